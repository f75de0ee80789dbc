"""Label-embedding tables: names (label keys), the sentences that were embedded, embeddings [N, D] (L2-normalised,
fp32) and the encoder's name. The table is the one contract between text and vision: training and evaluation read a
table, never a text model, so any encoder (CLIP, a precomputed file, the authors' universal_cat2vec.npy) plugs in.
The label keys, their sentences and the datasets' taxonomies (label_sentences.yaml) are label_spec.py's.
"""
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import LabelKeyError, WeightsError
# label_spec.py is the torch-free half of what this module was (for a deployment without torch); its names are
# imported here too, so that `from labels import ...` serves both halves
from label_spec import (IGNORE, IMAGENET, LABELS_YAML, SENTENCE_PREFIX, TEXT_MODES, LabelSpec,  # noqa: F401
                        dataset_label_keys, imagenet_keys, label_list_problem, label_texts, label_texts_for,
                        load_label_spec, parse_labels, with_own_labels)
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
