"""Label-embedding tables: names (label keys), the sentences that were embedded, embeddings [N, D] (L2-normalised,
fp32) and the encoder's name. The table is the one contract between text and vision: training and evaluation read a
table, never a text model, so any encoder (CLIP, a precomputed file, the authors' universal_cat2vec.npy) plugs in.
The label keys, their sentences and the datasets' taxonomies (label_sentences.yaml) are label_spec.py's.
"""
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import ConfigError, LabelKeyError, WeightsError
from label_spec import IGNORE, LabelSpec, load_label_spec
from torch_files import read_torch_file, save_torch_file


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
