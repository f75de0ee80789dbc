"""ONNX graphs of a trained model, for onnxruntime or any ONNX runtime: the model with its label embeddings and
temperature inside (`Segmenter`), and the writer (`export`). export.py is the command; its docstring describes the
graph's inputs and outputs. Needs the `onnx` package, imported only when a graph is written.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ConfigError
from inference import WHOLE_IMAGE_MULTIPLE
from model import similarity, upsample_logits

OPSET = 17  # Resize with dynamic sizes, Pad with dynamic pads, LayerNormalization; onnxruntime >= 1.14 runs it


class Segmenter(nn.Module):
    """A model with its label embeddings and temperature baked in.

    image (1, 3, H, W) normalised -> ids (1, H, W) int64, score (1, H, W) float32 [, emb (1, D, H'/4, W'/4)].
    """

    def __init__(self, model, label_emb, scale, with_emb=False):
        super().__init__()
        self.model = model
        self.register_buffer("label_emb", F.normalize(label_emb.float(), dim=-1))  # (N, D)
        self.register_buffer("scale", torch.tensor(float(scale)))                   # the checkpoint's temperature
        self.with_emb = with_emb
        self.eval()  # the model's eval forward (embeddings only); the exporter restores the wrapper's mode after

    def forward(self, image):
        h, w = image.shape[-2:]  # traced as tensors by the exporter, so the padding below follows the input's size
        m = WHOLE_IMAGE_MULTIPLE
        ph, pw = (m - h % m) % m, (m - w % m) % m
        top, left = ph // 2, pw // 2
        # padded to a multiple of 32, centred, as inference.whole_image_scores pads (so the outputs are its)
        x = F.pad(image, [left, pw - left, top, ph - top])                # (1, 3, H', W')
        emb = self.model(x)                                                # (1, D, H'/4, W'/4)
        logits = upsample_logits(similarity(emb, self.label_emb, self.scale), x.shape[-2:])  # (1, N, H', W')
        prob = logits[:, :, top:top + h, left:left + w].softmax(1)         # (1, N, H, W)
        score, ids = prob.max(1)                                           # (1, H, W) each
        if self.with_emb:
            return ids, score, F.normalize(emb, dim=1)
        return ids, score


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("export.py needs the `onnx` package: pip install onnx (or pip install -r "
                          "requirements-dev.txt, which also brings onnxruntime to check the export)") from None
    return onnx


def export(segmenter, path, opset=OPSET, metadata=None):
    """Write `segmenter` as ONNX to path with dynamic H and W; metadata {key: str} goes into the file."""
    onnx = import_onnx()
    names = ["ids", "score"] + (["emb"] if segmenter.with_emb else [])
    axes = {"image": {2: "H", 3: "W"}, "ids": {1: "H", 2: "W"}, "score": {1: "H", 2: "W"},
            "emb": {2: "h", 3: "w"}}
    example = torch.zeros(1, 3, 64, 96)  # not a multiple of 32 would also do; the padding is traced either way
    with torch.no_grad():
        torch.onnx.export(segmenter, (example,), str(path), input_names=["image"], output_names=names,
                          dynamic_axes={k: v for k, v in axes.items() if k in ["image"] + names},
                          opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
