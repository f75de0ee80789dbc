"""evaluate.py's evaluation in fp32 and in bf16 (--precision), image by image in the same run: how often the label
differs, the mIoU of each, and the speed of each.

    python -m tools.compare_precision --checkpoint=CKPT --dataset=camvid-segnet --base_size=360 --sliding=false
    python -m tools.compare_precision --checkpoint=CKPT --dataset=camvid-11 --root=R --list=L --embeddings=T.pt

Per image both precisions run evaluate.py's protocol (inference.infer; only the network in bf16 autocast), the
order flipping from image to image; the seconds of each are summed. On a CPU without bf16 units (see
runtime.cpu_has_bf16, printed) oneDNN emulates bf16, so the speed there says nothing about a CPU with them.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import run_main
from dataset_yaml import load_dataset_config
from evaluation import EvalDataset, confusion_matrix, metrics_from_confusion
from inference import Protocol, infer
from label_source import load_for_inference
from label_spec import label_texts
from provenance import provenance, repo_relative
from runtime import cpu_has_bf16, set_threads
from settings import parse_settings


@dataclass
class CompareSettings(Protocol):   # + the inference protocol's settings; precision is ignored: both are run
    checkpoint: str = ""
    dataset: str = "camvid-segnet"  # evaluate.py's dataset name or YAML
    root: str = ""
    list: str = ""
    embeddings: str = ""           # label table; "" = the checkpoint's own training table
    max_images: int = 0            # 0 = all
    threads: int = 0               # torch.set_num_threads; 0 = from the usable cores
    out: str = ""                  # results JSON ("" = none)


def main(argv=None):
    s = parse_settings(CompareSettings, argv)
    set_threads(s.threads)
    cfg, spec = load_dataset_config(s.dataset, s.root, s.list)
    dataset = EvalDataset(cfg, spec, s.max_images)
    model, _, label_emb, scale = load_for_inference(s.checkpoint, dataset.keys, label_texts(spec, dataset.keys),
                                                       s.embeddings)
    n = len(dataset.keys)
    protos = {p: Protocol(**{**s.protocol(), "precision": p}) for p in ("fp32", "bf16")}
    conf = {p: torch.zeros(n, n, dtype=torch.int64) for p in protos}
    seconds = {p: 0.0 for p in protos}
    differ = differ_labelled = pixels = labelled = 0
    print(f"{dataset.name}: {len(dataset)} images; CPU bf16 units: {cpu_has_bf16()}; {torch.get_num_threads()} "
          f"thread(s)", flush=True)
    for i in range(len(dataset)):
        image, target, _ = dataset[i]
        pred = {}
        for p in (list(protos) if i % 2 == 0 else list(protos)[::-1]):
            start = time.perf_counter()
            prob, _ = infer(model, image, label_emb, scale, protos[p], out_size=target.shape)  # (N, H, W)
            pred[p] = prob.argmax(0)                                                         # (H, W)
            seconds[p] += time.perf_counter() - start
            conf[p] += confusion_matrix(pred[p], target, n)
        changed = pred["fp32"] != pred["bf16"]
        keep = (target >= 0) & (target < n)
        differ, differ_labelled = differ + int(changed.sum()), differ_labelled + int(changed[keep].sum())
        pixels, labelled = pixels + changed.numel(), labelled + int(keep.sum())
    metrics = {p: metrics_from_confusion(c) for p, c in conf.items()}
    result = {"dataset": dataset.name, "images": len(dataset), "checkpoint": repo_relative(s.checkpoint), "protocol": s.protocol(),
              "cpu_has_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(),
              "pixels": pixels, "pixels_differing": differ, "labelled_pixels": labelled,
              "labelled_pixels_differing": differ_labelled,
              "miou": {p: m["miou"] for p, m in metrics.items()},
              "images_per_s": {p: len(dataset) / t for p, t in seconds.items()},
              "provenance": provenance("-m tools.compare_precision", sys.argv[1:] if argv is None else argv, "cpu",
                                       "fp32 and bf16", files={"checkpoint": s.checkpoint,
                                                               "label_table": s.embeddings})}
    print(f"label differs at {100 * differ / pixels:.3f}% of pixels ({100 * differ_labelled / labelled:.3f}% of "
          f"labelled ones); mIoU fp32 {100 * result['miou']['fp32']:.2f}, bf16 {100 * result['miou']['bf16']:.2f} "
          f"(bf16 - fp32 = {100 * (result['miou']['bf16'] - result['miou']['fp32']):+.2f}); images/s fp32 "
          f"{result['images_per_s']['fp32']:.2f}, bf16 {result['images_per_s']['bf16']:.2f}")
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
