"""Peak memory and forward+backward time of L_HD for the three ways to meet label resolution (losses.RESIZE_MODES):

  logits      cosine logits at the embedding resolution (H/4), bilinearly upsampled to the labels
  embeddings  embeddings upsampled to the labels, then cosine logits
  labels      labels downsampled (nearest) to H/4, logits stay at H/4

Usage: python -m tools.bench_losses [--labels 238 --size 640 --dim 512 --batch 2 --repeats 3 --device cpu|cuda]
                                    [--variants logits,labels] [--threads 0]

Only the loss path is measured: random embeddings (B, D, H/4, W/4) that require grad, a random label table (N, D),
random targets (B, H, W) with 10% ignored, losses.source_nll + loss_dense, then backward to the embeddings. Each
variant runs in its own subprocess, so one variant's freed-but-kept heap cannot hide the next one's peak.
Peak memory: on CPU the growth of resource.getrusage(RUSAGE_SELF).ru_maxrss (peak resident set, which sees torch's
allocations; tracemalloc would not) from just before the first forward+backward to just after it; on CUDA
torch.cuda.max_memory_allocated() minus what was allocated before. Time: the median of --repeats further runs.

Measured with `python -m tools.bench_losses` (defaults), torch 2.13.0+cpu, 2 threads, on a 2-core machine shared with
other jobs (load average 4-7 during the run: wall times are pessimistic and noisy, CPU times less so, the memory
reproduced to 1 MiB across two runs):

| variant | peak memory (MiB) | fwd+bwd wall s | fwd+bwd CPU s (medians of 3) |
|---|---:|---:|---:|
| logits | 2250 | 6.30 | 6.20 |
| embeddings | 9626 | 44.78 | 24.18 |
| labels | 506 | 2.70 | 1.84 |

For scale: one (2, 238, 640, 640) fp32 logit tensor is 744 MiB, one (2, 512, 640, 640) embedding tensor 1600 MiB.
"""
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import run_main
from losses import RESIZE_MODES, loss_dense, source_nll
from runtime import set_threads
from settings import one_of, parse_settings, require

REPO = Path(__file__).resolve().parents[1]


def run_variant(mode, args):
    """One variant in this process -> {"peak_mib", "seconds"}."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    B, N, D, S = args.batch, args.labels, args.dim, args.size
    emb = torch.randn(B, D, S // 4, S // 4, device=device, requires_grad=True)  # (B, D, H/4, W/4)
    label_emb = torch.randn(N, D, device=device)  # (N, D)
    target = torch.randint(0, N, (B, S, S), device=device)  # (B, H, W)
    target[torch.rand(B, S, S, device=device) < 0.1] = -1
    scale = torch.tensor(1 / 0.07, device=device)

    def step():
        loss = loss_dense(*source_nll(emb, label_emb, scale, target, mode))
        loss.backward()
        emb.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    # one tiny pass first, so that one-time allocations (thread pools, autograd engine, kernels) are not counted
    tiny = torch.randn(1, D, 2, 2, device=device, requires_grad=True)
    loss_dense(*source_nll(tiny, label_emb, scale, target[:1, :8, :8], mode)).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # all threads of this process: less sensitive to other jobs
    return {"peak_mib": peak / 2**20, "seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu)}


@dataclass
class LossBenchSettings:
    labels: int = 238              # label embeddings N
    size: int = 640                # square crop side H = W (multiple of 4)
    dim: int = 512                 # embedding width D
    batch: int = 2                 # images B
    repeats: int = 3               # timed runs per variant (the median is reported)
    device: str = "cpu"            # cpu | cuda
    variants: list = field(default_factory=lambda: list(RESIZE_MODES))  # losses.RESIZE_MODES to measure
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores (runtime.set_threads)
    child: str = ""                # internal: run this one variant in this process, print JSON

    def validate(self):
        require(self, "labels size dim batch repeats", lambda v: v >= 1, "must be >= 1")
        require(self, "size", lambda v: v % 4 == 0, "must be a multiple of 4")
        require(self, "variants", lambda v: v and set(v) <= set(RESIZE_MODES), f"must be among {RESIZE_MODES}")
        if self.child:
            one_of(self, "child", RESIZE_MODES)


def main(argv=None):
    args = parse_settings(LossBenchSettings, argv)
    set_threads(args.threads, verbose=not args.child)
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    how = "ru_maxrss growth" if args.device == "cpu" else "cuda max_memory_allocated"
    print(f"L_HD forward+backward: {args.labels} labels, {args.size}x{args.size} labels, embeddings "
          f"{args.dim}x{args.size // 4}x{args.size // 4}, batch {args.batch}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; peak memory = {how}")
    print(f"| variant | peak memory (MiB) | fwd+bwd wall s | fwd+bwd CPU s (medians of {args.repeats}) |")
    print("|---|---:|---:|---:|")
    for mode in args.variants:
        cmd = [sys.executable, "-m", "tools.bench_losses", "--child", mode] + [
            f"--{k}={getattr(args, k)}" for k in ("labels", "size", "dim", "batch", "repeats", "device")] + [
            f"--threads={torch.get_num_threads()}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise RuntimeError(f"variant {mode} failed:\n{res.stderr[-2000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    run_main(main)
