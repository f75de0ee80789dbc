"""Zero-shot evaluation of a checkpoint on a segmentation dataset, with MSeg's test protocol.

    python evaluate.py --dataset camvid --root DATA --list LIST --checkpoint CKPT  # camvid = MSeg's camvid-11
    python evaluate.py --dataset=camvid-11 --root=DATA --list=LIST --checkpoint=CKPT --embeddings=TABLE.pt
    python evaluate.py --dataset=configs/eval/camvid-segnet-shared.yaml --checkpoint=CKPT --clip_weights=ViT-B-32.pt
    torchrun --nproc_per_node=2 evaluate.py ...                     # images split over ranks, confusion all-reduced

Inference follows MSeg's test protocol (mseg-semantic `tool/inference_task.py`): see inference.py's docstring for the
steps and where we differ. Ignore pixels are skipped by the confusion matrix, and mIoU averages the classes with a
non-empty union (MSeg counts an absent class as 0; both numbers are written).
"""
from __future__ import annotations  # EvalSettings has a field named `list`, which would shadow the builtin below it

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import distributed
from checkpoints import check_width, load_checkpoint
from errors import ConfigError, run_main
from inference import Protocol, infer, label_embeddings, resolve_precision, save_prediction, to_uint8
from labels import IGNORE, dataset_label_keys, label_texts, load_label_spec, with_own_labels
from provenance import provenance
from readers import FORMATS
from settings import one_of, parse_settings, print_settings, read_yaml, require

REPO = Path(__file__).resolve().parent
EVAL_CONFIGS = REPO / "configs" / "eval"


@dataclass
class EvalSettings(Protocol):      # + the inference protocol's settings (inference.Protocol)
    dataset: str = "camvid-11"     # a name in configs/eval/ (an MSeg set also without its class count: camvid =
                                   # camvid-11) or a path to a dataset YAML (data.SourceConfig fields)
    root: str = ""                 # dataset root; overrides the YAML's (MSeg sets leave it to you)
    list: str = ""                 # list file of "image label" lines; overrides the YAML's
    images: str = ""               # ... or an image folder (relative to root) whose images pair with the label
                                   # files of `labels` by file stem (detectron2's open-vocabulary layouts)
    labels: str = ""               # the label folder for `images` (relative to root); both override the YAML's
    checkpoint: str = ""           # from train.py; the model is rebuilt from its model_args
    embeddings: str = ""           # label table (.pt from clip_text.py, or universal_cat2vec.npy); "" = the
                                   # checkpoint's own training table, unless clip_weights is given
    clip_weights: str = ""         # ... or CLIP weights to embed the dataset's labels now
    mode: str = "sentence"         # sentence | word (with clip_weights: embed the sentences or the bare names)
    max_images: int = 0            # evaluate the first N images only (0 = all)
    save_pred: str = ""            # folder for id PNGs and overlays with a legend ("" = none)
    out_dir: str = "out/eval"      # results JSON + markdown
    print_every: int = 10          # progress line every N images
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch's CPU threads per process; 0 = from the usable cores

    def validate(self):
        """The protocol's settings and these in range (parse_settings calls this)."""
        super().validate()
        require(self, "max_images", lambda v: v >= 0, "must be >= 0")
        require(self, "print_every", lambda v: v >= 1, "must be >= 1")
        one_of(self, "mode", ("sentence", "word"))


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
# Dataset: a data.SourceConfig in YAML (configs/eval/*.yaml), read by data.Source

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
    """The comment lines a dataset YAML opens with: what the dataset is, where it comes from, its layout."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append("  " + line[1:].removeprefix(" "))
    return "\n".join(lines)


def not_found(path, kind="file"):
    """What is wrong with a required path, for an error message."""
    return f"{path} is not a {kind}" if path else "not given"


def load_dataset_config(name_or_path, root="", list_path="", images="", labels="", spec=None,
                        also_missing=(), need_data=True):
    """A dataset name (see dataset_yaml) or YAML path -> (data.SourceConfig, label spec). The YAML holds SourceConfig
    fields (name, root, list | images + labels, names | class_names, taxonomy, encoding, ignore, colors); a relative
    root in it is relative to the repository; --root/--list (relative to the working directory) and --images/--labels
    (relative to the root) override the YAML's.

    A user's dataset brings its own labels without editing label_sentences.yaml: `sentences:` {class name or label
    key: sentence} and `taxonomy:` as a mapping {class name: label key | ignore} (classes it does not list are their
    own keys); see labels.with_own_labels. The returned spec is `spec` (default: label_sentences.yaml) plus those.

    Raises one message for everything missing, `also_missing` (what the caller found missing, e.g. the checkpoint)
    included: what to pass and, for the data, the YAML's header, which says where the dataset comes from. With
    need_data=False (export.py: only the class list) a missing root or list is not an error."""
    spec = spec or load_label_spec()
    path = dataset_yaml(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in EVAL_CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"unknown dataset {name_or_path!r}: no {path} (known: {known}; or give a YAML path)")
    d = read_yaml(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of data.SourceConfig fields")
    sentences = d.pop("sentences", None)
    own_taxonomy = d.pop("taxonomy") if isinstance(d.get("taxonomy"), dict) else None
    d["root"] = str(Path(root).resolve()) if root else (str(REPO / d["root"]) if d.get("root") else "")
    if list_path:  # --list or --images/--labels win over the YAML's pairs, whichever way it gives them
        d.update(list=str(Path(list_path).resolve()), images="", labels="")
    elif images or labels:
        d.update(list="", images=images, labels=labels)
    d["list"] = d.get("list") or ""
    missing = []
    if need_data and (not d["root"] or not Path(d["root"]).is_dir()):
        missing.append(f"--root DIR         the dataset's root folder ({not_found(d['root'], 'folder')})")
    if need_data and not d.get("labels") and (not d["list"] or not Path(d["root"], d["list"]).is_file()):
        missing.append(f"--list FILE        its list of `image label` lines, paths relative to the root "
                       f"({not_found(d['list'])}), or --images DIR --labels DIR, folders paired by file stem")
    if missing or also_missing:
        where = f"\n{d.get('name', path.stem)}, from {path}:\n{yaml_header(path)}" if missing else ""
        raise FileNotFoundError("evaluate.py needs\n  " + "\n  ".join([*also_missing, *missing]) + where)
    if not need_data and not d["list"] and not d.get("labels"):
        d["list"] = "-"  # a hack: SourceConfig validates that a dataset has a list; without data none is read
    cfg = data.SourceConfig.from_dict(d)
    taxonomy = cfg.taxonomy or cfg.name
    if sentences is not None or own_taxonomy is not None or (not cfg.taxonomy and taxonomy not in spec.datasets):
        names = data.source_class_names(cfg)
        ignored = {names[i]: IGNORE for i in FORMATS[cfg.encoding].ignore(cfg, len(names)) if i < len(names)}
        spec = with_own_labels(spec, taxonomy, names, {**ignored, **(own_taxonomy or {})}, sentences, str(path))
    return cfg, spec


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

    def __init__(self, cfg, spec, max_images=0):
        self.name, self.names = cfg.name, data.source_class_names(cfg)
        self.keys, self.class_ids, self.class_names = evaluated_classes(cfg, spec)
        self.source = data.Source(cfg, spec, {k: row for row, k in enumerate(self.keys)})  # raw id -> class index
        self.size = min(len(self.source), max_images) if max_images else len(self.source)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        sample = self.source.load(i, None)  # image (3, H, W) normalised, target (H, W) int64
        return sample["image"], sample["target"], Path(self.source.samples.image(i)).stem


# ----------------------------------------------------------------------------------------------------------------
# The evaluation loop

def evaluate_images(model, samples, label_emb, scale, proto, rank=0, world=1, print_every=0, on_pred=None):
    """Confusion matrix of `samples` (item -> (image, target, stem), as EvalDataset), summed over all ranks.

    Rank r takes items r, r + world, ...; under torch.distributed the (N, N) int64 matrix is all-reduced, so every
    rank returns the same. on_pred(stem, image, pred (H, W) int64) is called per image, e.g. to save pictures.
    """
    n = label_emb.shape[0]
    conf = torch.zeros(n, n, dtype=torch.int64)
    mine = range(rank, len(samples), world)
    start = time.time()
    for j, i in enumerate(mine, 1):
        image, target, stem = samples[i]
        prob, _ = infer(model, image, label_emb, scale, proto, out_size=target.shape)  # (N, H, W)
        pred = prob.argmax(0).cpu()                                                     # (H, W)
        conf += confusion_matrix(pred, target, n)
        if on_pred is not None:
            on_pred(stem, image, pred)
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


def write_results(out_dir, stem, result, class_names, keys):
    """results JSON + a markdown table of per-class IoU, seen/unseen and provenance. Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m, split, prov = result["metrics"], result["metrics"]["split"], result["provenance"]
    seen_line = ("seen/unseen: unknown (the checkpoint does not record its training label keys)"
                 if split["seen"] == "unknown" else
                 f"mIoU over seen classes {100 * split['seen']['miou']:.2f} ({split['seen']['classes']}), over unseen "
                 f"classes {100 * split['unseen']['miou']:.2f} ({split['unseen']['classes']}); seen = the label key "
                 f"is one the checkpoint's training sources name (" +
                 ", ".join(f"{src}: {tax}" for src, tax in result["trained_taxonomies"].items()) + ")")
    git = prov["git"]
    lines = [f"# {result['dataset']}: mIoU {100 * m['miou']:.2f}", "",
             f"checkpoint `{result['checkpoint']}` (step {result['step']}), labels: {result['labels']}, "
             f"base size {result['protocol']['base_size']}, scales {result['protocol']['scales']}, "
             f"{'sliding' if result['protocol']['sliding'] else 'whole'}, flip {result['protocol']['flip']}; "
             f"{result['images']} images, {result['images_per_s']:.2f} images/s "
             f"on {prov['device']['gpu'] or prov['device']['cpu']}, {prov['precision']}", "",
             f"mIoU {100 * m['miou']:.2f} (MSeg's mean, absent classes as 0: {100 * m['miou_mseg']:.2f}), "
             f"mAcc {100 * m['macc']:.2f}, allAcc {100 * m['allacc']:.2f}", "", seen_line, "",
             f"`{prov['command']}` at commit {git['commit']}"
             f"{' (changed: ' + ', '.join(git['changed']) + ')' if git.get('dirty') else ''}", "",
             "| class | label key | seen | IoU | Acc | GT pixels |", "|---|---|---|---:|---:|---:|"]
    for name, key, seen, iou, acc, gt in zip(class_names, keys, result["seen"], m["iou"], m["acc"], m["gt_pixels"]):
        word = "unknown" if seen is None else ("yes" if seen else "no")
        lines.append(f"| {name} | {key} | {word} | {100 * iou:.2f} | {100 * acc:.2f} | {gt} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def dataset_hashes(cfg, dataset, s):
    """provenance() arguments for what was evaluated: the checkpoint, the label table or CLIP weights (when files),
    the list file, or for a folder-pair dataset its sorted pairs as text, one `image label` line each, both relative
    to the root (no file holds that listing)."""
    files = {"checkpoint": s.checkpoint, "label_table": s.embeddings, "clip_weights": s.clip_weights}
    if cfg.list:
        return {"files": {**files, "list": str(cfg.path(cfg.list))}}
    pairs = dataset.source.samples  # image and label paths relative to the root, sorted by stem
    listing = "".join(f"{pairs.images[i]} {pairs.labels[i]}\n" for i in range(len(pairs)))
    return {"files": files, "texts": {"pairs": listing}}


def main(argv=None):
    s = parse_settings(EvalSettings, argv)
    rank, world, device = distributed.setup(s.device)  # torchrun: RANK set -> process group (gloo on CPU)
    master = rank == 0
    distributed.set_threads(s.threads, verbose=master)
    if master:
        print_settings(s)

    no_checkpoint = [] if Path(s.checkpoint).is_file() else [  # said together with any missing data, before any work
        f"--checkpoint CKPT  a checkpoint written by train.py ({not_found(s.checkpoint)})"]
    cfg, spec = load_dataset_config(s.dataset, s.root, s.list, s.images, s.labels, also_missing=no_checkpoint)
    dataset = EvalDataset(cfg, spec, s.max_images)
    texts = label_texts(spec, dataset.keys, s.mode)
    model, ckpt = load_checkpoint(s.checkpoint, device)
    if s.embeddings and s.mode == "word" and master:
        print("note: --mode only picks what --clip_weights embeds; a saved table is used as it was made")
    label_emb = label_embeddings(dataset.keys, texts, s.embeddings, s.clip_weights, device,  # (N, D)
                                 ckpt.get("label_table"))
    check_width(ckpt, label_emb, "the label embeddings")
    scale = float(model.scale().detach())
    # recorded before the run: the checkout, the files and the command as they were when it started
    precision = resolve_precision(s.precision, device)  # what --precision=auto means here, recorded as run
    prov = provenance("evaluate.py", sys.argv[1:] if argv is None else argv, device, precision,
                      **dataset_hashes(cfg, dataset, s)) if master else None
    if master:
        print(f"{dataset.name}: {len(dataset)} images, {len(dataset.keys)} classes evaluated "
              f"({', '.join(f'{n}->{k}' for n, k in zip(dataset.class_names, dataset.keys))}); "
              f"temperature {scale:.2f}; {world} process(es) on {device}, network in {precision}")

    class_ids = torch.tensor(dataset.class_ids)

    def save(stem, image, pred):  # raw dataset ids, so the PNGs compare directly with the label files
        save_prediction(s.save_pred, stem, to_uint8(image), class_ids[pred].numpy(), dataset.names)
    start = time.time()
    conf = evaluate_images(model, dataset, label_emb, scale, s, rank, world, s.print_every,
                           save if s.save_pred else None)
    seconds = time.time() - start
    if master:
        metrics = metrics_from_confusion(conf)
        seen = seen_classes(dataset.keys, ckpt)
        metrics["split"] = split_miou(metrics["iou"], seen)
        stem = f"{dataset.name}_{s.base_size}_{'ms' if len(s.scales) > 1 else 'ss'}{'_flip' if s.flip else ''}_{s.mode}"
        result = {"dataset": dataset.name, "checkpoint": s.checkpoint, "step": ckpt.get("step"),
                  "labels": s.embeddings or (f"{s.clip_weights} ({s.mode})" if s.clip_weights
                                             else "the checkpoint's training table"), "protocol": s.protocol(),
                  "images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / seconds,
                  "processes": world, "device": str(device), "class_names": dataset.class_names,
                  "keys": dataset.keys, "texts_embedded": texts if s.clip_weights else None,  # a table: its own
                  "seen": seen, "trained_taxonomies": ckpt.get("taxonomies"),
                  "metrics": metrics, "confusion": conf.tolist(), "provenance": prov}
        paths = write_results(s.out_dir, stem, result, dataset.class_names, dataset.keys)
        print(f"mIoU {100 * metrics['miou']:.2f}  mAcc {100 * metrics['macc']:.2f}  "
              f"allAcc {100 * metrics['allacc']:.2f}  ({len(dataset)} images, {len(dataset) / seconds:.2f} images/s)")
        split = metrics["split"]
        print("seen/unseen: unknown (the checkpoint does not record its training label keys)"
              if split["seen"] == "unknown" else
              f"mIoU seen {100 * split['seen']['miou']:.2f} ({split['seen']['classes']} classes), "
              f"unseen {100 * split['unseen']['miou']:.2f} ({split['unseen']['classes']} classes)")
        print("wrote " + ", ".join(map(str, paths)))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
