"""Plot the loss curves of one or more training runs (train.py's log.jsonl) into a PNG, with PIL only.

    python -m tools.plot_log runs/cpu_sentence/log.jsonl runs/cpu_onehot/log.jsonl --out loss.png [--key loss]

The log files are positional arguments (or --logs a.jsonl,b.jsonl).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from errors import DataError, run_main
from settings import parse_settings, require, required

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def read_curve(path, key):
    """[(step, value)] of `key` from a log.jsonl; a missing key is an error naming the file."""
    points = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON record ({e.msg}); expected train.py's log.jsonl") from None
        if key not in record:
            raise DataError(f"{path}:{n}: no {key!r} in the record (has {sorted(record)})")
        points.append((record["step"], record[key]))
    if not points:
        raise DataError(f"{path}: empty log")
    return points


def plot(curves, out, title, width=800, height=450, margin=60):
    """curves: {label: [(step, value)]} -> a line chart with axes, ticks and a legend, saved to `out`."""
    steps = [s for points in curves.values() for s, _ in points]
    values = [v for points in curves.values() for _, v in points]
    x0, x1, y0, y1 = 0, max(steps), 0.0, max(values) * 1.05
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    def xy(step, value):
        return (margin + (step - x0) / (x1 - x0) * (width - 2 * margin),
                height - margin - (value - y0) / (y1 - y0) * (height - 2 * margin))
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(6):  # ticks and grid
        step, value = x0 + i * (x1 - x0) / 5, y0 + i * (y1 - y0) / 5
        x, _ = xy(step, y0)
        _, y = xy(x0, value)
        draw.line([x, margin, x, height - margin], fill=(230, 230, 230))
        draw.line([margin, y, width - margin, y], fill=(230, 230, 230))
        draw.text((x - 12, height - margin + 6), f"{step:.0f}", fill="black")
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    for i, (label, points) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([xy(s, v) for s, v in points], fill=colour, width=2)
        draw.line([width - margin - 200, margin + 14 + 16 * i, width - margin - 180, margin + 14 + 16 * i],
                  fill=colour, width=3)
        draw.text((width - margin - 174, margin + 8 + 16 * i), label, fill="black")
    draw.text((margin, margin - 24), title, fill="black")
    draw.text((width // 2 - 12, height - margin + 24), "step", fill="black")
    img.save(out)


@dataclass
class PlotSettings:
    logs: list = field(default_factory=list)  # train.py log.jsonl files; each curve is named by its run folder
    out: str = ""                  # PNG to write
    key: str = "loss"              # the logged number to plot

    def validate(self):
        require(self, "logs", bool, "is empty: give one or more log.jsonl files")
        required(self, "out")


def main(argv=None):
    args = parse_settings(PlotSettings, argv, positional="logs")
    curves = {Path(p).parent.name: read_curve(p, args.key) for p in args.logs}
    plot(curves, args.out, f"{args.key} per step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
