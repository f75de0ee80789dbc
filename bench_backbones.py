"""Throughput of SegModel with different backbones in one run, on the same input (e.g. the CPU recipe's 360x480).

    python bench_backbones.py --backbones=efficientnet_lite0,mit_b0 --height=360 --width=480 --batch=2

Inference (eval, no grad) and a training step (forward + backward of a stand-in loss, no optimizer step), timed as
bench.py times them (its make_step / measure); the backbones take turns for `rounds` rounds and the best round of
each counts, so that load from other processes on a shared machine biases none. Prints img/s and each backbone's
speed relative to the first.
"""
import sys
from dataclasses import dataclass

import torch

from bench import make_step, measure, parse_args
from model import ModelConfig, build_model


@dataclass
class BenchSettings:
    backbones: str = "efficientnet_lite0,mit_b0"  # comma-separated; ratios are against the first
    height: int = 360
    width: int = 480
    batch: int = 2
    steps: int = 5  # timed iterations per phase (after `warmup`)
    warmup: int = 2
    rounds: int = 3
    embed_dim: int = 384  # the CPU recipe's MiniLM table width
    amp: bool = False  # bf16 autocast
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 0  # torch.set_num_threads on CPU; 0 = torch's default


def main():
    cfg = parse_args(BenchSettings(), sys.argv[1:])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(cfg)
    print(f"torch {torch.__version__}, device {cfg.device}, threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.height, cfg.width, device=cfg.device)
    x = x.contiguous(memory_format=torch.channels_last)  # as SegModel.forward makes it
    forward = lambda m, x: m(x)["emb"] if m.training else m(x)  # noqa: E731
    names = cfg.backbones.split(",")
    steps = {}
    for name in names:
        model = build_model(ModelConfig(backbone=name, embed_dim=cfg.embed_dim)).to(cfg.device)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"(backbone {sum(p.numel() for p in model.backbone.parameters()) / 1e6:.2f}M)")
        for phase in ("infer", "train"):
            steps[name, phase] = make_step(model, forward, x, cfg, phase)
    best = {}
    for r in range(cfg.rounds):
        for key, step in steps.items():
            speed, _ = measure(step, cfg)
            print(f"round {r}: {key[0]:>18} {key[1]:>5}: {speed:8.2f} img/s")
            best[key] = max(best.get(key, 0.0), speed)
    print(f"best of rounds, {cfg.height}x{cfg.width}, batch {cfg.batch}:")
    for phase in ("infer", "train"):
        for name in names:
            print(f"  {phase:>5} {name:>18}: {best[name, phase]:8.2f} img/s   "
                  f"{best[name, phase] / best[names[0], phase]:.2f}x {names[0]}")


if __name__ == "__main__":
    main()
