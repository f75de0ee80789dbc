"""Evaluation shared by evaluate.py and the tools that evaluate: the classes and samples of an evaluation set, the
loop over them, and mIoU from a confusion matrix (DETR's engine.py, for our protocol). Dataset YAMLs
(configs/eval/*.yaml) are read by dataset_yaml.py (load_dataset_config).
"""
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import distributed
from dataset_yaml import dataset_labels
from inference import infer
from label_spec import dataset_label_keys
from readers import FORMATS


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def confusion_matrix(pred, target, n):
    """pred, target: (...) int64 class indices, target < 0 (or >= n) = ignore -> (n, n) int64, rows = ground truth."""
    keep = (target >= 0) & (target < n)
    return torch.bincount(target[keep] * n + pred[keep], minlength=n * n).reshape(n, n)


def metrics_from_confusion(conf):
    """(n, n) confusion -> dict of per-class IoU and accuracy (nan where undefined) and their means."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"miou": float(iou.nanmean()), "miou_mseg": float(iou.nan_to_num(0.0).mean()),  # MSeg: absent class = 0
            "macc": float(acc.nanmean()), "allacc": float(tp.sum() / gt.sum().clamp(min=1)),
            "iou": iou.tolist(), "acc": acc.tolist(), "gt_pixels": gt.long().tolist()}


def seen_classes(keys, ckpt):
    """Per evaluated class: True when its label key is one the checkpoint's training sources could name (train.py
    records them as "trained_keys"), False when not, None for every class when the checkpoint has no such record."""
    trained = ckpt.get("trained_keys")
    if trained is None:
        return [None] * len(keys)
    trained = set(trained)
    return [k in trained for k in keys]


def split_miou(iou, seen):
    """mIoU over all, seen and unseen classes: {"all" | "seen" | "unseen": {"miou", "classes", "with_iou"}}, where
    miou averages the classes with an IoU (non-empty union), as metrics_from_confusion's miou. With seen unknown
    (None), "seen" and "unseen" are the string "unknown": no guess from the label table, which holds more keys than
    a training run names."""
    def part(pick):
        values = [v for v, p in zip(iou, pick) if p and not math.isnan(v)]
        return {"miou": sum(values) / len(values) if values else float("nan"), "classes": sum(map(bool, pick)),
                "with_iou": len(values)}
    out = {"all": part([True] * len(iou))}
    if any(s is None for s in seen):
        out.update(seen="unknown", unseen="unknown")
    else:
        out.update(seen=part(seen), unseen=part([not s for s in seen]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluated classes (dataset YAMLs are read by dataset_yaml.py)

def dataset_classes(name_or_path, spec=None):
    """A dataset's evaluated classes without its data (export.py bakes them into a graph): (label keys, class
    names, label spec) as evaluated_classes gives them."""
    cfg, spec = dataset_labels(name_or_path, spec)
    keys, _, names = evaluated_classes(cfg, spec)
    return keys, names, spec


def evaluated_classes(cfg, spec):
    """A dataset's evaluated classes: (label keys, raw class ids, class names), one entry per key, in id order; ids
    sharing a key are one class (names joined by +); ignored ids and classes mapped to ignore are left out."""
    names = data.source_class_names(cfg)
    ignore = set(FORMATS[cfg.encoding].ignore(cfg, len(names)))
    ids = [i for i in range(len(names)) if i not in ignore]
    keys = dataset_label_keys(spec, cfg.taxonomy or cfg.name, [names[i] for i in ids])
    out_keys, class_ids, class_names = [], [], []
    for i, k in zip(ids, keys):
        if k is None:
            continue
        if k in out_keys:
            class_names[out_keys.index(k)] += f"+{names[i]}"
        else:
            out_keys.append(k), class_ids.append(i), class_names.append(names[i])
    return out_keys, class_ids, class_names


class EvalDataset:
    """The samples of one evaluation set, read by data.Source: item i -> (image (3, H, W) normalised, target (H, W)
    int64 class index or -1 = ignore, stem). Classes: the dataset's ids whose taxonomy key is not ignore, in id order
    (ids sharing a key are one class). Ignored: the config's `ignore` ids and classes mapped to ignore."""

    def __init__(self, cfg, spec, max_images=0, work_size=None):
        self.name, self.names = cfg.name, data.source_class_names(cfg)
        self.keys, self.class_ids, self.class_names = evaluated_classes(cfg, spec)
        self.source = data.Source(cfg, spec, {k: row for row, k in enumerate(self.keys)})  # raw id -> class index
        self.size = min(len(self.source), max_images) if max_images else len(self.source)
        self.work_size = work_size  # (w, h) -> (W, H, how): the size the protocol processes an image at (budgeted)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        sample = self.source.load(i, None, work_size=self.work_size)  # image (3, H, W) normalised, target (H, W)
        return sample["image"], sample["target"], Path(self.source.samples.image(i)).stem


# ----------------------------------------------------------------------------------------------------------------
# The evaluation loop

def evaluate_images(model, samples, label_emb, scale, proto, rank=0, world=1, print_every=0, on_pred=None,
                    row_class=None):
    """Confusion matrix of `samples` (item -> (image, target, stem), as EvalDataset), summed over all ranks.

    row_class: (N,) int64, the class each label row counts as (a dataset with a rest class: its background labels
    all count as the rest); None = row i is class i.
    Rank r takes items r, r + world, ...; under torch.distributed the (N, N) int64 matrix is all-reduced, so every
    rank returns the same. on_pred(stem, image, pred (H, W) int64, target (H, W) int64) is called per image, e.g. to
    save pictures.
    """
    n = label_emb.shape[0] if row_class is None else int(row_class.max()) + 1
    conf = torch.zeros(n, n, dtype=torch.int64)
    mine = range(rank, len(samples), world)
    start = time.time()
    for j, i in enumerate(mine, 1):
        image, target, stem = samples[i]
        prob, _ = infer(model, image, label_emb, scale, proto, out_size=target.shape)  # (N, H, W)
        pred = prob.argmax(0).cpu()                                                     # (H, W)
        if row_class is not None:
            pred = row_class[pred]                                                      # label rows -> classes
        conf += confusion_matrix(pred, target, n)
        if on_pred is not None:
            on_pred(stem, image, pred, target)
        if print_every and rank == 0 and (j % print_every == 0 or j == len(mine)):
            rate = j / (time.time() - start)
            eta = (len(mine) - j) / rate
            print(f"[{j * world:>5}/{len(samples)}] {rate * world:.2f} images/s, ETA {eta // 60:.0f}m{eta % 60:02.0f}s",
                  flush=True)
    if distributed.is_distributed():  # NCCL reduces CUDA tensors only: reduce on the device the model runs on
        conf = conf.to(label_emb.device)
        dist.all_reduce(conf)  # gloo and NCCL both sum int64
        conf = conf.cpu()
    return conf
