"""How many pixels two folders of id PNGs (predict.py's, run_onnx.py's: <stem>.png) label alike, image by image.

    python -m tools.compare_ids --a=out/torch --b=out/onnx [--out=compare.json]

Prints the share of equal pixels over all images of --a (each must be in --b, at the same size), the images with
differences and how many, and the labels.json `ids` of both when they differ (the label order must be the same).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import ConfigError, run_main
from settings import parse_settings, print_settings


@dataclass
class CompareSettings:
    a: str = ""                    # a folder of <stem>.png id maps (and labels.json)
    b: str = ""                    # ... and another, with the same stems
    out: str = ""                  # also write the figures as JSON here


def main(argv=None):
    s = parse_settings(CompareSettings, argv)
    print_settings(s)
    a, b = Path(s.a), Path(s.b)
    stems = sorted(p.stem for p in a.glob("*.png") if not p.stem.endswith("_overlay"))
    if not stems:
        raise ConfigError(f"--a={s.a}: no id PNGs")
    labels = [json.loads((d / "labels.json").read_text())["ids"] for d in (a, b)]
    if [v["label"] for v in labels[0].values()] != [v["label"] for v in labels[1].values()]:
        raise ConfigError(f"{a}/labels.json and {b}/labels.json list other labels (or in another order)")
    total = same = 0
    differing = {}
    for stem in stems:
        x, y = (np.asarray(Image.open(d / f"{stem}.png")) for d in (a, b))
        if x.shape != y.shape:
            raise ConfigError(f"{stem}.png: {x.shape} in {a}, {y.shape} in {b}")
        equal = int((x == y).sum())
        total, same = total + x.size, same + equal
        if equal != x.size:
            differing[stem] = x.size - equal
    result = {"images": len(stems), "pixels": total, "equal": same, "share_equal": same / total,
              "differing_images": differing}
    print(f"{len(stems)} images, {total} pixels: {same} equal ({100 * same / total:.4f}%), {total - same} differ "
          f"in {len(differing)} images {differing}")
    if s.out:
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
