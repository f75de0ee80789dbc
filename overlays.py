"""Pictures of predictions: id PNGs, colour overlays with a legend, and image | prediction | ground truth strips.

A label's colour comes from its name, so road is the same colour in every dataset, run and label set (Cityscapes'
colours for the common street labels); two other labels can land on similar colours, which is why every overlay names
its colours in a legend.
"""
import colorsys
import functools
import hashlib
import itertools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from images import IMAGENET_MEAN, IMAGENET_STD

UNKNOWN_COLOUR = (0, 0, 0)
LEGEND_ROW, LEGEND_CELL = 14, 140  # pixels per legend line and per legend entry


def to_uint8(x):
    """(3, H, W) ImageNet-normalised (numpy, or a CPU tensor) -> (H, W, 3) uint8 RGB, for pictures."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return np.clip(np.round((np.asarray(x, np.float32) * std + mean) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)


# Cityscapes' colours for the labels street scenes share, so overlays look as the field's figures do; any other label
# gets a colour from its name (label_colour)
KNOWN_COLOURS = {
    "road": (128, 64, 128), "sidewalk_pavement": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
    "fence": (190, 153, 153), "pole": (153, 153, 153), "traffic_light": (250, 170, 30), "traffic_sign": (220, 220, 0),
    "vegetation": (107, 142, 35), "tree": (107, 142, 35), "terrain": (152, 251, 152), "sky": (70, 130, 180),
    "person": (220, 20, 60), "rider": (255, 0, 0), "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100),
    "train": (0, 80, 100), "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32)}


# A named colour differs from every Cityscapes colour above by at least this CIE76 distance in CIELAB: about where two
# swatches of a legend stop passing for one (window's first colour, a green 23 from vegetation's, did)
MIN_DELTA_E = 30.0


def cielab(rgb):
    """sRGB (0..255) -> CIE L*a*b* (D65), to compare colours as eyes do."""
    def linear(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    def f(t):
        return t ** (1 / 3) if t > 216 / 24389 else t * 24389 / 27 / 116 + 16 / 116

    r, g, b = (linear(float(c)) for c in rgb)
    x = f((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047)
    y = f(0.2126 * r + 0.7152 * g + 0.0722 * b)
    z = f((0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
    return 116 * y - 16, 500 * (x - y), 200 * (y - z)


KNOWN_LAB = [cielab(c) for c in set(KNOWN_COLOURS.values())]


@functools.lru_cache(maxsize=65536)  # a server asks for the same labels' colours again and again
def label_colour(name):
    """An RGB colour from a label's name alone: Cityscapes' for the labels in KNOWN_COLOURS, else hue, saturation and
    brightness from the name's sha256 (bright and saturated enough to read over a photo; never the unknown colour),
    drawn again from the hash of the name and a counter while it is within MIN_DELTA_E of a Cityscapes colour."""
    key = name.strip().lower().replace(" ", "_")
    if key in KNOWN_COLOURS:
        return KNOWN_COLOURS[key]
    for draw in itertools.count():  # 2.9 draws on average, at most 23, over 20,000 names
        h = hashlib.sha256((name.strip().lower() + "\n" * draw).encode()).digest()
        r, g, b = colorsys.hsv_to_rgb(h[0] / 256 + h[1] / 65536, 0.55 + 0.4 * h[2] / 255, 0.7 + 0.3 * h[3] / 255)
        colour = round(255 * r), round(255 * g), round(255 * b)
        if min(math.dist(cielab(colour), known) for known in KNOWN_LAB) >= MIN_DELTA_E:
            return colour


def colour_map(ids, names):
    """ids: (H, W) int; values outside 0..len(names)-1 are unknown. -> (H, W, 3) uint8 colours, and the list of
    table rows present (len(names) standing for unknown)."""
    colours = np.array([label_colour(n) for n in names] + [UNKNOWN_COLOUR], np.uint8)  # (N + 1, 3)
    ids = np.asarray(ids)
    idx = np.where((ids >= 0) & (ids < len(names)), ids, len(names))                  # (H, W)
    return colours[idx], [int(i) for i in np.unique(idx)]


def legend(width, names, present):
    """A white strip `width` wide naming the colours of the rows `present` (len(names) = unknown)."""
    per_row = max(1, width // LEGEND_CELL)
    strip = Image.new("RGB", (width, LEGEND_ROW * math.ceil(len(present) / per_row) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for j, i in enumerate(present):
        x, y = (j % per_row) * LEGEND_CELL + 2, (j // per_row) * LEGEND_ROW + 2
        colour = label_colour(names[i]) if i < len(names) else UNKNOWN_COLOUR
        draw.rectangle([x, y, x + 10, y + 10], fill=colour, outline=(0, 0, 0))
        draw.text((x + 14, y), names[i] if i < len(names) else "unknown", fill=(0, 0, 0))
    return strip


def with_legend(picture, names, present):
    """A PIL picture with the legend of `present` below it."""
    strip = legend(picture.width, names, present)
    canvas = Image.new("RGB", (picture.width, picture.height + strip.height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(strip, (0, picture.height))
    return canvas


def overlay_with_legend(image, ids, names, alpha=0.5):
    """image: (H, W, 3) uint8; ids: (H, W) int, values outside 0..len(names)-1 drawn as unknown (black).
    Returns a PIL image: the colour map blended over the photo, with a strip below naming the classes present."""
    colours, present = colour_map(ids, names)
    blended = (np.asarray(image, np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    return with_legend(Image.fromarray(blended), names, present)


def side_by_side(image, pred, target, names):
    """image (H, W, 3) uint8 | prediction | ground truth, at the size evaluated, with one legend of the classes in
    either map; pred and target (H, W) int rows of `names`, anything else (ignore) drawn as unknown (black)."""
    pred_colours, in_pred = colour_map(pred, names)
    target_colours, in_target = colour_map(target, names)
    strip = np.concatenate([np.asarray(image, np.uint8), pred_colours, target_colours], axis=1)  # (H, 3W, 3)
    return with_legend(Image.fromarray(strip), names, sorted(set(in_pred) | set(in_target)))


def id_png_dtype(largest_id):
    """The PNG sample type for ids 0..largest_id: uint8 where they fit (so nothing changes for label sets under 256),
    else uint16 (16-bit grey PNG; np.asarray(Image.open(path)) reads it back as uint16)."""
    if not 0 <= largest_id <= 65535:
        raise ValueError(f"ids up to {largest_id} do not fit a 16-bit PNG")
    return np.uint8 if largest_id <= 255 else np.uint16


def save_prediction(folder, stem, image, ids, names, unknown=None):
    """Write <stem>.png (ids; 8-bit when 0..len(names)-1 and `unknown` fit in a byte, else 16-bit, the same for
    every image of a label set) and <stem>_overlay.png (colours + legend) under folder. ids: (H, W) int in
    0..len(names)-1, or `unknown`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids)
    largest = max(len(names) - 1, unknown if unknown is not None else 0)
    bad = ((ids < 0) | (ids >= len(names))) & (ids != unknown if unknown is not None else True)
    if bad.any():
        raise ValueError(f"{stem}: ids {np.unique(ids[bad])[:5].tolist()} are neither label ids 0..{len(names) - 1} "
                         f"nor unknown ({unknown})")
    Image.fromarray(ids.astype(id_png_dtype(largest))).save(folder / f"{stem}.png")
    overlay_with_legend(image, ids, names).save(folder / f"{stem}_overlay.png")
