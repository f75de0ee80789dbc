"""CLIP's image tower (ViT) and the box targets of L_WD (SSIW eq. 6: V*_r = CLIP image embedding of box r).

Training never runs CLIP: this command encodes every box of a coco_boxes index (indexes.py) once and writes the
targets training reads, one float16 row per box row of the index (index_format.BOX_TARGETS_FILES):

  torchrun --nproc_per_node=8 clip_image.py --weights ViT-B-32.pt --index objects365/index_train \
      --out objects365/clip_b32_targets [--images objects365/train] [--shard_rows 1024 --batch 256 --workers 8]

25.4M Objects365 boxes take hours, so the work is cut into shards of rows: each rank encodes its part of the
unfinished shards, writes a shard's rows into targets.npy, syncs them to disk, and only then flips the shard's byte in
done.npy. A run that is killed (or a node that fails) loses at most the shards in flight: rerun the same command
(any number of ranks) and it does only the shards not yet done. Crops are cut in DataLoader workers; rows are
L2-normalised and stored as float16 (only their direction is used).

Weights: OpenAI's released .pt (keys visual.*) or an HF CLIP checkpoint (vision_model.*, visual_projection.weight),
read by clip_text.read_clip_state_dict and loaded strictly. Only the ViT variants exist here (B/32, B/16, L/14, sizes
read from the state dict); OpenAI's ResNet towers (RN50 ...) raise.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import distributed
from clip_text import WHERE_TO_GET, Transformer, drop_by_prefix, pop_hf_layers, read_clip_state_dict
from errors import DataError, WeightsError, run_main
from index_format import Index, prepare_targets
from images import decode_rgb, open_image
from runtime import set_threads
from settings import parse_settings, require, required

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

def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 RGB -> (..., 3, H, W) float, CLIP-normalised."""
    x = pixels.float().div(255).movedim(-1, -3)  # (..., H, W, 3) -> (..., 3, H, W)
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


def box_pixels(img: Image.Image, boxes, size: int) -> torch.Tensor:
    """The CLIP inputs of eq. 6 before normalising: boxes (K, 4) xyxy in the image's pixels -> (K, size, size, 3)
    uint8 (a quarter of the float size, for the trip from a DataLoader worker).

    Each box is cut from the original image (rounded outwards to whole pixels, clipped to the image, at least one
    pixel) and resized to size x size, aspect NOT kept: SSIW says "crop ... resize to the CLIP image size", and
    CLIP's centre crop would cut the ends off elongated objects (a standing person, a pole) while padding would add
    borders CLIP never saw. CLIP tolerates the stretch far better than a missing half of the object."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    W, H = img.size
    crops = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).tolist():
        left, top = min(max(int(np.floor(x1)), 0), W - 1), min(max(int(np.floor(y1)), 0), H - 1)
        right, bottom = max(min(int(np.ceil(x2)), W), left + 1), max(min(int(np.ceil(y2)), H), top + 1)
        crops.append(np.asarray(img.crop((left, top, right, bottom)).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(crops)) if crops else torch.zeros(0, size, size, 3, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------- box targets

class ShardCrops(torch.utils.data.Dataset):
    """Item k = (shard, (n, R, R, 3) uint8 crops of the shard's n box rows, [unreadable images: (first row, end row
    within the shard, message)]), shard = shards[k]. A shard's rows may start or end inside an image: that image is
    opened for the rows it has in the shard. An unreadable image raises, or with skip_bad gives black crops whose
    rows are written as NaN (no target: training drops those boxes)."""

    def __init__(self, index: Index, images: Path, shards, shard_rows: int, size: int, skip_bad: bool = False):
        self.index, self.images, self.shards, self.shard_rows = index, images, shards, shard_rows
        self.size, self.skip_bad = size, skip_bad

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int):
        shard = int(self.shards[k])
        offsets, boxes = self.index.arrays["box_offsets"], self.index.arrays["boxes"]
        names = self.index.strings("image_names")
        start, stop = shard * self.shard_rows, min((shard + 1) * self.shard_rows, len(boxes))
        first = int(np.searchsorted(offsets, start, side="right")) - 1  # the image that owns row `start`
        crops, bad = [], []
        for image in range(first, len(offsets) - 1):
            a, b = max(int(offsets[image]), start), min(int(offsets[image + 1]), stop)
            if a >= stop:
                break
            if a < b:
                path = self.images / names[image]
                try:
                    crops.append(box_pixels(decode_rgb(open_image(path), path), boxes[a:b], self.size))
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    crops.append(torch.zeros(b - a, self.size, self.size, 3, dtype=torch.uint8))
                    bad.append((a - start, b - start, str(e)))
        return shard, torch.cat(crops), bad


class ShardWriter:
    """Writes a shard's rows into targets.npy, syncs them to disk, then marks the shard done: a killed run never
    leaves a shard marked done whose rows are not on disk. Ranks write disjoint bytes of the same two files."""

    def __init__(self, out: Path):
        self.files = {}
        for name in ("targets.npy", "done.npy"):
            offset = np.load(out / name, mmap_mode="r").offset  # the .npy header's length
            self.files[name] = (os.open(out / name, os.O_WRONLY), offset)

    def _write(self, name: str, data: bytes, at: int) -> None:
        fd, offset = self.files[name]
        view, pos = memoryview(data), offset + at
        while view:  # pwrite may write less than asked
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        os.fsync(fd)

    def write(self, shard: int, first_row: int, rows: np.ndarray) -> None:
        self._write("targets.npy", rows.astype(np.float16).tobytes(), first_row * rows.shape[1] * 2)
        self._write("done.npy", b"\x01", shard)

    def close(self) -> None:
        for fd, _ in self.files.values():
            os.close(fd)


@torch.no_grad()
def encode_shards(model: VisionTransformer, crops: ShardCrops, writer: ShardWriter, batch_size: int, workers: int,
                  device, who: str = "clip_image") -> int:
    """Encode and write every shard of `crops`; returns the number of rows written."""
    loader = torch.utils.data.DataLoader(crops, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None, pin_memory=device.type == "cuda")
    start, done_rows, skipped = time.time(), 0, 0
    for k, (shard, pixels, bad) in enumerate(loader, 1):
        rows = [F.normalize(model.encode_image(normalise(pixels[i:i + batch_size].to(device))).float(), dim=-1)
                for i in range(0, len(pixels), batch_size)]  # (b, R, R, 3) uint8 -> (b, 3, R, R) -> (b, D)
        rows = torch.cat(rows).cpu().numpy()
        for a, b, message in bad:
            rows[a:b] = np.nan  # "no target": training drops these boxes
            skipped += 1
            print(f"{who}: skipped {message}", flush=True)
        writer.write(shard, shard * crops.shard_rows, rows)
        done_rows += len(pixels)
        if k % 100 == 0 or k == len(crops):
            rate = done_rows / (time.time() - start)
            eta = (len(crops) - k) * crops.shard_rows / max(rate, 1e-9)
            print(f"{who}: {k}/{len(crops)} shards, {rate:.0f} boxes/s, ETA {eta / 3600:.1f} h, "
                  f"{skipped} unreadable images skipped", flush=True)
    return done_rows


def read_done(out: Path, rows: int, shard_rows: int) -> np.ndarray:
    """done.npy of a box-target folder: (shards,) uint8, 1 = the shard's rows are on disk. Anything else (a pickled
    object, another dtype or length, a truncated file) raises DataError naming the folder and the file: ShardWriter
    writes single bytes into it, which only this layout makes right."""
    shards = -(-rows // shard_rows)
    try:
        done = np.load(out / "done.npy")  # allow_pickle=False: a pickled object is refused, not run
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{out}/done.npy: unreadable ({e}); not the shard flags clip_image.py writes, so {out} cannot "
                        f"be resumed: remove it or choose another --out") from None
    if done.dtype != np.uint8 or done.shape != (shards,):
        raise DataError(f"{out}/done.npy: {done.dtype} {done.shape}, expected uint8 ({shards},), one flag per "
                        f"shard of {shard_rows} rows; {out} cannot be resumed: remove it or choose another --out")
    return done


@dataclass
class ImageSettings:
    weights: str = ""              # OpenAI CLIP .pt or HF CLIP checkpoint (ViT)
    index: str = ""                # coco_boxes index folder (python indexes.py coco_boxes ...)
    images: str = ""               # image folder ("" = the one the index was checked against)
    out: str = ""                  # box-target folder to write or to resume
    shard_rows: int = 1024         # rows per shard (the unit of resumption)
    batch: int = 256               # crops per forward pass
    workers: int = 4               # DataLoader workers cutting crops, per rank
    skip_bad: bool = False         # an unreadable image gets NaN rows (no target: training drops its boxes) instead
                                   # of stopping the run
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch's CPU threads per rank; 0 = from the usable cores and workers

    def validate(self):
        """Required paths given, sizes in range (parse_settings calls this)."""
        required(self, "weights index out")
        require(self, "shard_rows batch", lambda v: v >= 1, "must be >= 1")
        require(self, "workers", lambda v: v >= 0, "must be >= 0")


def main(argv=None):
    a = parse_settings(ImageSettings, argv)
    rank, world, device = distributed.setup(a.device)
    set_threads(a.threads, verbose=rank == 0)
    model = load_image_tower(a.weights, device)
    index = Index(a.index, "coco_boxes")
    images = Path(a.images or index.meta["images_folder"])
    c = model.config
    encoder = (f"{Path(a.weights).name}: CLIP ViT image tower, patch {c.patch_size}, {c.image_size}px, "
               f"width {c.width}, {c.layers} layers, {c.embed_dim}-d")
    out = Path(a.out)
    if rank == 0:
        prepare_targets(out, index, c.embed_dim, a.shard_rows, encoder)
    if world > 1:
        dist.barrier()
    if rank != 0:
        prepare_targets(out, index, c.embed_dim, a.shard_rows, encoder)  # checks only: rank 0 made it
    done = read_done(out, index.meta["counts"]["boxes"], a.shard_rows)
    todo = np.flatnonzero(done == 0)
    mine = todo[rank::world]
    print(f"clip_image: rank {rank}/{world}: {len(mine)} of {len(todo)} unfinished shards "
          f"({index.meta['counts']['boxes']} boxes in {len(done)} shards); {encoder}", flush=True)
    writer = ShardWriter(out)
    encode_shards(model, ShardCrops(index, images, mine, a.shard_rows, c.image_size, a.skip_bad), writer, a.batch,
                  a.workers, device, f"clip_image rank {rank}")
    writer.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        left = int((read_done(out, index.meta["counts"]["boxes"], a.shard_rows) == 0).sum())
        print(f"clip_image: wrote {out}" if not left else f"clip_image: {left} shards still missing; rerun")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
