"""Segment any images with any labels (unseen ones through their sentences), and export pseudo-labels.

    python predict.py --images=photos/ --labels="deer,grass,sky" --checkpoint=CKPT --clip_weights=ViT-B-32.pt
    python predict.py --images=a.jpg,b.jpg --labels=building,window,door --sentences=mine.yaml --embeddings=T.pt \
        --checkpoint=CKPT --unknown_below=0.2 --background=default --export_emb=true --emb_dims=16

Text of each label: its sentence in --sentences (YAML {label: sentence}), else in label_sentences.yaml's `labels`,
else the label itself as a word; --mode=word always embeds the word. With --embeddings the table must have a row
named by each label (label_table.py makes one from a sentences YAML).
Inference is inference.py's MSeg protocol (evaluate.py's settings). Writes to out_dir:
  labels.json              id -> label and the text embedded; "unknown": the id of unknown pixels (or null), which
                           --unknown_below and --background produce
  <stem>.png               ids (label i -> i), the pseudo-label map at the image's size: an 8-bit grey PNG for up to
                           255 labels (unknown = 255), a 16-bit grey PNG beyond (up to 65535 labels, unknown = 65535),
                           so a pseudo-label set as large as OpenImages + Objects365 (600+ labels) keeps its ids;
                           np.asarray(Image.open(path)) reads either (uint8 / uint16), and readers.read_id_label
                           reads both back as training labels
  <stem>_overlay.png       colours over the photo, with a legend
  <stem>.npz (export_emb)  ids, and the L2-normalised pixel embeddings at stride 4 (whole image at base size), as
                           `emb` (k, h, w) in emb_dtype; with emb_dims = k > 0 PCA-reduced per image, with `basis`
                           (k, D) and `mean` (D,) so that emb_D ~= basis.T @ emb + mean.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import ConfigError, run_main
from images import MAX_ASPECT, MAX_PIXELS, decode_rgb, list_images, open_image, set_image_budget
from inference import Protocol, infer, resize_short_side, resolve_precision
from label_source import LabelSource
from overlays import save_prediction
from runtime import choose_precision, pick_device, set_threads
from score_rules import asked_labels, ids_from_scores, labels_record, share_line, unknown_id
from settings import one_of, parse_settings, print_settings, require
from transforms import eval_image

@dataclass
class PredictSettings(Protocol, LabelSource):  # + the protocol's and the label source's settings
    images: str = ""               # a folder, an image, or comma-separated images
    labels: str = ""               # comma-separated labels, e.g. "deer,grass,sky" (label i -> id i)
    sentences: str = ""            # YAML {label: sentence}; wins over label_sentences.yaml
    unknown_below: float = -1.0    # cosine similarity under which a pixel is unknown (unknown_id); -1 = never
    background: str = ""           # more labels whose winning pixels are unknown (unknown_id): "default"
                                   # (DEFAULT_BACKGROUND) or comma-separated labels; "" = none
    out_dir: str = "out/predict"
    export_emb: bool = False       # also write <stem>.npz with per-pixel embeddings
    emb_dims: int = 0              # PCA dims of the exported embeddings (0 = all D)
    emb_dtype: str = "float16"     # float16 | float32
    max_pixels: int = MAX_PIXELS   # an image, or the size the protocol processes it at, larger than this is refused
                                   # before decoding (100 MP)
    max_aspect: float = MAX_ASPECT # an image whose longer side is more than this times its shorter is refused so too
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores

    def validate(self):
        """The protocol's settings and these in range (parse_settings calls this)."""
        Protocol.validate(self)
        LabelSource.validate(self)
        require(self, "unknown_below", lambda v: -1 <= v <= 1, "must be in [-1, 1] (a cosine similarity; -1 = off)")
        require(self, "emb_dims", lambda v: v >= 0, "must be >= 0")
        one_of(self, "emb_dtype", ("float16", "float32"))


@torch.no_grad()
def pixel_embeddings(model, image, proto):
    """(3, H, W) normalised -> (D, h, w) L2-normalised pixel embeddings at stride 4 of the image resized to the base
    size (whole image, first scale): the model's own resolution, so nothing is invented by upsampling. The network
    runs in proto.precision."""
    x = image[None].to(next(model.parameters()).device)                 # (1, 3, H, W)
    x = resize_short_side(x, round(proto.scales[0] * (proto.base_size or min(x.shape[-2:]))))
    bf16 = resolve_precision(proto.precision, x.device) == "bf16"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = model(x)                                                   # (1, D, h, w)
    return F.normalize(emb[0].float(), dim=0)                            # (D, h, w)


def reduce_embeddings(emb, k):
    """PCA of one image's pixel embeddings. emb: (D, h, w) -> coeffs (k, h, w), basis (k, D), mean (D,)."""
    d, h, w = emb.shape
    x = emb.reshape(d, h * w).T.double()                                 # (hw, D)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, h * w - 1)                   # (D, D)
    _, vecs = torch.linalg.eigh(cov)                                     # ascending eigenvalues
    basis = vecs[:, -k:].flip(1).T                                       # (k, D), largest variance first
    coeffs = ((x - mean) @ basis.T).T.reshape(k, h, w)                   # (hw, k) -> (k, h, w)
    return coeffs.float(), basis.float(), mean.float()


def export_npz(path, ids, emb, k, dtype):
    """Write ids and (optionally PCA-reduced) embeddings; see the module docstring for the layout."""
    out = {"ids": ids}
    if k:
        if k > emb.shape[0]:
            raise ConfigError(f"--emb_dims={k} exceeds the embedding width {emb.shape[0]}")
        coeffs, basis, mean = reduce_embeddings(emb.cpu(), k)
        out.update(emb=coeffs.numpy().astype(dtype), basis=basis.numpy().astype(dtype), mean=mean.numpy())
    else:
        out["emb"] = emb.cpu().numpy().astype(dtype)
    np.savez_compressed(path, **out)


def predict_images(model, paths, labels, label_emb, scale, proto, out_dir, unknown_below=-1.0, export_emb=False,
                   emb_dims=0, emb_dtype="float16"):
    """Segment each image into `labels` and write the files listed in the module docstring. Returns {stem: ids}.
    label_emb (N, D) may have rows past len(labels): the background vocabulary, whose pixels become unknown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for n, path in enumerate(paths, 1):
        rgb = decode_rgb(open_image(path, proto.work_size), path)       # PIL RGB; the budget checked first
        image = eval_image(rgb)                                     # (3, H, W) normalised
        prob, cos = infer(model, image, label_emb, scale, proto, with_cos=unknown_below > -1)  # (N, H, W) each
        ids = ids_from_scores(prob.cpu().numpy(), cos if cos is None else cos.cpu().numpy(),  # (H, W) uint8 or
                              unknown_below, len(labels))                                  # uint16
        save_prediction(out_dir, path.stem, np.asarray(rgb), ids, labels, unknown_id(len(labels)))
        if export_emb:
            export_npz(out_dir / f"{path.stem}.npz", ids, pixel_embeddings(model, image, proto), emb_dims, emb_dtype)
        results[path.stem] = ids
        print(f"[{n}/{len(paths)}] {path.name}: {share_line(ids, labels)}", flush=True)
    return results


def main(argv=None):
    s = parse_settings(PredictSettings, argv)
    set_image_budget(s.max_pixels, s.max_aspect)
    print_settings(s)
    set_threads(s.threads)
    device = pick_device(s.device)
    precision, why = choose_precision(s.precision, device)  # which precision the network runs in, and why
    print(why)
    paths = list_images(s.images)
    labels, background, texts = asked_labels(s.labels, s.background, s.sentences, s.mode)
    model, ckpt, label_emb, scale = s.load(labels + background, texts, device)  # label_emb (N + B, D)
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "labels.json").write_text(json.dumps(labels_record(
        labels, texts, background, s.unknown_below, checkpoint=s.checkpoint, labels_from=s.described(),
        precision=precision), indent=2) + "\n")
    predict_images(model, paths, labels, label_emb, scale, s,
                   out_dir, s.unknown_below, s.export_emb, s.emb_dims, s.emb_dtype)
    print(f"wrote {len(paths)} id maps and overlays to {out_dir}")


if __name__ == "__main__":
    run_main(main)
