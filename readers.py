"""The on-disk formats of the sources, each read into raw class ids (data.py maps ids to label-table rows).

- list files: MSeg style, one sample a line, `image_path label_path` relative to the dataset root;
- names files: one class name a line, line index = class id;
- folder pairs: an image folder and a label folder, samples paired by file stem (detectron2's layouts);
- id PNGs or TIFFs (8- or 16-bit, one class id per pixel) and colour-coded PNGs (RGB or RGBA, one colour per class);
- OpenImages V6 segmentation (one binary PNG per instance) and COCO-format boxes (Objects365) with their CLIP box
  targets: millions of annotations, read through an index folder that `python indexes.py` builds once from the CSV or
  JSON (index_format.py). Training never parses the raw annotation files.
FORMATS at the end has one entry per format (`encoding` of a source): the fields it needs, its class names, the ids
it ignores and how it opens a source. Every problem raises DataError naming the file and what is wrong with it.

Memory: DataLoader workers are forked from the trainer and share its pages until they write to them. Reading a Python
object writes its reference count (and the garbage collector writes to every container), so a list of a million
paths is copied into every worker bit by bit; numpy arrays are one object each, and memory-mapped files are shared
page cache. So per-sample data lives in arrays here: list lines in a StringTable, annotations in mapped index files.
Nothing is checked per file at start (millions of stats on a network filesystem): the index command checked every
file once, and a file that vanished since is a DataError when it is read (skipped and counted under skip_bad).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from errors import ConfigError, DataError
from images import open_image
from index_format import Index, StringTable, map_npy, open_box_targets, read_index_meta

def read_list(list_path: Path, label_folder: str = "", label_suffix: str = ".png") -> tuple[StringTable, StringTable]:
    """MSeg-style list -> (image paths, label paths) as written in the list (relative to the dataset root).
    With label_folder, a line may hold the image alone (LabelMeFacade's own lists): its label is
    label_folder/<image stem><label_suffix>. An empty list or a bad line raise."""
    images, labels = [], []
    for n, line in enumerate(Path(list_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) == 1 and label_folder:
            fields.append(f"{label_folder}/{Path(fields[0]).stem}{label_suffix}")
        if len(fields) != 2:
            alone = "" if label_folder else " (or the image alone, with label_folder set)"
            raise DataError(f"{list_path}:{n}: expected `image_path label_path`{alone}, got {line!r}")
        images.append(fields[0])
        labels.append(fields[1])
    if not images:
        raise DataError(f"{list_path}: the list is empty")
    return StringTable.from_strings(images), StringTable.from_strings(labels)


def pair_folders(root: Path, images: str, labels: str, image_suffix: str,
                 label_suffix: str) -> tuple[StringTable, StringTable]:
    """Two folders below `root` paired by file stem (the detectron2 layouts of the open-vocabulary benchmarks) ->
    (image paths, label paths) relative to root, sorted by stem, as read_list returns a list's.

    The label folder defines the samples: its `*label_suffix` files, each of which needs an image `<stem>image_suffix`
    (a label without its image raises, naming the stems). Images without a label are not samples: the benchmarks keep
    every split's images in one folder (VOC2010/JPEGImages holds 10,103 images, PASCAL-Context val labels 5,105 of
    them), as detectron2's load_sem_seg, which takes the two folders' intersection, expects.
    Listing is one scandir of each folder (ADE20K-847 val: 2,000 files; PASCAL-Context: 10,103): cheap at start-up.
    """
    image_dir, label_dir = Path(root) / images, Path(root) / labels
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder")
    with os.scandir(label_dir) as entries:
        stems = sorted(e.name[:-len(label_suffix)] for e in entries
                       if e.name.endswith(label_suffix) and len(e.name) > len(label_suffix))
    if not stems:
        raise DataError(f"{label_dir}: no label files ending in {label_suffix!r}")
    with os.scandir(image_dir) as entries:
        have = {e.name for e in entries}
    lonely = [s for s in stems if s + image_suffix not in have]
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" ... and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        raise DataError(f"{label_dir}: {len(lonely)} label(s) have no image {image_dir}/<stem>{image_suffix}: {shown}")
    return (StringTable.from_strings(f"{images}/{s}{image_suffix}" for s in stems),
            StringTable.from_strings(f"{labels}/{s}{label_suffix}" for s in stems))


def read_names(path: Path) -> list[str]:
    """Names file -> class names; line index = class id. Blank lines are an error (they would shift the ids)."""
    lines = Path(path).read_text().splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not a class
        lines.pop()
    for n, name in enumerate(lines):
        if not name.strip():
            raise DataError(f"{path}:{n + 1}: blank class name (line index = class id, so it would shift the ids)")
    if not lines:
        raise DataError(f"{path}: no class names")
    return [name.strip() for name in lines]


def read_id_label(path: Path) -> np.ndarray:
    """Single-channel id PNG or TIFF (L, P, I;16 or I) -> (H, W) int32 raw class ids. 16-bit maps carry ids above 255
    (ADE20K-847, PASCAL-Context-459 as detectron2 prepares them: uint16 TIFF, 65535 = no label)."""
    im = open_image(path)
    if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{path}: expected a single-channel id map (PNG or TIFF), got mode {im.mode}")
    try:
        # P: the palette indices are the ids (np.asarray of a P image gives indices, not colours)
        return np.asarray(im).astype(np.int32)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated label ({e})") from None


def color_codes(colors: dict[str, str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """{"R:G:B": class name} -> (sorted int codes R<<16|G<<8|B, raw id per code, class names in first-seen order)."""
    names, codes, ids = [], [], []
    for rgb, name in colors.items():
        parts = rgb.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise ConfigError(f"colour {rgb!r} (class {name!r}): expected R:G:B with 0..255 each")
        r, g, b = (int(p) for p in parts)
        if name not in names:
            names.append(name)
        codes.append((r << 16) | (g << 8) | b)
        ids.append(names.index(name))
    order = np.argsort(codes)
    return np.asarray(codes, np.int64)[order], np.asarray(ids, np.int32)[order], names


def read_color_label(path: Path, codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Colour-coded PNG (RGB, or RGBA whose alpha is ignored) -> (H, W) int32 raw ids. An unknown colour raises."""
    im = open_image(path)
    try:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)  # (H, W, 3)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated label ({e})") from None
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    pos = np.minimum(np.searchsorted(codes, code), len(codes) - 1)
    bad = codes[pos] != code
    if bad.any():
        y, x = np.argwhere(bad)[0]
        r, g, b = rgb[y, x]
        raise DataError(f"{path}: colour {r}:{g}:{b} at (x={x}, y={y}) is not in the source's colour table "
                        f"({int(bad.sum())} pixels)")
    return ids[pos]


# ---- OpenImages V6 segmentation --------------------------------------------------------------------------------------

def paint_openimages(size: tuple[int, int], masks: list[tuple[Path, int]], ignore_id: int) -> np.ndarray:
    """Instance masks -> (H, W) int32 raw ids; pixels no mask covers get `ignore_id` (coarse labels: unlabelled is
    unknown, not background).

    Masks may be smaller than the image (OpenImages stores many at reduced size): nearest-resized to it.
    Overlaps: larger masks are painted first, so where masks overlap the smallest one wins. Overlaps in OpenImages
    are mostly parts or occluders inside a larger object (a face on a person, a wheel on a car), so the smaller mask
    is the more specific and usually the front-most label.
    """
    w, h = size
    binaries = []
    for path, raw_id in masks:
        im = open_image(path)
        try:
            m = im.convert("L")
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: unreadable or truncated mask ({e})") from None
        if m.size != (w, h):
            m = m.resize((w, h), Image.NEAREST)
        binary = np.asarray(m) > 0  # (H, W) bool; masks are 0/255 (or 0/1)
        binaries.append((int(binary.sum()), raw_id, binary))
    out = np.full((h, w), ignore_id, np.int32)
    for _, raw_id, binary in sorted(binaries, key=lambda t: -t[0]):  # stable: equal areas keep CSV order
        out[binary] = raw_id
    return out


# ---- The formats: one block each, one line in FORMATS ----------------------------------------------------------------
# `open(cfg)` returns the samples of a source (a data.SourceConfig): len(samples), samples.image(i) -> image path,
# samples.label(i, (w, h)) -> ((H, W) int32 raw ids, the label's path for messages) or None for a source without
# masks, and samples.boxes(i) -> ((K, 4) float xyxy in original pixels, (K,) int64 raw ids, (K, C) box targets) or
# None for a source without boxes.

class Samples:
    """What every format's samples share: no masks and no boxes unless the format says otherwise."""

    def label(self, i: int, size: tuple[int, int]):
        return None

    def boxes(self, i: int):
        return None


# -- id: image/label pairs from an MSeg-style list of `image label` lines, or from two folders paired by stem (`images`
#    + `labels`, the detectron2 layouts); single-channel id PNGs or TIFFs (8 or 16 bit); class names from a names file
#    or inline --
# -- color: the same pairs; colour-coded PNGs, one colour per class (`colors: {"R:G:B": class name}`) --

def check_pairs(cfg) -> None:
    """A list, or an image folder with a label folder: the two ways to give a source's pairs."""
    if bool(cfg.labels) != bool(cfg.images):
        raise ConfigError(f"source {cfg.name}: encoding {cfg.encoding} pairs folders by stem: give both 'images' and "
                         f"'labels' (or a 'list' instead)")


def sample_pairs(cfg) -> tuple[StringTable, StringTable]:
    """(image paths, label paths), relative to the root, of a list source or a folder-pair source. Nothing is checked
    per file here (millions of files on a network filesystem): a file that vanished is a DataError when it is read."""
    if cfg.list:
        return read_list(cfg.path(cfg.list), cfg.label_folder, cfg.label_suffix)
    return pair_folders(Path(cfg.root), cfg.images, cfg.labels, cfg.image_suffix, cfg.label_suffix)


class ListSamples(Samples):
    """The samples of an MSeg-style list or of two paired folders; `read(label path) -> (H, W) int32 raw ids` decodes
    one label file."""

    def __init__(self, cfg, read: Callable[[Path], np.ndarray]):
        self.root, self.read = Path(cfg.root), read
        self.images, self.labels = sample_pairs(cfg)  # MSeg's seven train lists: 180k lines, ~25 MB

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Path:
        return self.root / self.images[i]

    def label_path(self, i: int) -> Path:
        return self.root / self.labels[i]

    def label(self, i: int, size: tuple[int, int]):
        path = self.label_path(i)
        return self.read(path), path


def open_color_list(cfg) -> ListSamples:
    codes, ids, _ = color_codes(cfg.colors)
    return ListSamples(cfg, lambda path: read_color_label(path, codes, ids))


# -- openimages: OpenImages V6 segmentation through its index (indexes.py openimages): images, one PNG per instance --

class OpenImagesSamples(Samples):
    """One sample per image of the index; its label paints the image's instance masks (paint_openimages), and
    pixels no mask covers get the raw id one past the last class, which the format ignores."""

    def __init__(self, cfg):
        self.index = Index(cfg.path(cfg.index), "openimages")
        self.images, self.masks = cfg.path(cfg.images), cfg.path(cfg.masks)
        self.unlabelled = len(self.index.meta["class_names"])

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Path:
        return self.images / f"{self.index.strings('image_names')[i]}.jpg"

    def label(self, i: int, size: tuple[int, int]):
        rows, names = self.index.rows("mask_offsets", i), self.index.strings("mask_names")
        classes = self.index.arrays["mask_classes"][rows]
        masks = [(self.masks / names[j], int(c)) for j, c in zip(range(rows.start, rows.stop), classes)]
        return paint_openimages(size, masks, self.unlabelled), masks[0][0]


# -- coco_boxes: a COCO-format box file (Objects365) through its index (indexes.py coco_boxes), and for the box loss
#    the CLIP box targets of clip_image.py, row for row --

class CocoBoxSamples(Samples):
    """One sample per image of the index; no masks, boxes with their CLIP targets."""

    def __init__(self, cfg):
        self.index = Index(cfg.path(cfg.index), "coco_boxes")
        self.images, self.targets_folder = cfg.path(cfg.images), cfg.path(cfg.box_targets)
        self.targets = open_box_targets(self.targets_folder, self.index)  # (total boxes, C) float16, mapped

    def __getstate__(self):  # a spawned worker maps the targets again: pickling a memmap copies all of it (26 GB)
        return dict(self.__dict__, targets=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.targets = map_npy(self.targets_folder / "targets.npy")

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> Path:
        return self.images / self.index.strings("image_names")[i]

    def boxes(self, i: int):
        rows = self.index.rows("box_offsets", i)
        a = self.index.arrays
        targets = self.targets[rows].astype(np.float32)  # (K, C), copied out of the read-only map
        has = ~np.isnan(targets).any(1)  # NaN: the box's image was unreadable when the targets were made
        return (torch.from_numpy(a["boxes"][rows][has]),  # (K', 4)
                torch.from_numpy(a["box_classes"][rows][has].astype(np.int64)),  # (K',)
                torch.from_numpy(targets[has]))  # (K', C)


def index_class_names(kind: str) -> Callable:
    """cfg -> the class names recorded in the source's index (openimages: MIDs; coco_boxes: category names)."""
    return lambda cfg: read_index_meta(cfg.path(cfg.index), kind)["class_names"]


@dataclass(frozen=True)
class Format:
    required: tuple            # SourceConfig fields it needs; a tuple of names inside means exactly one of them
    class_names: Callable      # cfg -> [class name]; list index = raw class id
    open: Callable             # cfg -> samples (see above)
    ignore: Callable = lambda cfg, n: []  # (cfg, number of classes) -> raw ids that carry no label
    check: Callable = lambda cfg: None    # cfg -> None; raises ValueError on a combination `required` cannot say


FORMATS = {
    "id": Format((("list", "labels"), ("names", "class_names")),
                 lambda cfg: list(cfg.class_names) if cfg.class_names else read_names(cfg.path(cfg.names)),
                 lambda cfg: ListSamples(cfg, read_id_label), ignore=lambda cfg, n: [int(i) for i in cfg.ignore],
                 check=check_pairs),
    "color": Format((("list", "labels"), "colors"), lambda cfg: color_codes(cfg.colors)[2], open_color_list,
                    check=check_pairs),
    "openimages": Format(("index", "images", "masks"), index_class_names("openimages"), OpenImagesSamples,
                         ignore=lambda cfg, n: [n]),  # painted where no mask lies
    "coco_boxes": Format(("index", "images"), index_class_names("coco_boxes"), CocoBoxSamples),
}
