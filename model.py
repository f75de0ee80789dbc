"""The pixel-embedding network: a backbone (MiT-B0..B5, HRNet-W18/W48 or EfficientNet-Lite0/1/2), a decoder to D-dim
embeddings at 1/4 resolution, an optional auxiliary FCN head and box projection, the learnable temperature, and for
EfficientNet-Lite an optional frozen ImageNet branch (labels never seen in training); and the pixel-label similarity.
Loading public checkpoints into it is checkpoints.py's.

    model = build_model(ModelConfig(backbone="mit_b5", embed_dim=512, aux_head=True))
    checkpoints.load_pretrained(model, "segformer_7data.pth")
    emb = model.eval()(images)                                # (B, 512, H/4, W/4), not normalised
    logits = similarity(emb, label_emb, model.scale())        # (B, N, H/4, W/4)
    logits = upsample_logits(logits, images.shape[-2:])       # (B, N, H, W)
    logits, cos = label_logits(model, images, label_emb, model.scale())  # with the ImageNet branch where it has one
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
    backbone: str = "mit_b5"  # mit_b0..mit_b5, hrnet_w18, hrnet_w48, efficientnet_lite0/1/2
    embed_dim: int = 512  # D, the label-embedding width (CLIP ViT-B: 512)
    decoder_dim: int = 0  # SegFormer MLP width; 0 = 256 for mit_b0/b1 and efficientnet_lite0, 768 otherwise
    aux_head: bool = False  # auxiliary FCN head on the 1/16 features (the authors train with one)
    box_head: bool = False  # 1x1 conv embed_dim -> box_dim on the embeddings, for the box loss
    box_dim: int = 512  # width of the box targets (CLIP image embeddings)
    drop_path_rate: float = 0.1  # MiT / EfficientNet stochastic depth, linear over blocks
    dropout: float = 0.1  # Dropout2d before the decoder's last 1x1 conv
    # the frozen ImageNet branch (EfficientNet-Lite only): the backbone's ImageNet classifier per stride-32 pixel,
    # mapped into label space through the 1000 ImageNet class sentences (ImageNetBranch), combined with the trained
    # branch as FC-CLIP's geometric ensemble: log p = (1 - w) log p_trained + w log p_imagenet per label, w by
    # whether the label was seen in training (docs/results.md "Labels never seen in training" measured the values)
    imagenet_branch: bool = False
    imagenet_temperature: float = 1.0  # softmax temperature of the per-pixel ImageNet logits
    imagenet_scale: float = 3.0  # the branch's standardised scores -> logits (the trained branch learns its own scale)
    ensemble_seen: float = 0.15  # w for labels seen in training (FC-CLIP's alpha)
    ensemble_unseen: float = 1.0  # w for labels never seen (FC-CLIP's beta): the ImageNet branch alone, since the
                                  # trained branch's score for a label it never saw says nothing
    imagenet_guide: float = 0.1  # the branch's stride-32 scores to stride 4 guided by the pixel embeddings
                                 # (guided_upsample's temperature); 0 = bilinear


class AuxHead(nn.Module):
    """SSIW's auxiliary FCN head: conv3x3 (no bias) + BN + ReLU + 1x1 conv to D. No dropout, as theirs."""

    def __init__(self, c_in, out_dim, channels=256):
        super().__init__()
        self.conv = nn.Conv2d(c_in, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.pred = nn.Conv2d(channels, out_dim, 1)

    def forward(self, x):
        return self.pred(F.relu(self.bn(self.conv(x))))


# A label counts as seen by the cosine of its embedding with the nearest training label's, ramping linearly from
# unseen at 0.62 to seen at 0.8. MiniLM sentences, against the CPU recipe's 15 training labels: objects neither
# dataset names sit at 0.38-0.6 (sheep, cow, cat, bird, horse, dog, boat, airplane), stuff near a trained class in
# between (ground 0.65, tree 0.68, grass 0.72, wall 0.73: partly the trained branch's), the training labels at 1.
SEEN_COSINE = (0.62, 0.8)
IMAGENET_CLASSES = 1000


class ImageNetBranch(nn.Module):
    """The out-of-vocabulary branch: a frozen copy of an EfficientNet-Lite ImageNet network whose classifier runs per
    stride-32 pixel; its distribution over the 1000 classes, p, maps into the label-embedding space through the
    embeddings of the classes' sentences, E (1000, D): t = p E, and a label is scored by how near the pixel's likely
    classes are to it (label_scores), so any label the sentence encoder places near ImageNet classes ("horse" near
    "sorrel") is recognised without ever being trained on. Never trained (no gradients, always in eval mode); train.py
    can distill t.

    class_emb: (1000, D) the ImageNet classes' label embeddings in logit order, set by train.py from the label table
    and saved with the weights. seen_emb: (K, D) the labels the model was trained on, set when a checkpoint is loaded
    (checkpoints.load_checkpoint) from its training table; not saved (the checkpoint holds the table).
    """

    def __init__(self, variant, embed_dim, temperature):
        super().__init__()
        self.net = EfficientNetLite(variant, drop_path_rate=0.0, classifier=True)
        self.temperature = temperature
        self.register_buffer("class_emb", torch.zeros(IMAGENET_CLASSES, embed_dim))
        self.register_buffer("seen_emb", torch.zeros(0, embed_dim), persistent=False)
        self.requires_grad_(False)

    def train(self, mode=True):  # frozen: BatchNorm keeps its ImageNet statistics, dropout stays off
        return super().train(False)

    def probabilities(self, images):
        """(B, 3, H, W) ImageNet-normalised -> (B, 1000, H/32, W/32) the classifier's distribution per pixel."""
        return (self.net.classify_pixels(images).float() / self.temperature).softmax(1)

    def forward(self, images):
        """(B, 3, H, W) ImageNet-normalised -> (B, D, H/32, W/32) ImageNet knowledge in label space (t = p E), not
        normalised: the distillation target."""
        return torch.einsum("bkhw,kd->bdhw", self.probabilities(images), self.class_emb)  # (B, D, h, w)

    def label_scores(self, images, label_emb):
        """(B, 3, H, W), label_emb (N, D) unit rows -> scores and cosines (B, N, H/32, W/32).

        score = sum_c p_c z_cn, z_cn the cosine of class c's and label n's embeddings standardised over the 1000
        classes: a label is scored by how much nearer than usual the pixel's likely classes are to it. Raw cosines
        (cos(t, label)) favour whatever the class list has most of: 40% of ImageNet is animals, so "horse" won every
        pixel of a horse photo, grass and sky included (the recipe's checkpoint at step 200, 80 Weizmann photos: horse
        IoU 25 raw vs 29 standardised with the branch alone, 26 vs 57 in the ensemble). The cosines are cos(t,
        label), for --unknown_below.
        """
        p = self.probabilities(images)                                  # (B, 1000, h, w)
        cos_cn = F.normalize(self.class_emb, dim=1) @ label_emb.T       # (1000, N)
        z = (cos_cn - cos_cn.mean(0)) / cos_cn.std(0).clamp_min(1e-6)   # (1000, N), standardised per label
        weight = torch.cat([z, self.class_emb], 1).T[:, :, None, None]  # (N + D, 1000, 1, 1): both in one 1x1 conv
        scores, t = F.conv2d(p, weight).split([z.shape[1], self.class_emb.shape[1]], 1)  # (B, N | D, h, w)
        return scores, similarity(t, label_emb, 1.0)

    def weights(self, label_emb, seen, unseen):
        """(N, D) label embeddings -> (N,) the branch's ensemble weight per label: `seen` for labels the model was
        trained on, `unseen` for labels far from all of them (SEEN_COSINE), linear in between."""
        if self.seen_emb.shape[0] == 0:
            return label_emb.new_full(label_emb.shape[:1], unseen)
        near = (F.normalize(label_emb, dim=1) @ F.normalize(self.seen_emb, dim=1).T).amax(1)  # (N, K) -> (N,)
        lo, hi = SEEN_COSINE
        s = ((near - lo) / (hi - lo)).clamp(0, 1)
        return unseen + (seen - unseen) * s


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
        if cfg.imagenet_branch and cfg.backbone not in EFFICIENTNET_VARIANTS:
            raise ConfigError(f"imagenet_branch needs an EfficientNet-Lite backbone (its ImageNet classifier); "
                              f"{cfg.backbone} has none")
        self.aux = AuxHead(self.backbone.dims[2], cfg.embed_dim) if cfg.aux_head else None
        self.box_proj = nn.Conv2d(cfg.embed_dim, cfg.box_dim, 1) if cfg.box_head else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.apply(_init_weights)
        self.imagenet = None
        if cfg.imagenet_branch:  # its weights come from its file (load_imagenet_branch); built without drawing from
            with torch.random.fork_rng(devices=[]):  # the global generator, so a run trains the same weights with it
                self.imagenet = ImageNetBranch(cfg.backbone, cfg.embed_dim, cfg.imagenet_temperature)  # as without
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


    def combine(self, emb, images, label_emb, scale=None, branch="on", valid=None):
        """Pixel embeddings emb (B, D, h, w) of images (B, 3, H, W) and label_emb (N, D) -> logits and cosines
        (B, N, h, w).

        The trained branch alone: logits = scale * cos (`similarity`). With the ImageNet branch (branch "on"): per
        label, (1 - w) log_softmax(trained) + w log_softmax(imagenet) with w from ImageNetBranch.weights, and the
        cosines mixed with the same weights (what --unknown_below thresholds); "alone": the ImageNet branch only.
        The caller upsamples and softmaxes the logits like plain ones (log-probabilities renormalise). valid (N,)
        bool: rows that are labels; the others (padding of a fixed-size input) take no part in either softmax.
        """
        scale = self.scale() if scale is None else scale
        cos = similarity(emb, label_emb, 1.0)                             # (B, N, h, w)
        if self.imagenet is None or branch == "off":
            return scale * cos, cos
        label_emb = F.normalize(label_emb.float(), dim=1)
        ov, ov_cos = self.imagenet.label_scores(images, label_emb)        # (B, N, H/32, W/32) each
        c = self.config
        if c.imagenet_guide:  # each stride-4 pixel takes the scores of the stride-32 cells its embedding is like
            ov, ov_cos = guided_upsample(torch.cat([ov, ov_cos], 1).float(), emb.float(), c.imagenet_guide).chunk(2, 1)
        else:
            ov, ov_cos = (upsample_logits(t.float(), cos.shape[-2:]) for t in (ov, ov_cos))  # (B, N, h, w)
        trained, ov = scale * cos.float(), c.imagenet_scale * ov
        if valid is not None:  # padding rows: out of both softmaxes (their sums would weigh labels unequally)
            trained, ov = (torch.where(valid[:, None, None], t, -1e4) for t in (trained, ov))
        if branch == "alone":
            return ov, ov_cos
        w = self.imagenet.weights(label_emb, c.ensemble_seen, c.ensemble_unseen)[:, None, None]  # (N, 1, 1)
        logits = (1 - w) * trained.log_softmax(1) + w * ov.log_softmax(1)
        return logits, (1 - w) * cos.float() + w * ov_cos


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


def label_logits(net, images, label_emb, scale, branch="on"):
    """images (B, 3, H, W), label_emb (N, D) -> logits and cosines (B, N, H/4, W/4), the network in eval mode: a
    SegModel's `combine` (with its ImageNet branch where it has one, `branch` on | off | alone), or for any other
    network mapping images to pixel embeddings (the tests' stand-ins) scale x cosine."""
    emb = net(images)                                                     # (B, D, h, w)
    if isinstance(net, SegModel):
        return net.combine(emb, images, label_emb, scale, branch)
    cos = similarity(emb, label_emb, 1.0)                                 # (B, N, h, w)
    return scale * cos, cos


def guided_upsample(scores, emb, temperature):
    """Stride-32 scores (B, C, h, w) to the stride-4 grid of emb (B, D, H, W), H <= 8h: each stride-4 pixel averages
    the scores of the 3 x 3 stride-32 cells around its own, weighted by a softmax over the cosines of its embedding
    with each cell's mean embedding / temperature. Bilinear upsampling spreads a horse's scores over the grass beside
    it; the trained branch's embeddings know where the horse ends (Weizmann horses: horse IoU 56.1 bilinear, 60.4
    guided; docs/results.md). A joint bilateral upsampling with the cells as the low-resolution grid, computed per
    8 x 8 block of pixels (one cell) so that nothing of size D x H x W is copied."""
    b, c, h, w = scores.shape
    d, (H, W) = emb.shape[1], emb.shape[-2:]
    cells = F.normalize(F.avg_pool2d(emb, 8, 8, ceil_mode=True), dim=1)  # (B, D, h, w) mean embedding per cell
    emb = F.normalize(F.pad(emb, (0, 8 * w - W, 0, 8 * h - H)), dim=1)  # (B, D, 8h, 8w), padding cut off below
    blocks = emb.reshape(b, d, h, 8, w, 8)                               # pixel (8i + y, 8j + x) of cell (i, j)
    scores, cells = (F.pad(t, (1, 1, 1, 1), mode="replicate") for t in (scores, cells))  # (B, ., h + 2, w + 2)
    shifted = [torch.stack([t[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 2)
               for t in (cells, scores)]                                 # (B, D | C, 9, h, w): the 3 x 3 neighbours
    affinity = torch.einsum("bdiyjx,bdkij->bkiyjx", blocks, shifted[0])  # (B, 9, h, 8, w, 8) cosines
    weights = (affinity / temperature).softmax(1)
    out = torch.einsum("bkiyjx,bckij->bciyjx", weights, shifted[1])     # (B, C, h, 8, w, 8)
    return out.reshape(b, c, 8 * h, 8 * w)[:, :, :H, :W]                 # (B, C, H, W)


def upsample_logits(logits, size):
    """(B, N, h, w) -> (B, N, *size), bilinear, align_corners=False (the project's one resize rule)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
