"""Label keys, their sentences, per-dataset taxonomies (label_sentences.yaml) and label-embedding tables.

The label table is the one contract between text and vision: names (label keys), the sentences that were embedded,
embeddings [N, D] (L2-normalised, fp32) and the encoder's name. Training and evaluation read a table, never a text
model, so any encoder (CLIP, a precomputed file, the authors' universal_cat2vec.npy) plugs in.
"""
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from errors import ConfigError, LabelKeyError, WeightsError
from settings import read_yaml
from torch_files import read_torch_file, save_torch_file

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


@dataclass
class LabelTable:
    names: list[str]  # N label keys
    sentences: list[str]  # N embedded texts ("" where unknown)
    embeddings: torch.Tensor  # (N, D) fp32, rows L2-normalised
    encoder: str  # what produced the embeddings: an encoder id ("sentence all-MiniLM-L6-v2", "clip-text ViT-B-32.pt")
    weights_sha256: str = ""  # sha256 of the encoder's weights file; "" where unknown (older tables, .npy, onehot)

    def __post_init__(self):
        _check_table(self.names, self.sentences, self.embeddings, "LabelTable")
        self.embeddings = self.embeddings.float()

    def rows(self, keys: list[str]) -> torch.Tensor:
        """Row index of each key: LongTensor (len(keys),); KeyError naming the keys the table lacks."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [k for k in keys if k not in index]
        if missing:
            raise LabelKeyError(f"label table ({self.encoder}) has no row for {missing}")
        return torch.tensor([index[k] for k in keys], dtype=torch.long)


def _check_table(names: list[str], sentences: list[str], e: torch.Tensor, where: str) -> None:
    """Raise unless names/sentences/embeddings (N, D) agree in length and the rows are finite and unit-norm."""
    if not isinstance(e, torch.Tensor) or e.ndim != 2 or not e.is_floating_point():
        raise WeightsError(f"{where}: embeddings must be a 2-D float tensor [N, D], got {getattr(e, 'shape', type(e))}")
    if not (len(names) == len(sentences) == e.shape[0]):
        raise WeightsError(f"{where}: {len(names)} names, {len(sentences)} sentences, {e.shape[0]} embedding rows")
    if len(set(names)) != len(names):
        raise WeightsError(f"{where}: duplicate names {sorted(n for n, c in Counter(names).items() if c > 1)}")
    if not torch.isfinite(e).all():
        raise WeightsError(f"{where}: embeddings contain NaN or inf")
    norms = e.float().norm(dim=1)
    bad = (norms - 1).abs() > 1e-3
    if bad.any():
        i = int(bad.nonzero()[0])
        raise WeightsError(f"{where}: embeddings must be L2-normalised rows; row {i} ({names[i]!r}) has norm "
                           f"{norms[i].item():.4f} ({int(bad.sum())} rows off by > 1e-3)")


def label_table_sha256(table: dict) -> str:
    """sha256 of a label table's content, not of its file: its names (JSON) and its embeddings' shape and float32
    bytes. The same table saved as .pt or loaded from .npy has one hash; other embeddings under the same names, or
    another order, another. table: a dict with "names" and "embeddings" (N, D), e.g. asdict(LabelTable)."""
    emb = table["embeddings"].detach().float().cpu().contiguous()  # (N, D)
    h = hashlib.sha256(json.dumps(table["names"]).encode())
    h.update(str(tuple(emb.shape)).encode())
    h.update(emb.numpy().tobytes())
    return h.hexdigest()


def onehot_table(keys: list[str], dim: int) -> LabelTable:
    """The ablation's labels: orthonormal one-hot vectors instead of sentence embeddings (needs len(keys) <= dim)."""
    if len(keys) > dim:
        raise ConfigError(f"label_table=onehot needs at most embed_dim={dim} labels, the sources use {len(keys)}")
    return LabelTable(names=list(keys), sentences=list(keys), embeddings=torch.eye(len(keys), dim), encoder="onehot")


TEXT_FAMILIES = ("sentence", "clip-text")  # encoder ids begin with their family (LabelTable.encoder)


def encoder_family(encoder: str) -> str:
    """"sentence" or "clip-text" for tables made by those encoders; "" for others (.npy, onehot, test tables)."""
    first = str(encoder).split(" ", 1)[0]
    return first if first in TEXT_FAMILIES else ""


def check_same_encoder(trained: LabelTable | None, encoder: str, width: int | None, given: str) -> None:
    """Raise WeightsError where label embeddings from `encoder` (`width`-d, None = not known yet) cannot stand for the
    rows of the table a checkpoint was trained with: another encoder family (a CLIP table for a model trained on
    sentence-encoder rows, or the reverse) or another width. `given` names the setting that gave them."""
    if trained is None:
        return
    trained_width = trained.embeddings.shape[1]
    a, b = encoder_family(trained.encoder), encoder_family(encoder)
    if (a and b and a != b) or (width is not None and width != trained_width):
        raise WeightsError(f"{given} gives {encoder} embeddings ({width or '?'}-d), but the checkpoint was trained on "
                           f"{trained.encoder} embeddings ({trained_width}-d); embed the labels with the checkpoint's "
                           f"encoder (no --clip_weights/--embeddings: its own, where installed)")


def warn_other_weights(trained: LabelTable | None, encoder: str, sha: str, given: str) -> None:
    """One `warning:` line where the embeddings come from other weights than the checkpoint's table's, within the same
    family and width (CLIP ViT-B/16 for ViT-B/32, or the same weights in another file format: the hashes cannot tell
    those apart): their sha256s differ, or where either is unknown (label_table.py --clip_random_init's table has no
    weights file, older tables no hash) their encoder ids do."""
    if trained is None:
        return
    other = sha != trained.weights_sha256 if sha and trained.weights_sha256 else encoder != trained.encoder
    if other:
        def named(enc, h):
            return f"{enc} (weights sha256 {h[:16] + '...' if h else 'unknown'})"
        print(f"warning: {given}: {named(encoder, sha)} is not the encoder of the checkpoint's table, "
              f"{named(trained.encoder, trained.weights_sha256)}: other weights, or the same in another file? The "
              f"model was trained against that table's rows")


def save_label_table(path: str | Path, table: LabelTable) -> None:
    """torch.save {"names", "sentences", "embeddings" (N, D) fp32, "encoder", "weights_sha256"}, atomically
    (torch_files.save_torch_file)."""
    path = Path(path)
    _check_table(table.names, table.sentences, table.embeddings, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"names": list(table.names), "sentences": list(table.sentences),
           "embeddings": table.embeddings.detach().float().cpu().contiguous(), "encoder": table.encoder,
           "weights_sha256": table.weights_sha256}
    save_torch_file(obj, path)


TABLE = ("a label table: a .pt written by label_table.py (or labels.save_label_table), or the authors' "
         "universal_cat2vec.npy")


def load_label_table(path: str | Path, spec: LabelSpec | None = None) -> LabelTable:
    """Read a .pt table written by save_label_table, or the authors' universal_cat2vec.npy.

    .npy: [194, D] float rows in MSeg universal order (the `unlabeled` row excluded; a 195-row array with it is
    accepted and that row dropped). Rows are L2-normalised here, since the released array need not be. Row names
    come from the `mseg_universal` section of `spec` (default: the repo's label_sentences.yaml); sentences are ""
    because the authors did not release the texts they embedded.
    """
    path = Path(path)
    if path.suffix == ".npy":
        spec = spec or load_label_spec()
        if not path.is_file():
            raise WeightsError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; expected {TABLE}")
        try:
            arr = np.load(path, allow_pickle=False)  # numbers only: an array of Python objects could run code
        except ValueError:  # numpy's message suggests loading unsafely
            raise WeightsError(f"{path}: not a .npy array of numbers; expected {TABLE}") from None
        keys = [k for _, k in spec.mseg_universal]
        names = [k for k in keys if k != IGNORE]
        if arr.ndim != 2 or arr.shape[0] not in (len(names), len(keys)):
            raise WeightsError(f"{path}: expected a [{len(names)}, D] array in MSeg universal order, got {arr.shape}")
        emb = torch.from_numpy(np.asarray(arr, dtype=np.float32))  # (194, D), or (195, D) with `unlabeled`
        if emb.shape[0] != len(names):
            emb = emb[torch.tensor([k != IGNORE for k in keys])]  # (195, D) -> (194, D)
        if not torch.isfinite(emb).all() or (emb.norm(dim=1) == 0).any():
            raise WeightsError(f"{path}: array has NaN/inf or all-zero rows")
        emb = torch.nn.functional.normalize(emb, dim=1)
        return LabelTable(names, [""] * len(names), emb, f"ssiw universal_cat2vec ({path.name})")
    obj = read_torch_file(path, TABLE)
    expected = {"names", "sentences", "embeddings", "encoder"}  # + "weights_sha256" since it was recorded
    if not isinstance(obj, dict) or set(obj) - {"weights_sha256"} != expected:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path}: expected a dict with keys {sorted(expected)}, got {got}; expected {TABLE}")
    names, sentences, emb = list(obj["names"]), list(obj["sentences"]), obj["embeddings"]
    _check_table(names, sentences, emb, str(path))  # first with the file's name in the message
    sha = obj.get("weights_sha256", "")
    if not isinstance(sha, str) or not re.fullmatch(r"([0-9a-f]{64})?", sha):
        raise WeightsError(f"{path}: weights_sha256 must be 64 hex digits or empty, got {sha!r:.80}")
    return LabelTable(names, sentences, emb, str(obj["encoder"]), sha)
