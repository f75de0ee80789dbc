"""train.py end to end on tiny synthetic data: DDP == one process, kill -9 / SIGTERM resume == uninterrupted,
atomic checkpoints, bf16 autocast on CPU, non-finite loss reporting, the learning-rate schedule."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from errors import ConfigError, DivergedError
import train
from run_dir import save_checkpoint
from data_fixtures import write_tiny_run
from label_spec import load_label_spec
from losses import compute_losses

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data, a random label table and a config for a tiny MiT-B0 run (data_fixtures.write_tiny_run)."""
    root = tmp_path_factory.mktemp("train")
    write_tiny_run(root, max_steps=STEPS)
    return root


def run(setup, out, *flags, torchrun=0, background=False):
    cmd = [sys.executable, "train.py", str(setup / "config.yaml"), f"--out_dir={out}", *flags]
    if torchrun:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def final(out, step=STEPS):
    return torch.load(Path(out) / f"ckpt_{step:08d}.pt", map_location="cpu", weights_only=True)


def wait_for(path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.stdout.read()[-3000:]}"
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup / "uninterrupted"
    log = run(setup, out)
    assert f"step {STEPS}/{STEPS}" in log
    return final(out)


@pytest.mark.slow
def test_checkpoint_is_self_describing(uninterrupted):
    ckpt = uninterrupted
    assert ckpt["step"] == STEPS and ckpt["model_args"]["backbone"] == "mit_b0"
    assert ckpt["config"]["embed_dim"] == 32 and len(ckpt["label_table"]["names"]) == len(load_label_spec().sentences)
    assert {"model", "optimizer", "scaler", "sampler", "label_table"} <= set(ckpt)
    # what evaluate.py calls seen: the keys the two sources' classes map to (names.txt order), and their taxonomies
    mapping = load_label_spec().datasets["camvid-segnet"]
    names = (Path(ckpt["config"]["sources"][0]["root"]) / "names.txt").read_text().split()
    assert ckpt["trained_keys"] == list(dict.fromkeys(mapping[n] for n in names if mapping[n] != "ignore"))
    assert ckpt["taxonomies"] == {"a": "camvid-segnet", "b": "camvid-segnet"}


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(setup, uninterrupted):
    out = setup / "killed"
    proc = run(setup, out, background=True)
    wait_for(out / "ckpt_00000003.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / f"ckpt_{STEPS:08d}.pt").exists(), "the run finished before it could be killed"
    log = run(setup, out, "--resume=auto")
    assert "resumed from" in log
    resumed = final(out)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(setup, uninterrupted):
    out = setup / "terminated"
    proc = run(setup, out, background=True)
    wait_for(out / "ckpt_00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    log = proc.stdout.read()
    assert "stopped by signal" in log, log[-2000:]
    stopped_at = max(int(p.stem.split("_")[1]) for p in out.glob("ckpt_*.pt"))
    assert 2 <= stopped_at < STEPS
    run(setup, out, "--resume=auto")
    resumed = final(out)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_over_the_same_global_batches(setup):
    # SGD: Adam's division by sqrt(v) would magnify float summation-order noise in near-zero gradients
    one = setup / "one"
    two = setup / "two"
    run(setup, one, "--batch_size=4", "--optimizer=sgd", "--lr=0.05", "--max_steps=3")
    run(setup, two, "--batch_size=2", "--optimizer=sgd", "--lr=0.05", "--max_steps=3", torchrun=2)
    a, b = final(one, 3)["model"], final(two, 3)["model"]
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)
    initial = train.build_model(train.ModelConfig(**final(one, 3)["model_args"])).state_dict()
    moved = sum(not torch.allclose(initial[k].float(), a[k].float()) for k in a if a[k].is_floating_point())
    assert moved > 100  # the runs trained: equality is not two untouched initialisations


@pytest.mark.slow
def test_bf16_autocast_runs_on_cpu(setup, monkeypatch, capsys):
    """--amp=bf16 on a CPU: the network's output reaches the losses in bf16 at every step (autocast ran), the losses
    are fp32, the run says and records bf16, and the fp32 weights it saves are finite."""
    seen = []

    def recording(out, batch, label_emb, scale, weights, **options):
        terms = compute_losses(out, batch, label_emb, scale, weights, **options)
        seen.append((out["emb"].dtype, terms["loss"].dtype))
        return terms

    monkeypatch.setattr(train, "compute_losses", recording)
    out = setup / "bf16"
    train.main([str(setup / "config.yaml"), f"--out_dir={out}", "--amp=bf16", "--max_steps=2", "--threads=1"])
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert "precision: bf16 (as set; cpu" in capsys.readouterr().out
    ckpt = final(out, 2)
    assert ckpt["precision"] == "bf16"
    assert all(torch.isfinite(v).all() and v.dtype != torch.bfloat16 for v in ckpt["model"].values()
               if v.is_floating_point())


def test_half_written_checkpoint_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    good = tmp_path / "ckpt_00000001.pt"
    save_checkpoint(good, {"step": 1, "model": {}, "optimizer": {}}, keep_last=3)

    def dies_midway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt_00000002.pt", {"step": 2, "model": {}, "optimizer": {}}, keep_last=3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no ckpt_2, no temp file left behind
    assert torch.load(good)["step"] == 1


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path / f"ckpt_{step:08d}.pt", {"step": step, "model": {}, "optimizer": {}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_terms_and_sources(setup, monkeypatch):
    def nan_losses(out, batch, label_emb, scale, weights, **options):
        nan = out["emb"].sum() * float("nan")
        return {"loss": nan, "loss_dense": nan}

    monkeypatch.setattr(train, "compute_losses", nan_losses)
    with pytest.raises(DivergedError, match=r"step 0.*loss_dense.*'a'"):
        train.main([str(setup / "config.yaml"), f"--out_dir={setup / 'nan'}"])


@pytest.mark.slow
def test_loss_settings_reach_the_losses(setup, monkeypatch):
    class Seen(Exception):
        pass

    def record(out, batch, label_emb, scale, weights, **options):
        raise Seen(weights, options)

    monkeypatch.setattr(train, "compute_losses", record)
    with pytest.raises(Seen) as seen:
        train.main([str(setup / "config.yaml"), f"--out_dir={setup / 'options'}", "--loss_resize=labels",
                    "--coarse_drop=0.25", "--weight_aux=0.5"])
    weights, options = seen.value.args
    assert options == {"resize": "labels", "drop_fraction": 0.25} and weights["aux"] == 0.5
    with pytest.raises(ConfigError, match="loss_resize='pixels' must be one of"):
        train.main([str(setup / "config.yaml"), f"--out_dir={setup / 'options'}", "--loss_resize=pixels"])


def test_poly_schedule_by_hand():
    s = train.TrainSettings(lr=1.0, warmup_steps=4, max_steps=10, poly_power=1.0)
    assert [train.poly_lr(i, s) for i in (0, 3)] == [0.25, 1.0]
    assert train.poly_lr(4, s) == pytest.approx(0.6) and train.poly_lr(10, s) == 0.0


def test_param_groups_split_heads_and_exempt_norms_biases_and_temperature():
    model = train.build_model(train.ModelConfig(backbone="mit_b0", embed_dim=8))
    s = train.TrainSettings(head_lr_mult=10.0, weight_decay=0.01)
    groups = train.param_groups(model, s)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["logit_scale"])]["weight_decay"] == 0.0
    for name, p in named.items():
        group = by_id[id(p)]
        assert group["lr_mult"] == (1.0 if name.startswith("backbone.") else 10.0), name
        if p.ndim == 1:
            assert group["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(named)


@pytest.mark.slow
def test_log_lines_carry_time_and_the_run_ends_with_a_summary(setup, tmp_path):
    out = tmp_path / "summary"
    before = time.time()
    log = run(setup, out, "--max_steps=3", "--warmup_steps=5")
    after = time.time()
    assert "warning: max_steps=3 < warmup_steps=5: the run ends in the warm-up, its learning rate never reaches " \
           "lr=0.001" in log
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert before < records[0]["time"] <= records[-1]["time"] < after
    for r in records:  # elapsed: since this run started; batch 2, one process: 2 images a step
        assert r["elapsed_s"] > 0 and r["images_per_s"] * r["elapsed_s"] == pytest.approx(2 * r["step"], rel=1e-2)
    summary = log.strip().splitlines()[-1]
    assert re.fullmatch(r"trained steps 1\.\.3 \(3 steps, 6 images\) in \d+\.\d min, \d+\.\d images/s; "
                        rf"last checkpoint {re.escape(str(out / 'ckpt_00000003.pt'))}", summary), summary
    resumed = run(setup, out, "--resume=auto", "--max_steps=4")
    assert re.search(r"^trained steps 4\.\.4 \(1 steps, 2 images\)", resumed.strip().splitlines()[-1]), resumed
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
