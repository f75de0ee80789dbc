"""Images/s of evaluate.py's protocol (MSeg: sliding windows, multi-scale, flip), windows batched across scales and
flips against the plain per-window loop (window_batch=1: each window with its mirror image, one forward each, as
MSeg's net_process runs them), in the same run, alternating rounds, best round of each.

    python -m tools.bench_protocol                                                 # MSeg's protocol: base 1080,
        # 6 scales + flip, 640 windows, 1080x1920 images; MiT-B0 with random weights (CPU: minutes per image)
    python -m tools.bench_protocol --base_size=360 --crop_size=256 --images=4      # a CPU-sized variant
    python -m tools.bench_protocol --backbone=mit_b5 --window_batch=16 --images=8  # on a GPU

Times evaluate.evaluate_images (inference + confusion matrix, what evaluate.py runs per image) on random images of
--height x --width whose labels are that size too. Prints images/s per variant, the ratio, how many pixels the two
variants label differently (tests/test_evaluate.py checks their probabilities agree to 1e-6), and writes a results
JSON with provenance (--out).
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from errors import run_main
from evaluation import evaluate_images
from images import short_side_size
from inference import Protocol, infer, window_starts
from model import ModelConfig, build_model
from provenance import provenance
from runtime import set_threads
from settings import parse_settings

MSEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


@dataclass
class BenchSettings:
    backbone: str = "mit_b0"       # random weights: speed does not depend on them
    embed_dim: int = 512
    classes: int = 20              # label embeddings per image (MSeg's test sets: 11 to 60)
    images: int = 2
    height: int = 1080             # image and label size
    width: int = 1920
    base_size: int = 1080
    crop_size: int = 640
    scales: list = field(default_factory=lambda: list(MSEG_SCALES))
    flip: bool = True
    window_batch: int = 8          # the batched variant's windows per forward (the plain loop: 1)
    rounds: int = 2                # plain and batched alternate; the best round of each is reported
    threads: int = 0               # torch.set_num_threads on CPU; 0 = from the usable cores
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = ""                  # results JSON ("" = none)


def count_windows(proto, height, width):
    """Windows per image over all scales (sliding), from MSeg's grid."""
    stride = math.ceil(proto.crop_size * proto.stride_ratio)
    total = 0
    for s in proto.scales:
        h, w = short_side_size(height, width, round(s * proto.base_size))
        total += len(window_starts(max(h, proto.crop_size), proto.crop_size, stride)) * \
            len(window_starts(max(w, proto.crop_size), proto.crop_size, stride))
    return total


def main(argv=None):
    s = parse_settings(BenchSettings, argv)
    set_threads(s.threads)
    device = torch.device(s.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=s.backbone, embed_dim=s.embed_dim, drop_path_rate=0.0,
                                    dropout=0.0)).to(device).eval()
    label_emb = F.normalize(torch.randn(s.classes, s.embed_dim, device=device), dim=1)   # (N, D)
    gen = torch.Generator().manual_seed(1)
    samples = [(torch.randn(3, s.height, s.width, generator=gen), torch.zeros(s.height, s.width, dtype=torch.int64),
                f"random{i}") for i in range(s.images)]
    variants = {"plain": 1, "batched": s.window_batch}
    protos = {name: Protocol(base_size=s.base_size, crop_size=s.crop_size, scales=list(s.scales), flip=s.flip,
                             sliding=True, window_batch=b, precision="fp32", compile=False)
              for name, b in variants.items()}  # eager: the protocol's loop is what is measured
    windows = count_windows(protos["plain"], s.height, s.width)
    print(f"{s.backbone}, {s.classes} classes, {s.images} images {s.height}x{s.width}, base {s.base_size}, scales "
          f"{s.scales}, flip {s.flip}, {s.crop_size} windows: {windows} per image ({windows * (1 + s.flip)} forwards "
          f"of one window in the plain loop); {device}, {torch.get_num_threads()} threads, fp32", flush=True)

    # warm-up (kernel selection, allocator): one window batch of each variant, not a whole protocol pass
    for proto in protos.values():
        infer(model, samples[0][0], label_emb, 10.0, Protocol(base_size=s.crop_size, crop_size=s.crop_size,
                                                                window_batch=proto.window_batch, precision="fp32",
                                                                compile=False))
    prov = provenance("-m tools.bench_protocol", sys.argv[1:] if argv is None else argv, device, "fp32")
    best, preds = {name: float("inf") for name in variants}, {name: [] for name in variants}
    for r in range(s.rounds):
        for name, proto in protos.items():
            keep = (lambda stem, image, pred, target, name=name: preds[name].append(pred)) if r == 0 else None
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            evaluate_images(model, samples, label_emb, 10.0, proto, on_pred=keep)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            best[name] = min(best[name], seconds)
            print(f"round {r + 1} {name:>7} (window_batch {variants[name]:>2}): {s.images / seconds:.4f} images/s "
                  f"({seconds / s.images:.1f} s per image)", flush=True)
    rates = {name: s.images / best[name] for name in variants}
    ratio = rates["batched"] / rates["plain"]
    differ = sum(int((a != b).sum()) for a, b in zip(preds["plain"], preds["batched"]))  # argmax labels
    print(f"best of {s.rounds}: plain {rates['plain']:.4f} images/s, batched {rates['batched']:.4f} images/s, "
          f"batched / plain {ratio:.2f}x; pixels labelled differently by the two: {differ}")
    if s.out:
        result = {"settings": asdict(s), "windows_per_image": windows, "images_per_s": rates, "ratio": ratio,
                  "best_seconds": best, "pixels_labelled_differently": differ, "provenance": prov}
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {s.out}")


if __name__ == "__main__":
    run_main(main)
