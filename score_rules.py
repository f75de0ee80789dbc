"""From scores to ids, with numpy alone (no torch), so that predict.py, serve.py and the torch-free runner and server
(run_onnx.py, serve_onnx.py) share one rule: the argmax, unknown pixels below a cosine threshold, and the background
vocabulary whose winning pixels are unknown too.
"""
import numpy as np

from errors import ConfigError
from label_spec import label_texts_for, parse_labels
from overlays import id_png_dtype

# The background vocabulary of --background=default: labels a model can name that are not asked for, so a pixel of a
# thing nobody asked about can go to one of them (and become unknown) instead of to the nearest asked label; SAN's
# augment_vocabulary does this with all 171 COCO-Stuff names. Ours is small: the classes covering the most pixels
# of everyday scenes: ADE20K-150's first 22 classes (its class order is by pixel share) that our keys name, less the
# furniture and fittings among them (bed, windowpane, cabinet, door, table, curtain, chair; plant is in vegetation).
# Labels that are asked for are left out of it.
DEFAULT_BACKGROUND = ["wall", "building", "sky", "floor", "vegetation", "ceiling", "road", "grass",
                      "sidewalk_pavement", "person", "ground", "mountain_hill", "water", "car"]


def unknown_id(n_labels):
    """The id of unknown pixels: 255 while ids 0..n-1 leave it free in a byte, else 65535 (16-bit PNGs)."""
    if not 1 <= n_labels <= 65535:
        raise ValueError(f"{n_labels} labels: give 1..65535")
    return 255 if n_labels <= 255 else 65535


def ids_from_scores(prob, cos=None, unknown_below=-1.0, asked=None):
    """prob, cos: (N, H, W) numpy (a torch caller passes .cpu().numpy()) -> (H, W) ids, uint8 or uint16 (see
    unknown_id); pixels whose winning label's cosine is under the threshold -> unknown. The cosine is that of the
    argmax label (the first of equal ones), so 'unknown' means 'even the best label fits badly'. With `asked` = n < N,
    rows n.. are the background vocabulary: pixels they win are unknown too. The unknown id follows the number of
    asked labels (the background is never written as an id)."""
    prob = np.asarray(prob)
    n = asked if asked is not None else prob.shape[0]
    unknown = unknown_id(n)
    pred = prob.argmax(0)                                                # (H, W)
    if cos is not None and unknown_below > -1:
        best = np.take_along_axis(np.asarray(cos), pred[None], 0)[0]     # (H, W)
        pred = np.where(best < unknown_below, unknown, pred)
    if asked is not None:
        pred = np.where((pred >= asked) & (pred != unknown), unknown, pred)
    return pred.astype(id_png_dtype(unknown))


def background_labels(background, labels):
    """--background -> the background vocabulary: DEFAULT_BACKGROUND for "default", else the comma-separated labels;
    labels that are asked for are left out (asking for a label must not make it unknown)."""
    extra = DEFAULT_BACKGROUND if background == "default" else parse_labels(background, "--background")
    return [b for b in dict.fromkeys(extra) if b not in labels]


def share_line(ids, labels):
    """Every label's share of the pixels, largest first, the labels that won none included, and unknown where it
    won any: 'building 30.6%, road 28.4%, ..., fence 0.0%'."""
    counts = np.bincount(ids.ravel(), minlength=unknown_id(len(labels)) + 1)  # ids: 0..N-1 or unknown_id
    order = sorted(range(len(labels)), key=lambda i: -counts[i])              # stable: ties keep the asked order
    parts = [f"{labels[i]} {100 * counts[i] / ids.size:.1f}%" for i in order]
    unknown = ids.size - counts[:len(labels)].sum()
    return ", ".join(parts + ([f"unknown {100 * unknown / ids.size:.1f}%"] if unknown else []))


def asked_labels(labels, background, sentences="", mode="sentence"):
    """predict.py's and run_onnx.py's --labels, --background, --sentences and --mode -> (labels, background labels,
    the text to embed for each of labels + background). ConfigError naming the flag where the labels are missing or
    break label_spec's rule (blank, repeated, too many: label i gets id i)."""
    asked = parse_labels(labels, "--labels")
    if not asked:
        raise ConfigError("--labels: give the labels to segment into, comma-separated (label i gets id i)")
    extra = background_labels(background, asked)
    return asked, extra, label_texts_for(asked + extra, sentences, mode)


def labels_record(labels, texts, background, unknown_below, **meta):
    """labels.json of predict.py and run_onnx.py: id -> label and the text embedded, the unknown id (null where no
    pixel can be unknown: no threshold, no background), the background labels with their texts, then `meta`
    (checkpoint or graphs, where the embeddings came from, precision)."""
    return {"ids": {str(i): {"label": lab, "text": t} for i, (lab, t) in enumerate(zip(labels, texts))},
            "unknown": unknown_id(len(labels)) if unknown_below > -1 or background else None,
            "background": dict(zip(background, texts[len(labels):])), **meta}
