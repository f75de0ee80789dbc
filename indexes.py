"""Index the annotations of a weak source once, into the memory-mapped arrays training reads (index_format.Index).

    python indexes.py coco_boxes --json objects365/zhiyuan_objv2_train.json --images objects365/train \
        --out objects365/index_train [--skip_missing] [--overwrite]
    python indexes.py openimages --csv openimages_v6/train-annotations-object-segmentation.csv \
        --classes openimages_v6/classes-segmentation.txt [--descriptions openimages_v6/oidv6-class-descriptions.csv] \
        --images openimages_v6/train --masks openimages_v6/train-masks --out openimages_v6/index_train

Why a command: Objects365 V2's train JSON (1.74M images, 25.4M boxes) parsed by json.load is tens of GB of Python
objects and minutes per process, and DataLoader workers copy what they touch of them; OpenImages' masks CSV (2.69M
rows) and a per-file existence check at every start scale the same way. This reads the annotations once, streaming
(peak RSS 3.5 GB and 228 CPU s for a full-size Objects365 JSON, once: tools/bench_weak_data.py), checks once that
every referenced file exists, and writes the fields of index_format.INDEX_FIELDS plus index.json (class names, counts,
the source files' size and mtime, what the check found) into a temporary folder renamed into place, so an index is
whole or absent.

coco_boxes (Objects365 V2 layout): images[{id, file_name, width, height, ...}], annotations[{id, image_id,
category_id, bbox [x, y, w, h], iscrowd, ...}], categories[{id, name}]. Class id = position in `categories`, names
kept exactly (Objects365's typos and trailing spaces included, since label_sentences.yaml matches them exactly).
Images in the JSON's order, boxes in annotation order within an image. The JSON names images
`images/v1/patch8/objects365_v1_00420917.jpg`; mmdetection's layout (the archives unpacked into train/) has them at
`train/patch8/objects365_v1_00420917.jpg`: the one of the two under which most of the first 200 images exist is used
for all.
Boxes are clipped to the image size the JSON gives (counted); a box left without area is dropped (counted).

openimages (OpenImages V6 segmentation): the masks CSV (MaskPath, ImageID, LabelName, BoxID, ...), images at
<images>/<ImageID>.jpg, masks at <masks>/<MaskPath> as `unzip train-masks-*.zip` leaves them (or one subfolder per
first character of MaskPath, e.g. <masks>/0/...). Classes are matched by MID (LabelName), the key of the `openimages`
taxonomy of label_sentences.yaml: --classes is Google's classes-segmentation.txt, one MID a line, class id = line.
It is the dataset's fixed class list, so ids do not depend on which classes a (trimmed) CSV happens to use, and an
annotation of a MID outside it is an error. --descriptions (oidv6-class-descriptions.csv) only adds display names
to index.json for people. Images in first-appearance order of the CSV, masks in CSV order within an image.

Missing files are an error listing them; with --skip_missing the images concerned are left out (with all their
boxes or masks), counted in index.json and listed in missing.txt beside it. (Objects365 V2's JSON names three images
that its archives lack, as mmdetection's objv2_ignore_list records.)
"""
import csv
import json
import os
import shutil
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import DataError, run_main
from index_format import INDEX_FIELDS, INDEX_FORMAT, Index, StringTable
from json_stream import json_array_items
from settings import parse_command, required

OPENIMAGES_MASK_COLUMNS = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                           "PredictedIoU", "Clicks"]
MAX_CLASSES = np.iinfo(np.int16).max  # class ids are stored as int16


# ----------------------------------------------------------------------------------------------------- helpers

def file_info(path) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime": st.st_mtime}


def pick_layout(folder: Path, names: list[str], layouts: dict, probe: int = 200) -> str:
    """Which of `layouts` ({label: name -> path under folder}) finds most of the first `probe` files (ties: the
    first listed). The full existence check then runs under that one."""
    hits = {label: sum((folder / to_path(n)).is_file() for n in names[:probe]) for label, to_path in layouts.items()}
    return max(layouts, key=hits.get)


def find_missing(folder: Path, paths: list[str]) -> np.ndarray:
    """(n,) bool: paths[i] (relative to folder) is not a file. One listing per directory instead of a stat per file:
    millions of stats are slow on a network filesystem, a few large listings are not."""
    listings: dict[str, set] = {}
    missing = np.zeros(len(paths), bool)
    for i, path in enumerate(paths):
        parent, _, name = path.rpartition("/")
        if parent not in listings:
            try:
                with os.scandir(folder / parent) as entries:
                    listings[parent] = {e.name for e in entries if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = set()
        missing[i] = name not in listings[parent]
    return missing


def report_missing(what: str, folder: Path, paths: list[str], missing: np.ndarray, skip: bool, show: int = 10):
    """Raise listing the missing files, or (skip) print how many will be left out."""
    if not missing.any():
        return
    listed = [str(folder / p) for p in np.asarray(paths, dtype=object)[missing][:show]]
    more = f"\n  ... and {int(missing.sum()) - show} more" if missing.sum() > show else ""
    message = f"{int(missing.sum())} of {len(paths)} {what} do not exist:\n  " + "\n  ".join(listed) + more
    if not skip:
        raise DataError(f"{message}\n(--skip_missing leaves their images out, counted and listed in missing.txt)")
    print(f"indexes: {message}\n  -> their images are left out (--skip_missing)")


def write_index(out, kind: str, arrays: dict, meta: dict, missing: list[str], start: float,
                overwrite: bool = False) -> Index:
    """Write the fields of INDEX_FIELDS[kind] and index.json into a temporary folder, rename it to `out`, and open
    it with index_format.Index (whose checks then hold for what was written). index.json's `seconds`: since `start`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; --overwrite replaces it (box targets written for it then refuse to "
                              f"load, since they record the index build they belong to)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    counts = {}
    for field, (dtype, shape) in INDEX_FIELDS[kind].items():
        a = np.ascontiguousarray(arrays[field], dtype=dtype)
        for dim, name in zip(a.shape, shape):
            if isinstance(name, str):
                counts[name.removesuffix("+1")] = dim - 1 if name.endswith("+1") else dim
        np.save(tmp / f"{field}.npy", a)
    meta = {"kind": kind, "format": INDEX_FORMAT, "build": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": counts, **meta,
            "seconds": round(time.time() - start, 1)}
    (tmp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    (tmp / "missing.txt").write_text("".join(f"{p}\n" for p in missing))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return Index(out, kind)


# ------------------------------------------------------------------------------------------ coco_boxes (Objects365)

COCO_LAYOUTS = {"as in the JSON": lambda name: name,
                "patch folder + file name (mmdetection's train/patchN/)": lambda name: "/".join(name.split("/")[-2:])}


def read_coco(json_path):
    """Stream a COCO detection JSON into flat arrays: images (ids, file names, sizes), annotations (ids, image ids,
    category ids, bbox x y w h float32) and categories [(id, name)]."""
    img_ids, sizes, names = array("q"), array("i"), []
    ann_ids, ann_images, ann_cats, bbox = array("q"), array("q"), array("q"), array("f")
    categories, count, arrays = [], {}, set()
    for key, item in json_array_items(json_path, arrays=arrays):
        n = count[key] = count.get(key, -1) + 1
        try:
            if key == "images":
                img_ids.append(item["id"])
                sizes.extend((item["width"], item["height"]))
                names.append(item["file_name"])
            elif key == "annotations":
                x, y, w, h = item["bbox"]  # COCO: top-left corner + size
                bbox.extend((x, y, w, h))
                ann_ids.append(item.get("id", n))
                ann_images.append(item["image_id"])
                ann_cats.append(item["category_id"])
            elif key == "categories":
                categories.append((int(item["id"]), str(item["name"])))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            problem = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{json_path}: {key}[{n}] (id {item.get('id') if isinstance(item, dict) else '?'}): "
                            f"{problem}") from None
    for key in ("images", "annotations", "categories"):
        if key not in arrays:
            raise DataError(f"{json_path}: not a COCO detection JSON (no {key!r} array)")
    return (np.frombuffer(img_ids, np.int64), names, np.frombuffer(sizes, np.int32).reshape(-1, 2),
            np.frombuffer(ann_ids, np.int64), np.frombuffer(ann_images, np.int64),
            np.frombuffer(ann_cats, np.int64), np.frombuffer(bbox, np.float32).reshape(-1, 4), categories)


def lookup(keys: np.ndarray, values: np.ndarray, what: str, where) -> np.ndarray:
    """Position of each of `values` in `keys` (unique). An unknown value raises: where(i) names annotation i."""
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], values).clip(0, max(len(keys) - 1, 0))
    found = keys[order][pos] == values if len(keys) else np.zeros(len(values), bool)
    if not found.all():
        first = int(np.argmin(found))
        raise DataError(f"{where(first)} refers to unknown {what} {int(values[first])} "
                        f"({int((~found).sum())} such annotation(s))")
    return order[pos]


def build_coco_boxes(json_path, images, out, skip_missing=False, overwrite=False) -> Index:
    """COCO-format box JSON -> index folder `out` (see the module docstring)."""
    start, images = time.time(), Path(images)
    img_ids, names, sizes, ann_ids, ann_images, ann_cats, xywh, categories = read_coco(json_path)
    print(f"indexes: read {len(names)} images, {len(ann_ids)} boxes, {len(categories)} categories from {json_path} "
          f"in {time.time() - start:.0f} s")
    cat_ids = np.array([c for c, _ in categories], np.int64)
    for what, ids in (("image id", img_ids), ("category id", cat_ids)):
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{json_path}: {what} {int(unique[counts > 1][0])} appears more than once")
    if len(categories) > MAX_CLASSES:
        raise DataError(f"{json_path}: {len(categories)} categories; the index stores class ids as int16")

    def annotation(i):
        return f"{json_path}: annotation {int(ann_ids[i])}"
    box_image = lookup(img_ids, ann_images, "image_id", annotation)  # (K,) image row of each box
    box_class = lookup(cat_ids, ann_cats, "category_id", annotation)  # (K,) class id = position in categories
    bad = ~np.isfinite(xywh).all(1)
    if bad.any():
        raise DataError(f"{annotation(int(np.argmax(bad)))}: bbox is not finite ({int(bad.sum())} such boxes)")
    boxes = xywh.copy()  # (K, 4) -> x1, y1, x2, y2, clipped to the image column by column (no (K, 4) temporaries)
    del xywh
    boxes[:, 2:] += boxes[:, :2]
    changed = np.zeros(len(boxes), bool)
    for col in range(4):
        limit = sizes[box_image, col % 2]  # (K,) width for x, height for y
        changed |= (boxes[:, col] < 0) | (boxes[:, col] > limit)
        np.clip(boxes[:, col], 0, limit, out=boxes[:, col])
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])

    layout = pick_layout(images, names, COCO_LAYOUTS)
    paths = [COCO_LAYOUTS[layout](n) for n in names]
    missing = find_missing(images, paths)
    report_missing("images", images, paths, missing, skip_missing)

    keep_box = ~empty & ~missing[box_image]
    order = np.argsort(box_image[keep_box], kind="stable")  # grouped by image, annotation order within one
    new_row = np.cumsum(~missing) - 1  # old image row -> row among the kept images
    rows = new_row[box_image[keep_box]][order]
    offsets = np.zeros((~missing).sum() + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(offsets) - 1), out=offsets[1:])
    kept_paths = StringTable.from_strings(p for p, m in zip(paths, missing) if not m)
    arrays = {"image_names": kept_paths.blob, "image_names_offsets": kept_paths.offsets, "image_sizes": sizes[~missing],
              "box_offsets": offsets, "boxes": boxes[keep_box][order], "box_classes": box_class[keep_box][order]}
    meta = {"class_names": [name for _, name in categories], "sources": {"json": file_info(json_path)},
            "images_folder": str(images.resolve()), "image_layout": layout,
            "check": {"images_listed": len(names), "images_missing": int(missing.sum()),
                      "boxes_listed": len(ann_ids), "boxes_clipped_to_image": int((changed & ~empty).sum()),
                      "boxes_without_area_dropped": int(empty.sum()),
                      "first_dropped_box_ids": ann_ids[empty][:20].tolist(),
                      "boxes_of_missing_images": int((missing[box_image] & ~empty).sum())}}
    index = write_index(out, "coco_boxes", arrays, meta, [str(images / p) for p, m in zip(paths, missing) if m],
                        start, overwrite)
    print(f"indexes: wrote {out}: {len(index)} images, {len(arrays['boxes'])} boxes ({meta['check']})")
    return index


# --------------------------------------------------------------------------------- openimages (V6 segmentation)

OPENIMAGES_MASK_LAYOUTS = {"as in MaskPath": lambda name: name,
                           "one folder per first character": lambda name: f"{name[:1]}/{name}"}


def read_classes(path) -> list[str]:
    """classes-segmentation.txt: one MID a line -> [MID]; class id = line index. Blank lines and repeats raise."""
    mids = Path(path).read_text().splitlines()
    while mids and not mids[-1].strip():
        mids.pop()
    for n, mid in enumerate(mids, 1):
        if not mid.strip() or "," in mid or "\t" in mid or mids.index(mid) != n - 1:
            raise DataError(f"{path}:{n}: expected one distinct MID a line (e.g. /m/0k4j), got {mid!r}")
    if not mids:
        raise DataError(f"{path}: no classes")
    return [m.strip() for m in mids]


def read_class_descriptions(path) -> dict[str, str]:
    """`LabelName,DisplayName` CSV (header optional, as in oidv6-class-descriptions.csv) -> {MID: display name}."""
    names = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if n == 1 and row == ["LabelName", "DisplayName"]:
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{n}: expected `LabelName,DisplayName`, got {row}")
            names[row[0]] = row[1]
    return names


def build_openimages(csv_path, classes, images, masks, out, descriptions=None, skip_missing=False,
                     overwrite=False) -> Index:
    """OpenImages V6 masks CSV -> index folder `out` (see the module docstring)."""
    start, images, masks = time.time(), Path(images), Path(masks)
    mids = read_classes(classes)
    class_of = {mid: i for i, mid in enumerate(mids)}
    if len(mids) > MAX_CLASSES:
        raise DataError(f"{classes}: {len(mids)} classes; the index stores class ids as int16")
    image_row: dict[str, int] = {}  # ImageID -> row, in first-appearance order (944k entries: fine once)
    mask_image, mask_class, mask_names = array("q"), array("h"), []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        if not set(OPENIMAGES_MASK_COLUMNS[:3]) <= set(header):
            raise DataError(f"{csv_path}: header {header} lacks MaskPath,ImageID,LabelName "
                            f"(expected {','.join(OPENIMAGES_MASK_COLUMNS)})")
        col_mask, col_image, col_label = (header.index(c) for c in OPENIMAGES_MASK_COLUMNS[:3])
        for n, row in enumerate(reader, 2):
            try:
                mask, image_id, label = row[col_mask], row[col_image], row[col_label]
            except IndexError:
                raise DataError(f"{csv_path}:{n}: {len(row)} columns, the header has {len(header)}") from None
            if label not in class_of:
                raise DataError(f"{csv_path}:{n}: LabelName {label} is not a class of {classes}")
            mask_image.append(image_row.setdefault(image_id, len(image_row)))
            mask_class.append(class_of[label])
            mask_names.append(mask)
    if not mask_names:
        raise DataError(f"{csv_path}: no masks")
    image_ids = list(image_row)
    del image_row
    print(f"indexes: read {len(mask_names)} masks of {len(image_ids)} images from {csv_path} in "
          f"{time.time() - start:.0f} s")
    mask_image = np.frombuffer(mask_image, np.int64)

    layout = pick_layout(masks, mask_names, OPENIMAGES_MASK_LAYOUTS)
    mask_paths = [OPENIMAGES_MASK_LAYOUTS[layout](m) for m in mask_names]
    image_paths = [f"{i}.jpg" for i in image_ids]
    missing_image = find_missing(images, image_paths)
    missing_mask = find_missing(masks, mask_paths)
    report_missing("images", images, image_paths, missing_image, skip_missing)
    report_missing("masks", masks, mask_paths, missing_mask, skip_missing)
    drop = missing_image.copy()
    drop[mask_image[missing_mask]] = True  # an image without one of its masks would get a wrong label there

    keep_mask = ~drop[mask_image]
    order = np.argsort(mask_image[keep_mask], kind="stable")
    rows = (np.cumsum(~drop) - 1)[mask_image[keep_mask]][order]
    offsets = np.zeros((~drop).sum() + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(offsets) - 1), out=offsets[1:])
    kept = np.flatnonzero(keep_mask)[order]
    image_names = StringTable.from_strings(i for i, d in zip(image_ids, drop) if not d)
    mask_names_kept = StringTable.from_strings(mask_paths[j] for j in kept)
    arrays = {"image_names": image_names.blob, "image_names_offsets": image_names.offsets, "mask_offsets": offsets,
              "mask_names": mask_names_kept.blob, "mask_names_offsets": mask_names_kept.offsets,
              "mask_classes": np.frombuffer(mask_class, np.int16)[kept]}
    meta = {"class_names": mids, "sources": {"csv": file_info(csv_path), "classes": file_info(classes)},
            "images_folder": str(images.resolve()), "masks_folder": str(masks.resolve()), "mask_layout": layout,
            "check": {"images_listed": len(image_ids), "images_missing": int(missing_image.sum()),
                      "masks_listed": len(mask_names), "masks_missing": int(missing_mask.sum()),
                      "images_dropped": int(drop.sum()), "masks_dropped": int((~keep_mask).sum())}}
    if descriptions:
        display = read_class_descriptions(descriptions)
        unknown = [m for m in mids if m not in display]
        if unknown:
            raise DataError(f"{descriptions}: no display name for {len(unknown)} MIDs of {classes}, e.g. {unknown[:5]}")
        meta["display_names"] = [display[m] for m in mids]
        meta["sources"]["descriptions"] = file_info(descriptions)
    missing = [str(images / p) for p, m in zip(image_paths, missing_image) if m]
    missing += [str(masks / p) for p, m in zip(mask_paths, missing_mask) if m]
    index = write_index(out, "openimages", arrays, meta, missing, start, overwrite)
    print(f"indexes: wrote {out}: {len(index)} images, {len(kept)} masks ({meta['check']})")
    return index


@dataclass
class CocoBoxesSettings:
    """coco_boxes: a COCO-format box JSON (Objects365 V2)."""
    json: str = ""                 # e.g. objects365/zhiyuan_objv2_train.json
    images: str = ""               # image folder
    out: str = ""                  # index folder to write
    skip_missing: bool = False     # leave out images whose files are missing
    overwrite: bool = False        # replace an existing index folder

    def validate(self):
        required(self, "json images out")


@dataclass
class OpenImagesSettings:
    """openimages: OpenImages V6 segmentation."""
    csv: str = ""                  # train-annotations-object-segmentation.csv
    classes: str = ""              # classes-segmentation.txt: one MID a line (class id = line)
    descriptions: str = ""         # oidv6-class-descriptions.csv (display names, optional)
    images: str = ""               # image folder
    masks: str = ""                # folder of the unzipped train-masks-*.zip
    out: str = ""                  # index folder to write
    skip_missing: bool = False     # leave out images whose files are missing
    overwrite: bool = False        # replace an existing index folder

    def validate(self):
        required(self, "csv classes images masks out")


def main(argv=None):
    kind, a = parse_command({"coco_boxes": CocoBoxesSettings, "openimages": OpenImagesSettings}, argv)
    if kind == "coco_boxes":
        build_coco_boxes(a.json, a.images, a.out, a.skip_missing, a.overwrite)
    else:
        build_openimages(a.csv, a.classes, a.images, a.masks, a.out, a.descriptions, a.skip_missing, a.overwrite)


if __name__ == "__main__":
    run_main(main)
