"""The index format: what `python indexes.py` writes once from OpenImages' masks CSV or Objects365's box JSON, and
`clip_image.py` adds (CLIP box targets), and what training reads, memory-mapped, instead of the raw annotations.

Per-sample data lives in flat numpy arrays (StringTable for strings; one .npy file per field): DataLoader workers are
forked from the trainer and share its pages until they write to them, and reading a Python object writes its
reference count, so a list of a million Python objects is copied into every worker bit by bit, while an array is one
object and a mapped file is shared page cache (see readers.py's docstring).
"""
import json
import mmap
import os
from pathlib import Path

import numpy as np

from errors import ConfigError, DataError


class StringTable:
    """Many strings as one UTF-8 byte array and (n + 1,) int64 offsets: string i is blob[offsets[i]:offsets[i+1]].
    Two numpy arrays instead of a Python object per string, so forked workers share them (see the module docstring);
    the arrays may be memory-mapped index fields."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, strings) -> "StringTable":
        encoded = [s.encode() for s in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()



# ---- Index folders of the weak sources (written by indexes.py) -------------------------------------------------------
# One .npy file per field, memory-mapped (map_npy), plus index.json: kind, format, build (an id that box
# targets record), class names, counts, the source files (size, mtime), what the build checked and dropped.
# `X_offsets` fields are (n + 1,) int64: item i owns rows offsets[i]:offsets[i+1] of X. Sizes are at full scale.
INDEX_FORMAT = 1
INDEX_FIELDS = {  # kind -> {field: (dtype, shape)}; a shape entry names a count in index.json ("x+1": count + 1)
    "coco_boxes": {  # Objects365 V2 train: 1.74M images, 25.4M boxes
        "image_names": ("uint8", ("image_name_bytes",)),  # paths under the images folder: 1.74M x ~30 B = 52 MB
        "image_names_offsets": ("int64", ("images+1",)),  # 1.74M x int64 = 14 MB
        "image_sizes": ("int32", ("images", 2)),  # (width, height) as the JSON gives them: 14 MB
        "box_offsets": ("int64", ("images+1",)),  # image i's boxes are rows box_offsets[i]:box_offsets[i+1]: 14 MB
        "boxes": ("float32", ("boxes", 4)),  # 25.4M boxes x 4 float32 (x1, y1, x2, y2 in pixels) = 406 MB
        "box_classes": ("int16", ("boxes",)),  # class id = position in the JSON's categories: 25.4M x 2 B = 51 MB
    },
    "openimages": {  # OpenImages V6 segmentation train: 944k images, 2.69M masks
        "image_names": ("uint8", ("image_name_bytes",)),  # ImageIDs (16 hex digits): 944k x 16 B = 15 MB
        "image_names_offsets": ("int64", ("images+1",)),  # 7.6 MB
        "mask_offsets": ("int64", ("images+1",)),  # image i's masks are rows mask_offsets[i]:mask_offsets[i+1]: 7.6 MB
        "mask_names": ("uint8", ("mask_name_bytes",)),  # paths under the masks folder: 2.69M x ~36 B = 97 MB
        "mask_names_offsets": ("int64", ("masks+1",)),  # 21 MB
        "mask_classes": ("int16", ("masks",)),  # class id = line of the MID in the classes file: 5.4 MB
    },
}
OFFSET_OF = {"image_names_offsets": "image_names", "box_offsets": "boxes", "mask_offsets": "mask_classes",
             "mask_names_offsets": "mask_names"}  # offsets field -> the field whose rows it points into


def map_npy(path) -> np.ndarray:
    """A read-only memory map of a .npy file, as numpy.load(mmap_mode="r") gives, advised MADV_RANDOM: training
    reads a few rows here and there, and on a page fault the kernel would otherwise read read_ahead_kb around it
    (8 MB on the test machine): megabytes of I/O and page cache per 16-byte box, which also showed as ~60 MiB of
    mapped file pages per worker (tools/bench_weak_data.py). Raises ValueError for a truncated file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset, size = f.tell(), Path(path).stat().st_size
        if size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"{size} bytes, the header announces {dtype} {shape}")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    if hasattr(mmap, "MADV_RANDOM"):  # Linux, macOS
        m.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=m, offset=offset, order="F" if fortran else "C")


def read_index_meta(folder, kind: str) -> dict:
    """index.json of an index folder of `kind` (class names, counts, provenance); raises if absent or of another
    kind."""
    path = Path(folder) / "index.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: not an index folder (no index.json); build it with `python indexes.py {kind} "
                        f"...`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if (meta.get("kind"), meta.get("format")) != (kind, INDEX_FORMAT):
        raise DataError(f"{path}: a {meta.get('kind')!r} index of format {meta.get('format')}, expected {kind!r} "
                        f"format {INDEX_FORMAT}; rebuild it with `python indexes.py {kind} ...`")
    return meta


class Index:
    """An index folder opened for reading: `meta` (index.json) and `arrays` (field -> read-only memory map), checked
    against each other when opened, so a truncated or inconsistent index raises naming the folder and the field.
    The checks read the offsets only (tens of MB at full scale), never the boxes or masks. Pickled (into a spawned
    worker), an Index carries its folder and meta and maps the files again."""

    def __init__(self, folder, kind: str):
        self.folder, self.kind = Path(folder), kind
        self.meta = read_index_meta(folder, kind)
        self.arrays = self._map()
        self._check()

    def __getstate__(self):
        return {"folder": self.folder, "kind": self.kind, "meta": self.meta}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.arrays = self._map()

    def _map(self) -> dict[str, np.ndarray]:
        arrays = {}
        for field in INDEX_FIELDS[self.kind]:
            try:
                arrays[field] = map_npy(self.folder / f"{field}.npy")
            except (OSError, ValueError) as e:
                raise DataError(f"{self.folder}: field {field} ({field}.npy) is missing, truncated or unreadable "
                                f"({e}); rebuild the index") from None
        return arrays

    def _check(self) -> None:
        counts = self.meta["counts"]
        for field, (dtype, shape) in INDEX_FIELDS[self.kind].items():
            want = tuple(d if isinstance(d, int) else counts[d[:-2]] + 1 if d.endswith("+1") else counts[d]
                         for d in shape)
            got = self.arrays[field]
            if got.dtype != np.dtype(dtype) or got.shape != want:
                raise DataError(f"{self.folder}: field {field} is {got.dtype} {got.shape}, index.json says "
                                f"{dtype} {want}; the index is truncated or mixed up, rebuild it")
        for field, target in OFFSET_OF.items():
            if field in self.arrays:
                off, rows = self.arrays[field], len(self.arrays[target])
                if hasattr(mmap, "MADV_WILLNEED"):  # read whole, in large reads (the map is advised random)
                    off.base.madvise(mmap.MADV_WILLNEED)
                if off[0] != 0 or off[-1] != rows or (np.diff(off) < 0).any():
                    raise DataError(f"{self.folder}: field {field} does not run from 0 to {rows} without going "
                                    f"backwards (the rows of {target}); rebuild the index")

    def __len__(self) -> int:
        return self.meta["counts"]["images"]

    def strings(self, field: str) -> StringTable:
        return StringTable(self.arrays[field], self.arrays[field + "_offsets"])

    def rows(self, offsets_field: str, i: int) -> slice:
        off = self.arrays[offsets_field]
        return slice(int(off[i]), int(off[i + 1]))


# The box targets of a coco_boxes index (written by `clip_image.py`, which resumes): a folder of
#   targets.npy   (total boxes, C) float16: row r = CLIP image embedding (L2-normalised) of box row r of the index,
#                 or NaN where the image was unreadable (clip_image.py --skip_bad): those boxes have no target;
#                 25.4M boxes x 512 x 2 B = 26 GB, memory-mapped, so only the rows of the sampled images are read
#   done.npy      (shards,) uint8: 1 once the rows of shard s (rows s * shard_rows ...) are on disk
#   targets.json  {index_build, rows, dim, shard_rows, encoder}
BOX_TARGETS_FILES = ("targets.npy", "done.npy", "targets.json")


def prepare_targets(out: Path, index: Index, dim: int, shard_rows: int, encoder: str) -> None:
    """Create the target folder (rank 0; a temporary folder renamed into place), or check that the one there
    belongs to this index, encoder and shard size, so resuming continues the same work."""
    rows = index.meta["counts"]["boxes"]
    want = {"index_build": index.meta["build"], "rows": rows, "dim": dim, "shard_rows": shard_rows,
            "encoder": encoder, "index": str(index.folder.resolve())}
    if out.exists():
        if not (out / "targets.json").is_file():
            raise ConfigError(f"{out} exists and is not a box-target folder (no targets.json); choose another --out")
        have = json.loads((out / "targets.json").read_text())
        differs = [k for k in want if k != "index" and have.get(k) != want[k]]
        if differs:
            raise ConfigError(f"{out} holds box targets with other {', '.join(differs)} "
                             f"({ {k: have.get(k) for k in differs} } vs { {k: want[k] for k in differs} }); "
                             f"remove it or choose another --out")
        return
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    np.lib.format.open_memmap(tmp / "targets.npy", mode="w+", dtype=np.float16, shape=(rows, dim)).flush()
    np.save(tmp / "done.npy", np.zeros(-(-rows // shard_rows), np.uint8))  # ceil: the last shard may be short
    (tmp / "targets.json").write_text(json.dumps(want, indent=1) + "\n")
    os.replace(tmp, out)


def open_box_targets(folder, index: Index) -> np.ndarray:
    """The finished (total boxes, C) float16 targets of `index`, memory-mapped. Targets of another index build,
    unfinished shards or a truncated file raise naming the folder."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "targets.json").read_text())
        done = np.load(folder / "done.npy")
        targets = map_npy(folder / "targets.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: not a box-target folder, or a truncated one ({e}); write it with "
                        f"`clip_image.py --index {index.folder} --out {folder}`") from None
    if meta.get("index_build") != index.meta["build"]:
        raise DataError(f"{folder}: box targets of index build {meta.get('index_build')}, but {index.folder} is "
                        f"build {index.meta['build']} (rebuilt since?); write the targets again")
    if not done.all():
        raise DataError(f"{folder}: {int((done == 0).sum())} of {len(done)} shards are not written yet; rerun "
                        f"the clip_image.py command, it resumes with the missing shards")
    if targets.dtype != np.float16 or targets.shape != (index.meta["counts"]["boxes"], meta.get("dim")):
        raise DataError(f"{folder}/targets.npy: expected float16 ({index.meta['counts']['boxes']}, "
                        f"{meta.get('dim')}), got {targets.dtype} {targets.shape}")
    return targets
