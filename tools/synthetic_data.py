"""Write a small, procedurally generated two-source street dataset for the offline end-to-end demo.

SYNTHETIC DATA: no real image is involved. Each scene (sky, buildings with windows and doors, road, pavement, trees,
cars, poles with signs) is drawn twice in label space, in the on-disk formats and taxonomies of two real datasets
that conflict with each other:

  street-ids/     CamVid-style (SegNet order, `camvid-segnet` taxonomy): 8-bit id PNGs, ids 0..10, 11 = ignore.
                  Windows and doors are part of Building; trees are Tree.
  facade-colors/  LabelMeFacade-style (`labelmefacade` taxonomy): RGB colour-coded PNGs. Windows and doors are their
                  own classes; poles and signs fall into `various` (black, ignored).

Usage: python -m tools.synthetic_data --out data/synthetic [--train 48 --val 16 --size 160x120]
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import ConfigError, run_main
from settings import parse_settings, require

# What is drawn, and the class each taxonomy gives it.
CAMVID_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                "Bicyclist"]
FACADE_COLORS = {"various": (0, 0, 0), "building": (128, 0, 0), "car": (128, 0, 128), "door": (128, 128, 0),
                 "pavement": (128, 128, 128), "road": (128, 64, 0), "sky": (0, 128, 128),
                 "vegetation": (0, 128, 0), "window": (0, 0, 128)}
# part -> (CamVid name, facade name)
PARTS = {
    "sky": ("Sky", "sky"), "wall": ("Building", "building"), "window": ("Building", "window"),
    "door": ("Building", "door"), "road": ("Road", "road"), "pavement": ("Pavement", "pavement"),
    "tree": ("Tree", "vegetation"), "car": ("Car", "car"), "pole": ("Pole", "various"),
    "sign": ("SignSymbol", "various"),
}
PART_IDS = {name: i for i, name in enumerate(PARTS)}


def draw_scene(rng, width, height):
    """One random scene: an RGB image (H, W, 3) uint8 and a part map (H, W) of PART_IDS."""
    parts = np.zeros((height, width), np.int64)
    yy, xx = np.mgrid[0:height, 0:width]
    sky = np.array([110, 160, 230]) + rng.integers(-30, 30, 3)
    image = np.zeros((height, width, 3), np.float64)
    image[:] = sky * (0.75 + 0.25 * (1 - yy / height))[..., None]

    horizon = int(height * rng.uniform(0.55, 0.7))
    pavement_top = horizon + int(height * rng.uniform(0.04, 0.08))
    def fill(mask, part, colour, noise=8.0):
        parts[mask] = PART_IDS[part]
        image[mask] = np.asarray(colour, np.float64) + rng.normal(0, noise, (int(mask.sum()), 3))

    fill(yy >= pavement_top, "road", [70, 70, 75] + rng.integers(-10, 10, 3))
    fill((yy >= horizon) & (yy < pavement_top), "pavement", [165, 160, 150] + rng.integers(-15, 15, 3))

    x = int(rng.integers(-width // 8, width // 8))
    while x < width:  # a row of buildings along the street
        w = int(rng.integers(width // 5, width // 2))
        top = int(rng.integers(height // 12, horizon // 2))
        wall = (xx >= x) & (xx < x + w) & (yy >= top) & (yy < horizon)
        fill(wall, "wall", rng.integers(90, 200, 3), noise=6.0)
        cell = int(rng.integers(10, 18))
        for wy in range(top + 4, horizon - cell, cell):
            for wx in range(x + 4, x + w - cell // 2, cell):
                fill((xx >= wx) & (xx < wx + cell // 2) & (yy >= wy) & (yy < wy + cell // 2), "window",
                     [40, 60, 90], noise=10.0)
        door_x = x + int(rng.integers(2, max(3, w - 10)))
        fill((xx >= door_x) & (xx < door_x + 7) & (yy >= horizon - 14) & (yy < horizon), "door", [90, 50, 20])
        x += w

    for _ in range(int(rng.integers(1, 4))):  # trees: noisy green blobs on the pavement line
        cx, cy, r = rng.integers(0, width), horizon - int(rng.integers(5, 25)), int(rng.integers(8, 20))
        blob = (xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2 < r ** 2 * rng.uniform(0.7, 1.0, (height, width))
        fill(blob, "tree", [50, 120, 40] + rng.integers(-20, 20, 3), noise=18.0)

    for _ in range(int(rng.integers(1, 3))):  # poles with a sign
        px = int(rng.integers(0, width - 3))
        fill((xx >= px) & (xx < px + 2) & (yy >= horizon - 35) & (yy < pavement_top), "pole", [60, 60, 60])
        fill((xx >= px - 3) & (xx < px + 5) & (yy >= horizon - 38) & (yy < horizon - 30), "sign", [200, 30, 30])

    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        cw, ch = int(rng.integers(22, 40)), int(rng.integers(10, 16))
        # max(): on small images a car may stick out of the picture (the masks clip it) rather than not fit
        cx = int(rng.integers(0, max(1, width - cw)))
        cy = int(rng.integers(pavement_top, max(pavement_top + 1, height - ch)))
        fill((xx >= cx) & (xx < cx + cw) & (yy >= cy) & (yy < cy + ch), "car", rng.integers(30, 230, 3))

    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, parts


def write_split(out, split, count, rng, width, height):
    """Write `count` scenes of one split into both sources; returns nothing, writes list files."""
    camvid_lut = np.array([CAMVID_NAMES.index(camvid) for camvid, _ in PARTS.values()], np.uint8)
    facade_lut = np.array([FACADE_COLORS[facade] for _, facade in PARTS.values()], np.uint8)
    lists = {"street-ids": [], "facade-colors": []}
    for i in range(count):
        image, parts = draw_scene(rng, width, height)
        name = f"{split}_{i:04d}"
        for source in lists:
            (out / source / "images").mkdir(parents=True, exist_ok=True)
            (out / source / "labels").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / source / "images" / f"{name}.png")
        Image.fromarray(camvid_lut[parts]).save(out / "street-ids" / "labels" / f"{name}.png")
        Image.fromarray(facade_lut[parts]).save(out / "facade-colors" / "labels" / f"{name}.png")
        for source in lists:
            lists[source].append(f"images/{name}.png labels/{name}.png")
    for source, lines in lists.items():
        (out / source / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (out / "street-ids" / "names.txt").write_text("\n".join(CAMVID_NAMES) + "\n")


@dataclass
class SyntheticSettings:
    out: str = "data/synthetic"    # folder to write (street-ids/ and facade-colors/ in it)
    train: int = 48                # training scenes
    val: int = 16                  # validation scenes
    size: str = "160x120"          # WIDTHxHEIGHT of every scene
    seed: int = 0

    def validate(self):
        require(self, "train val", lambda v: v >= 0, "must be >= 0")
        width, height = self.width_height()
        if width < 8 or height < 6:
            raise ConfigError(f"settings: size={self.size!r}: the scenes need at least 8x6 pixels")

    def width_height(self):
        try:
            width, height = (int(v) for v in self.size.split("x"))
        except ValueError:
            raise ConfigError(f"settings: size={self.size!r}: write it as WIDTHxHEIGHT, e.g. 160x120") from None
        return width, height


def main(argv=None):
    args = parse_settings(SyntheticSettings, argv)
    width, height = args.width_height()
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    write_split(out, "train", args.train, rng, width, height)
    write_split(out, "val", args.val, rng, width, height)
    print(f"wrote SYNTHETIC data ({args.train} train + {args.val} val scenes, {width}x{height}) to {out}/street-ids "
          f"and {out}/facade-colors")


if __name__ == "__main__":
    run_main(main)
