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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import distributed
from checkpoints import check_width, load_checkpoint
from errors import ConfigError, run_main
from inference import Protocol, infer, label_embeddings, save_prediction, to_uint8
from labels import dataset_label_keys, label_texts, load_label_spec
from readers import FORMATS
from settings import parse_settings, print_settings, read_yaml

REPO = Path(__file__).resolve().parent
EVAL_CONFIGS = REPO / "configs" / "eval"


@dataclass
class EvalSettings(Protocol):      # + the inference protocol's settings (inference.Protocol)
    dataset: str = "camvid-11"     # a name in configs/eval/ (an MSeg set also without its class count: camvid =
                                   # camvid-11) or a path to a dataset YAML (data.SourceConfig fields)
    root: str = ""                 # dataset root; overrides the YAML's (MSeg sets leave it to you)
    list: str = ""                 # list file of "image label" lines; overrides the YAML's
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


def load_dataset_config(name_or_path, root="", list_path="", also_missing=()):
    """A dataset name (see dataset_yaml) or YAML path -> data.SourceConfig. The YAML holds SourceConfig fields (name,
    root, list, names | class_names, taxonomy, encoding, ignore, colors); a relative root in it is relative to the
    repository, --root/--list (relative to the working directory) override it.

    Raises one message for everything missing, `also_missing` (what the caller found missing, e.g. the checkpoint)
    included: what to pass and, for the data, the YAML's header, which says where the dataset comes from."""
    path = dataset_yaml(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in EVAL_CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"unknown dataset {name_or_path!r}: no {path} (known: {known}; or give a YAML path)")
    d = read_yaml(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of data.SourceConfig fields")
    d["root"] = str(Path(root).resolve()) if root else (str(REPO / d["root"]) if d.get("root") else "")
    d["list"] = str(Path(list_path).resolve()) if list_path else (d.get("list") or "")
    missing = []
    if not d["root"] or not Path(d["root"]).is_dir():
        missing.append(f"--root DIR         the dataset's root folder ({not_found(d['root'], 'folder')})")
    if not d["list"] or not Path(d["root"], d["list"]).is_file():
        missing.append(f"--list FILE        its list of `image label` lines, paths relative to the root "
                       f"({not_found(d['list'])})")
    if missing or also_missing:
        where = f"\n{d.get('name', path.stem)}, from {path}:\n{yaml_header(path)}" if missing else ""
        raise FileNotFoundError("evaluate.py needs\n  " + "\n  ".join([*also_missing, *missing]) + where)
    return data.SourceConfig.from_dict(d)


class EvalDataset:
    """The samples of one evaluation set, read by data.Source: item i -> (image (3, H, W) normalised, target (H, W)
    int64 class index or -1 = ignore, stem). Classes: the dataset's ids whose taxonomy key is not ignore, in id order
    (ids sharing a key are one class). Ignored: the config's `ignore` ids and classes mapped to ignore."""

    def __init__(self, cfg, spec, max_images=0):
        self.name, self.names = cfg.name, data.source_class_names(cfg)
        ignore = set(FORMATS[cfg.encoding].ignore(cfg, len(self.names)))
        ids = [i for i in range(len(self.names)) if i not in ignore]
        keys = dataset_label_keys(spec, cfg.taxonomy or cfg.name, [self.names[i] for i in ids])
        self.keys, self.class_ids, self.class_names = [], [], []  # one entry per evaluated class
        for i, k in zip(ids, keys):
            if k is None:
                continue
            if k in self.keys:
                self.class_names[self.keys.index(k)] += f"+{self.names[i]}"
            else:
                self.keys.append(k), self.class_ids.append(i), self.class_names.append(self.names[i])
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
    """results JSON + a markdown table of per-class IoU. Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m = result["metrics"]
    lines = [f"# {result['dataset']}: mIoU {100 * m['miou']:.2f}", "",
             f"checkpoint `{result['checkpoint']}` (step {result['step']}), labels: {result['labels']}, "
             f"base size {result['protocol']['base_size']}, scales {result['protocol']['scales']}, "
             f"{'sliding' if result['protocol']['sliding'] else 'whole'}, flip {result['protocol']['flip']}; "
             f"{result['images']} images, {result['images_per_s']:.2f} images/s", "",
             f"mIoU {100 * m['miou']:.2f} (MSeg's mean, absent classes as 0: {100 * m['miou_mseg']:.2f}), "
             f"mAcc {100 * m['macc']:.2f}, allAcc {100 * m['allacc']:.2f}", "",
             "| class | label key | IoU | Acc | GT pixels |", "|---|---|---:|---:|---:|"]
    for name, key, iou, acc, gt in zip(class_names, keys, m["iou"], m["acc"], m["gt_pixels"]):
        lines.append(f"| {name} | {key} | {100 * iou:.2f} | {100 * acc:.2f} | {gt} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None):
    s = parse_settings(EvalSettings, argv)
    rank, world, device = distributed.setup(s.device)  # torchrun: RANK set -> process group (gloo on CPU)
    master = rank == 0
    if master:
        print_settings(s)

    spec = load_label_spec()
    no_checkpoint = [] if Path(s.checkpoint).is_file() else [  # said together with any missing data, before any work
        f"--checkpoint CKPT  a checkpoint written by train.py ({not_found(s.checkpoint)})"]
    dataset = EvalDataset(load_dataset_config(s.dataset, s.root, s.list, no_checkpoint), spec, s.max_images)
    texts = label_texts(spec, dataset.keys, s.mode)
    model, ckpt = load_checkpoint(s.checkpoint, device)
    if s.embeddings and s.mode == "word" and master:
        print("note: --mode only picks what --clip_weights embeds; a saved table is used as it was made")
    label_emb = label_embeddings(dataset.keys, texts, s.embeddings, s.clip_weights, device,  # (N, D)
                                 ckpt.get("label_table"))
    check_width(ckpt, label_emb, "the label embeddings")
    scale = float(model.scale().detach())
    if master:
        print(f"{dataset.name}: {len(dataset)} images, {len(dataset.keys)} classes evaluated "
              f"({', '.join(f'{n}->{k}' for n, k in zip(dataset.class_names, dataset.keys))}); "
              f"temperature {scale:.2f}; {world} process(es) on {device}")

    class_ids = torch.tensor(dataset.class_ids)

    def save(stem, image, pred):  # raw dataset ids, so the PNGs compare directly with the label files
        save_prediction(s.save_pred, stem, to_uint8(image), class_ids[pred].numpy(), dataset.names)
    start = time.time()
    conf = evaluate_images(model, dataset, label_emb, scale, s, rank, world, s.print_every,
                           save if s.save_pred else None)
    seconds = time.time() - start
    if master:
        metrics = metrics_from_confusion(conf)
        stem = f"{dataset.name}_{s.base_size}_{'ms' if len(s.scales) > 1 else 'ss'}{'_flip' if s.flip else ''}_{s.mode}"
        result = {"dataset": dataset.name, "checkpoint": s.checkpoint, "step": ckpt.get("step"),
                  "labels": s.embeddings or f"{s.clip_weights} ({s.mode})", "protocol": s.protocol(),
                  "images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / seconds,
                  "processes": world, "device": str(device), "class_names": dataset.class_names,
                  "keys": dataset.keys, "metrics": metrics, "confusion": conf.tolist()}
        paths = write_results(s.out_dir, stem, result, dataset.class_names, dataset.keys)
        print(f"mIoU {100 * metrics['miou']:.2f}  mAcc {100 * metrics['macc']:.2f}  "
              f"allAcc {100 * metrics['allacc']:.2f}  ({len(dataset)} images, {len(dataset) / seconds:.2f} images/s)")
        print("wrote " + ", ".join(map(str, paths)))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
