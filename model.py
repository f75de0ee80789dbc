"""The pixel-embedding network: a backbone (MiT-B0..B5, HRNet-W18/W48 or EfficientNet-Lite0), a decoder to D-dim
embeddings at 1/4 resolution, an optional auxiliary FCN head and box projection, and the learnable temperature; and
the pixel-label similarity. Loading public checkpoints into it is checkpoints.py's.

    model = build_model(ModelConfig(backbone="mit_b5", embed_dim=512, aux_head=True))
    checkpoints.load_pretrained(model, "segformer_7data.pth")
    emb = model.eval()(images)                                # (B, 512, H/4, W/4), not normalised
    logits = similarity(emb, label_emb, model.scale())        # (B, N, H/4, W/4)
    logits = upsample_logits(logits, images.shape[-2:])       # (B, N, H, W)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientnet import EFFICIENTNET_VARIANTS, EfficientNetLite
from errors import ConfigError
from hrnet import HRNET_WIDTHS, HRNet, HRNetHead
from segformer import MIT_VARIANTS, MixTransformer, SegFormerHead


@dataclass
class ModelConfig:
    backbone: str = "mit_b5"  # mit_b0..mit_b5, hrnet_w18, hrnet_w48, efficientnet_lite0
    embed_dim: int = 512  # D, the label-embedding width (CLIP ViT-B: 512)
    decoder_dim: int = 0  # SegFormer MLP width; 0 = 256 for mit_b0/b1 and efficientnet_lite0, 768 otherwise
    aux_head: bool = False  # auxiliary FCN head on the 1/16 features (the authors train with one)
    box_head: bool = False  # 1x1 conv embed_dim -> box_dim on the embeddings, for the box loss
    box_dim: int = 512  # width of the box targets (CLIP image embeddings)
    drop_path_rate: float = 0.1  # MiT / EfficientNet stochastic depth, linear over blocks
    dropout: float = 0.1  # Dropout2d before the decoder's last 1x1 conv


class AuxHead(nn.Module):
    """SSIW's auxiliary FCN head: conv3x3 (no bias) + BN + ReLU + 1x1 conv to D. No dropout, as theirs."""

    def __init__(self, c_in, out_dim, channels=256):
        super().__init__()
        self.conv = nn.Conv2d(c_in, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.pred = nn.Conv2d(channels, out_dim, 1)

    def forward(self, x):
        return self.pred(F.relu(self.bn(self.conv(x))))


class SegModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        if cfg.backbone in MIT_VARIANTS:
            self.backbone = MixTransformer(cfg.backbone, cfg.drop_path_rate)
            dim = cfg.decoder_dim or (256 if cfg.backbone in ("mit_b0", "mit_b1") else 768)
            self.decoder = SegFormerHead(self.backbone.dims, dim, cfg.embed_dim, cfg.dropout)
        elif cfg.backbone in HRNET_WIDTHS:
            if cfg.decoder_dim:
                raise ConfigError(f"decoder_dim={cfg.decoder_dim} is for MiT and EfficientNet; HRNet's head width "
                                  "is the sum of its branches")
            self.backbone = HRNet(cfg.backbone)
            self.decoder = HRNetHead(self.backbone.dims, cfg.embed_dim, cfg.dropout)
        elif cfg.backbone in EFFICIENTNET_VARIANTS:  # maps of 24, 40, 112, 320 channels into SegFormer's MLP decoder
            self.backbone = EfficientNetLite(cfg.backbone, cfg.drop_path_rate)
            self.decoder = SegFormerHead(self.backbone.dims, cfg.decoder_dim or 256, cfg.embed_dim, cfg.dropout)
        else:
            raise ConfigError(f"unknown backbone {cfg.backbone!r}; expected one of "
                              f"{sorted(MIT_VARIANTS) + sorted(HRNET_WIDTHS) + sorted(EFFICIENTNET_VARIANTS)}")
        self.aux = AuxHead(self.backbone.dims[2], cfg.embed_dim) if cfg.aux_head else None
        self.box_proj = nn.Conv2d(cfg.embed_dim, cfg.box_dim, 1) if cfg.box_head else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.apply(_init_weights)
        # channels_last throughout: MiT's tokens (B, N, C) already are channels_last maps, and on CPU (oneDNN) and
        # GPU (cuDNN, AMP) NHWC convolutions are faster; tools/bench_model.py measured ~3.6x for MiT-B0 inference on
        # CPU.
        self.to(memory_format=torch.channels_last)

    def scale(self):
        """exp(logit_scale), clamped at 100 as CLIP does, so the softmax cannot become arbitrarily sharp."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, images):
        """images (B, 3, H, W), ImageNet-normalised.

        eval: (B, D, H/4, W/4) pixel embeddings, not normalised.
        train: {"emb": (B, D, H/4, W/4), "aux": (B, D, H/16, W/16) if aux_head, "box": (B, box_dim, H/4, W/4) if
        box_head}. (H/4 etc. round up for sizes that are not multiples of 32.)
        """
        images = images.contiguous(memory_format=torch.channels_last)  # a no-op when it already is
        feats = self.backbone(images)  # 4 maps at strides 4, 8, 16, 32
        emb = self.decoder(feats)
        if not self.training:
            return emb
        out = {"emb": emb}
        if self.aux is not None:
            out["aux"] = self.aux(feats[2])
        if self.box_proj is not None:
            out["box"] = self.box_proj(emb)
        return out


def _init_weights(m):
    # SegFormer's init for all new layers; pretrained weights overwrite most of it.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig) -> SegModel:
    return SegModel(cfg)


# ----------------------------------------------------------------------------------------------------------------
# pixel-label similarity

def similarity(pixel_emb, label_emb, scale):
    """Cosine similarity times the temperature: pixel_emb (B, D, h, w), label_emb (N, D) -> logits (B, N, h, w).

    Resize policy, decided here once: logits are computed at the embedding resolution (H/4) and then bilinearly
    upsampled with `upsample_logits` (align_corners=False) where full-resolution logits are needed. This is
    4^2 = 16x cheaper than normalising upsampled embeddings. (The authors' released model instead upsamples the
    raw embeddings with align_corners=True before the similarity; the two are not equal.)
    """
    pixel = F.normalize(pixel_emb, dim=1)
    label = F.normalize(label_emb, dim=1)
    return scale * torch.einsum("bdhw,nd->bnhw", pixel, label)  # (B, D, h, w), (N, D) -> (B, N, h, w)


def upsample_logits(logits, size):
    """(B, N, h, w) -> (B, N, *size), bilinear, align_corners=False (the project's one resize rule)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
