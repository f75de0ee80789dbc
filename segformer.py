"""SegFormer: the Mix Transformer encoder (MiT-B0..B5) and the all-MLP decoder, as plain modules.

Follows NVlabs `mix_transformer.py` / `segformer_head.py` numerically (checked against HF transformers in
tests/test_model.py) with our own module names; `remap_mit_key` / `remap_head_key` translate the public names.
Tokens travel as (B, N, C) with N = h*w row-major, so (B, N, C).transpose(1, 2).view(B, C, h, w) is a free
channels_last view: convolutions (patch embedding, spatial reduction, depth-wise conv) read it without a copy.
"""
import re

import torch.nn as nn
import torch.nn.functional as F

# name -> (channels per stage, depths); all variants share heads [1, 2, 5, 8], sr ratios [8, 4, 2, 1], mlp ratio 4
MIT_VARIANTS = {
    "mit_b0": ([32, 64, 160, 256], [2, 2, 2, 2]),
    "mit_b1": ([64, 128, 320, 512], [2, 2, 2, 2]),
    "mit_b2": ([64, 128, 320, 512], [3, 4, 6, 3]),
    "mit_b3": ([64, 128, 320, 512], [3, 4, 18, 3]),
    "mit_b4": ([64, 128, 320, 512], [3, 8, 27, 3]),
    "mit_b5": ([64, 128, 320, 512], [3, 6, 40, 3]),
}
NUM_HEADS = [1, 2, 5, 8]
SR_RATIOS = [8, 4, 2, 1]
MLP_RATIO = 4
# The original builds block and stage norms with partial(nn.LayerNorm, eps=1e-6) but leaves the patch-embedding and
# spatial-reduction norms at nn.LayerNorm's default 1e-5; both matter for equal outputs.
BLOCK_EPS = 1e-6


def drop_path(x, p: float, training: bool):
    """Stochastic depth: zero the residual branch of whole samples with probability p (rescaled to keep the mean)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)  # rescale the (B, 1, 1) mask, not the activations: one pass over x


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv whose kernel is larger than its stride."""

    def __init__(self, c_in, c_out, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C); free when x is channels_last
        return self.norm(x), h, w


class Attention(nn.Module):
    """Efficient self-attention: keys/values come from the tokens shrunk sr x sr by a strided conv.

    q and kv stay separate Linears (the public layout) rather than one fused qkv: they read different inputs
    except in stage 4, where one fused GEMM would save little at 1/32 resolution.
    """

    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr) if sr > 1 else None
        self.sr_norm = nn.LayerNorm(dim) if sr > 1 else None

    def forward(self, x, h, w):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr is not None:
            x = x.transpose(1, 2).view(B, C, h, w)  # (B, N, C) -> (B, C, h, w), channels_last view
            x = self.sr(x).flatten(2).transpose(1, 2)  # (B, C, h/sr, w/sr) -> (B, N', C)
            x = self.sr_norm(x)
        kv = self.kv(x).view(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (2, B, nh, N', hd)
        x = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, nh, N, hd); scale hd**-0.5 as the original
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, nh, N, hd) -> (B, N, C)
        return self.proj(x)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depth-wise conv (the only positional signal in MiT) -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        B, N, _ = x.shape
        x = self.fc1(x).transpose(1, 2).view(B, -1, h, w)  # (B, N, 4C) -> (B, 4C, h, w), channels_last view
        x = self.dwconv(x).flatten(2).transpose(1, 2)  # -> (B, N, 4C)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim, heads, sr, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = Attention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)
        self.drop_path = drop_path_rate

    def forward(self, x, h, w):
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path, self.training)
        return x


class Stage(nn.Module):
    def __init__(self, c_in, dim, depth, heads, sr, first, drop_path_rates):
        super().__init__()
        self.patch_embed = PatchEmbed(c_in, dim, kernel=7 if first else 3, stride=4 if first else 2)
        self.blocks = nn.ModuleList(Block(dim, heads, sr, p) for p in drop_path_rates)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_EPS)
        assert len(self.blocks) == depth

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        x = self.norm(x)
        # (B, N, C) -> (B, C, h, w) as a channels_last view; the original's .contiguous() copy is not needed
        return x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


class MixTransformer(nn.Module):
    """MiT encoder. forward: (B, 3, H, W) -> four maps (B, C_i, H/2^(i+2), W/2^(i+2)), i = 0..3."""

    def __init__(self, variant: str, drop_path_rate: float = 0.1):
        super().__init__()
        dims, depths = MIT_VARIANTS[variant]
        self.dims = dims
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # = torch.linspace(0, rate, n), as theirs
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            Stage(3 if i == 0 else dims[i - 1], dims[i], depths[i], NUM_HEADS[i], SR_RATIOS[i], i == 0,
                  rates[starts[i]:starts[i] + depths[i]])
            for i in range(4))

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SegFormerHead(nn.Module):
    """All-MLP decoder: per-stage Linear to E, upsample to 1/4, concat, 1x1 conv + BN + ReLU, 1x1 conv to D.

    Computed in a cheaper but equal order: a 1x1 conv and a bilinear resize commute (both linear; bilinear weights
    sum to one, so biases pass through), so each stage's Linear and its slice of the fuse conv are folded into one
    (E, C_i) matrix applied at the stage's own resolution, and only E-channel maps are upsampled and summed. This
    skips the 4E-channel concat at 1/4 resolution (for B5 at 512x512 about 38 of ~190 GMACs per image) with the
    same parameters, names and gradients.
    """

    def __init__(self, in_dims, dim, out_dim, dropout):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in in_dims)  # linear_c1..linear_c4
        self.fuse = nn.Conv2d(4 * dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout2d(dropout)
        self.pred = nn.Conv2d(dim, out_dim, 1)

    def forward(self, feats):
        """feats: four (B, C_i, h_i, w_i) maps -> (B, out_dim, h_0, w_0)."""
        E = self.fuse.out_channels
        size = feats[0].shape[2:]
        fuse = self.fuse.weight.flatten(1)  # (E, 4E); the original concatenates [c4, c3, c2, c1] in this order
        x = 0
        for i, (f, proj) in enumerate(zip(feats, self.proj)):
            part = fuse[:, (3 - i) * E:(4 - i) * E]  # (E, E): the block of input channels that sees stage i
            y = F.linear(f.permute(0, 2, 3, 1), part @ proj.weight, part @ proj.bias)  # (B, h_i, w_i, E)
            y = y.permute(0, 3, 1, 2)  # (B, E, h_i, w_i)
            if i > 0:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # as SegFormerHead and HF
            x = x + y
        x = self.drop(F.relu(self.bn(x)))
        return self.pred(x)


# ----------------------------------------------------------------------------------------------------------------
# public names -> ours

_MIT_RULES = [  # (pattern on an NVlabs MiT key, replacement); the first match wins
    (r"^patch_embed([1-4])\.(proj|norm)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.{m[2]}."),
    (r"^block([1-4])\.(\d+)\.attn\.norm\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.sr_norm."),
    (r"^block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv."),
    (r"^block([1-4])\.(\d+)\.(norm1|norm2|attn\.(?:q|kv|proj|sr)|mlp\.fc1|mlp\.fc2)\.",
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}."),
    (r"^norm([1-4])\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
]
_HEAD_RULES = [  # NVlabs / SSIW SegFormerHead (mmcv ConvModule names `linear_fuse.conv`, `linear_fuse.bn`)
    (r"^linear_c([1-4])\.proj\.", lambda m: f"proj.{int(m[1]) - 1}."),
    (r"^linear_fuse\.conv\.", lambda m: "fuse."),
    (r"^linear_fuse\.bn\.", lambda m: "bn."),
    (r"^linear_pred\.", lambda m: "pred."),
]


def _apply(rules, key):
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m) + key[m.end():]
    return None


def remap_mit_key(key: str):
    """NVlabs MiT key (e.g. `block3.7.attn.norm.weight`) -> ours (`stages.2.blocks.7.attn.sr_norm.weight`).

    Returns None for a key no rule knows; the caller raises naming it."""
    return _apply(_MIT_RULES, key)


def remap_head_key(key: str):
    """SegFormerHead key (e.g. `linear_c4.proj.weight`) -> ours (`proj.3.weight`); None when unknown."""
    return _apply(_HEAD_RULES, key)
