"""Evaluation shared by evaluate.py and the tools that evaluate: dataset configs (configs/eval/*.yaml), the samples
of an evaluation set, the loop over them, and mIoU from a confusion matrix (DETR's engine.py, for our protocol).

A dataset config is a data.SourceConfig in YAML, read by data.Source; `load_dataset_config` finds it by name, applies
--root / --list / --images / --labels, and says in one message what is missing and where the data comes from.
"""
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import distributed
from errors import ConfigError
from inference import infer
from provenance import repo_relative
from labels import IGNORE, dataset_label_keys, load_label_spec, with_own_labels
from readers import FORMATS
from settings import read_yaml

REPO = Path(__file__).resolve().parent
EVAL_CONFIGS = REPO / "configs" / "eval"


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
# Dataset configs

def dataset_yaml(name_or_path):
    """configs/eval/<name>.yaml, or an MSeg test set by its name without the class count (camvid -> camvid-11.yaml,
    kitti -> kitti-19.yaml), or a YAML path as given."""
    path = Path(name_or_path)
    if path.suffix:
        return path
    path = EVAL_CONFIGS / f"{name_or_path}.yaml"
    counted = [p for p in EVAL_CONFIGS.glob(f"{name_or_path}-*.yaml") if p.stem[len(name_or_path) + 1:].isdigit()]
    if path.is_file() or len(counted) != 1:
        return path
    return counted[0]


def yaml_header(path):
    """The comment lines a dataset YAML opens with (what the dataset is, where it comes from), indented."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append("  " + line[1:].removeprefix(" "))
    return "\n".join(lines)


def _read_dataset_yaml(name_or_path, root="", list_path="", images="", labels="", data_root="data"):
    """The YAML's SourceConfig fields with --root/--list/--images/--labels applied, its path, and the user's own
    `sentences:` / `taxonomy:` mapping (None where it has none)."""
    path = dataset_yaml(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in EVAL_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"unknown dataset {name_or_path!r}: no {repo_relative(path)} (known: {', '.join(known)}; "
                          f"or give a YAML path)")
    d = read_yaml(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of data.SourceConfig fields")
    sentences = d.pop("sentences", None)
    own_taxonomy = d.pop("taxonomy") if isinstance(d.get("taxonomy"), dict) else None
    d["root"] = str(Path(root).resolve()) if root else (str(Path(data_root, d["root"]).resolve()) if d.get("root") else "")
    if list_path:  # --list or --images/--labels win over the YAML's pairs, whichever way it gives them
        d.update(list=str(Path(list_path).resolve()), images="", labels="")
    elif images or labels:
        d.update(list="", images=images, labels=labels)
    d["list"] = d.get("list") or ""
    return d, path, sentences, own_taxonomy


def _with_own_labels(cfg, spec, path, sentences, own_taxonomy):
    """spec plus the dataset's own sentences and taxonomy, where it brings them (see load_dataset_config)."""
    taxonomy = cfg.taxonomy or cfg.name
    if sentences is not None or own_taxonomy is not None or (not cfg.taxonomy and taxonomy not in spec.datasets):
        names = data.source_class_names(cfg)
        ignored = {names[i]: IGNORE for i in FORMATS[cfg.encoding].ignore(cfg, len(names)) if i < len(names)}
        spec = with_own_labels(spec, taxonomy, names, {**ignored, **(own_taxonomy or {})}, sentences, str(path))
    return spec


def same_dataset_here(path, data_root):
    """(name, folder) of each other shipped YAML of the same dataset (the name before its first '-': camvid-11 and
    camvid-segnet) whose data is in data_root: what a user who holds that copy (README.md's CamVid in data/camvid-11,
    the SegNet layout) can evaluate on when the YAML asked for lacks its data."""
    family = path.stem.split("-")[0]
    found = []
    for other in sorted(EVAL_CONFIGS.glob(f"{family}*.yaml")):
        d = read_yaml(other) if other != path and other.stem.split("-")[0] == family else None
        if isinstance(d, dict) and isinstance(d.get("root"), str) and Path(data_root, d["root"]).is_dir():
            found.append((other.stem, Path(data_root, d["root"])))
    return found


def load_dataset_config(name_or_path, root="", list_path="", images="", labels="", spec=None, also_missing=(),
                        data_root="data"):
    """A dataset name (see dataset_yaml) or YAML path -> (data.SourceConfig, label spec). The YAML holds SourceConfig
    fields (name, root, list | images + labels, names | class_names, taxonomy, encoding, ignore, colors); a relative
    root in it is a folder of data_root (--data_root, default data/ of the working directory); --root/--list
    (relative to the working directory) and --images/--labels (relative to the root) override the YAML's.

    A user's dataset brings its own labels without editing label_sentences.yaml: `sentences:` {class name or label
    key: sentence} and `taxonomy:` as a mapping {class name: label key | ignore} (classes it does not list are their
    own keys); see labels.with_own_labels. The returned spec is `spec` (default: label_sentences.yaml) plus those.

    Raises one short message for everything missing, `also_missing` (flags the caller found missing, e.g.
    "--checkpoint CKPT") included: what to pass, and the YAML whose header says where the data comes from."""
    d, path, sentences, own_taxonomy = _read_dataset_yaml(name_or_path, root, list_path, images, labels, data_root)
    missing = []
    if not d["root"] or not Path(d["root"]).is_dir():
        missing.append("--root DIR" + (f" ({repo_relative(d['root'])} is not a folder)" if d["root"] else ""))
    if not d.get("labels") and (not d["list"] or not Path(d["root"], d["list"]).is_file()):
        missing.append("--list FILE" + (f" ({d['list']} is not a file)" if d["list"] else "")
                       + " (or --images DIR --labels DIR)")
    if missing or also_missing:
        hint = f"{repo_relative(path)} says where the data comes from:\n{yaml_header(path)}" if missing else ""
        here = "".join(f"; or --dataset={name}, which reads the copy in {folder}"
                       for name, folder in same_dataset_here(path, data_root)) if missing else ""
        raise ConfigError(f"evaluate.py --dataset={d.get('name', path.stem)} needs "
                          + ", ".join([*also_missing, *missing]) + here, hint=hint)
    cfg = data.SourceConfig.from_dict(d)
    return cfg, _with_own_labels(cfg, spec or load_label_spec(), path, sentences, own_taxonomy)


def dataset_classes(name_or_path, spec=None):
    """A dataset's evaluated classes without its data (export.py bakes them into a graph): (label keys, class
    names, label spec) as evaluated_classes gives them."""
    d, path, sentences, own_taxonomy = _read_dataset_yaml(name_or_path)
    if not d["list"] and not d.get("labels"):
        d["list"] = "(not read)"  # SourceConfig insists on a data location; only the class names are read here
    cfg = data.SourceConfig.from_dict(d)
    spec = _with_own_labels(cfg, spec or load_label_spec(), path, sentences, own_taxonomy)
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
