"""Relative speed of SegModel with different backbones, on the same input (e.g. the CPU recipe's 360x480).

    python -m tools.bench_backbones --backbones=efficientnet_lite0,mit_b0 --batch=2 --pairs=12 --threads=1
    python -m tools.bench_backbones --backbones=efficientnet_lite0,efficientnet_lite0+imagenet,efficientnet_lite2 \
        --batch=1 --labels=15                     # with the frozen ImageNet branch: inference scores 15 labels

Inference (eval, inference_mode) and a training step (train mode, forward + backward of a stand-in loss, no
optimizer step). The backbones alternate call by call and each reports its median seconds per call and the median
over rounds of its time / the first backbone's time, with quartiles: on a machine shared with other processes,
whose load comes and goes over seconds, per-round ratios stay tight where best-of-N throughputs of separate runs
(tools/bench_model.py's method) swung 2-3x between rounds. A name ending in `+imagenet` is that backbone with the frozen
ImageNet branch (model.ImageNetBranch); inference then times model.label_logits for --labels labels (every model,
for the same work after the network), training the trainable part as usual.
"""
import statistics
import time
from dataclasses import dataclass, field

import torch

from errors import run_main
from model import ModelConfig, build_model, label_logits
from runtime import set_threads
from settings import parse_settings


@dataclass
class BenchSettings:
    backbones: list = field(default_factory=lambda: ["efficientnet_lite0", "mit_b0"])  # ratios are against the first
    height: int = 360
    width: int = 480
    batch: int = 2
    pairs: int = 12  # timed rounds per phase, each calling every backbone once (after one warm-up round)
    embed_dim: int = 384  # the CPU recipe's MiniLM table width
    labels: int = 0  # > 0: inference scores this many labels (model.label_logits), as evaluate.py does
    threads: int = 0  # torch.set_num_threads; 0 = from the usable cores (runtime.set_threads)


def main(argv=None):
    cfg = parse_settings(BenchSettings, argv)
    set_threads(cfg.threads)
    print(cfg)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.height, cfg.width).contiguous(memory_format=torch.channels_last)
    models = {b: build_model(ModelConfig(backbone=b.removesuffix("+imagenet"), embed_dim=cfg.embed_dim,
                                         imagenet_branch=b.endswith("+imagenet"))) for b in cfg.backbones}
    label_emb = torch.nn.functional.normalize(torch.randn(max(cfg.labels, 1), cfg.embed_dim), dim=1)  # (N, D)
    for name, m in models.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters "
              f"(backbone {sum(p.numel() for p in m.backbone.parameters()) / 1e6:.2f}M)")

    def infer(m):
        m.eval()
        with torch.inference_mode():
            label_logits(m, x, label_emb, m.scale()) if cfg.labels else m(x)

    def train(m):
        m.train()
        m(x)["emb"].float().square().mean().backward()  # stand-in loss touching every output
        for p in m.parameters():
            p.grad = None

    first = next(iter(models))
    for phase, step in (("infer", infer), ("train", train)):
        for m in models.values():
            step(m)  # warm-up
        times = {name: [] for name in models}
        for _ in range(cfg.pairs):
            for name, m in models.items():
                t0 = time.perf_counter()
                step(m)
                times[name].append(time.perf_counter() - t0)
        for name in models:
            ratios = [a / b for a, b in zip(times[name], times[first])]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"{phase} {cfg.height}x{cfg.width} batch {cfg.batch}: {name:>18} "
                  f"{statistics.median(times[name]):6.2f} s/call ({cfg.batch / statistics.median(times[name]):5.2f} "
                  f"img/s), time / {first} {statistics.median(ratios):.2f} (quartiles {q[0]:.2f}..{q[2]:.2f})")


if __name__ == "__main__":
    run_main(main)
