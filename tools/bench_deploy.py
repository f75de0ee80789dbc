"""Latency of the torch-free runner's step (run_onnx.py: onnx_segment on the deployment's graphs) beside predict.py's
(inference.infer in torch) on the same checkpoint, images and labels, in the same run.

    python -m tools.bench_deploy --checkpoint=CKPT --deploy_dir=DIR --images=data/camvid-11/val --threads=1

Per image, as each command does it, writing files aside: decode, normalise, the protocol (--base_size, whole image,
one scale, fp32: predict.py --sliding=false --precision=fp32), the ids. Labels embedded once beforehand (their time is
the text cache's). The two take turns: each round times --calls images with each, the order reversing every round;
prints the median call of each and the ratio predict / runner.
"""
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import run_main
from images import decode_rgb, list_images, normalized, open_image
from inference import Protocol, infer
from label_source import load_for_inference
from label_spec import label_texts_for, parse_labels
from onnx_segment import OnnxSegmenter
from score_rules import ids_from_scores
from settings import parse_settings, print_settings
from transforms import eval_image


@dataclass
class BenchSettings:
    checkpoint: str = ""           # from train.py
    deploy_dir: str = ""           # export.py --deploy_dir of that checkpoint
    images: str = "data/camvid-11/val"
    labels: str = "sky,building,pole,road,sidewalk_pavement,vegetation,traffic_sign,fence,car,person,bicyclist"
    base_size: int = 360
    threads: int = 1               # torch's threads and onnxruntime's intra-op threads
    rounds: int = 4
    calls: int = 5                 # images per engine per round
    out: str = ""                  # also write the figures as JSON here


def main(argv=None):
    s = parse_settings(BenchSettings, argv)
    print_settings(s)
    torch.set_num_threads(s.threads)
    labels = parse_labels(s.labels, "--labels")
    texts = label_texts_for(labels)
    model, _, emb, scale = load_for_inference(s.checkpoint, labels, texts)   # (N, D) the checkpoint's encoder
    proto = Protocol(base_size=s.base_size, sliding=False, precision="fp32")
    seg = OnnxSegmenter(Path(s.deploy_dir) / "image.onnx", Path(s.deploy_dir) / "text.onnx", s.threads, "off")
    onnx_emb, _ = seg.label_embeddings(texts)
    paths = list_images(s.images)

    def predict_step(path):
        rgb = decode_rgb(open_image(path, proto.work_size), path)
        prob, _ = infer(model, eval_image(rgb), emb, scale, proto)
        return ids_from_scores(prob.cpu().numpy(), None, -1.0, len(labels))

    def runner_step(path):
        rgb = decode_rgb(open_image(path, seg.work_size(s.base_size)), path)
        prob, cos = seg.scores(normalized(rgb), onnx_emb, s.base_size)
        return ids_from_scores(prob, cos, -1.0, len(labels))

    engines = {"predict": predict_step, "runner": runner_step}
    times = {name: [] for name in engines}
    k = 0
    for r in range(s.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        chunk = [paths[(k + i) % len(paths)] for i in range(s.calls)]
        k += s.calls
        for name in order:
            for path in chunk:
                t0 = time.perf_counter()
                engines[name](path)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{s.checkpoint}, {len(labels)} labels, base {s.base_size}, {s.threads} thread(s), {s.rounds} rounds x "
          f"{s.calls} images, median call: predict {1000 * med['predict']:.0f} ms, runner {1000 * med['runner']:.0f} "
          f"ms, predict / runner {med['predict'] / med['runner']:.2f}")
    result = {"settings": vars(s), "median_s": med, "ratio_predict_over_runner": med["predict"] / med["runner"],
              "times_s": times}
    if s.out:
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_main(main)
