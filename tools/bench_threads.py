"""Training speed at the automatic thread count (runtime.set_threads) against fixed counts, on an idle machine and
beside one busy process: does the default pick well?

    python -m tools.synthetic_data --out data/synthetic                # the demo's data and label table (made here
    python label_table.py --clip_random_init --out=runs/demo/label_table.pt   # if missing, for the default config)
    python -m tools.bench_threads [--config configs/demo_synthetic.yaml] [--threads 0,1,2] [--max_steps 12]
                                  [--rounds 3] [--busy true] [--out docs/results/bench_threads.json]

Each measurement is one fresh `python train.py CONFIG --threads=T --max_steps=N --log_every=1` (a process as a user
starts it, OMP_NUM_THREADS unset, so T = 0 is the automatic count, which train.py prints and this records). Its
seconds per step come from its own log.jsonl (images_per_s there is cumulative: consecutive records give each step's
time); the first `skip` steps (DataLoader start, first allocations) are left out and the median of the others is the
run's figure. Settings alternate within a round, in an order rotated every round, idle and busy runs taking turns,
so a slow spell of a shared machine lands on all of them. "busy" = one `python -c 'while True: pass'` started beside
the run and killed after it. Reported per condition: images/s of each setting (median over rounds) and
default / best (1.0 = the automatic count was the fastest).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataset_yaml import source_fields
from errors import DataError, run_main
from runtime import usable_cores
from settings import parse_settings, read_yaml, require, required

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "configs/demo_synthetic.yaml"
DEMO_INPUTS = [["-m", "tools.synthetic_data", "--out", "data/synthetic"],  # what demo.sh runs before training
               ["label_table.py", "--clip_random_init", "--out=runs/demo/label_table.pt"]]


@dataclass
class ThreadBenchSettings:
    config: str = DEMO_CONFIG      # training config (relative paths in it: from the repository root)
    threads: list = field(default_factory=lambda: [0, 1, 2])  # train.py --threads per run; 0 = the automatic count
    max_steps: int = 12            # steps per run
    skip: int = 2                  # first steps of a run left out of its figure (warm-up)
    rounds: int = 3                # every setting once per round and condition; figures are medians over rounds
    busy: bool = True              # also run each setting beside one busy process
    out: str = "docs/results/bench_threads.json"  # results JSON ("" = none)

    def validate(self):
        required(self, "config")
        require(self, "threads", lambda v: v and all(t >= 0 for t in v), "must be counts >= 0 (0 = automatic)")
        require(self, "rounds", lambda v: v >= 1, "must be >= 1")
        require(self, "skip", lambda v: v >= 1, "must be >= 1 (the first step's time includes the start)")
        require(self, "max_steps", lambda v: v >= self.skip + 2, f"must be >= skip + 2 = {self.skip + 2}")


def step_seconds(log: Path, skip: int, images_per_step: int) -> list[float]:
    """Seconds of each step after the first `skip`, from train.py's log.jsonl written with log_every=1. Its
    images_per_s is images since the loop started / seconds since then, so elapsed_k = images_k / rate_k."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    elapsed = [r["step"] * images_per_step / r["images_per_s"] for r in records]
    return [b - a for a, b in zip(elapsed[skip - 1:], elapsed[skip:])]


def train_once(s, config: Path, threads: int, busy: bool, images_per_step: int) -> dict:
    """One train.py run -> {"s_per_step": median, "threads_used": what train.py printed}."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK")}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "train.py", str(config), f"--threads={threads}", f"--out_dir={out}",
                                   f"--max_steps={s.max_steps}", "--log_every=1", f"--save_every={s.max_steps}"],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"train.py --threads={threads} failed:\n{done.stdout[-1500:]}{done.stderr[-3000:]}")
            seconds = step_seconds(Path(out) / "log.jsonl", s.skip, images_per_step)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    used = next(line for line in done.stdout.splitlines() if line.startswith("threads: "))
    return {"s_per_step": statistics.median(seconds), "threads_used": used}


def make_demo_inputs(config: dict) -> None:
    """The demo's synthetic data and random label table, as demo.sh makes them, where they are missing."""
    data_root = REPO / config.get("data_root", "data")  # as train.py run from the repository root reads it
    sources = [Path(d["root"], d["list"]) for d, _ in (source_fields(e, data_root) for e in config["sources"])]
    if all(p.is_file() for p in sources) and (REPO / config["label_table"]).is_file():
        return
    for cmd in DEMO_INPUTS:
        print("making the demo's inputs: python " + " ".join(cmd), flush=True)
        subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, capture_output=True)


def main(argv=None):
    s = parse_settings(ThreadBenchSettings, argv)
    config_path = Path(s.config) if Path(s.config).is_absolute() else REPO / s.config
    if not config_path.is_file():
        raise DataError(f"--config={s.config}: no such file (a train.py config)")
    config = read_yaml(config_path)
    if s.config == DEMO_CONFIG:
        make_demo_inputs(config)
    images_per_step = config.get("batch_size", 2) * config.get("accum_steps", 1)
    conditions = ["idle", "busy"] if s.busy else ["idle"]
    runs = {c: {t: [] for t in s.threads} for c in conditions}
    used = {}
    print(f"{s.config}: {s.max_steps} steps per run (first {s.skip} untimed), {images_per_step} images per step; "
          f"{usable_cores()} usable cores; threads {s.threads}, {s.rounds} rounds", flush=True)
    for r in range(s.rounds):
        order = s.threads[r % len(s.threads):] + s.threads[:r % len(s.threads)]  # rotated every round
        for threads in order:
            for condition in conditions:
                run = train_once(s, config_path, threads, condition == "busy", images_per_step)
                runs[condition][threads].append(run["s_per_step"])
                used[threads] = run["threads_used"]
                print(f"round {r + 1} {condition:4s} --threads={threads}: {run['s_per_step']:.3f} s/step "
                      f"({images_per_step / run['s_per_step']:.1f} images/s); {run['threads_used']}", flush=True)
    summary = {}
    for condition in conditions:
        rate = {t: images_per_step / statistics.median(runs[condition][t]) for t in s.threads}
        best = max(rate, key=rate.get)
        summary[condition] = {"images_per_s": {str(t): rate[t] for t in s.threads}, "best_threads": best,
                              "default_over_best": rate[0] / rate[best] if 0 in rate else None}
        print(f"{condition}: " + ", ".join(f"--threads={t} {rate[t]:.2f} images/s" for t in s.threads)
              + (f"; default / best = {summary[condition]['default_over_best']:.2f}" if 0 in rate else ""))
    if s.out:
        out = Path(s.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": asdict(s), "usable_cores": usable_cores(),
                                   "automatic": used.get(0), "s_per_step": {c: {str(t): v for t, v in runs[c].items()}
                                                                             for c in conditions},
                                   "summary": summary}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
