"""Inference shared by evaluate.py, predict.py, export.py and serve.py: MSeg's test protocol. Which checkpoint and
which label embeddings it scores with is label_source.py's; the rules that turn scores into ids (unknown below a
threshold, a background vocabulary) are score_rules.py's, in numpy, shared with the deployment without torch
(run_onnx.py, serve_onnx.py).

The protocol follows mseg-semantic `tool/inference_task.py` (which SSIW's test code copies):
  1. resize the image so its shorter side is round(scale * base_size) (bilinear, aspect kept);
  2. sliding window: pad to at least crop x crop with the mean colour (centred), windows of crop x crop at stride
     ceil(crop * 2/3), the last window flush with the border; or whole image: one window padded to a multiple of 32;
  3. per window: cosine similarity of pixel embeddings with the dataset's label embeddings, times the model's
     temperature, upsampled to the window, softmax; with flip, averaged with the mirrored window's probabilities;
  4. probabilities averaged where windows overlap, the padding cut off, resized to the label's size;
  5. averaged over scales, argmax (by the caller).
Where we differ from MSeg, and why: logits are upsampled with align_corners=False (SegFormer's convention for its
stride-4 output; MSeg's PSPNet uses True), and flip is off by default (SSIW's released test does not flip; MSeg's
net_process always does).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from images import WHOLE_IMAGE_MULTIPLE, short_side_size
from runtime import choose_precision, compile_default, compiled
from model import label_logits, upsample_logits
from settings import one_of, require


# ----------------------------------------------------------------------------------------------------------------
# The inference protocol

@dataclass
class Protocol:
    """The inference settings; evaluate.py's and predict.py's settings extend it, so each is defined once."""
    base_size: int = 720           # shorter side before inference (MSeg: 360, 480, 720, 1080; 0 = the image's own)
    crop_size: int = 640           # sliding window (SSIW/SegFormer 640, MSeg's PSPNet/HRNet 713)
    stride_ratio: float = 2 / 3    # window stride as a fraction of crop_size
    scales: list = field(default_factory=lambda: [1.0])  # multi-scale: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False             # average with the horizontally flipped input
    sliding: bool = True           # sliding window (True) or the whole image at once
    window_batch: int = 0          # windows per forward pass; 0 = auto: 1 on a CPU (batching measured 0.80x there),
                                   # 4 on a GPU (fills the device; speed-up not measured)
    compile: bool = field(default_factory=compile_default)  # torch.compile the network (inductor; compile
                                                            # cache ~/.cache/ssiw/inductor); false = eager;
                                                            # SSIW_COMPILE=0 makes false the default
    precision: str = "auto"        # the network's: auto (bf16 on GPUs and on CPUs with bf16 units, else fp32) | fp32 |
                                   # bf16 (autocast; similarity, softmax and averaging stay fp32)
    imagenet_branch: str = "on"    # a checkpoint with a frozen ImageNet branch (labels never seen in training): on (the
                                   # ensemble) | off (the trained branch alone) | alone (the ImageNet branch alone)

    def work_size(self, w, h):
        """(W, H, how): the largest image the protocol makes of a w x h one (the short side resized for the largest
        scale, then padded to the crop, or to a multiple of 32 for the whole image), and the settings that set it;
        images.open_image checks it against the pixel budget before decoding the image."""
        s = max(self.scales)
        hs, ws = short_side_size(h, w, round(s * (self.base_size or min(w, h))))
        if self.sliding:
            size, pad = (max(ws, self.crop_size), max(hs, self.crop_size)), f"padded to crop_size={self.crop_size}"
        else:
            m = WHOLE_IMAGE_MULTIPLE
            size, pad = (-(-ws // m) * m, -(-hs // m) * m), f"padded to a multiple of {m}"
        return (*size, f"base_size={self.base_size}" + (f", scale {s:g}" if s != 1 else "") + f", {pad}")

    def protocol(self) -> dict:
        """Just the protocol's fields (for results files), also of a subclass's settings."""
        return {f.name: getattr(self, f.name) for f in fields(Protocol)}

    def validate(self):
        """The protocol's settings in range (parse_settings calls this, also for evaluate's and predict's)."""
        require(self, "crop_size", lambda v: v >= 1, "must be >= 1")
        require(self, "window_batch", lambda v: v >= 0, "must be >= 0 (0 = auto: 1 on a CPU, 4 on a GPU)")
        require(self, "base_size", lambda v: v >= 0, "must be >= 0")
        require(self, "stride_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
        require(self, "scales", lambda v: v and all(type(x) in (int, float) and x > 0 for x in v),
                "must be a non-empty list of positive numbers")
        one_of(self, "precision", ("auto", "fp32", "bf16"))
        one_of(self, "imagenet_branch", ("on", "off", "alone"))


def resolve_precision(precision, device):
    """Protocol.precision on `device` -> "fp32" or "bf16", the precision the network then runs in: auto means what it
    means in training (runtime.choose_precision)."""
    return choose_precision(precision, device)[0]


def in_precision(model, precision, device, branch="on", compile=None):
    """The scoring function (x, label_emb, scale) -> (logits, cos) of model.label_logits with the ImageNet branch
    `branch` (Protocol.imagenet_branch), under bf16 run in bf16 autocast and returning fp32: only the network runs in
    bf16; the similarity, softmax and averaging of the protocol stay fp32.

    compile (Protocol.compile): True runs it through torch.compile where that works (runtime.compiled: one line says
    so at the first call; where it cannot, one `warning:` line and eager), False eager with a line saying so, None
    eager without a line (the library's own fp32 calls). The compiled function is kept with the model, one per
    precision, branch and device, so each image of a run reuses it instead of compiling again."""
    device = torch.device(device)
    bf16 = resolve_precision(precision, device) == "bf16"
    key = (bf16, branch, compile, str(device))
    kept = vars(model).setdefault("_scorers", {}) if compile is not None else {}  # a plain attribute: no state_dict
    if key in kept:
        return kept[key]

    def network(x, label_emb, scale):
        return label_logits(model, x, label_emb, scale, branch)
    if compile is not None:  # autocast stays outside the compiled function: inside, AOTAutograd's compile cache
        network = compiled(network, compile, device)  # refuses the graph (_enter_autocast) and every run re-traces it

    def run(x, label_emb, scale):
        if compile:  # any number of labels, one graph (serve.py's requests differ in it)
            torch._dynamo.maybe_mark_dynamic(label_emb, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, cos = network(x, label_emb, scale)
        return (logits.float(), cos.float()) if bf16 else (logits, cos)
    if compile is not None:
        kept[key] = run
    return run


def resize_short_side(x, short):
    """(B, C, H, W) -> (B, C, h, w) with min(h, w) == short, aspect kept as MSeg rounds it; bilinear, no antialias
    (cv2.INTER_LINEAR, which MSeg uses, does not antialias either)."""
    h, w = x.shape[-2:]
    new_h, new_w = short_side_size(h, w, short)
    if (new_h, new_w) == (h, w):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

def pad_centred(x, min_h, min_w):
    """(B, C, H, W) -> (B, C, max(H, min_h), max(W, min_w)) zero-padded, half before and half after (MSeg's
    pad_to_crop_sz). Returns the padded tensor and the (top, left) offsets of the image in it."""
    h, w = x.shape[-2:]
    ph, pw = max(min_h - h, 0), max(min_w - w, 0)
    top, left = ph // 2, pw // 2
    if ph or pw:
        x = F.pad(x, (left, pw - left, top, ph - top))
    return x, top, left


def window_starts(size, crop, stride):
    """Start offsets of MSeg's windows along one axis: every `stride`, the last one flush with the end."""
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


@torch.no_grad()
def window_scores(model, x, label_emb, scale, flip, with_cos):
    """Class scores of a batch of equal-sized windows.

    model: in_precision's scoring function (model.label_logits: the trained branch, with the ImageNet branch where the
    model has one); x: (B, 3, h, w) normalised; label_emb: (N, D). Returns (B, N, h, w) softmax probabilities, or
    (B, 2N, h, w) with the cosine similarities appended when with_cos (upsampled the same way, for predict.py's
    unknown threshold).
    """
    b, _, h, w = x.shape
    if flip:
        x = torch.cat([x, x.flip(-1)])                                   # (2B, 3, h, w)
    logits, cos = model(x, label_emb, scale)                             # (B', N, h/4, w/4) each
    logits = upsample_logits(logits.to(label_emb.dtype), (h, w))        # (B', N, h, w), fp32 even under autocast
    out = logits.softmax(1)
    if with_cos:
        out = torch.cat([out, upsample_logits(cos.to(label_emb.dtype), (h, w))], 1)  # (B', 2N, h, w)
    if flip:
        out = (out[:b] + out[b:].flip(-1)) / 2                           # un-mirror, then average probabilities
    return out


def whole_image_scores(model, x, label_emb, scale, flip, with_cos=False):
    """Scores of one image as one window padded to a multiple of 32. x: (1, 3, h, w) -> (C, h, w), C = N or 2N.
    model: in_precision's scoring function, or a network (scored in fp32 by model.label_logits)."""
    if isinstance(model, torch.nn.Module):
        model = in_precision(model, "fp32", x.device)
    h, w = x.shape[-2:]
    m = WHOLE_IMAGE_MULTIPLE
    xp, top, left = pad_centred(x, math.ceil(h / m) * m, math.ceil(w / m) * m)
    return window_scores(model, xp, label_emb, scale, flip, with_cos)[0, :, top:top + h, left:left + w]


def window_batch(setting, device):
    """Protocol.window_batch on `device`: the setting, or for 0 (auto) 1 on a CPU, where a batch of windows ran
    slower per window than one at a time (0.80x, tools/bench_protocol.py, docs/results/bench_protocol_540_b0_cpu.json),
    and 4 on a GPU, where one window leaves most of the device idle."""
    return setting or (1 if torch.device(device).type == "cpu" else 4)


def sliding_scores(model, x, sizes, label_emb, scale, proto, out_size, with_cos=False):
    """Sum over scales of the sliding-window scores of one image, each scale's resized to out_size.

    x: (1, 3, H, W); sizes: [(h_s, w_s)] the image's size at each scale. Returns (C, H_out, W_out), C = N or 2N.
    The windows of all scales (crop x crop each) go through the network in batches of window_batch, in scale order,
    so the few windows of the small scales fill a batch with those of the next scale instead of running alone (at
    base 1080 the six scales have 2, 6, 12, 18, 28 and 32 windows). A scale is resized and padded when its first
    window is needed, and its sums are averaged, cut, resized to out_size and added as soon as its last window is
    in, before the next scale's sums exist: one scale's (C, H', W') sums at a time, as with one scale per batch. Per
    window the arithmetic is that of a batch of one, and the scales are added in order, so any window_batch gives the
    same result up to float rounding in the network.
    """
    crop = proto.crop_size
    stride = math.ceil(crop * proto.stride_ratio)
    padded = [(max(h, crop), max(w, crop)) for h, w in sizes]          # pad_centred's size at each scale
    queue = [(k, t, l) for k, (hp, wp) in enumerate(padded)
             for t in window_starts(hp, crop, stride) for l in window_starts(wp, crop, stride)]
    left_to_do = [sum(1 for k2, _, _ in queue if k2 == k) for k in range(len(sizes))]
    open_scales, total = {}, 0  # k -> {image (1, 3, H', W') padded, top, left, sum (C, H', W'), count (1, H', W')}
    batch = window_batch(proto.window_batch, x.device)
    for i in range(0, len(queue), batch):
        chunk = queue[i:i + batch]
        for k, _, _ in chunk:
            if k not in open_scales:
                xs = resize_short_side(x, min(sizes[k]))                  # (1, 3, h_s, w_s); min = the short side
                open_scales[k] = dict(zip(("image", "top", "left"), pad_centred(xs, crop, crop)))
        crops = torch.cat([open_scales[k]["image"][:, :, t:t + crop, l:l + crop] for k, t, l in chunk])  # (b, 3, c, c)
        scores = window_scores(model, crops, label_emb, scale, proto.flip, with_cos)  # (b, C, crop, crop)
        for (k, t, l), window in zip(chunk, scores):
            state = open_scales[k]
            if "sum" not in state:  # at its first window, after the scale before was folded in and freed: the
                state["sum"] = window.new_zeros(window.shape[0], *padded[k])  # sums of one scale at a time, as large
                state["count"] = window.new_zeros(1, *padded[k])              # as (C, H', W') at the largest scale
            state["sum"][:, t:t + crop, l:l + crop] += window
            state["count"][:, t:t + crop, l:l + crop] += 1
            left_to_do[k] -= 1
            if left_to_do[k] == 0:                                         # the scale is complete: fold it in
                del open_scales[k]
                h, w = sizes[k]
                top, left = state["top"], state["left"]
                mean = (state["sum"] / state["count"])[:, top:top + h, left:left + w]  # padding cut off: (C, h_s, w_s)
                total = total + F.interpolate(mean[None], size=out_size, mode="bilinear", align_corners=False)[0]
                del state, mean                                            # free this scale before the next one's
    return total


@torch.no_grad()
def infer(model, image, label_emb, scale, proto, out_size=None, with_cos=False):
    """MSeg-protocol scores of one image.

    image: (3, H, W) ImageNet-normalised (transforms.eval_image); resizing after normalising equals normalising after
    resizing (bilinear weights sum to 1), and zero padding is then padding with the mean colour, as MSeg pads.
    label_emb: (N, D); scale: the temperature (model.scale()).
    Returns (N, H_out, W_out) class probabilities averaged over scales (and flips), at out_size (default: the
    image's size, which is the label's); with with_cos, also (N, H_out, W_out) cosine similarities, else None.
    The network runs in proto.precision (in_precision); what follows it, in fp32.
    """
    x = image.to(label_emb.device, label_emb.dtype)[None]                # (1, 3, H, W), the labels' precision (fp32)
    model = in_precision(model, proto.precision, x.device, proto.imagenet_branch, proto.compile)
    out_size = tuple(out_size or x.shape[-2:])
    short = proto.base_size or min(x.shape[-2:])
    sizes = [short_side_size(*x.shape[-2:], round(s * short)) for s in proto.scales]
    if proto.sliding:
        total = sliding_scores(model, x, sizes, label_emb, scale, proto, out_size, with_cos)
    else:  # whole images differ in size from scale to scale: one forward each (with its flip)
        total = 0
        for h, w in sizes:
            xs = resize_short_side(x, min(h, w))                          # (1, 3, h_s, w_s)
            scores = whole_image_scores(model, xs, label_emb, scale, proto.flip, with_cos)  # (C, h_s, w_s)
            total = total + F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    total = total / len(proto.scales)                                    # (C, H_out, W_out)
    n = label_emb.shape[0]
    return (total[:n], total[n:]) if with_cos else (total, None)


# ----------------------------------------------------------------------------------------------------------------
