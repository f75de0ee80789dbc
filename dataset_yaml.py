"""A dataset described in YAML, for training and evaluation alike: the one reader of the mappings that describe a
dataset on disk, whether a training config lists them under `sources:` (train.py) or a file holds one
(configs/eval/*.yaml, evaluate.py --dataset).

A description is data.SourceConfig's fields, and may bring its own labels, so that adding a dataset edits no
repository file (label_spec.with_own_labels):
  sentences: {class name or label key: sentence}
  taxonomy:  {class name: label key | ignore}   (a mapping; a string names a dataset of label_sentences.yaml)
A training source may name a dataset YAML instead of copying it, and override any of its fields:
  sources:
    - {dataset: camvid-segnet, name: camvid, images: train, labels: trainannot}   # configs/eval/camvid-segnet.yaml
    - {dataset: path/to/mine.yaml, list: train.txt}
A list given over the YAML's image and label folders replaces them, and folders replace a list.

The one data_root rule (under_data_root): a relative `root` is a folder of the data root (train.py's and
evaluate.py's --data_root, default data/ of the working directory); an absolute one is kept.
"""
from pathlib import Path

import data
from errors import ConfigError
from label_spec import IGNORE, load_label_spec, with_own_labels
from provenance import repo_relative
from readers import FORMATS
from settings import read_yaml

EVAL_CONFIGS = Path(__file__).resolve().parent / "configs" / "eval"


def under_data_root(root, data_root) -> str:
    """The data_root rule: a relative root is a folder of data_root; an absolute one (or data_root "") is kept."""
    return str(Path(data_root, root)) if data_root and not Path(root).is_absolute() else str(root)


def find_yaml(name_or_path) -> Path:
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


def yaml_header(path) -> str:
    """The comment lines a dataset YAML opens with (what the dataset is, where it comes from), indented."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append("  " + line[1:].removeprefix(" "))
    return "\n".join(lines)


def read_dataset_yaml(name_or_path) -> tuple[dict, Path]:
    """A dataset YAML's mapping (SourceConfig fields, + sentences / taxonomy) and its path."""
    path = find_yaml(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in EVAL_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"unknown dataset {name_or_path!r}: no {repo_relative(path)} (known: {', '.join(known)}; "
                          f"or give a YAML path)")
    d = read_yaml(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of data.SourceConfig fields")
    return d, path


def with_location(d: dict, list_path="", images="", labels="") -> dict:
    """`d` with a list, or image and label folders, in place of its own (whichever way it gives them)."""
    if list_path:
        return {**d, "list": list_path, "images": "", "labels": ""}
    if images or labels:
        return {**d, "list": "", "images": images or d.get("images", ""), "labels": labels or d.get("labels", "")}
    return d


def source_fields(entry, data_root="") -> tuple[dict, str]:
    """A training config's source entry -> (its SourceConfig fields with sentences / taxonomy still in, and where
    it comes from for messages): a `dataset:` entry is that YAML with the entry's other keys over it; a relative
    root is under data_root."""
    if not isinstance(entry, dict):
        raise ConfigError(f"sources: each entry must be a mapping of source fields, got {entry!r:.100}")
    d, where = dict(entry), f"source {entry.get('name', '?')}"
    if "dataset" in d:
        name = d.pop("dataset")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"sources: dataset must be a dataset name or YAML path, got {name!r}")
        base, path = read_dataset_yaml(name)
        own = {k: v for k, v in d.items() if k not in ("list", "images", "labels")}
        d = {**with_location(base, d.get("list", ""), d.get("images", ""), d.get("labels", "")), **own}
        where = f"source {d.get('name', '?')} ({repo_relative(path)})"
    if isinstance(d.get("root"), str) and d["root"]:
        d["root"] = under_data_root(d["root"], data_root)
    return d, where


def split_own_labels(d: dict) -> tuple[dict, dict | None, dict | None]:
    """(SourceConfig fields, own sentences or None, own taxonomy mapping or None) of a description."""
    d = dict(d)
    sentences = d.pop("sentences", None)
    taxonomy = d.pop("taxonomy") if isinstance(d.get("taxonomy"), dict) else None
    return d, sentences, taxonomy


def add_own_labels(cfg: data.SourceConfig, spec, where, sentences=None, taxonomy=None):
    """spec plus the dataset's own sentences and taxonomy where it brings them; a dataset with neither, no taxonomy
    name and a name label_sentences.yaml does not know gets its class names as label keys. Ignored ids map to
    ignore."""
    name = cfg.taxonomy or cfg.name
    if sentences is None and taxonomy is None and (cfg.taxonomy or name in spec.datasets):
        return spec
    names = data.source_class_names(cfg)
    ignored = {names[i]: IGNORE for i in FORMATS[cfg.encoding].ignore(cfg, len(names)) if i < len(names)}
    return with_own_labels(spec, name, names, {**ignored, **(taxonomy or {})}, sentences, where)


def load_sources(entries, data_root="", spec=None) -> tuple[list[data.SourceConfig], object]:
    """A training config's `sources:` -> (data.SourceConfig per entry, the label spec: `spec`, default
    label_sentences.yaml, plus the sources' own labels)."""
    spec, sources = spec or load_label_spec(), []
    for entry in entries:
        d, where = source_fields(entry, data_root)
        fields, sentences, taxonomy = split_own_labels(d)
        cfg = data.SourceConfig.from_dict(fields)
        spec = add_own_labels(cfg, spec, where, sentences, taxonomy)
        sources.append(cfg)
    return sources, spec


# ---- evaluation sets: a dataset YAML by name, its data found or the user told where it comes from ---------------

def same_dataset_here(path, data_root):
    """(name, folder) of each other shipped YAML of the same dataset (the name before its first '-': camvid-11 and
    camvid-segnet) whose data is in data_root: what a user who holds that copy (README.md's CamVid in data/camvid-11,
    the SegNet layout) can evaluate on when the YAML asked for lacks its data."""
    family = path.stem.split("-")[0]
    found = []
    for other in sorted(EVAL_CONFIGS.glob(f"{family}*.yaml")):
        d = read_yaml(other) if other != path and other.stem.split("-")[0] == family else None
        if isinstance(d, dict) and isinstance(d.get("root"), str) and Path(under_data_root(d["root"], data_root)).is_dir():
            found.append((other.stem, Path(under_data_root(d["root"], data_root))))
    return found


def read_eval_yaml(name_or_path, root="", list_path="", images="", labels="", data_root="data"):
    """(SourceConfig fields with --root / --list / --images / --labels applied, path, own sentences, own taxonomy)."""
    d, path = read_dataset_yaml(name_or_path)
    d, sentences, taxonomy = split_own_labels(d)
    d["root"] = (str(Path(root).resolve()) if root else
                 str(Path(under_data_root(d["root"], data_root)).resolve()) if d.get("root") else "")
    d = with_location(d, str(Path(list_path).resolve()) if list_path else "", images, labels)
    d["list"] = d.get("list") or ""
    return d, path, sentences, taxonomy


def dataset_labels(name_or_path, spec=None, data_root="data"):
    """A dataset YAML read for its classes and labels alone, its data not looked for (export.py bakes its classes
    into a graph, label_table.py embeds its own sentences) -> (data.SourceConfig, spec plus its own labels)."""
    d, path, sentences, taxonomy = read_eval_yaml(name_or_path, data_root=data_root)
    if not d["list"] and not d.get("labels"):
        d["list"] = "(not read)"  # SourceConfig insists on a data location; only the class names are read here
    cfg = data.SourceConfig.from_dict(d)
    return cfg, add_own_labels(cfg, spec or load_label_spec(), str(path), sentences, taxonomy)


def load_dataset_config(name_or_path, root="", list_path="", images="", labels="", spec=None, also_missing=(),
                        data_root="data"):
    """A dataset name (see find_yaml) or YAML path -> (data.SourceConfig, label spec) for evaluation. A relative
    root in the YAML is under data_root; --root / --list (relative to the working directory) and --images /
    --labels (relative to the root) override the YAML's. The returned spec is `spec` (default:
    label_sentences.yaml) plus the dataset's own labels.

    Raises one short message for everything missing, `also_missing` (flags the caller found missing, e.g.
    "--checkpoint CKPT") included: what to pass, and the YAML whose header says where the data comes from."""
    d, path, sentences, taxonomy = read_eval_yaml(name_or_path, root, list_path, images, labels, data_root)
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
    return cfg, add_own_labels(cfg, spec or load_label_spec(), str(path), sentences, taxonomy)
