"""Throughput and peak memory of the model, against HF transformers' SegFormer on the same settings when installed.

    python -m tools.bench_model --backbone=mit_b0 --size=512 --batch=2 --steps=10
    python -m tools.bench_model --backbone=mit_b5 --size=640 --batch=8 --amp=True --compile=True      # on a GPU
    python -m tools.bench_model --compile=True --amp=True --hf_peer=True   # ours compiled bf16, HF eager fp32

Prints images/s for inference (eval, no grad) and for a training step (train mode, forward + backward of a
stand-in loss; no optimizer step, the same for both models), the peak memory of each phase, and ours / HF ratios.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU the peak process RSS above the RSS before the phase,
sampled every millisecond by a thread (torch's CPU allocator gives large blocks back to the OS, so this tracks
tensor memory; tracemalloc cannot see torch allocations).
"""
import threading
import time
from dataclasses import dataclass

import torch

from errors import run_main
from model import ModelConfig, build_model
from runtime import set_threads
from settings import parse_settings


@dataclass
class BenchConfig:
    backbone: str = "mit_b0"
    size: int = 512  # square input, pixels
    batch: int = 2
    steps: int = 10  # timed iterations per phase (after `warmup`)
    warmup: int = 2
    rounds: int = 3  # ours and HF alternate; the best round of each is reported
    embed_dim: int = 512
    compile: bool = False  # torch.compile both models
    channels_last: bool = False  # model and input in channels_last memory format
    amp: bool = False  # bf16 autocast (CPU and CUDA)
    hf_peer: bool = False  # HF eager fp32 whatever compile/amp say (the peer the speed targets name): ours as set
    hf: bool = True  # also measure HF SegformerForSemanticSegmentation (MiT backbones, when installed)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int = 0  # torch.set_num_threads on CPU; 0 = from the usable cores (runtime.set_threads)


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every millisecond (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base


def make_step(model, forward, x, cfg, phase, bf16):
    amp = torch.autocast(device_type=cfg.device, dtype=torch.bfloat16, enabled=bf16)

    def step():
        model.train(phase == "train")
        if phase == "infer":
            with torch.inference_mode(), amp:
                forward(model, x)
        else:
            with amp:
                out = forward(model, x)
            out.float().square().mean().backward()  # stand-in loss touching every output
            for p in model.parameters():
                p.grad = None
    return step


def measure(step, cfg):
    """(images/s, peak bytes) of `steps` calls of step(), after `warmup` calls."""
    cuda = cfg.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(cfg.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            step()
        sync()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.bytes
    return cfg.batch * cfg.steps / dt, peak


def main(argv=None):
    cfg = parse_settings(BenchConfig, argv)
    set_threads(cfg.threads)
    print(cfg)
    print(f"torch {torch.__version__}, device {cfg.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cfg.device == 'cuda' else ''}, threads {torch.get_num_threads()}, "
          f"peak memory = {'cuda max_memory_allocated' if cfg.device == 'cuda' else 'sampled RSS above phase start'}")
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=cfg.device).contiguous(memory_format=fmt)

    model = build_model(ModelConfig(backbone=cfg.backbone, embed_dim=cfg.embed_dim)).to(cfg.device, memory_format=fmt)
    runs = {"ours": (model, lambda m, x: m(x)["emb"] if m.training else m(x))}
    if cfg.hf and cfg.backbone.startswith("mit"):
        try:
            import transformers
        except ImportError:
            print("transformers not installed: measuring ours only")
        else:
            from segformer import MIT_VARIANTS
            dims, depths = MIT_VARIANTS[cfg.backbone]
            hf_cfg = transformers.SegformerConfig(depths=depths, hidden_sizes=dims, num_labels=cfg.embed_dim,
                                                  decoder_hidden_size=model.decoder.fuse.out_channels)
            hf = transformers.SegformerForSemanticSegmentation(hf_cfg).to(cfg.device, memory_format=fmt)
            print(f"HF transformers {transformers.__version__}, attention: {hf.config._attn_implementation}")
            runs["hf"] = (hf, lambda m, x: m(pixel_values=x).logits)
    steps = {}
    for name, (m, forward) in runs.items():
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
        peer = name == "hf" and cfg.hf_peer
        if cfg.compile and not peer:
            m = torch.compile(m)
        for phase in ("infer", "train"):
            steps[name, phase] = make_step(m, forward, x, cfg, phase, cfg.amp and not peer)
    # Models take turns for `rounds` rounds and the best round counts, so that load from other processes on a
    # shared machine (which comes and goes) biases neither side.
    best = {}
    for r in range(cfg.rounds):
        for key, step in steps.items():
            speed, peak = measure(step, cfg)
            print(f"round {r}: {key[0]:>4} {key[1]:>5}: {speed:8.2f} img/s   peak {peak / 2**20:8.1f} MiB")
            if key not in best or speed > best[key][0]:
                best[key] = (speed, peak)
    print("best of rounds:")
    for (name, phase), (speed, peak) in best.items():
        print(f"  {name:>4} {phase:>5}: {speed:8.2f} img/s   peak {peak / 2**20:8.1f} MiB")
    if "hf" in runs:
        for phase in ("infer", "train"):
            (a, ma), (b, mb) = best["ours", phase], best["hf", phase]
            print(f"ours / hf {phase}: speed {a / b:.2f}x, peak memory {ma / max(mb, 1):.2f}x")


if __name__ == "__main__":
    run_main(main)
