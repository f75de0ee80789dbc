"""Write SYNTHETIC annotation files shaped like the real weak and dense training data, at a fraction of full size,
for tools/bench_weak_data.py. Images, masks and labels are hard links to a few tiny real files, so millions of files
cost directory entries, not disk.

    python -m tools.make_weak_data --out /tmp/weak/f0.025 --fraction 0.025 [--old_formats] [--dim 512]

  objects365/zhiyuan_objv2_train.json  Objects365 V2's train JSON: images {height, id, license, width, file_name
      (images/v1|v2/patchN/objects365_v1|v2_XXXXXXXX.jpg), url}, annotations {id, iscrowd, isfake, area, isreflected,
      bbox [x, y, w, h] with the file's ten decimals, image_id, category_id}, categories {name, id} (the 365 real
      names when a class-list folder is given), licenses; 1.742M images and 25.4M boxes at full size, ~14.6 a image
  objects365/train/patchN/...          the images, where mmdetection's layout puts them (51 patch folders)
  openimages_v6/train-annotations-object-segmentation.csv  the 10 published columns, 2.687M masks of 944k images
  openimages_v6/classes-segmentation.txt (350 MIDs), oidv6-class-descriptions.csv (~20k rows, as published)
  openimages_v6/train/<ImageID>.jpg, train-masks/<MaskPath>
  mseg/<dataset>/list/train.txt + names: the seven dense MSeg train lists at their real sizes (178,750 lines in all,
      whatever the fraction: they do not shrink), each line's two files present
  with --old_formats, what main at 4243516 reads instead of indexes: openimages_v6/oidv6-class-descriptions-
      segmentation.csv (the 350 classes) and objects365/objects365_clip_b32.pt (per-image (K, dim) float16 box
      targets as its clip_image.py wrote them)
"""
import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import run_main
from settings import parse_settings, require, required

FULL = {"o365_images": 1_742_000, "o365_boxes": 25_400_000, "oi_images": 944_037, "oi_masks": 2_686_666}
MSEG_LISTS = {  # train lines (mseg-api's lists), classes, how a line reads
    "ade20k-150": (20_210, 150, "images/training/ADE_train_{i:08d}.jpg "
                                "annotations_semseg150/training/ADE_train_{i:08d}.png"),
    "bdd": (7_000, 19, "seg/images/train/{i:08x}-{i:08x}.jpg seg/labels/train/{i:08x}-{i:08x}_train_id.png"),
    "cityscapes-19": (2_975, 19, "leftImg8bit/train/city/city_{i:06d}_000019_leftImg8bit.png "
                                 "gtFine_19cls/train/city/city_{i:06d}_000019_gtFine_labelIds.png"),
    "coco-panoptic-133": (118_287, 133, "images/train2017/{i:012d}.jpg semantic_annotations133/train2017/{i:012d}.png"),
    "idd-39": (6_993, 39, "leftImg8bit/train/0/{i:06d}_leftImg8bit.png gtFine39/train/0/{i:06d}_gtFine_labelids.png"),
    "mapillary-public65": (18_000, 65, "training/images/{i:022x}.jpg training_semseg65/labels/{i:022x}.png"),
    "sunrgbd-37": (5_285, 37, "image/train/img-{i:06d}.jpg semseg-label37/train/{i:08d}.png"),
}
SIZE = (64, 48)  # every synthetic image is this small (w, h); the JSON says so too, and boxes lie inside it


class Linker:
    """Hard links to a few tiny originals (a new original every 60,000 links: ext4 allows 65,000 per inode)."""

    made: set = set()  # folders known to exist, shared by all linkers (a mkdir per file would double the time)

    def __init__(self, folder: Path, name: str, write):
        self.folder, self.name, self.write, self.count, self.source = folder, name, write, 0, None

    def link(self, path) -> None:
        if self.count % 60_000 == 0:
            name = Path(self.name)
            self.source = self.folder / f"{name.stem}_{self.count // 60_000}{name.suffix}"
            self.write(self.source)
        parent = os.path.dirname(path)
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        os.link(self.source, path)
        self.count += 1


def tiny_files(folder: Path, mask_size: tuple[int, int] = SIZE) -> dict:
    """Linkers to a SIZE photo (JPEG), a binary mask of `mask_size` (w, h) whose middle half is set, and an id PNG."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = SIZE
    photo = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mw, mh = mask_size
    mask = np.zeros((mh, mw), np.uint8)
    mask[mh // 4:3 * mh // 4, mw // 4:3 * mw // 4] = 255
    ids = rng.integers(0, 10, (h, w), dtype=np.uint8)
    ids[0] = 255
    return {"jpg": Linker(folder, "photo.jpg", lambda p: photo.save(p, quality=90)),
            "mask": Linker(folder, "mask.png", lambda p: Image.fromarray(mask).save(p)),
            "ids": Linker(folder, "ids.png", lambda p: Image.fromarray(ids).save(p))}


def class_lists(rng, folder: Path | None = None) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Objects365 names, OpenImages (MID, display name) of the 350 segmentation classes (the real ones when `folder`,
    objects365_v2_classes.tsv and openimages_v6_segmentation_classes.tsv, holds them), and ~20k other MIDs."""
    if folder is not None and (folder / "objects365_v2_classes.tsv").is_file():
        o365 = [line.split("\t", 1)[1] for line in (folder / "objects365_v2_classes.tsv").read_text().split("\n")[1:]
                if line]
        oi = [tuple(line.split("\t")) for line in
              (folder / "openimages_v6_segmentation_classes.tsv").read_text().split("\n")[1:] if line]
    else:
        o365 = [f"Category {i}" for i in range(365)]
        oi = [(f"/m/0{i:05x}", f"Thing {i}") for i in range(350)]
    others = [f"/m/0{k:06x}" for k in rng.choice(16 ** 6, 19_700, replace=False)]
    return o365, oi, others


def write_objects365(root: Path, n_images: int, n_boxes: int, names: list[str], linker: Linker, rng) -> np.ndarray:
    """The JSON (streamed, record by record) and the image links. Returns boxes per image."""
    per_image = rng.multinomial(n_boxes - n_images, np.full(n_images, 1 / n_images)) + 1  # >= 1 box each
    w, h = SIZE
    with open(root / "zhiyuan_objv2_train.json", "w") as f:
        f.write('{"images": [')
        for i in range(n_images):
            patch = i % 51
            version = "v1" if patch < 16 else "v2"
            name = f"images/{version}/patch{patch}/objects365_{version}_{i:08d}.jpg"
            f.write(f'{", " if i else ""}{{"height": {h}, "id": {i}, "license": {1 + i % 8}, "width": {w}, '
                    f'"file_name": "{name}", "url": ""}}')
            linker.link(f"{root}/train/patch{patch}/{name.rsplit('/', 1)[1]}")
        f.write('], "annotations": [')
        image_of = np.repeat(np.arange(n_images), per_image)
        for start in range(0, n_boxes, 1 << 20):  # boxes in blocks, formatted one by one
            n = min(1 << 20, n_boxes - start)
            x, y = rng.uniform(0, w - 2, n), rng.uniform(0, h - 2, n)
            bw, bh = rng.uniform(1, w - x), rng.uniform(1, h - y)
            cats = rng.integers(1, len(names) + 1, n)
            parts = [f'{", " if start + k else ""}{{"id": {start + k}, "iscrowd": 0, "isfake": 0, '
                     f'"area": {bw[k] * bh[k]:.10f}, "isreflected": 0, "bbox": [{x[k]:.10f}, {y[k]:.10f}, '
                     f'{bw[k]:.10f}, {bh[k]:.10f}], "image_id": {image_of[start + k]}, "category_id": {cats[k]}}}'
                     for k in range(n)]
            f.write("".join(parts))
        f.write('], "categories": [')
        f.write(", ".join(f'{{"name": "{n}", "id": {i}}}' for i, n in enumerate(names, 1)))
        f.write('], "licenses": [' + ", ".join(f'{{"name": "license {i}", "id": {i}, "url": ""}}'
                                              for i in range(1, 9)) + "]}")
    return per_image


def write_openimages(root: Path, n_images: int, n_masks: int, classes, others, jpg: Linker, mask: Linker, rng):
    per_image = rng.multinomial(n_masks - n_images, np.full(n_images, 1 / n_images)) + 1
    (root / "classes-segmentation.txt").write_text("".join(f"{mid}\n" for mid, _ in classes))
    with open(root / "oidv6-class-descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        w.writerows(sorted(list(classes) + [(mid, f"Other {k}") for k, mid in enumerate(others)]))
    with open(root / "train-annotations-object-segmentation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                    "PredictedIoU", "Clicks"])
        image_ids = [f"{v:016x}" for v in rng.choice(2 ** 62, n_images, replace=False)]
        image_of = np.repeat(np.arange(n_images), per_image)  # masks grouped by image, as the published CSV is
        for start in range(0, n_masks, 1 << 18):  # random fields drawn a block at a time
            n = min(1 << 18, n_masks - start)
            mids = rng.integers(len(classes), size=n)
            box_ids = rng.integers(2 ** 32, size=n)
            corner, iou = rng.uniform(0, 0.5, (n, 2)), rng.uniform(0.5, 1, n)
            clicks, click_labels = rng.uniform(size=(n, 6, 2)), rng.integers(2, size=(n, 6))
            for k in range(n):
                image = image_of[start + k]
                image_id, mid, box_id = image_ids[image], classes[mids[k]][0], f"{box_ids[k]:08x}"
                if start + k == 0 or image_of[start + k - 1] != image:
                    jpg.link(f"{root}/train/{image_id}.jpg")
                name = f"{image_id}_{mid.replace('/', '')}_{box_id}.png"
                mask.link(f"{root}/train-masks/{name}")
                x0, y0 = corner[k]
                points = ";".join(f"{cx:.5f} {cy:.5f} {c}" for (cx, cy), c in zip(clicks[k], click_labels[k]))
                w.writerow([name, image_id, mid, box_id, f"{x0:.6f}", f"{x0 + 0.4:.6f}", f"{y0:.6f}",
                            f"{y0 + 0.4:.6f}", f"{iou[k]:.5f}", points])


def write_mseg_list(name: str, list_file: Path, root: Path, lines: int, ids: Linker, photo: Linker) -> None:
    """The MSeg train list of dataset `name` with `lines` lines in its real layout (MSEG_LISTS), each line's image
    and label linked under the dataset root."""
    list_file.parent.mkdir(parents=True, exist_ok=True)
    with open(list_file, "w") as f:
        for i in range(lines):
            line = MSEG_LISTS[name][2].format(i=i)
            image, label = line.split()
            photo.link(f"{root}/{image}")
            ids.link(f"{root}/{label}")
            f.write(line + "\n")


def write_mseg(root: Path, ids: Linker, jpg: Linker) -> None:
    for name, (lines, classes, _) in MSEG_LISTS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}_names.txt").write_text("".join(f"class_{c}\n" for c in range(classes)))
        write_mseg_list(name, folder / "list" / "train.txt", folder, lines, ids, jpg)


def write_old_formats(root: Path, classes, o365_per_image: np.ndarray, dim: int) -> None:
    """What main at 4243516 reads: the descriptions CSV trimmed to the 350 classes (its config's suggestion), the
    per-image box-target cache of its clip_image.py ({"encoder", "targets": {file_name: (K, dim) fp16}}), and
    objects365/as_in_json/images/vN/patchK -> train/patchK (it joins the JSON's file_name to the image folder)."""
    import torch  # only here: the rest of the generator is torch-free

    for patch in range(51):
        link = root / "objects365" / "as_in_json" / "images" / ("v1" if patch < 16 else "v2") / f"patch{patch}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(root / "objects365" / "train" / f"patch{patch}", target_is_directory=True)
    with open(root / "openimages_v6" / "oidv6-class-descriptions-segmentation.csv", "w", newline="") as f:
        csv.writer(f).writerows([("LabelName", "DisplayName")] + list(classes))
    targets = {}
    for i, k in enumerate(o365_per_image):
        patch = i % 51
        version = "v1" if patch < 16 else "v2"
        targets[f"images/{version}/patch{patch}/objects365_{version}_{i:08d}.jpg"] = torch.zeros(int(k), dim,
                                                                                                 dtype=torch.float16)
    torch.save({"encoder": "synthetic zeros", "targets": targets}, root / "objects365" / "objects365_clip_b32.pt")


def write_all(out: Path, fraction: float, old_formats: bool = False, dim: int = 512, seed: int = 0,
              mseg: Path | None = None) -> dict:
    """Everything listed in the module docstring under `out` (the MSeg lists under `mseg` if given, written there
    only once: they do not depend on the fraction); returns the counts written."""
    start = time.time()
    rng = np.random.default_rng(seed)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    Linker.made.clear()
    links = tiny_files(out / "originals")
    o365, oi, others = class_lists(rng)
    n = {k: max(1, round(v * fraction)) for k, v in FULL.items()}
    (out / "objects365").mkdir(parents=True)
    (out / "openimages_v6").mkdir()
    per_image = write_objects365(out / "objects365", n["o365_images"], n["o365_boxes"], o365, links["jpg"], rng)
    write_openimages(out / "openimages_v6", n["oi_images"], n["oi_masks"], oi, others, links["jpg"], links["mask"],
                     rng)
    mseg = Path(mseg) if mseg else out / "mseg"
    if not (mseg / "done").exists():
        shutil.rmtree(mseg, ignore_errors=True)
        write_mseg(mseg, links["ids"], links["jpg"])
        (mseg / "done").touch()
    if old_formats:
        write_old_formats(out, oi, per_image, dim)
    n["mseg_lines"] = sum(v[0] for v in MSEG_LISTS.values())
    print(f"make_weak_data: {out} at {fraction:g} of full size: {n} in {time.time() - start:.0f} s")
    return n


@dataclass
class WeakDataSettings:
    out: str = ""                  # folder to write
    fraction: float = 0.025        # of the real sizes (the MSeg lists keep theirs)
    old_formats: bool = False      # also the files main at 4243516 reads instead of indexes
    dim: int = 512                 # width of the old-format box targets

    def validate(self):
        required(self, "out")
        require(self, "fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
        require(self, "dim", lambda v: v >= 1, "must be >= 1")


def main(argv=None):
    a = parse_settings(WeakDataSettings, argv)
    write_all(Path(a.out), a.fraction, a.old_formats, a.dim)


if __name__ == "__main__":
    run_main(main)
