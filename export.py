"""Export a trained checkpoint with a fixed label set baked in to ONNX, for onnxruntime or any ONNX runtime.

    python export.py --checkpoint=CKPT --dataset=camvid --out=camvid.onnx       # the dataset's evaluated classes
    python export.py --checkpoint=CKPT --labels=road,car,sky --sentences=mine.yaml --embeddings=T.pt --out=m.onnx
    python export.py ... --embeddings_out=true                                # also output the pixel embeddings

The graph (inputs and outputs by name):
  image   (1, 3, H, W) float32, RGB scaled to [0, 1] then ImageNet-normalised (transforms.eval_image: mean
          0.485 0.456 0.406, std 0.229 0.224 0.225); H and W are dynamic, any size
  ids     (1, H, W) int64, the label with the highest score: 0..N-1 in the order of --labels (or of the dataset's
          evaluated classes), listed in the file's metadata `labels` (JSON)
  score   (1, H, W) float32, the softmax probability of that label
  emb     (1, D, H'/4, W'/4) float32, L2-normalised pixel embeddings (with --embeddings_out); H', W' are H, W
          padded up to multiples of 32, half of the padding before the image (top, left), half after
This is evaluate.py's whole-image protocol at one scale without flip (inference.whole_image_scores): the image is
padded to a multiple of 32 (centred, zeros = the mean colour), the cosine similarity with the label embeddings
times the checkpoint's temperature is upsampled to the padded size, the padding is cut off, softmax, argmax. Resize
the image to the base size you evaluate at before feeding it; the graph does not resize. Labels: --labels, their
texts and embeddings exactly as predict.py makes them; --dataset, as evaluate.py makes them.

Needs the `onnx` package (pip install -r requirements-dev.txt, or pip install onnx); never imported by train.py,
evaluate.py or predict.py. The TorchScript exporter (dynamo=False) is used: it needs nothing but onnx.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from distributed import set_threads
from errors import ConfigError, run_main
from evaluation import dataset_classes
from inference import load_for_inference
from labels import label_texts, label_texts_for
from onnx_export import Segmenter, export, import_onnx
from settings import parse_settings, print_settings
from transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ExportSettings:
    checkpoint: str = ""           # from train.py
    dataset: str = ""              # a dataset name or YAML (evaluate.py's): its evaluated classes are the labels
    labels: str = ""               # ... or comma-separated labels (predict.py's), label i -> id i
    sentences: str = ""            # with labels: YAML {label: sentence}; wins over label_sentences.yaml
    embeddings: str = ""           # label table; "" = the checkpoint's own encoder or its table (docs/labels.md)
    clip_weights: str = ""         # ... or CLIP weights to embed the label texts now
    mode: str = "sentence"         # sentence | word
    embeddings_out: bool = False   # also output the pixel embeddings `emb`
    out: str = "model.onnx"        # the ONNX file to write
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores


def labels_and_texts(s):
    """(names, label keys or labels, texts to embed) of --dataset or --labels."""
    if bool(s.dataset) == bool(s.labels):
        raise ConfigError("give exactly one of --dataset=NAME (its evaluated classes) or --labels=a,b,c")
    if s.dataset:
        keys, names, spec = dataset_classes(s.dataset)
        return names, keys, label_texts(spec, keys, s.mode)
    labels = [label.strip() for label in s.labels.split(",") if label.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels={s.labels!r}: give distinct comma-separated labels")
    return labels, labels, label_texts_for(labels, s.sentences, s.mode)


def main(argv=None):
    s = parse_settings(ExportSettings, argv)
    print_settings(s)
    set_threads(s.threads)
    import_onnx()  # before any work
    if not Path(s.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint={s.checkpoint!r}: not a file (a checkpoint written by train.py)")
    names, keys, texts = labels_and_texts(s)
    model, ckpt, label_emb, scale = load_for_inference(s.checkpoint, keys, texts, s.embeddings, s.clip_weights)
    segmenter = Segmenter(model, label_emb, scale, s.embeddings_out)
    command = " ".join(["export.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"labels": json.dumps(names), "label_keys": json.dumps(keys), "texts": json.dumps(texts),
            "checkpoint": s.checkpoint, "step": str(ckpt.get("step")), "command": command,
            "input": json.dumps({"layout": "NCHW RGB", "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})}
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    export(segmenter, s.out, metadata=meta)
    print(f"wrote {s.out}: {len(names)} labels ({', '.join(names)}), temperature {float(segmenter.scale):.2f}, "
          f"outputs ids, score{', emb' if s.embeddings_out else ''}")


if __name__ == "__main__":
    run_main(main)
