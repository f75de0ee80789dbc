"""Training augmentations (paper 4.1): resize the shorter edge, random scale, random crop, flip, colour jitter, blur,
corruption (noise, JPEG). Label maps use nearest resampling; boxes move with the image.

All random draws of one sample happen up front in `TrainTransform.plan` from a numpy Generator the dataset seeds per
(seed, epoch, draw), so a sample is reproducible and the image, label and boxes share one geometry.
"""
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from images import IMAGENET_MEAN, IMAGENET_STD, normalized

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass
class TrainTransform:
    short_side: int = 1080                 # resize the shorter edge to this (0 = keep the original size)
    crop_size: int = 640                   # square random crop (SegFormer 640, HRNet 713); padded where smaller
    scale_range: tuple = (0.5, 2.0)        # random scale, relative to short_side
    p_flip: float = 0.5                    # horizontal flip
    p_jitter: float = 0.8                  # colour jitter: brightness, contrast, saturation factors in 1 +- jitter
    jitter: float = 0.3
    p_blur: float = 0.2                    # gaussian blur, sigma in blur_sigma (pixels of the crop)
    blur_sigma: tuple = (0.1, 2.0)
    p_noise: float = 0.1                   # additive gaussian noise, std in noise_std (fraction of full range)
    noise_std: tuple = (0.01, 0.05)
    p_jpeg: float = 0.1                    # JPEG re-encode at a quality in jpeg_quality
    jpeg_quality: tuple = (30, 90)
    min_box: float = 1.0                   # boxes thinner than this (pixels) after the crop are dropped

    def plan(self, width: int, height: int, rng: np.random.Generator) -> dict:
        """Every random choice for one sample of an original (width, height) image, drawn in a fixed order."""
        base = self.short_side / min(width, height) if self.short_side > 0 else 1.0
        scale = base * rng.uniform(*self.scale_range)
        sw, sh = max(1, round(width * scale)), max(1, round(height * scale))  # scaled image size
        c = self.crop_size
        x0 = int(rng.integers(0, sw - c + 1)) if sw > c else 0
        y0 = int(rng.integers(0, sh - c + 1)) if sh > c else 0
        p = {"scaled": (sw, sh), "crop": (x0, y0, min(c, sw - x0), min(c, sh - y0)),
             "flip": rng.random() < self.p_flip,
             "jitter": rng.uniform(1 - self.jitter, 1 + self.jitter, 3) if rng.random() < self.p_jitter else None,
             "blur": rng.uniform(*self.blur_sigma) if rng.random() < self.p_blur else None,
             "jpeg": int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
             if rng.random() < self.p_jpeg else None,
             "noise": rng.uniform(*self.noise_std) if rng.random() < self.p_noise else None,
             "noise_seed": int(rng.integers(2**31))}
        return p

    def __call__(self, image: Image.Image, orig_size: tuple[int, int], target: np.ndarray | None,
                 boxes: torch.Tensor, plan: dict):
        """Apply `plan` to one sample.

        image: RGB PIL image, possibly decoded smaller than orig_size by `draft` (same content, coarser pixels).
        target: (h, w) int32 label-table rows (-1 = ignore) at orig_size, or None (box-only source: all ignore).
        boxes: (K, 4) float xyxy in original pixels.
        Returns image (3, C, C) float normalised, target (C, C) int64, boxes (K', 4), keep (K,) bool (which input
        boxes survived, to drop their rows/targets alike).
        """
        w, h = orig_size
        sw, sh = plan["scaled"]
        x0, y0, cw, ch = plan["crop"]
        sx, sy = sw / w, sh / h
        # Resize only the crop window: PIL's `box` resamples a source rectangle straight to the output size, the same
        # pixels as resizing the whole image and then cropping, without building a 2160-pixel-tall intermediate.
        window = (x0 / sx, y0 / sy, (x0 + cw) / sx, (y0 + ch) / sy)  # in original pixels
        dx, dy = image.size[0] / w, image.size[1] / h  # draft reduction, 1 when not drafted
        img = image.resize((cw, ch), Image.BILINEAR,
                           box=(window[0] * dx, window[1] * dy, window[2] * dx, window[3] * dy))
        if target is not None:
            lab = Image.fromarray(target.astype(np.int32)).resize((cw, ch), Image.NEAREST, box=window)
            lab = np.asarray(lab).astype(np.int64)  # (ch, cw)
        else:
            lab = np.full((ch, cw), -1, np.int64)
        # boxes: original pixels -> crop pixels, clipped; those left thinner than min_box vanish
        b = boxes.clone()
        b[:, [0, 2]] = (b[:, [0, 2]] * sx - x0).clamp(0, cw)
        b[:, [1, 3]] = (b[:, [1, 3]] * sy - y0).clamp(0, ch)
        keep = ((b[:, 2] - b[:, 0]) >= self.min_box) & ((b[:, 3] - b[:, 1]) >= self.min_box)
        b = b[keep]
        if plan["flip"]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lab = lab[:, ::-1].copy()
            b = hflip_boxes(b, cw)
        if plan["jitter"] is not None:
            img = color_jitter(img, *plan["jitter"])
        if plan["blur"] is not None:
            img = img.filter(ImageFilter.GaussianBlur(radius=plan["blur"]))
        if plan["jpeg"] is not None:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=plan["jpeg"])
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        if plan["noise"] is not None:
            noise = np.random.default_rng(plan["noise_seed"]).standard_normal(x.shape, dtype=np.float32)
            x = (x + plan["noise"] * torch.from_numpy(noise)).clamp_(0, 1)
        x = normalize(x)
        # pad bottom/right to the crop size: image with the mean (0 after normalising), labels with ignore
        c = self.crop_size
        out = torch.zeros(3, c, c)
        out[:, :ch, :cw] = x
        tgt = torch.full((c, c), -1, dtype=torch.int64)
        tgt[:ch, :cw] = torch.from_numpy(lab)
        return out, tgt, b, keep


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> ImageNet-normalised."""
    return (x - _MEAN) / _STD


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """(K, 4) xyxy -> the same boxes in the horizontally flipped image of that width."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def color_jitter(img: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    """Scale brightness, contrast (about the mean grey) and saturation (about each pixel's grey), in that order.
    PIL's ImageEnhance works on uint8 in C: several times faster than the same maths on float tensors."""
    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    return ImageEnhance.Color(img).enhance(saturation)


def eval_image(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) normalised float, no augmentation: images.normalized, as a tensor."""
    return torch.from_numpy(normalized(image))


def draft_size(plan: dict) -> tuple[int, int]:
    """The smallest decode size that still covers the scaled image (what JPEG `draft` may reduce to)."""
    sw, sh = plan["scaled"]
    return math.ceil(sw), math.ceil(sh)
