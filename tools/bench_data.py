"""Data throughput: images/second per worker for decode + augment at the paper's settings on the real data, and the
DataLoader settings training should use.

    python -m tools.bench_data [--config configs/cpu_camvid_facade_b0.yaml] [--samples 60]
                               [--short_side 1080 --crop 640] [--loader_workers 2] [--gpu_images_per_s 25]

"Per worker" = one process, one thread (a DataLoader worker runs torch with one thread), timed on each source and
on the balanced mix through collate. The DataLoader run checks that workers scale and that collation and the
worker->trainer transfer add little. --gpu_images_per_s is what one GPU consumes (an assumption to set for your
model; SegFormer-B5 at 640x640 in bf16 is of the order of 20-30 images/s on an A100-class GPU).
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import labels
from dataset_yaml import load_sources
from errors import run_main
from sampler import BalancedSampler
from settings import parse_settings, read_yaml, require
from transforms import TrainTransform

REPO = Path(__file__).resolve().parents[1]


def config_sources(config: Path):
    """The `sources` of a training config and the label spec with their own labels, read as train.py run from the
    repository root reads them (relative roots under its data_root, default data/)."""
    d = read_yaml(config)
    return load_sources(d["sources"], REPO / d.get("data_root", "data"))


def rate(fn, n: int) -> float:
    fn(0)  # warm-up: first-touch file cache, imports
    t0 = time.perf_counter()
    for k in range(1, n + 1):
        fn(k)
    return n / (time.perf_counter() - t0)


@dataclass
class DataBenchSettings:
    config: str = str(REPO / "configs" / "cpu_camvid_facade_b0.yaml")  # training config whose `sources` are measured
    samples: int = 60              # samples timed per source
    short_side: int = 1080         # TrainTransform's short side
    crop: int = 640                # TrainTransform's crop
    batch_size: int = 2            # images per GPU per step
    loader_workers: int = 2        # workers for the DataLoader check (0 = skip)
    gpu_images_per_s: float = 25.0  # what one GPU consumes (an assumption for your model)

    def validate(self):
        require(self, "samples short_side crop batch_size gpu_images_per_s", lambda v: v > 0, "must be > 0")
        require(self, "loader_workers", lambda v: v >= 0, "must be >= 0")


def main(argv=None):
    args = parse_settings(DataBenchSettings, argv)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config={args.config}: no such file (a training config with `sources`)")

    torch.set_num_threads(1)  # as inside a DataLoader worker
    sources, spec = config_sources(Path(args.config))
    keys = data.source_label_keys(sources, spec)
    table = labels.LabelTable(keys, keys, torch.eye(len(keys)), "bench (rows only)")
    transform = TrainTransform(short_side=args.short_side, crop_size=args.crop)
    ds = data.MultiSourceDataset(sources, spec, table, transform, seed=0)
    print(f"settings: {transform}")
    print(f"cpu: {os.cpu_count()} cores visible; python {sys.version.split()[0]}, torch {torch.__version__}")

    n = args.samples
    per_source = {}
    for s, src in enumerate(ds.sources):
        per_source[src.cfg.name] = rate(lambda k: ds[(s, k % len(src), 0, k)], n)
        print(f"  {src.cfg.name:14s} decode+augment: {per_source[src.cfg.name]:6.1f} images/s per worker")
    sampler = BalancedSampler(ds.source_sizes, batch_size=args.batch_size, seed=0)
    batches = [b for _, b in zip(range(n // args.batch_size + 1), sampler)]
    mixed = rate(lambda k: data.collate([ds[key] for key in batches[k % len(batches)]]),
                 n // args.batch_size) * args.batch_size
    print(f"  balanced mix + collate:       {mixed:6.1f} images/s per worker")

    if args.loader_workers:
        loader = data.make_loader(ds, sampler, workers=args.loader_workers, pin_memory=torch.cuda.is_available())
        it = iter(loader)
        next(it)  # worker start-up is paid once (persistent workers)
        t0, seen = time.perf_counter(), 0
        for _ in range(n // args.batch_size):
            seen += len(next(it)["source"])
        loaded = seen / (time.perf_counter() - t0)
        print(f"  DataLoader, {args.loader_workers} workers:          {loaded:6.1f} images/s "
              f"({loaded / args.loader_workers:.1f} per worker; this machine has {os.cpu_count()} shared cores)")

    workers = max(2, math.ceil(1.5 * args.gpu_images_per_s / mixed))  # 1.5x headroom for slow images and jitter
    print("DataLoader settings for training (data.make_loader):")
    print(f"  workers per GPU      {workers}   (= ceil(1.5 x {args.gpu_images_per_s:g} GPU images/s / {mixed:.1f} "
          f"images/s per worker); needs that many free cores per GPU")
    print("  pin_memory           True on CUDA (page-locked batches, non-blocking copies in data.to_device)")
    print("  prefetch_factor      4    (batches queued per worker: absorbs slow decodes, ~16 MB per 640 crop batch)")
    print("  persistent_workers   True (sources and file handles stay open across epochs; the epoch travels in the"
          " sampler's keys)")
    print(f"  batch_sampler        BalancedSampler(batch_size={args.batch_size} per GPU)")


if __name__ == "__main__":
    run_main(main)
