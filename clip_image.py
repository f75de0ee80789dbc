"""CLIP's image tower (ViT) and the box-target cache for L_WD (SSIW eq. 6: V*_r = CLIP image embedding of box r).

Training never runs CLIP: this command encodes every box of a box-labelled dataset once and writes a cache that
data.py reads (rows in the order of readers.load_coco_boxes):

  python clip_image.py --weights ViT-B-32.pt --boxes objects365.json --images DIR --out cache.pt [--batch 64]

  cache = {"encoder": str, "targets": {image_file: FloatTensor (K, C)}}   (L2-normalised, fp16 unless --fp32)

Weights: OpenAI's released .pt (keys visual.*) or an HF CLIP checkpoint (vision_model.*, visual_projection.weight),
read by clip_text.read_clip_state_dict and loaded strictly. Only the ViT variants exist here (B/32, B/16, L/14, sizes
read from the state dict); OpenAI's ResNet towers (RN50 ...) raise.
"""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clip_text import WHERE_TO_GET, Transformer, drop_by_prefix, pop_hf_layers, read_clip_state_dict
from errors import WeightsError, run_main
from readers import load_coco_boxes

# CLIP's own normalisation (clip/clip.py _transform), not ImageNet's
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:  # defaults: ViT-B/32
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    embed_dim: int = 512


# ---------------------------------------------------------------------------------------------------- image tower

class VisionTransformer(nn.Module):
    """CLIP's ViT image tower; parameter names are OpenAI's `visual.*` without the prefix. Built for loading:
    parameters are left uninitialised (torch.empty) because load_image_tower overwrites every one of them."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)  # patch embedding
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, causal=False)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R), CLIP-normalised, R = config.image_size -> (B, embed_dim), projected, not normalised."""
        R = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, R, R):
            raise ValueError(f"expected images (B, 3, {R}, {R}), got {tuple(images.shape)}: the positional "
                             f"embedding is fixed to the checkpoint's resolution")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 1 + g*g, C)
        x = self.transformer(self.ln_pre(x))  # (B, 1 + g*g, C)
        # the class token is the one position trained to summarise the image (CLIP pools it, not a mean)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, C) @ (C, D) -> (B, D)

    forward = encode_image


# -------------------------------------------------------------------------------------------------------- loading

# Keys that are not the image tower, dropped by name (and counted in the log): never a silent filter.
SKIP_PREFIXES = {"openai": ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                            "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size"),
                 "hf": ("text_model.", "text_projection.", "logit_scale",
                        "vision_model.embeddings.position_ids")}  # an arange buffer; positions are implicit here
OPENAI_RESNET_MARKERS = ("visual.layer1.", "visual.attnpool.")


def openai_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI keys -> ours: strip `visual.`. Any other key is left as it is, so the strict load names it."""
    return {k.removeprefix("visual."): v for k, v in sd.items()}


def hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision keys -> OpenAI's `visual.*` names (without the prefix). Leftover keys raise."""
    sd = dict(sd)
    e, v = "vision_model.embeddings.", "vision_model."
    out = {"conv1.weight": sd.pop(e + "patch_embedding.weight"),
           "class_embedding": sd.pop(e + "class_embedding"),
           "positional_embedding": sd.pop(e + "position_embedding.weight"),
           "ln_pre.weight": sd.pop(v + "pre_layrnorm.weight"),  # sic: HF's spelling
           "ln_pre.bias": sd.pop(v + "pre_layrnorm.bias"),
           "ln_post.weight": sd.pop(v + "post_layernorm.weight"),
           "ln_post.bias": sd.pop(v + "post_layernorm.bias"),
           "proj": sd.pop("visual_projection.weight").t()}  # nn.Linear (D, C) -> OpenAI's matrix (C, D)
    out.update(pop_hf_layers(sd, "vision_model.encoder.layers."))
    if sd:
        raise KeyError(f"unexpected HF CLIP keys: {sorted(sd)[:10]}")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> VisionConfig:
    """Sizes from tensor shapes, as OpenAI's build_model does (heads = width // 64 for every released ViT)."""
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
    return VisionConfig(image_size=patch * grid, patch_size=patch, width=width,
                        layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
                        heads=width // 64, mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                        embed_dim=sd["proj"].shape[1])


def load_image_tower(path, device="cpu") -> VisionTransformer:
    """CLIP checkpoint (see clip_text.read_clip_state_dict) -> fp32 VisionTransformer in eval mode, loaded strictly."""
    raw, fmt = read_clip_state_dict(path)
    sd = drop_by_prefix(raw, SKIP_PREFIXES[fmt], f"clip_image: {path} ({fmt})", "non-image-tower")
    if any(k.startswith(OPENAI_RESNET_MARKERS) for k in sd):
        raise WeightsError(f"{path}: a CLIP ResNet image tower (keys visual.layer1.*, visual.attnpool.*); "
                           f"only the ViT towers are implemented (ViT-B/32, ViT-B/16, ViT-L/14)")
    try:
        sd = hf_to_ours(sd) if fmt == "hf" else openai_to_ours(sd)
        model = VisionTransformer(config_from_state_dict(sd))
        model.load_state_dict(sd, strict=True)  # copies into fp32 parameters (OpenAI's .pt files hold fp16)
    except (KeyError, RuntimeError) as e:
        raise WeightsError(f"{path}: weights do not fit a CLIP ViT image tower: {e}. {WHERE_TO_GET}") from e
    return model.to(device).eval()


# -------------------------------------------------------------------------------------------------- preprocessing

def to_clip_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float, CLIP-normalised."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """CLIP's own transform for a whole image: bicubic resize of the shorter side to `size`, centre crop, normalise.
    -> (3, size, size)."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_clip_tensor(img.crop((left, top, left + size, top + size)))


def box_crops(img: Image.Image, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The CLIP inputs of eq. 6: boxes (K, 4) xyxy in the image's pixels -> (K, 3, size, size).

    Each box is cut from the original image (rounded outwards to whole pixels, clipped to the image, at least one
    pixel) and resized to size x size, aspect NOT kept: SSIW says "crop ... resize to the CLIP image size", and
    CLIP's centre crop would cut the ends off elongated objects (a standing person, a pole) while padding would add
    borders CLIP never saw. CLIP tolerates the stretch far better than a missing half of the object."""
    W, H = img.size
    crops = []
    for x1, y1, x2, y2 in boxes.tolist():
        left, top = min(max(int(np.floor(x1)), 0), W - 1), min(max(int(np.floor(y1)), 0), H - 1)
        right, bottom = max(min(int(np.ceil(x2)), W), left + 1), max(min(int(np.ceil(y2)), H), top + 1)
        crops.append(to_clip_tensor(img.crop((left, top, right, bottom)).resize((size, size), Image.BICUBIC)))
    return torch.stack(crops) if crops else torch.zeros(0, 3, size, size)


# ---------------------------------------------------------------------------------------------- box-target cache

@torch.no_grad()
def encode_boxes(model: VisionTransformer, boxes_by_image: dict, images_dir, batch_size: int = 64,
                 device="cpu") -> dict[str, torch.Tensor]:
    """{image_file: ((K, 4) xyxy, names)} -> {image_file: (K, D) L2-normalised fp32}, rows in the boxes' order.
    Crops of consecutive images share batches, so images with few boxes still fill the accelerator."""
    R, D = model.config.image_size, model.config.embed_dim
    out: dict[str, list[torch.Tensor]] = {}
    crops, owners = [], []  # pending crops (3, R, R) and the image each belongs to

    def flush():
        for i in range(0, len(crops), batch_size):
            emb = F.normalize(model.encode_image(torch.stack(crops[i:i + batch_size]).to(device)).float(), dim=-1)
            for owner, row in zip(owners[i:i + batch_size], emb.cpu()):  # owners are contiguous: order is kept
                out[owner].append(row)
        crops.clear()
        owners.clear()

    for n, (name, (boxes, _)) in enumerate(boxes_by_image.items()):
        out[name] = []
        if len(boxes):
            path = Path(images_dir) / name
            if not path.is_file():
                raise FileNotFoundError(f"image {name} of the box file not found at {path}")
            with Image.open(path) as img:
                crops.extend(box_crops(img, boxes, R).unbind(0))
            owners.extend([name] * len(boxes))
        if len(crops) >= batch_size:
            flush()
        if (n + 1) % 1000 == 0:
            print(f"clip_image: {n + 1}/{len(boxes_by_image)} images")
    flush()
    return {name: torch.stack(rows) if rows else torch.zeros(0, D) for name, rows in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description="Encode every box of a COCO-format box file with CLIP's image tower "
                                            "(the L_WD targets), once, into a cache for training.")
    p.add_argument("--weights", required=True, help="OpenAI CLIP .pt or HF CLIP checkpoint (ViT)")
    p.add_argument("--boxes", required=True, help="COCO-format json (e.g. Objects365), read by readers.load_coco_boxes")
    p.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    p.add_argument("--out", required=True, help="cache .pt to write (atomically)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="store fp32 targets (default fp16: half the size, and only "
                                                       "their direction is used)")
    args = p.parse_args(argv)

    model = load_image_tower(args.weights, args.device)
    c = model.config
    encoder = (f"{Path(args.weights).name}: CLIP ViT image tower, patch {c.patch_size}, {c.image_size}px, "
               f"width {c.width}, {c.layers} layers, {c.embed_dim}-d")
    boxes = load_coco_boxes(args.boxes)
    print(f"clip_image: {sum(len(b) for b, _ in boxes.values())} boxes in {len(boxes)} images; {encoder}")
    targets = encode_boxes(model, boxes, args.images, args.batch, args.device)
    dtype = torch.float32 if args.fp32 else torch.float16
    cache = {"encoder": encoder, "targets": {k: v.to(dtype) for k, v in targets.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(cache, tmp)
    os.replace(tmp, out)  # atomic: a crashed run never leaves a half-written cache behind
    print(f"clip_image: wrote {out}")


if __name__ == "__main__":
    run_main(main)
