"""Label keys, their sentences and the per-dataset taxonomies of label_sentences.yaml, and the texts a label is
embedded as: with the yaml reader alone (no torch), so a deployment without torch (run_onnx.py, serve_onnx.py) words
its labels as predict.py does. labels.py holds the label-embedding tables.
"""
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from errors import ConfigError, LabelKeyError
from settings import read_yaml

LABELS_YAML = Path(__file__).resolve().parent / "label_sentences.yaml"
IGNORE = "ignore"
SENTENCE_PREFIX = "An image of"
TEXT_MODES = ("sentence", "word")  # what a label table embeds: the sentence, or the bare name
SECTIONS = ("labels", "datasets", "mseg_universal")
KEY_RE = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")


@dataclass
class LabelSpec:
    sentences: dict[str, str]  # label key -> "An image of ..."
    datasets: dict[str, dict[str, str]]  # dataset -> {raw class name -> label key | IGNORE}
    mseg_universal: list[tuple[str, str]] = field(default_factory=list)  # [(MSeg name, key | IGNORE)], universal id order


def load_label_spec(path: str | Path = LABELS_YAML) -> LabelSpec:
    """Read and validate label_sentences.yaml. Every error names the file and the offending key."""
    path = Path(path)
    doc = read_yaml(path)  # strict: a duplicate key raises, naming the file and line
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {SECTIONS}")
    for section in doc:
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown top-level section {section!r} (expected {SECTIONS})")
    sentences = doc.get("labels") or {}
    if not isinstance(sentences, dict) or not sentences:
        raise ConfigError(f"{path}: section 'labels' must be a non-empty mapping key -> sentence")
    for key, sentence in sentences.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key) or key == IGNORE:
            raise ConfigError(f"{path}: label key {key!r} must be snake_case (and not {IGNORE!r})")
        if not isinstance(sentence, str) or not sentence.strip():
            raise ConfigError(f"{path}: label {key!r} has a missing or empty sentence")
        if not sentence.startswith(SENTENCE_PREFIX):
            raise ConfigError(f"{path}: sentence of label {key!r} must start with {SENTENCE_PREFIX!r}: {sentence!r}")

    def check_target(where: str, raw, key) -> None:
        if not isinstance(raw, str):  # e.g. an unquoted `no:` that YAML reads as False
            raise ConfigError(f"{path}: {where}: class name {raw!r} is not a string (quote it)")
        if key != IGNORE and key not in sentences:
            raise ConfigError(f"{path}: {where}: {raw!r} maps to unknown label key {key!r}")

    datasets = doc.get("datasets") or {}
    if not isinstance(datasets, dict):
        raise ConfigError(f"{path}: section 'datasets' must be a mapping dataset -> {{class name: key}}")
    for name, mapping in datasets.items():
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError(f"{path}: dataset {name!r} must be a non-empty mapping class name -> key")
        for raw, key in mapping.items():
            check_target(f"dataset {name!r}", raw, key)

    universal = []
    for item in doc.get("mseg_universal") or []:
        if not (isinstance(item, list) and len(item) == 2):
            raise ConfigError(f"{path}: mseg_universal entry {item!r} must be [MSeg name, key]")
        check_target("mseg_universal", *item)
        universal.append((item[0], item[1]))
    dup = sorted(n for n, c in Counter(n for n, _ in universal).items() if c > 1)
    if dup:
        raise ConfigError(f"{path}: mseg_universal: duplicate name(s) {dup}")
    return LabelSpec(sentences=dict(sentences), datasets={d: dict(m) for d, m in datasets.items()},
                     mseg_universal=universal)


def dataset_label_keys(spec: LabelSpec, dataset: str, class_names: list[str]) -> list[str | None]:
    """Label key of each of a dataset's classes, in order (class id = list index); None where the class is ignored."""
    if dataset not in spec.datasets:
        raise LabelKeyError(f"unknown dataset {dataset!r}; label_sentences.yaml has {sorted(spec.datasets)}")
    mapping = spec.datasets[dataset]
    missing = [n for n in class_names if n not in mapping]
    if missing:
        raise LabelKeyError(f"dataset {dataset!r}: class name(s) {missing} have no mapping in label_sentences.yaml")
    return [None if mapping[n] == IGNORE else mapping[n] for n in class_names]


IMAGENET = "imagenet-1k"  # label_sentences.yaml's dataset of the 1000 ImageNet classes, keyed by logit index


def imagenet_keys(spec: LabelSpec) -> list[str]:
    """The label key of each ImageNet-1k class in logit order (the ImageNet branch's class embeddings)."""
    return dataset_label_keys(spec, IMAGENET, [str(i) for i in range(1000)])


def with_own_labels(spec: LabelSpec, dataset: str, class_names: list[str], taxonomy: dict | None = None,
                    sentences: dict | None = None, where: str = "") -> LabelSpec:
    """`spec` plus a dataset's own labels (a user's dataset YAML), so that no repository file needs an edit.

    taxonomy: {class name: label key | "ignore"}; a class it does not list is its own label key, its name as written.
    sentences: {label key or class name: sentence}; they win over label_sentences.yaml's.
    Returns a new LabelSpec whose datasets[dataset] maps every class of `class_names` and whose sentences cover every
    key it maps to. Every class whose key has no sentence in either place is named in one ConfigError (`where` first).
    """
    taxonomy, sentences = taxonomy or {}, sentences or {}
    for what, given in (("taxonomy", taxonomy), ("sentences", sentences)):
        if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                  for k, v in given.items()):
            raise ConfigError(f"{where}: `{what}` must map names to non-empty strings, got {given!r:.200} "
                             f"(quote names that YAML reads as numbers or booleans)")
    stray = sorted(set(taxonomy) - set(class_names))
    if stray:
        raise ConfigError(f"{where}: `taxonomy` lists {stray}, which are not class names of the dataset")
    mapping = {name: taxonomy.get(name, name) for name in class_names}
    stray = sorted(set(sentences) - set(class_names) - set(mapping.values()))
    if stray:
        raise ConfigError(f"{where}: `sentences` has {stray}, which are neither class names nor their label keys")
    own = {}
    for name, key in mapping.items():
        text = sentences.get(key) or sentences.get(name)
        if text and key != IGNORE:
            own.setdefault(key, text)
    missing = [f"{name!r} -> {key!r}" for name, key in mapping.items()
               if key != IGNORE and key not in own and key not in spec.sentences]
    if missing:
        raise ConfigError(f"{where}: {len(missing)} class(es) have no sentence: {', '.join(missing)}. Map each under "
                         f"`taxonomy:` to a label key of label_sentences.yaml (class name: key, or: ignore), or give "
                         f"its sentence under `sentences:` (class name or key: sentence)")
    return LabelSpec(sentences={**spec.sentences, **own}, datasets={**spec.datasets, dataset: mapping},
                     mseg_universal=spec.mseg_universal)


MAX_LABELS = 65535  # ids of 16-bit PNGs (overlays.id_png_dtype), the unknown id kept free


def label_list_problem(labels: list[str], max_labels: int = MAX_LABELS, limit: str = "") -> str:
    """Why a list of labels given by a user cannot be used ("" where it can): the one rule for a flag's and a
    request's label lists. A blank label (label i gets id i, so dropping it would shift the ids after it), one that is
    not valid Unicode (a lone surrogate, from JSON's "\\ud800" or a command line's undecodable bytes, which no file,
    hash or PNG legend can hold), more than max_labels (`limit` says whose limit that is), or one asked twice."""
    for i, label in enumerate(labels, 1):
        if not label.strip():
            return (f"label {i} of {len(labels)} is blank (label i gets id i: a blank label would shift the ids after "
                    f"it)")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            return f"label {i} of {len(labels)} is not valid Unicode ({label!r:.80})"
    if len(labels) > max_labels:
        return f"{len(labels)} labels, more than {limit or f'{max_labels} (the ids of a 16-bit PNG)'}"
    repeated = sorted(label for label, n in Counter(x.strip() for x in labels).items() if n > 1)
    if repeated:
        return f"{repeated} asked more than once"
    return ""


def parse_labels(text: str, flag: str) -> list[str]:
    """A comma-separated label list (a flag's value) -> the labels, stripped; ConfigError naming the flag where
    label_list_problem finds one. "" -> []."""
    if not text.strip():
        return []
    labels = text.split(",")
    problem = label_list_problem(labels)
    if problem:
        raise ConfigError(f"{flag}={text!r}: {problem}")
    return [label.strip() for label in labels]


def label_texts(spec: LabelSpec, keys: list[str], mode: str = "sentence", extra: dict[str, str] | None = None,
                unknown_as_word: bool = False) -> list[str]:
    """The text to embed for each key. mode "sentence": its sentence from `extra` ({key: sentence}, e.g. a user's
    file) or else from label_sentences.yaml; mode "word": the key itself with underscores -> spaces. A key with no
    sentence anywhere raises, unless unknown_as_word (predict.py's free-form labels), which embeds it as a word."""
    if mode not in TEXT_MODES:
        raise ConfigError(f"unknown label text mode {mode!r} (expected one of {TEXT_MODES})")
    extra = extra or {}
    unknown = [k for k in keys if k not in extra and k not in spec.sentences]
    if unknown and not unknown_as_word:
        raise LabelKeyError(f"unknown label key(s) {unknown}")
    if mode == "word":
        return [k.replace("_", " ") for k in keys]
    return [extra.get(k) or spec.sentences.get(k) or k.replace("_", " ") for k in keys]


def label_texts_for(labels, sentences="", mode="sentence", spec=None):
    """The text to embed per label: `sentences` (a YAML file's path, or a {label: sentence} dict as serve.py's
    requests give), then label_sentences.yaml, then the label as a word."""
    user = sentences if isinstance(sentences, dict) else {}
    if sentences and not isinstance(sentences, dict):
        user = read_yaml(sentences) or {}
        bad = {k: v for k, v in user.items() if not isinstance(v, str)} if isinstance(user, dict) else user
        if bad:
            raise ConfigError(f"{sentences}: expected a mapping {{label: sentence}}, got {bad!r:.200}")
    return label_texts(spec or load_label_spec(), labels, mode, extra=user, unknown_as_word=True)
