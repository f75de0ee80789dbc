"""A local page to try any labels on any photo, and a JSON API for programs: one model in memory, served with
Python's standard library (http.server), requests run through the model one at a time.

    python serve.py --checkpoint=CKPT --clip_weights=ViT-B-32.pt [--port=8000] [--host=127.0.0.1]
    then open http://127.0.0.1:8000/ (the page: drop a photo, type labels, move the "unknown below" slider)

Labels are embedded as predict.py embeds them (--embeddings=TABLE: rows named by the labels; --clip_weights: each
label's sentence embedded on request), once per label set (the last --label_cache sets stay in memory).
The routes, the request's fields, the answer, the limits and the errors: serve_http.py (shared with serve_onnx.py,
which serves an exported model on onnxruntime alone).
"""
from dataclasses import dataclass

import torch

from checkpoints import check_width
from errors import run_main
from inference import Protocol, infer, resolve_precision
from label_source import LabelSource, label_embeddings
from label_spec import label_texts_for, parse_labels
from runtime import pick_device, set_threads
from serve_http import serve
from serve_segmenter import HttpSettings, Segmenter
from settings import parse_settings, print_settings


@dataclass
class ServeSettings(Protocol, LabelSource, HttpSettings):  # + the protocol's, the label source's and every server's
    device: str = "auto"
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores (runtime.set_threads)

    def validate(self):
        Protocol.validate(self)
        LabelSource.validate(self)
        HttpSettings.validate(self)


class TorchSegmenter(Segmenter):
    """The checkpoint's model and its label source (predict.py's: --embeddings, --clip_weights or its own)."""

    def __init__(self, s, device):
        super().__init__(s)
        self.device = device
        warm = parse_labels(s.warmup, "--warmup")
        texts = label_texts_for(warm, {}, s.mode, self.spec)
        self.model, self.ckpt, emb, self.scale = s.load(warm, texts, device)  # emb (N, D)
        self.remember((tuple(warm), tuple(texts)), emb)
        self.start()

    def embed(self, keys, texts):
        emb = label_embeddings(keys, texts, self.s.embeddings, self.s.clip_weights, self.device,
                               self.ckpt.get("label_table"))               # (N, D)
        check_width(self.ckpt, emb, "the label embeddings")
        return emb

    def work_size(self, w, h):
        return self.s.work_size(w, h)

    def scores(self, image, emb, size):
        prob, cos = infer(self.model, torch.from_numpy(image), emb, self.scale, self.s, out_size=size, with_cos=True)
        return prob.cpu().numpy(), cos.cpu().numpy()                       # (N, h, w) each

    def health(self):
        s = self.s
        return {"status": "ok", "checkpoint": s.checkpoint, "backbone": self.ckpt["model_args"].get("backbone"),
                "labels_from": s.described(),
                "device": str(self.device), "precision": resolve_precision(s.precision, self.device),
                "base_size": s.base_size, "served": self.served, "waiting": self.waiting, "limits": self.limits()}


def main(argv=None):
    s = parse_settings(ServeSettings, argv)
    set_threads(s.threads)
    print_settings(s)
    device = pick_device(s.device)
    segmenter = TorchSegmenter(s, device)
    serve(segmenter, f"{s.checkpoint} ({device}, {resolve_precision(s.precision, device)}, "
                     f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    run_main(main)
