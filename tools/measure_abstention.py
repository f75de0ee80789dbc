"""How well predict.py abstains: ask for some of a dataset's classes and count where the pixels of the others go.

    python -m tools.measure_abstention --checkpoint=CKPT --asked=Sky,Building,Road,Car          # CamVid val
    python -m tools.measure_abstention --checkpoint=CKPT --asked=Sky,Road --background=wall,sky,vegetation \
        --thresholds="[-1, 0.3, 0.5]" --dataset=configs/eval/camvid-segnet.yaml --out=abstention.json

Each image is segmented as predict.py segments it (inference.infer, then predict.ids_from_scores) into the label
keys of the asked classes, once with no background vocabulary and once with --background's (predict.py's setting;
labels asked for are left out of it), and each of those at every cosine threshold of --thresholds (-1 = off).
For every setting it reports
  - pixels of the other classes (ground truth not asked for, not ignored): the share that became unknown, and the
    share given an asked label (mislabelled);
  - pixels of the asked classes: the share labelled right, the share wrongly abstained (unknown), the share given
    another asked label.
Labels come from --embeddings (a table) or else the checkpoint's training table, by label key.
"""
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from errors import ConfigError, run_main
from dataset_yaml import load_dataset_config
from evaluation import EvalDataset
from inference import Protocol, infer, resolve_precision
from score_rules import background_labels, ids_from_scores, unknown_id
from label_source import load_for_inference
from label_spec import label_texts_for, parse_labels
from provenance import provenance, repo_relative
from runtime import pick_device, set_threads
from settings import parse_settings


@dataclass
class AbstentionSettings(Protocol):  # + the inference protocol's settings (inference.Protocol)
    dataset: str = "configs/eval/camvid-segnet.yaml"
    root: str = ""
    list: str = ""
    asked: str = "Sky,Building,Road,Car"  # class names of the dataset to ask for (comma-separated)
    background: str = "default"    # predict.py's --background for the runs with a background vocabulary
    thresholds: list = field(default_factory=lambda: [-1.0, 0.2, 0.3, 0.4, 0.5, 0.6])  # predict.py's --unknown_below
    checkpoint: str = ""
    embeddings: str = ""           # label table; "" = the checkpoint's training table
    max_images: int = 0
    out: str = ""                  # results JSON ("" = none)
    device: str = "auto"
    threads: int = 0               # torch.set_num_threads on CPU; 0 = from the usable cores


def count(ids, target, asked_class):
    """ids: (H, W) predict ids (i = i-th asked label, or predict.unknown_id of the asked labels); target: (H, W) dataset class index, -1 ignore;
    asked_class: (A,) dataset class index of each asked label. Returns pixel counts {other_unknown, other_labelled,
    asked_right, asked_unknown, asked_wrong}."""
    valid = target >= 0
    is_asked = torch.isin(target, asked_class) & valid
    other = valid & ~is_asked
    unknown = ids == unknown_id(len(asked_class))
    as_class = asked_class[ids.clamp(max=len(asked_class) - 1)]           # (H, W) dataset class of the label given
    right = ~unknown & (as_class == target)
    return {"other_unknown": int((other & unknown).sum()), "other_labelled": int((other & ~unknown).sum()),
            "asked_right": int((is_asked & right).sum()), "asked_unknown": int((is_asked & unknown).sum()),
            "asked_wrong": int((is_asked & ~unknown & ~right).sum())}


def unknown_per_class(ids, target, n, unknown):
    """(n,) pixels per dataset class that became unknown (id `unknown`), and (n,) valid pixels per class."""
    valid = target >= 0
    return (torch.bincount(target[valid & (ids == unknown)], minlength=n),
            torch.bincount(target[valid], minlength=n))


def main(argv=None):
    s = parse_settings(AbstentionSettings, argv)
    set_threads(s.threads)
    device = pick_device(s.device)
    cfg, spec = load_dataset_config(s.dataset, s.root, s.list)
    dataset = EvalDataset(cfg, spec, s.max_images)
    asked_names = parse_labels(s.asked, "--asked")
    unknown_names = [a for a in asked_names if a not in dataset.class_names]
    if unknown_names or not asked_names:
        raise ConfigError(f"--asked={s.asked!r}: {unknown_names or 'nothing'} not among the dataset's classes "
                         f"{dataset.class_names}")
    asked_class = torch.tensor([dataset.class_names.index(a) for a in asked_names])
    asked_keys = [dataset.keys[i] for i in asked_class]
    background = background_labels(s.background, asked_keys)
    keys = asked_keys + background
    model, ckpt, label_emb, scale = load_for_inference(s.checkpoint, keys, label_texts_for(keys, spec=spec),  # (A+B, D)
                                                       s.embeddings, "", device)
    print(f"{dataset.name}: {len(dataset)} images; asked {dict(zip(asked_names, asked_keys))}; other classes "
          f"{[n for n in dataset.class_names if n not in asked_names]}; background vocabulary {background}", flush=True)

    prov = provenance("-m tools.measure_abstention", sys.argv[1:] if argv is None else argv, device,
                      resolve_precision(s.precision, device),
                      files={"checkpoint": s.checkpoint, "label_table": s.embeddings,
                             "list": str(cfg.path(cfg.list)) if cfg.list else ""})
    vocabularies = {"none": label_emb[:len(asked_keys)], "background": label_emb}
    totals = {(v, t): dict.fromkeys(["other_unknown", "other_labelled", "asked_right", "asked_unknown",
                                     "asked_wrong"], 0) for v in vocabularies for t in s.thresholds}
    n = len(dataset.class_names)
    per_class = {setting: torch.zeros(n, dtype=torch.int64) for setting in totals}  # unknown pixels per class
    class_pixels = torch.zeros(n, dtype=torch.int64)
    for i in range(len(dataset)):
        image, target, _ = dataset[i]
        class_pixels += torch.bincount(target[target >= 0], minlength=n)
        for v, emb in vocabularies.items():
            prob, cos = infer(model, image, emb, scale, s, out_size=target.shape, with_cos=True)  # (N, H, W) each
            prob, cos = prob.cpu().numpy(), cos.cpu().numpy()
            for t in s.thresholds:
                ids = torch.from_numpy(ids_from_scores(prob, cos, t, len(asked_keys))).long()
                for k, pixels in count(ids, target, asked_class).items():
                    totals[(v, t)][k] += pixels
                per_class[(v, t)] += unknown_per_class(ids, target, n, unknown_id(len(asked_keys)))[0]
        if (i + 1) % 20 == 0 or i + 1 == len(dataset):
            print(f"[{i + 1}/{len(dataset)}]", flush=True)

    rows = []
    print("\n| background vocabulary | unknown below | other classes: unknown | other: mislabelled | "
          "asked: right | asked: wrongly abstained | asked: other asked label |\n|---|---:|---:|---:|---:|---:|---:|")
    for (v, t), c in totals.items():
        other, asked = c["other_unknown"] + c["other_labelled"], c["asked_right"] + c["asked_unknown"] + c["asked_wrong"]
        row = {"background": v == "background", "unknown_below": t, **c,
               "other_unknown_share": c["other_unknown"] / max(other, 1),
               "other_mislabelled_share": c["other_labelled"] / max(other, 1),
               "asked_right_share": c["asked_right"] / max(asked, 1),
               "asked_abstained_share": c["asked_unknown"] / max(asked, 1),
               "asked_wrong_share": c["asked_wrong"] / max(asked, 1),
               "unknown_share_per_class": {name: float(u) / max(int(p), 1) for name, u, p in
                                           zip(dataset.class_names, per_class[(v, t)], class_pixels)}}
        rows.append(row)
        print(f"| {', '.join(background) if v == 'background' else 'none'} | {'off' if t <= -1 else t} | "
              f"{100 * row['other_unknown_share']:.1f}% | {100 * row['other_mislabelled_share']:.1f}% | "
              f"{100 * row['asked_right_share']:.1f}% | {100 * row['asked_abstained_share']:.1f}% | "
              f"{100 * row['asked_wrong_share']:.1f}% |")
    if s.out:
        result = {"dataset": dataset.name, "images": len(dataset), "asked": dict(zip(asked_names, asked_keys)),
                  "other_classes": [n for n in dataset.class_names if n not in asked_names],
                  "background": background, "protocol": s.protocol(), "checkpoint": repo_relative(s.checkpoint),
                  "step": ckpt.get("step"), "labels": s.embeddings or "the checkpoint's training table",
                  "rows": rows, "settings": asdict(s), "provenance": prov}
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {s.out}")


if __name__ == "__main__":
    run_main(main)
