"""ONNX graphs of a trained model, for onnxruntime or any ONNX runtime: the model with its label embeddings and
temperature inside (`Segmenter`), the model taking label embeddings at run time (`OpenVocabSegmenter`), and the
writer (`export`). export.py is the command; its docstring describes the graphs' inputs and outputs. Needs the `onnx`
package, imported only when a graph is written. The text encoders' graphs are onnx_text.py's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ConfigError
from images import WHOLE_IMAGE_MULTIPLE
from model import upsample_logits

OPSET = 17  # Resize with dynamic sizes, Pad with dynamic pads, LayerNormalization; onnxruntime >= 1.14 runs it
# The logit of a padded label row (OpenVocabSegmenter with max_labels): real logits lie within +-100 (the temperature
# is clamped at 100, cosines within +-1), so exp(PADDED_LOGIT - best) is exactly 0 in float32 and the row can neither
# win nor add to the softmax's sum. Finite, not -inf: the bilinear upsample multiplies by weights that may be 0, and
# 0 * -inf is NaN.
PADDED_LOGIT = -1e4


def label_logits(emb, label_emb, scale):
    """model.similarity in the ops runtimes run fast: emb (1, D, h, w) raw pixel embeddings, label_emb (N, D)
    L2-normalised -> (1, N, h, w) cosine similarity times scale.

    Equal to similarity() up to float rounding: the pixel norm is divided out of the N similarities rather than out of
    the D embedding channels (N is ~10, D 512), and the product is a MatMul (onnxruntime's Einsum kernel took 12% of
    the whole graph's time; tools/bench_export.py, docs/deployment.md).
    """
    b, d, h, w = emb.shape
    dot = torch.matmul(label_emb, emb.reshape(b, d, h * w))              # (N, D) @ (1, D, hw) -> (1, N, hw)
    norm = emb.norm(dim=1).clamp_min(1e-12).reshape(b, 1, h * w)          # (1, 1, hw); F.normalize's eps
    return (scale * dot / norm).reshape(b, -1, h, w)                      # (1, N, h, w)


def segment(model, image, label_emb, scale, with_emb, valid=None, with_scores=False):
    """evaluate.py's whole-image protocol at one scale without flip (inference.whole_image_scores), then the argmax.

    image (1, 3, H, W) normalised; label_emb (N, D) L2-normalised; valid (N,) bool or None: rows that are labels
    (the others are padding and get PADDED_LOGIT). Returns ids (1, H, W) int64, score (1, H, W) float32 [, emb
    (1, D, H'/4, W'/4) L2-normalised] [, prob and cos (1, N, H, W) float32: with_scores, the softmax probabilities
    and the cosines whole_image_scores(..., with_cos=True) returns, which a runtime resizes to the photo's size
    before its argmax and unknown threshold, as inference.infer does (run_onnx.py)].
    """
    h, w = image.shape[-2:]  # traced as tensors by the exporter, so the padding below follows the input's size
    m = WHOLE_IMAGE_MULTIPLE
    ph, pw = (m - h % m) % m, (m - w % m) % m
    top, left = ph // 2, pw // 2
    # padded to a multiple of 32, centred, as inference.whole_image_scores pads (so the outputs are its)
    x = F.pad(image, [left, pw - left, top, ph - top])                    # (1, 3, H', W')
    emb = model(x)                                                         # (1, D, H'/4, W'/4)
    if model.imagenet is None:
        logits = label_logits(emb, label_emb, scale)                       # (1, N, H'/4, W'/4)
        cos = logits / scale if with_scores else None                      # (1, N, H'/4, W'/4)
    else:  # the ensemble with the frozen ImageNet branch, as inference.infer computes it
        logits, cos = model.combine(emb, x, label_emb, scale, valid=valid)  # (1, N, H'/4, W'/4) each
    if valid is not None:
        logits = torch.where(valid[:, None, None], logits, PADDED_LOGIT)   # (1, N, H'/4, W'/4)
    logits = upsample_logits(logits, x.shape[-2:])[:, :, top:top + h, left:left + w]  # (1, N, H, W)
    # the softmax's largest probability is exp(0) / sum(exp(logits - best)): no N-channel division (onnxruntime's
    # Softmax over axis 1 also transposes twice); its argmax is the logits' (softmax is increasing)
    best, ids = logits.max(1)                                              # (1, H, W) each
    e = (logits - best[:, None]).exp()                                     # (1, N, H, W)
    score = 1 / e.sum(1)                                                   # (1, H, W)
    out = (ids, score) + ((F.normalize(emb, dim=1),) if with_emb else ())
    if with_scores:  # the softmax is e / sum(e) = e * score, the same numbers as torch's softmax
        cos = upsample_logits(cos, x.shape[-2:])[:, :, top:top + h, left:left + w]  # (1, N, H, W)
        out += (e * score[:, None], cos)
    return out


class Segmenter(nn.Module):
    """A model with its label embeddings and temperature baked in.

    image (1, 3, H, W) normalised -> ids (1, H, W) int64, score (1, H, W) float32 [, emb (1, D, H'/4, W'/4)].
    """

    with_scores = False  # prob and cos: OpenVocabSegmenter's option, for the torch-free runtimes

    def __init__(self, model, label_emb, scale, with_emb=False):
        super().__init__()
        self.model = model
        self.register_buffer("label_emb", F.normalize(label_emb.float(), dim=-1))  # (N, D)
        self.register_buffer("scale", torch.tensor(float(scale)))                   # the checkpoint's temperature
        self.with_emb = with_emb
        self.eval()  # the model's eval forward (embeddings only); the exporter restores the wrapper's mode after

    def forward(self, image):
        return segment(self.model, image, self.label_emb, self.scale, self.with_emb)

    def graph_io(self):
        """(example inputs, {input name: dims}) for export; a str dim is dynamic and named."""
        return (torch.zeros(1, 3, 64, 96),), {"image": [1, 3, "height", "width"]}


class LabelCountCheck(nn.Module):
    """label_count (1,) int64 -> itself where it lies in 1..max_labels, else the graph fails. Outside, no output is
    right: 0 or less labels nothing, more than M counts padding rows as labels (a zero row may win pixels).

    A hack, named as one: ONNX has no assert, but a Gather whose index is out of bounds is an error in every runtime
    (the spec says so). So label_count is multiplied by element 0 or 1 of a one-element tensor; 1, out of bounds,
    where it is outside 1..M. onnxruntime's message names the node, and the node is named by this module's attribute
    in OpenVocabSegmenter: '/label_count_outside_1_to_max_labels/Gather'. In torch, the same index is an IndexError.
    """

    def __init__(self, max_labels):
        super().__init__()
        self.max_labels = max_labels

    def forward(self, label_count):
        outside = ((label_count < 1) | (label_count > self.max_labels)).long()       # (1,) 0 or 1
        return label_count * torch.ones(1, dtype=torch.long).index_select(0, outside)  # (1,), or the error


class OpenVocabSegmenter(nn.Module):
    """A model with its temperature baked in; the label embeddings are an input, L2-normalised in the graph.

    image (1, 3, H, W), label_emb (K, D) -> ids (1, H, W) int64 in 0..K-1, score, [emb] as Segmenter's, [prob, cos]
    (1, K, H, W) with with_scores (segment's; what run_onnx.py and serve_onnx.py read). With
    max_labels = M > 0: label_emb (M, D) static and label_count (1,) int64 in 1..M (else the graph fails:
    LabelCountCheck); rows label_count.. are padding and never win (PADDED_LOGIT), so the outputs are those of the
    first label_count rows alone.
    """

    def __init__(self, model, scale, with_emb=False, max_labels=0, with_scores=False):
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.with_emb, self.max_labels, self.with_scores = with_emb, max_labels, with_scores
        self.embed_dim = model.config.embed_dim
        if max_labels:  # the attribute's name is the node's in a runtime's error message
            self.label_count_outside_1_to_max_labels = LabelCountCheck(max_labels)
        self.eval()

    def forward(self, image, label_emb, label_count=None):
        label_emb = F.normalize(label_emb, dim=-1)                          # (K, D)
        valid = None
        if self.max_labels:
            label_count = self.label_count_outside_1_to_max_labels(label_count)  # (1,), or the graph fails
            valid = torch.arange(self.max_labels) < label_count             # (M,) bool
        return segment(self.model, image, label_emb, self.scale, self.with_emb, valid, self.with_scores)

    def graph_io(self):
        image = torch.zeros(1, 3, 64, 96)
        if self.max_labels:
            return ((image, torch.zeros(self.max_labels, self.embed_dim), torch.tensor([1])),
                    {"image": [1, 3, "height", "width"], "label_emb": [self.max_labels, self.embed_dim],
                     "label_count": [1]})
        return ((image, torch.randn(5, self.embed_dim)),
                {"image": [1, 3, "height", "width"], "label_emb": ["labels", self.embed_dim]})


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("export.py needs the `onnx` package: pip install onnx (or pip install -r "
                          "requirements-dev.txt, which also brings onnxruntime to check the export)") from None
    return onnx


def name_dims(graph, dims):
    """Set the declared shapes of the graph's inputs and outputs: dims {name: [int or str]}, a str being a named
    dynamic dimension. The exporter names what it cannot infer itself (`ArgMaxids_dim_0` for the batch of 1)."""
    for value in list(graph.graph.input) + list(graph.graph.output):
        if value.name in dims:
            shape = value.type.tensor_type.shape
            assert len(shape.dim) == len(dims[value.name]), (value.name, shape, dims[value.name])
            for d, want in zip(shape.dim, dims[value.name]):
                if isinstance(want, str):
                    d.dim_param = want
                else:
                    d.dim_value = want


def write_graph(module, inputs, dims, outputs, path, opset=OPSET, metadata=None):
    """Trace `module` on example `inputs` into an ONNX file: dims {input or output name: [int or str]} (the str dims
    dynamic, by those names), `outputs` the output names in order; metadata {key: str} goes into the file."""
    onnx = import_onnx()
    axes = {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for name, shape in dims.items()}
    names = [name for name in dims if name not in outputs]
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items() if v}, opset_version=opset, dynamo=False)
    graph = onnx.load(str(path))
    # the exporter drops inputs the trace never reads (CLIP's attention_mask): declared again, unread, so that the
    # graph takes the inputs its kind promises
    declared = {value.name: value for value in graph.graph.input}
    types = {torch.int64: onnx.TensorProto.INT64, torch.float32: onnx.TensorProto.FLOAT}
    inputs_now = [declared.get(name) or onnx.helper.make_tensor_value_info(name, types[x.dtype], list(x.shape))
                  for name, x in zip(names, inputs)]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs_now)
    name_dims(graph, dims)
    onnx.checker.check_model(graph)
    for key, value in (metadata or {}).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def export(segmenter, path, opset=OPSET, metadata=None):
    """Write a Segmenter or OpenVocabSegmenter as ONNX to path with dynamic height and width (and number of labels,
    for an OpenVocabSegmenter without max_labels); metadata {key: str} goes into the file."""
    inputs, dims = segmenter.graph_io()
    dims.update({"ids": [1, "height", "width"], "score": [1, "height", "width"]})
    outputs = ["ids", "score"]
    if segmenter.with_emb:
        dims["emb"] = [1, segmenter.model.config.embed_dim, "emb_height", "emb_width"]
        outputs.append("emb")
    if segmenter.with_scores:
        for name in ("prob", "cos"):
            dims[name] = [1, segmenter.max_labels or "labels", "height", "width"]
            outputs.append(name)
    write_graph(segmenter, inputs, dims, outputs, path, opset, metadata)
