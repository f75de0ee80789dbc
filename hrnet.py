"""HRNetV2 (W18, W48): four stages of parallel multi-resolution branches, and the segmentation head.

Follows HRNet-Semantic-Segmentation `seg_hrnet.py` (bilinear, align_corners=False fusion upsampling). The body keeps
the public module names (conv1, layer1, transition1, stage2.0.branches..., fuse_layers...): they are already plain
attribute names, and renaming nested Sequential indices would only move numbers around, so the body loads with an
identity key map; only the head is renamed (`last_layer.0/1` -> `fuse`/`bn`).
"""
import re

import torch.nn as nn
import torch.nn.functional as F

# stage -> (number of modules, block type, blocks per branch); channels are width * [1, 2, 4, 8]
HRNET_STAGES = {2: (1, "basic", 4), 3: (4, "basic", 4), 4: (3, "basic", 4)}
HRNET_WIDTHS = {"hrnet_w18": 18, "hrnet_w48": 48}


def conv_bn(c_in, c_out, kernel, stride=1, relu=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, c, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


def make_blocks(block, c_in, c, n):
    down = conv_bn(c_in, c * block.expansion, 1, relu=False) if c_in != c * block.expansion else None
    return nn.Sequential(block(c_in, c, down), *(block(c * block.expansion, c) for _ in range(n - 1)))


class HighResolutionModule(nn.Module):
    """Runs each branch, then every output branch i sums all inputs brought to its resolution and channels."""

    def __init__(self, channels, n_blocks):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(make_blocks(BasicBlock, c, c, n_blocks) for c in channels)
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:  # lower resolution: 1x1 conv to c_i, upsampled in forward
                    row.append(conv_bn(channels[j], channels[i], 1, relu=False))
                elif j == i:
                    row.append(nn.Identity())
                else:  # higher resolution: i - j stride-2 3x3 convs, the last one to c_i and without ReLU
                    steps = [conv_bn(channels[j], channels[i] if k == i - j - 1 else channels[j], 3, 2,
                                     relu=k != i - j - 1) for k in range(i - j)]
                    row.append(nn.Sequential(*steps))
            self.fuse_layers.append(row)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = 0
            for j, layer in enumerate(row):
                z = layer(xs[j])
                if j > i:
                    z = F.interpolate(z, size=xs[i].shape[2:], mode="bilinear", align_corners=False)
                y = y + z
            out.append(F.relu(y))
        return out


def make_transition(c_prev, c_next):
    """Adapts branch channels (conv3x3-BN-ReLU when they differ) and opens a new branch at half the resolution."""
    layers = nn.ModuleList()
    for i, c in enumerate(c_next):
        if i < len(c_prev):
            layers.append(conv_bn(c_prev[i], c, 3) if c != c_prev[i] else nn.Identity())
        else:
            n = i + 1 - len(c_prev)
            layers.append(nn.Sequential(*(conv_bn(c_prev[-1], c if k == n - 1 else c_prev[-1], 3, 2)
                                          for k in range(n))))
    return layers


class HRNet(nn.Module):
    """forward: (B, 3, H, W) -> four maps (B, W*2^i, H/2^(i+2), W/2^(i+2)), i = 0..3."""

    def __init__(self, variant: str):
        super().__init__()
        width = HRNET_WIDTHS[variant]
        self.dims = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.layer1 = make_blocks(Bottleneck, 64, 64, 4)
        prev = [64 * Bottleneck.expansion]
        for s in (2, 3, 4):
            n_modules, _, n_blocks = HRNET_STAGES[s]
            chans = self.dims[:s]
            setattr(self, f"transition{s - 1}", make_transition(prev, chans))
            setattr(self, f"stage{s}", nn.Sequential(*(HighResolutionModule(chans, n_blocks)
                                                       for _ in range(n_modules))))
            prev = chans

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        xs = [self.layer1(x)]
        for s in (2, 3, 4):
            transition = getattr(self, f"transition{s - 1}")
            # a new branch grows out of the lowest-resolution existing one
            xs = [t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{s}")(xs)
        return xs


class HRNetHead(nn.Module):
    """Upsample the four branches to 1/4, concat, 1x1 conv (with bias) + BN + ReLU, 1x1 conv to D.

    The concat + 1x1 conv runs in the equal, cheaper order (see SegFormerHead): each branch's slice of `fuse` is
    applied at the branch's own resolution and the results are upsampled and summed.
    """

    def __init__(self, in_dims, out_dim, dropout):
        super().__init__()
        c = sum(in_dims)
        self.in_dims = in_dims
        self.fuse = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout2d(dropout)
        self.pred = nn.Conv2d(c, out_dim, 1)

    def forward(self, feats):
        """feats: four (B, C_i, h_i, w_i) maps -> (B, out_dim, h_0, w_0)."""
        weight = self.fuse.weight.flatten(1)  # (C, sum C_i), input blocks in branch order as seg_hrnet's concat
        x, start = 0, 0
        for i, f in enumerate(feats):
            part = weight[:, start:start + f.shape[1]][:, :, None, None]  # (C, C_i, 1, 1)
            start += f.shape[1]
            y = F.conv2d(f, part, self.fuse.bias if i == 0 else None)  # (B, C, h_i, w_i)
            if i > 0:
                y = F.interpolate(y, size=feats[0].shape[2:], mode="bilinear", align_corners=False)
            x = x + y
        x = self.drop(F.relu(self.bn(x)))
        return self.pred(x)


_HRNET_CLS_HEAD = re.compile(r"^(incre_modules|downsamp_modules|final_layer|classifier)\.")
_HRNET_BODY = re.compile(r"^(conv1|bn1|conv2|bn2|layer1|transition[1-3]|stage[2-4])\.")


def remap_hrnet_key(key: str):
    """HRNet (cls or seg) key -> (our key or None, why dropped or None). Unknown keys give (None, None)."""
    if _HRNET_BODY.match(key):
        return "backbone." + key, None
    if _HRNET_CLS_HEAD.match(key):
        return None, "ImageNet classification head (incre/downsamp/final/classifier)"
    if key.startswith("last_layer.0."):
        return "decoder.fuse." + key[len("last_layer.0."):], None
    if key.startswith("last_layer.1."):
        return "decoder.bn." + key[len("last_layer.1."):], None
    if key.startswith("last_layer.3."):
        return None, "segmentation classifier (its class count is not our embedding width)"
    return None, None
