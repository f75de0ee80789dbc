"""serve.py's page and JSON API on a deployment's two graphs (export.py --deploy_dir), with onnxruntime, numpy and
Pillow alone (no torch): the same routes, request fields, answers, limits and errors (serve_http.py), the labels
embedded by the text graph (through the text cache), the photo segmented whole at one scale (onnx_segment.py: serve.py
with --sliding=false, the default scales and no flip, in fp32).

    python serve_onnx.py [--image_graph=image.onnx --text_graph=text.onnx] [--base_size=360] [--port=8000]
    then open http://127.0.0.1:8000/
"""
from dataclasses import dataclass

from errors import run_main
from onnx_segment import OnnxSegmenter
from serve_http import serve
from serve_segmenter import HttpSettings, Segmenter
from settings import parse_settings, print_settings, require


@dataclass
class OnnxServeSettings(HttpSettings):  # + every server's settings (serve_segmenter.py)
    image_graph: str = "image.onnx"  # export.py --deploy_dir's open-vocabulary image graph
    text_graph: str = "text.onnx"  # ... and its text graph (the tokenizer's files beside it)
    base_size: int = 720           # the photo's shorter side before inference (0 = its own)
    text_cache: str = ""           # the text cache's folder; "" = $SSIW_CACHE or ~/.cache/ssiw; "off"
    threads: int = 0               # onnxruntime's intra-op threads; 0 = its default (the cores)

    def validate(self):
        super().validate()
        require(self, "base_size threads", lambda v: v >= 0, "must be >= 0")


class GraphSegmenter(Segmenter):
    """The deployment's image graph and text graph (onnx_segment.OnnxSegmenter)."""

    def __init__(self, s):
        super().__init__(s)
        self.graphs = OnnxSegmenter(s.image_graph, s.text_graph, s.threads, s.text_cache)
        self.start()

    def embed(self, keys, texts):
        return self.graphs.label_embeddings(texts)[0]                    # (N, D)

    def work_size(self, w, h):
        return self.graphs.work_size(self.s.base_size)(w, h)

    def scores(self, image, emb, size):
        return self.graphs.scores(image, emb, self.s.base_size, out_size=size)  # (N, h, w) each

    def health(self):
        s = self.s
        return {"status": "ok", "image_graph": s.image_graph, "text_graph": s.text_graph,
                "checkpoint": self.graphs.meta.get("checkpoint"), "encoder": self.graphs.text.encoder,
                "device": "cpu", "precision": "fp32", "base_size": s.base_size, "served": self.served,
                "waiting": self.waiting, "limits": self.limits()}


def main(argv=None):
    s = parse_settings(OnnxServeSettings, argv)
    print_settings(s)
    segmenter = GraphSegmenter(s)
    serve(segmenter, f"{s.image_graph} and {s.text_graph} (onnxruntime, fp32)")


if __name__ == "__main__":
    run_main(main)
