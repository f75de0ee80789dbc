"""The on-disk formats of the sources, each read into raw class ids (data.py maps ids to label-table rows).

- list files: MSeg style, one sample a line, `image_path label_path` relative to the dataset root;
- names files: one class name a line, line index = class id;
- folder pairs: an image folder and a label folder, samples paired by file stem (detectron2's layouts);
- id PNGs or TIFFs (8- or 16-bit, one class id per pixel) and colour-coded PNGs (RGB or RGBA, one colour per class);
- OpenImages V6 segmentation: the masks CSV plus one binary PNG per instance;
- COCO-format box JSON (Objects365).
FORMATS at the end has one entry per format (`encoding` of a source): the fields it needs, its class names, the ids
it ignores and how it opens a source. Every problem raises DataError naming the file and what is wrong with it.
"""
import csv
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from errors import ConfigError, DataError

Image.MAX_IMAGE_PIXELS = 200_000_000  # Mapillary/OpenImages originals are large but legitimate; this still stops bombs

OPENIMAGES_MASK_COLUMNS = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                           "PredictedIoU", "Clicks"]


def read_list(list_path: Path, root: Path) -> list[tuple[Path, Path]]:
    """MSeg-style list -> [(image path, label path)], both joined to `root`. Empty list or a bad line raise."""
    pairs = []
    for n, line in enumerate(Path(list_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{list_path}:{n}: expected `image_path label_path`, got {line!r}")
        pairs.append((root / fields[0], root / fields[1]))
    if not pairs:
        raise DataError(f"{list_path}: the list is empty")
    return pairs


def pair_folders(images: Path, labels: Path, image_suffix: str, label_suffix: str) -> list[tuple[Path, Path]]:
    """Two folders paired by file stem (the detectron2 layouts of the open-vocabulary benchmarks) -> [(image path,
    label path)], sorted by stem.

    The label folder defines the samples: its `*label_suffix` files, each of which needs an image `<stem>image_suffix`
    (a label without its image raises, naming the stems). Images without a label are not samples: the benchmarks keep
    every split's images in one folder (VOC2010/JPEGImages holds 10,103 images, PASCAL-Context val labels 5,105 of
    them), as detectron2's load_sem_seg, which takes the two folders' intersection, expects.
    Listing is one scandir of each folder (ADE20K-847 val: 2,000 files; PASCAL-Context: 10,103): cheap at start-up.
    """
    for folder in (images, labels):
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder")
    with os.scandir(labels) as entries:
        stems = sorted(e.name[:-len(label_suffix)] for e in entries
                       if e.name.endswith(label_suffix) and len(e.name) > len(label_suffix))
    if not stems:
        raise DataError(f"{labels}: no label files ending in {label_suffix!r}")
    with os.scandir(images) as entries:
        have = {e.name for e in entries}
    lonely = [s for s in stems if s + image_suffix not in have]
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" ... and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        raise DataError(f"{labels}: {len(lonely)} label(s) have no image {images}/<stem>{image_suffix}: {shown}")
    return [(images / f"{s}{image_suffix}", labels / f"{s}{label_suffix}") for s in stems]


def check_exist(paths, what: str, show: int = 10) -> None:
    """Raise DataError listing the first `show` missing paths (one os.path.exists per path: cheap at start-up)."""
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        listed = "\n  ".join(missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise DataError(f"{what}: {len(missing)} listed file(s) do not exist:\n  {listed}{more}")


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


def open_image(path: Path) -> Image.Image:
    """Open (header only; pixels are decoded later, after `draft`)."""
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path}: unreadable image ({e})") from None


def decode_rgb(im: Image.Image, path: Path, draft_size=None) -> Image.Image:
    """Decode to RGB. `draft_size` (w, h) lets JPEG decode at 1/2, 1/4 or 1/8 scale while staying >= that size,
    which is most of the decode time saved on large photos. Truncated/corrupt files raise DataError."""
    try:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
        return im.convert("RGB")  # forces the full decode, so truncation surfaces here
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from None


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


# ---- OpenImages V6 segmentation -------------------------------------------------------------------------------------

def read_class_descriptions(path: Path) -> tuple[list[str], list[str]]:
    """`LabelName,DisplayName` CSV (header optional, as in oidv6-class-descriptions.csv) -> (label names, names)."""
    label_names, display = [], []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if n == 1 and row == ["LabelName", "DisplayName"]:
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{n}: expected `LabelName,DisplayName`, got {row}")
            label_names.append(row[0])
            display.append(row[1])
    if not label_names:
        raise DataError(f"{path}: no classes")
    return label_names, display


def read_openimages_masks(path: Path, class_ids: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Masks CSV -> {ImageID: [(MaskPath, raw class id), ...]}, images in first-appearance order."""
    per_image: dict[str, list[tuple[str, int]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(OPENIMAGES_MASK_COLUMNS[:3]) <= set(reader.fieldnames):
            raise DataError(f"{path}: header {reader.fieldnames} lacks MaskPath,ImageID,LabelName "
                            f"(expected {','.join(OPENIMAGES_MASK_COLUMNS)})")
        for n, row in enumerate(reader, 2):
            if row["LabelName"] not in class_ids:
                raise DataError(f"{path}:{n}: LabelName {row['LabelName']} is not in the class descriptions")
            per_image.setdefault(row["ImageID"], []).append((row["MaskPath"], class_ids[row["LabelName"]]))
    if not per_image:
        raise DataError(f"{path}: no masks")
    return per_image


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


# ---- COCO-format boxes (Objects365) ----------------------------------------------------------------------------------

def load_coco_boxes(json_path) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """COCO JSON -> {image file_name: (boxes FloatTensor (K, 4) xyxy in original pixels, [category name] * K)}.

    Every image of the JSON is present (K may be 0), in the JSON's image order; boxes in annotation order. This order
    is the contract with clip_image.py's box-target cache. Degenerate boxes are kept here (the cache counts them);
    transforms drop boxes that end up narrower than a pixel, with their targets.
    """
    coco = _read_json(str(json_path))
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"{json_path}: not a COCO detection JSON (no {key!r})")
    cat_name = {c["id"]: c["name"] for c in coco["categories"]}
    file_of = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes: dict[str, list] = {im["file_name"]: [] for im in coco["images"]}
    names: dict[str, list] = {im["file_name"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] not in file_of:
            raise DataError(f"{json_path}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in cat_name:
            raise DataError(f"{json_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        x, y, bw, bh = ann["bbox"]  # COCO: top-left corner + size
        file_name = file_of[ann["image_id"]]
        boxes[file_name].append([x, y, x + bw, y + bh])
        names[file_name].append(cat_name[ann["category_id"]])
    return {f: (torch.tensor(boxes[f], dtype=torch.float32).reshape(-1, 4), names[f]) for f in boxes}


def coco_category_names(json_path) -> list[str]:
    """Category names of a COCO JSON in category order (the source's class list)."""
    coco = _read_json(str(json_path))
    if "categories" not in coco:
        raise DataError(f"{json_path}: not a COCO detection JSON (no 'categories')")
    return [c["name"] for c in coco["categories"]]


@functools.lru_cache(maxsize=2)
def _read_json(path: str) -> dict:
    """Objects365's JSON is gigabytes: read it once per process even though class names and boxes both need it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from None


# ---- The formats: one block each, one line in FORMATS ---------------------------------------------------------------
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


def sample_pairs(cfg) -> list[tuple[Path, Path]]:
    """[(image path, label path)] of a list source or a folder-pair source."""
    if cfg.list:
        pairs = read_list(cfg.path(cfg.list), Path(cfg.root))
        check_exist([p for pair in pairs for p in pair], f"source {cfg.name} ({cfg.path(cfg.list)})")
        return pairs
    return pair_folders(cfg.path(cfg.images), cfg.path(cfg.labels), cfg.image_suffix, cfg.label_suffix)


class ListSamples(Samples):
    """The samples of an MSeg-style list or of two paired folders; `read(label path) -> (H, W) int32 raw ids` decodes
    one label file."""

    def __init__(self, cfg, read: Callable[[Path], np.ndarray]):
        self.pairs = sample_pairs(cfg)  # [(image, label)]
        self.read = read

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, i: int) -> Path:
        return self.pairs[i][0]

    def label(self, i: int, size: tuple[int, int]):
        return self.read(self.pairs[i][1]), self.pairs[i][1]


def open_color_list(cfg) -> ListSamples:
    codes, ids, _ = color_codes(cfg.colors)
    return ListSamples(cfg, lambda path: read_color_label(path, codes, ids))


# -- openimages: OpenImages V6 segmentation (class descriptions CSV, masks CSV, one binary PNG per instance) --

class OpenImagesSamples(Samples):
    """One sample per image of the masks CSV; its label paints the image's instance masks (paint_openimages), and
    pixels no mask covers get the raw id one past the last class, which the format ignores."""

    def __init__(self, cfg):
        label_names, _ = read_class_descriptions(cfg.path(cfg.class_descriptions))
        per_image = read_openimages_masks(cfg.path(cfg.masks_csv), {ln: i for i, ln in enumerate(label_names)})
        # mask names stay strings (joined at load time): the train CSV has 2.7M masks and every worker holds them
        self.masks_dir, self.unlabelled = cfg.path(cfg.masks), len(label_names)
        self.items = [(cfg.path(cfg.images) / f"{image_id}.jpg", masks) for image_id, masks in per_image.items()]
        check_exist([p for image, masks in self.items for p in [image] + [self.masks_dir / m for m, _ in masks]],
                    f"source {cfg.name} ({cfg.path(cfg.masks_csv)})")

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Path:
        return self.items[i][0]

    def label(self, i: int, size: tuple[int, int]):
        masks = [(self.masks_dir / mask, raw_id) for mask, raw_id in self.items[i][1]]
        return paint_openimages(size, masks, self.unlabelled), masks[0][0]


# -- coco_boxes: a COCO-format box JSON (Objects365) and, for the box loss, the CLIP box-target cache of clip_image.py --

class CocoBoxSamples(Samples):
    """One sample per image of the JSON (load_coco_boxes order); no masks, boxes with their CLIP targets."""

    def __init__(self, cfg):
        json_path = cfg.path(cfg.boxes_json)
        self.boxes_of = load_coco_boxes(json_path)  # {file: ((K, 4), [name] * K)}
        self.items = [(cfg.path(cfg.images) / file_name, file_name) for file_name in self.boxes_of]
        if not self.items:
            raise DataError(f"{json_path}: no images")
        self.targets_path = cfg.path(cfg.box_targets)
        check_exist([image for image, _ in self.items] + [self.targets_path], f"source {cfg.name} ({json_path})")
        self.raw_id = {name: i for i, name in enumerate(coco_category_names(json_path))}
        cache = torch.load(self.targets_path, map_location="cpu", weights_only=True)
        self.targets = cache["targets"]  # {file: (K, C)} in load_coco_boxes order

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Path:
        return self.items[i][0]

    def boxes(self, i: int):
        file_name = self.items[i][1]
        boxes, names = self.boxes_of[file_name]
        targets = self.targets.get(file_name)
        if targets is None or targets.shape[0] != boxes.shape[0]:
            got = "none" if targets is None else f"{targets.shape[0]} rows"
            raise DataError(f"{self.targets_path}: {file_name} needs {boxes.shape[0]} box targets "
                            f"(load_coco_boxes order), the cache has {got}")
        return boxes, torch.tensor([self.raw_id[n] for n in names], dtype=torch.int64), targets.float()


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
    "openimages": Format(("images", "masks", "masks_csv", "class_descriptions"),
                         lambda cfg: read_class_descriptions(cfg.path(cfg.class_descriptions))[1],
                         OpenImagesSamples, ignore=lambda cfg, n: [n]),  # painted where no mask lies
    "coco_boxes": Format(("images", "boxes_json"), lambda cfg: coco_category_names(cfg.path(cfg.boxes_json)),
                         CocoBoxSamples),
}
