"""Segment images with any labels on onnxruntime, numpy and Pillow alone (no torch): a deployment's runner. Takes the
two graphs of export.py --deploy_dir (the open-vocabulary image graph and the text graph) and writes what predict.py
writes (labels.json, <stem>.png ids, <stem>_overlay.png; see predict.py), with the text cache, --unknown_below and
--background as there.

    python run_onnx.py --images=photos/ --labels="deer,grass,sky"              # in the deployment folder
    python run_onnx.py --images=a.jpg --labels=road,car,sky --image_graph=DIR/image.onnx --text_graph=DIR/text.onnx
    python run_onnx.py --images=a.jpg --labels=road,car,sky --base_size=360 --unknown_below=0.2 --background=default

The protocol is predict.py's with --sliding=false --scales=[1.0] --flip=false --precision=fp32 (the whole photo at
one scale): the photo's short side resized to base_size, the graph, its probabilities and cosines resized to the
photo's size, the argmax (onnx_segment.py). On the checkpoint the graphs came from, the ids equal predict.py's with
those settings (docs/deployment.md measures how closely).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import run_main
from images import MAX_ASPECT, MAX_PIXELS, decode_rgb, list_images, normalized, open_image, set_image_budget
from label_spec import TEXT_MODES
from onnx_segment import OnnxSegmenter
from overlays import save_prediction
from score_rules import asked_labels, ids_from_scores, labels_record, share_line, unknown_id
from settings import one_of, parse_settings, print_settings, require


@dataclass
class RunSettings:
    images: str = ""               # a folder, an image, or comma-separated images
    labels: str = ""               # comma-separated labels, e.g. "deer,grass,sky" (label i -> id i)
    sentences: str = ""            # YAML {label: sentence}; wins over label_sentences.yaml
    mode: str = "sentence"         # sentence | word
    unknown_below: float = -1.0    # cosine similarity under which a pixel is unknown; -1 = never
    background: str = ""           # more labels whose winning pixels are unknown: "default" or comma-separated
    image_graph: str = "image.onnx"  # export.py --deploy_dir's open-vocabulary image graph
    text_graph: str = "text.onnx"  # ... and its text graph (the tokenizer's files beside it)
    base_size: int = 720           # the photo's shorter side before inference (0 = its own)
    out_dir: str = "out/predict"
    text_cache: str = ""           # the text cache's folder; "" = $SSIW_CACHE or ~/.cache/ssiw; "off"
    max_pixels: int = MAX_PIXELS   # a photo, or the size it is processed at, larger than this is refused (100 MP)
    max_aspect: float = MAX_ASPECT # a photo whose longer side is more than this times its shorter is refused
    threads: int = 0               # onnxruntime's intra-op threads; 0 = its default (the cores)

    def validate(self):
        require(self, "unknown_below", lambda v: -1 <= v <= 1, "must be in [-1, 1] (a cosine similarity; -1 = off)")
        require(self, "base_size", lambda v: v >= 0, "must be >= 0")
        require(self, "threads", lambda v: v >= 0, "must be >= 0")
        one_of(self, "mode", TEXT_MODES)


def main(argv=None):
    s = parse_settings(RunSettings, argv)
    set_image_budget(s.max_pixels, s.max_aspect)
    print_settings(s)
    paths = list_images(s.images)
    labels, background, texts = asked_labels(s.labels, s.background, s.sentences, s.mode)
    seg = OnnxSegmenter(s.image_graph, s.text_graph, s.threads, s.text_cache)
    label_emb, hits = seg.label_embeddings(texts)                        # (N + B, D)
    print(f"label embeddings: {len(texts)} texts embedded with {s.text_graph} ({seg.text.encoder}; {hits} from the "
          f"text cache)")
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "labels.json").write_text(json.dumps(labels_record(
        labels, texts, background, s.unknown_below, checkpoint=seg.meta.get("checkpoint"),
        labels_from=f"{s.text_graph} ({s.mode})", image_graph=s.image_graph, precision="fp32"), indent=2) + "\n")
    work_size = seg.work_size(s.base_size)
    for n, path in enumerate(paths, 1):
        rgb = decode_rgb(open_image(path, work_size), path)              # PIL RGB; the budget checked first
        prob, cos = seg.scores(normalized(rgb), label_emb, s.base_size)  # (N, H, W) each
        ids = ids_from_scores(prob, cos, s.unknown_below, len(labels))   # (H, W) uint8 or uint16
        save_prediction(out_dir, path.stem, np.asarray(rgb), ids, labels, unknown_id(len(labels)))
        print(f"[{n}/{len(paths)}] {path.name}: {share_line(ids, labels)}", flush=True)
    print(f"wrote {len(paths)} id maps and overlays to {out_dir}")


if __name__ == "__main__":
    run_main(main)
