"""Zero-shot evaluation of a checkpoint on a segmentation dataset, with MSeg's test protocol.

    python evaluate.py --dataset camvid --root DATA --list LIST --checkpoint CKPT  # camvid = MSeg's camvid-11
    python evaluate.py --dataset=camvid-11 --root=DATA --list=LIST --checkpoint=CKPT --embeddings=TABLE.pt
    python evaluate.py --dataset=configs/eval/camvid-segnet.yaml --checkpoint=CKPT --clip_weights=ViT-B-32.pt
    torchrun --nproc_per_node=2 evaluate.py ...                     # images split over ranks, confusion all-reduced

Inference follows MSeg's test protocol (mseg-semantic `tool/inference_task.py`): see inference.py's docstring for the
steps and where we differ. Ignore pixels are skipped by the confusion matrix, and mIoU averages the classes with a
non-empty union (MSeg counts an absent class as 0; both numbers are written).
"""
from __future__ import annotations  # EvalSettings has a field named `list`, which would shadow the builtin below it

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

import distributed
from dataset_yaml import load_dataset_config
from errors import ConfigError, run_main
from evaluation import EvalDataset, evaluate_images, metrics_from_confusion, seen_classes, split_miou
from inference import Protocol
from score_rules import background_labels
from label_source import LabelSource
from label_spec import label_texts
from overlays import id_png_dtype, side_by_side, to_uint8
from provenance import provenance, repo_relative
from images import MAX_ASPECT, MAX_PIXELS, set_image_budget
from runtime import choose_precision, set_threads
from settings import parse_settings, print_settings, require


@dataclass
class EvalSettings(Protocol, LabelSource):  # + the protocol's and the label source's settings
    dataset: str = "camvid-11"     # a name in configs/eval/ (an MSeg set also without its class count: camvid =
                                   # camvid-11) or a path to a dataset YAML (data.SourceConfig fields)
    data_root: str = "data"        # the YAML's relative root is a folder in here (dataset_yaml.py; README)
    root: str = ""                 # dataset root; overrides the YAML's (MSeg sets leave it to you)
    list: str = ""                 # list file of "image label" lines; overrides the YAML's
    images: str = ""               # ... or an image folder (relative to root) whose images pair with the label
                                   # files of `labels` by file stem (detectron2's open-vocabulary layouts)
    labels: str = ""               # the label folder for `images` (relative to root); both override the YAML's
    background: str = ""           # a dataset with a rest class (its YAML's `rest:`, e.g. weizmann-horses' background):
                                   # the labels standing for it, "default" = predict.py's background vocabulary
    max_images: int = 0            # evaluate the first N images only (0 = all)
    max_pixels: int = MAX_PIXELS   # an image (or label), or the size the protocol processes it at, larger than this
                                   # is refused before decoding (100 MP)
    max_aspect: float = MAX_ASPECT # an image whose longer side is more than this times its shorter is refused so too
    save_pred: str = ""            # folder for id PNGs and overlays with a legend ("" = none)
    out_dir: str = "out/eval"      # results JSON + markdown
    print_every: int = 10          # progress line every N images
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch's CPU threads per process; 0 = from the usable cores

    def validate(self):
        """The protocol's settings and these in range (parse_settings calls this)."""
        Protocol.validate(self)
        LabelSource.validate(self)
        require(self, "max_images", lambda v: v >= 0, "must be >= 0")
        require(self, "print_every", lambda v: v >= 1, "must be >= 1")


def rest_labels(cfg, dataset, background):
    """The label rows to infer with: the dataset's keys, or for a dataset with a rest class (cfg.rest) its other
    classes' keys followed by the background labels that stand for the rest. Returns (keys, row_class): row_class
    (N,) int64 maps each row to its class index (every background row to the rest's), None without a rest class."""
    if not cfg.rest:
        if background:
            raise ConfigError(f"--background={background}: dataset {cfg.name} has no rest class (`rest:` in its YAML)")
        return dataset.keys, None
    if cfg.rest not in dataset.class_names:
        raise ConfigError(f"dataset {cfg.name}: rest: {cfg.rest!r} is not one of its classes {dataset.class_names}")
    if not background:
        raise ConfigError(f"dataset {cfg.name} scores its class {cfg.rest!r} as everything else: give the labels that "
                          f"stand for it, --background=default (predict.py's background vocabulary) or your own")
    rest = dataset.class_names.index(cfg.rest)
    named = [k for i, k in enumerate(dataset.keys) if i != rest]
    extra = background_labels(background, named)
    row_class = [i for i in range(len(dataset.keys)) if i != rest] + [rest] * len(extra)
    return named + extra, torch.tensor(row_class)


# ----------------------------------------------------------------------------------------------------------------
# Results files

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
    set_image_budget(s.max_pixels, s.max_aspect)
    rank, world, device = distributed.setup(s.device)  # torchrun: RANK set -> process group (gloo on CPU)
    master = rank == 0
    set_threads(s.threads, verbose=master)
    if master:
        print_settings(s)

    no_checkpoint = [] if Path(s.checkpoint).is_file() else ["--checkpoint CKPT"]  # said with any missing data
    cfg, spec = load_dataset_config(s.dataset, s.root, s.list, s.images, s.labels, also_missing=no_checkpoint,
                                    data_root=s.data_root)
    dataset = EvalDataset(cfg, spec, s.max_images, s.work_size)
    keys, row_class = rest_labels(cfg, dataset, s.background)
    texts = label_texts(spec, keys, s.mode, unknown_as_word=row_class is not None)
    if s.embeddings and s.mode == "word" and master:
        print("note: --mode only picks what --clip_weights embeds; a saved table is used as it was made")
    model, ckpt, label_emb, scale = s.load(keys, texts, device)          # label_emb (N, D)
    # recorded before the run: the checkout, the files and the command as they were when it started
    precision, why = choose_precision(s.precision, device)  # what auto means here, recorded as run
    if master:
        print(why)
    prov = provenance("evaluate.py", sys.argv[1:] if argv is None else argv, device, precision,
                      **dataset_hashes(cfg, dataset, s)) if master else None
    if master:
        print(f"{dataset.name}: {len(dataset)} images, {len(dataset.keys)} classes evaluated "
              f"({', '.join(f'{n}->{k}' for n, k in zip(dataset.class_names, dataset.keys))}); "
              f"temperature {scale:.2f}; {world} process(es) on {device}, network in {precision}")

    class_ids = torch.tensor(dataset.class_ids)

    def save(stem, image, pred, target):  # ids: raw dataset ids, so the PNGs compare directly with the label files
        folder = Path(s.save_pred)
        folder.mkdir(parents=True, exist_ok=True)
        ids = class_ids[pred].numpy()
        Image.fromarray(ids.astype(id_png_dtype(max(class_ids.max().item(), 0)))).save(folder / f"{stem}.png")
        photo = Image.fromarray(to_uint8(image.cpu().numpy()))
        photo = photo.resize(target.shape[::-1], Image.BILINEAR)  # the evaluated size
        side_by_side(photo, pred.numpy(), target.numpy(), dataset.class_names).save(folder / f"{stem}_overlay.png")
    start = time.time()
    conf = evaluate_images(model, dataset, label_emb, scale, s, rank, world, s.print_every,
                           save if s.save_pred else None, row_class)
    seconds = time.time() - start
    if master:
        metrics = metrics_from_confusion(conf)
        seen = seen_classes(dataset.keys, ckpt)
        metrics["split"] = split_miou(metrics["iou"], seen)
        stem = f"{dataset.name}_{s.base_size}_{'ms' if len(s.scales) > 1 else 'ss'}{'_flip' if s.flip else ''}_{s.mode}"
        result = {"dataset": dataset.name, "checkpoint": repo_relative(s.checkpoint), "step": ckpt.get("step"),
                  "background": keys[len(dataset.keys) - 1:] if row_class is not None else None,
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
