"""tools/bench_threads.py: its step-time arithmetic by hand, and a smoke run on a tiny config (3 steps, one setting;
the figures themselves are not checked: this is not a timed test)."""
import json

import pytest

from data_fixtures import write_tiny_run
from tools.bench_threads import main, step_seconds


def test_step_seconds_from_the_cumulative_rates_of_the_log(tmp_path):
    elapsed = [2.0, 3.0, 4.5, 5.0]  # seconds since the loop started, at the end of steps 1..4; 4 images per step
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": k, "images_per_s": 4 * k / t}) + "\n" for k, t in enumerate(elapsed, 1)))
    assert [round(x, 9) for x in step_seconds(log, 1, 4)] == [1.0, 1.5, 0.5]
    assert [round(x, 9) for x in step_seconds(log, 2, 4)] == [1.5, 0.5]


@pytest.mark.slow
def test_smoke_one_setting_on_a_tiny_run(tmp_path, capsys):
    write_tiny_run(tmp_path)
    out = tmp_path / "bench.json"
    main([f"--config={tmp_path / 'config.yaml'}", "--threads=1", "--max_steps=3", "--skip=1", "--rounds=1",
          "--busy=false", f"--out={out}"])
    result = json.loads(out.read_text())
    assert list(result["s_per_step"]) == ["idle"] and len(result["s_per_step"]["idle"]["1"]) == 1
    assert result["s_per_step"]["idle"]["1"][0] > 0
    assert result["summary"]["idle"]["best_threads"] == 1 and result["summary"]["idle"]["default_over_best"] is None
    assert "--threads=1" in capsys.readouterr().out
