"""CPU latency of an exported model in onnxruntime against the same model in torch eager, in the same run; and,
with a checkpoint, how the export labels a real evaluation set against evaluate.py.

    python -m tools.bench_export                                      # efficientnet_lite0 and mit_b0, 360x480
    python -m tools.bench_export --threads=1 --rounds=5
    python -m tools.bench_export --checkpoint=CKPT --dataset=camvid-segnet --base_size=360
    python -m tools.bench_export --open_labels=[11,300] --max_labels=320 --text_labels=[11,300] --baseline=DIR

Latency: random weights (speed does not depend on them), --classes labels of width --embed_dim, batch 1, one image
of --height x --width. The engines: evaluate.py's whole-image protocol in torch (inference.whole_image_scores, fp32,
then the argmax), the ONNX export (onnx_export.Segmenter) in onnxruntime (CPU provider, intra-op threads = --threads,
inter-op 1), and with --baseline the graph of the same backbone in that folder (e.g. exported by another version).
They take turns: each round runs --calls calls of each engine, the order reversing every round. Prints the median
call of each and the ratio torch / onnxruntime. With --open_labels, also the open-vocabulary graph (export.py
--open_vocab) fed that many label rows; with --max_labels, also the graph padded to that many rows, fed --classes real
ones (all in the same alternation).

Text (--text_labels): CLIP's ViT-B/32-sized text tower (random weights) embedding that many label sentences of
label_sentences.yaml at once: clip_text.encode_sentences in torch against its ONNX graph through onnx_text.TextGraph
(tokenizing included in both), alternating as above.

Real images (--checkpoint and --dataset): every image of the set, resized as evaluate.py resizes it at --base_size
(whole image, one scale, no flip: what the graph computes), through the export in onnxruntime and through
evaluate.py's protocol in torch: pixels labelled differently (and the largest margin between torch's best two labels
among them: a tie within float rounding when tiny), the largest score difference, and the mIoU of each.
"""
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import run_main
from dataset_yaml import load_dataset_config
from evaluation import EvalDataset, confusion_matrix, metrics_from_confusion
from inference import Protocol, infer, resize_short_side, whole_image_scores
from label_source import load_for_inference
from label_spec import label_texts
from model import ModelConfig, build_model
from runtime import set_threads
import clip_text
from label_spec import load_label_spec
from onnx_export import OpenVocabSegmenter, Segmenter, export
from onnx_text import TextGraph
from onnx_text_export import export_clip_text
from provenance import provenance
from settings import parse_settings


@dataclass
class BenchSettings:
    backbones: list = field(default_factory=lambda: ["efficientnet_lite0", "mit_b0"])
    height: int = 360
    width: int = 480
    embed_dim: int = 512
    classes: int = 11
    open_labels: list = field(default_factory=list)  # label counts to feed the open-vocabulary graph ([] = none)
    max_labels: int = 0            # also the open-vocabulary graph padded to this many rows (0 = none)
    text_labels: list = field(default_factory=list)  # sentence counts for the text-encoder timing ([] = none)
    baseline: str = ""             # a folder of graphs BACKBONE.onnx (e.g. exported by another version) to time too
    threads: int = 0               # torch's and onnxruntime's intra-op threads; 0 = from the usable cores
    rounds: int = 4                # torch and onnxruntime alternate, the order flipping every round
    calls: int = 5                 # calls per engine per round (after one warm-up call each)
    checkpoint: str = ""           # with dataset: the real-image comparison
    dataset: str = ""              # evaluate.py's dataset name or YAML (with its root and list)
    embeddings: str = ""           # label table; "" = the checkpoint's own training table
    base_size: int = 360
    max_images: int = 0            # 0 = all
    out: str = ""                  # results JSON ("" = none)


def session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def alternate(engines, s):
    """Median seconds per call of each engine {name: fn}: one warm-up call each, then s.rounds rounds of s.calls
    calls per engine, the order flipping every round."""
    times = {name: [] for name in engines}
    for fn in engines.values():
        fn()  # warm-up: allocator, kernel choice, onnxruntime's first-run setup
    for r in range(s.rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            for _ in range(s.calls):
                start = time.perf_counter()
                engines[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def latency(backbone, s, folder):
    """Median seconds per call of torch eager and onnxruntime for one random-weight model (and of the
    open-vocabulary graphs, see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embed_dim=s.embed_dim)).eval()
    label_emb = torch.randn(s.classes, s.embed_dim)
    seg = Segmenter(model, label_emb, 14.0)
    path = Path(folder) / f"{backbone}.onnx"
    export(seg, path)
    image = torch.randn(1, 3, s.height, s.width)
    sess, feed = session(path, s.threads), {"image": image.numpy()}

    def run_torch():  # evaluate.py's whole-image protocol, then the argmax and its probability
        score, ids = whole_image_scores(model, image, seg.label_emb, 14.0, flip=False).max(0)
    engines = {"torch": run_torch, "onnxruntime": lambda: sess.run(None, feed)}
    if s.baseline:
        base = session(Path(s.baseline) / f"{backbone}.onnx", s.threads)
        engines["onnxruntime_baseline"] = lambda: base.run(None, feed)
    if s.open_labels:
        export(OpenVocabSegmenter(model, 14.0), Path(folder) / "open.onnx")
        open_sess = session(Path(folder) / "open.onnx", s.threads)
        for k in s.open_labels:
            rows = torch.randn(k, s.embed_dim).numpy()
            engines[f"onnxruntime_open_{k}"] = lambda rows=rows: open_sess.run(None, dict(feed, label_emb=rows))
    if s.max_labels:
        export(OpenVocabSegmenter(model, 14.0, max_labels=s.max_labels), Path(folder) / "padded.onnx")
        padded = session(Path(folder) / "padded.onnx", s.threads)
        rows = torch.cat([label_emb, torch.zeros(s.max_labels - s.classes, s.embed_dim)]).numpy()
        engines[f"onnxruntime_padded_{s.max_labels}"] = lambda: padded.run(
            None, dict(feed, label_emb=rows, label_count=np.array([s.classes])))
    return alternate(engines, s)


def text_latency(s, folder):
    """Median seconds to embed k label sentences, for each k of s.text_labels: torch against the ONNX text graph."""
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig()).eval()  # ViT-B/32's text tower, random weights
    torch.save(tower.state_dict(), Path(folder) / "clip_random.pt")
    export_clip_text(Path(folder) / "clip_random.pt", Path(folder) / "text.onnx")
    graph = TextGraph(Path(folder) / "text.onnx", s.threads)
    sentences = list(load_label_spec().sentences.values())
    engines = {}
    for k in s.text_labels:
        texts = sentences[:k]
        engines[f"torch_{k}"] = lambda texts=texts: clip_text.encode_sentences(tower, texts)
        engines[f"onnxruntime_{k}"] = lambda texts=texts: graph.embed(texts)
    return alternate(engines, s)


def real_images(s, folder):
    """The export of a checkpoint against evaluate.py's protocol on every image of a dataset."""
    cfg, spec = load_dataset_config(s.dataset)
    dataset = EvalDataset(cfg, spec, s.max_images)
    model, _, label_emb, scale = load_for_inference(s.checkpoint, dataset.keys, label_texts(spec, dataset.keys),
                                                    s.embeddings)
    path = Path(folder) / "checkpoint.onnx"
    export(Segmenter(model, label_emb, scale), path)
    sess = session(path, s.threads)
    proto = Protocol(base_size=s.base_size, sliding=False, precision="fp32", compile=False)  # eager: what the export is compared with
    n = len(dataset.keys)
    conf = {"torch": torch.zeros(n, n, dtype=torch.int64), "onnxruntime": torch.zeros(n, n, dtype=torch.int64)}
    differ, pixels, score_diff, tie = 0, 0, 0.0, 0.0  # tie: the largest top-2 margin where the two differ
    for i in range(len(dataset)):
        image, target, _ = dataset[i]
        x = resize_short_side(image[None], s.base_size)                  # (1, 3, h, w), as infer resizes it
        prob, _ = infer(model, x[0], label_emb, scale, proto)            # (N, h, w): no resize at base_size
        ids, score = sess.run(None, {"image": x.numpy()})                # (1, h, w) each
        want_score, want = prob.max(0)
        changed = torch.from_numpy(ids[0]) != want                       # (h, w)
        if changed.any():
            top2 = prob.topk(2, 0).values                                # (2, h, w)
            tie = max(tie, float((top2[0] - top2[1])[changed].max()))
        differ += int(changed.sum())
        pixels += want.numel()
        score_diff = max(score_diff, float(np.abs(score[0] - want_score.numpy()).max()))
        size = target.shape  # the label's size: both predictions resized alike (nearest) when it differs
        for name, pred in (("torch", want), ("onnxruntime", torch.from_numpy(ids[0]))):
            pred = F.interpolate(pred[None, None].float(), size=size, mode="nearest")[0, 0].long()
            conf[name] += confusion_matrix(pred, target, n)
    miou = {name: metrics_from_confusion(c)["miou"] for name, c in conf.items()}
    return {"images": len(dataset), "pixels": pixels, "pixels_labelled_differently": differ,
            "max_score_difference": score_diff, "largest_margin_where_different": tie, "miou": miou}


def main(argv=None):
    s = parse_settings(BenchSettings, argv)
    s.threads = set_threads(s.threads)  # the count onnxruntime gets too, and the one recorded
    result = {"settings": s.__dict__, "latency_s": {}}
    print(f"batch 1, {s.height}x{s.width}, {s.classes} labels of width {s.embed_dim}, {s.threads} thread(s), "
          f"{s.rounds} rounds x {s.calls} calls per engine, alternating")
    with tempfile.TemporaryDirectory() as folder:
        for backbone in s.backbones:
            med = latency(backbone, s, folder)
            result["latency_s"][backbone] = med
            print(f"{backbone}: torch eager {1000 * med['torch']:.1f} ms, onnxruntime {1000 * med['onnxruntime']:.1f} "
                  f"ms (median call); torch / onnxruntime = {med['torch'] / med['onnxruntime']:.2f}", flush=True)
            for name in list(med)[2:]:
                print(f"{backbone}: {name} {1000 * med[name]:.1f} ms", flush=True)
        if s.text_labels:
            med = result["text_latency_s"] = text_latency(s, folder)
            for k in s.text_labels:
                print(f"CLIP ViT-B/32 text tower, {k} sentences: torch {1000 * med[f'torch_{k}']:.1f} ms, onnxruntime "
                      f"{1000 * med[f'onnxruntime_{k}']:.1f} ms", flush=True)
        if s.checkpoint and s.dataset:
            real = result["real_images"] = real_images(s, folder)
            print(f"{s.dataset}, {real['images']} images at base {s.base_size}: {real['pixels_labelled_differently']} "
                  f"of {real['pixels']} pixels labelled differently by onnxruntime (where the best two labels' "
                  f"probabilities are within {real['largest_margin_where_different']:.1e}); largest score difference "
                  f"{real['max_score_difference']:.2e}; mIoU torch {100 * real['miou']['torch']:.2f}, onnxruntime "
                  f"{100 * real['miou']['onnxruntime']:.2f}")
    result["provenance"] = provenance("-m tools.bench_export", sys.argv[1:] if argv is None else argv, "cpu", "fp32",
                                      files={"checkpoint": s.checkpoint, "label_table": s.embeddings})
    if s.out:
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
