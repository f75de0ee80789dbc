"""The image steps of inference, with numpy and Pillow alone (no torch), so that a deployment without torch
(run_onnx.py, serve_onnx.py) and the torch path (predict.py, serve.py, evaluate.py, data.py) share them: the pixel
budget checked from an image's header, decoding (and EXIF rotation, for uploads), normalising, and the bilinear resize
of the protocol (align_corners=False, no antialias: torch's F.interpolate, which the torch path runs on its device;
tests/test_images.py holds this one to it).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
WHOLE_IMAGE_MULTIPLE = 32  # MiT's total stride: padding to it keeps the stride-4 output aligned with the pixels

# The pixel budget of one image, checked by open_image from the header before anything is decoded (set_image_budget;
# train.py, evaluate.py and predict.py pass their max_pixels and max_aspect settings). predict.py holds ~64 bytes a
# pixel plus 4 per label at its peak (decoded RGB, float copies, full-size score maps and overlay; measured on a 25 MP
# JPEG: 2.04 GB RSS with 2 labels, 2.63 GB with 8), so 100 MP with the 16 labels of --background=default is ~13 GB,
# which fits a 24 GB machine, while a 400 MP "PNG bomb" of 1 MB on disk ran to the OOM killer at 22 GB. Camera photos
# stay far below (6000x4000 is 24 MP). The same budget bounds the size the model processes an image at (the short
# side resized to base_size, then padded), which a small image of an extreme shape can blow up: a 93-byte 3000x1 PNG
# at base_size 720 is 2,160,000x720. max_aspect refuses such shapes outright (panoramas are 2:1 to ~10:1). A
# module-level value (as PIL's own limit is) rather than an argument: every reader opens images through open_image,
# several calls deep, in DataLoader workers forked from the script that set it.
MAX_PIXELS = 100_000_000
MAX_ASPECT = 20.0  # the longer side over the shorter
Image.MAX_IMAGE_PIXELS = None  # PIL only warns below twice its limit and raises no DataError: open_image checks


def megapixels(n: int) -> str:
    return f"{n / 1e6:.{1 if n >= 100_000 else 2}f} MP"


@dataclass(frozen=True)
class ImageBudget:
    """What one image may ask for, checked from its header before a byte of it is decoded."""
    max_pixels: int = MAX_PIXELS   # of the image, and of the size the model processes it at
    max_aspect: float = MAX_ASPECT

    def problem(self, w: int, h: int, work: tuple[int, int, str] | None = None) -> str:
        """Why a w x h image is refused ("" where it is not). work: (W, H, how) the size the model would process it
        at and the settings that make it so (inference.Protocol.work_size), or None where no model sees it whole."""
        if w * h > self.max_pixels:
            return (f"{w}x{h} = {w * h / 1e6:.0f} MP is over max_pixels={self.max_pixels} "
                    f"({self.max_pixels / 1e6:.0f} MP), the pixel budget of one image; refused before decoding it "
                    f"(raise max_pixels if the machine has the memory)")
        processed = f"{work[0]}x{work[1]} = {megapixels(work[0] * work[1])} ({work[2]})" if work else ""
        if max(w, h) > self.max_aspect * min(w, h):
            seen = f"; the model would process it at {processed}" if work else ""
            ratio = f"{max(w, h) / min(w, h):.1f}".removesuffix(".0")
            return f"{w}x{h} has an aspect ratio of {ratio}:1, over max_aspect={self.max_aspect:g}{seen}; refused " \
                   f"before decoding it"
        if work and work[0] * work[1] > self.max_pixels:
            return (f"{w}x{h} is processed at {processed}, over max_pixels={self.max_pixels} "
                    f"({megapixels(self.max_pixels)}), the pixel budget of one image; refused before decoding it "
                    f"(lower base_size, or raise max_pixels if the machine has the memory)")
        return ""


BUDGET = ImageBudget()


def set_image_budget(max_pixels: int, max_aspect: float) -> None:
    """The budget open_image enforces from now on (a script's max_pixels and max_aspect settings)."""
    global BUDGET
    if not (isinstance(max_pixels, int) and max_pixels >= 1):
        raise ConfigError(f"max_pixels={max_pixels!r} must be >= 1")
    if not (isinstance(max_aspect, (int, float)) and max_aspect >= 1):
        raise ConfigError(f"max_aspect={max_aspect!r} must be >= 1")
    BUDGET = ImageBudget(max_pixels, float(max_aspect))


def read_header(path) -> Image.Image:
    """Image.open: the header only, nothing decoded; a missing or unreadable file raises DataError naming it."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:  # its message names the file object (`<_io.BytesIO object at 0x...>` for bytes)
        raise DataError(f"{path}: unreadable image (not a format Pillow reads: JPEG, PNG, WebP, BMP, TIFF, ...)") \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def open_image(path: Path, work_size=None) -> Image.Image:
    """Open (header only; pixels are decoded later, after `draft`). An image over the process's budget (BUDGET: more
    than max_pixels pixels, or an aspect ratio over max_aspect, or, with work_size, processed at more than
    max_pixels) raises DataError here, from its header's size, before a byte of it is decoded.
    work_size: (w, h) -> (W, H, how), the size a model processes a w x h image at (inference.Protocol.work_size)."""
    im = read_header(path)
    w, h = im.size
    problem = BUDGET.problem(w, h, work_size(w, h) if work_size else None)
    if problem:
        im.close()
        raise DataError(f"{path}: {problem}")
    return im


def decode_rgb(im: Image.Image, path: Path, draft_size=None) -> Image.Image:
    """Decode to RGB. `draft_size` (w, h) lets JPEG decode at 1/2, 1/4 or 1/8 scale while staying >= that size,
    which is most of the decode time saved on large photos. Truncated/corrupt files raise DataError."""
    try:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", (max(1, int(draft_size[0])), max(1, int(draft_size[1]))))
        return im.convert("RGB")  # forces the full decode, so truncation surfaces here
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from None


def quarter_turned(im: Image.Image) -> bool:
    """Whether im's EXIF orientation is a quarter turn (5..8): its width and height swap once it is upright."""
    return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def upright(rgb: Image.Image) -> Image.Image:
    """A decoded image turned as its EXIF orientation says: phone photos upright, as a browser shows them."""
    return ImageOps.exif_transpose(rgb)


def normalized(rgb) -> np.ndarray:
    """RGB PIL image or (H, W, 3) uint8 -> (3, H, W) float32 ImageNet-normalised (transforms.eval_image's numbers)."""
    x = np.asarray(rgb, dtype=np.float32) / 255.0                         # (H, W, 3)
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))                     # (3, H, W)


def short_side_size(h, w, short):
    """(h, w) resized so that min == short, aspect kept, rounded as MSeg rounds it."""
    return (round(short / w * h), short) if h > w else (short, round(short / h * w))


def whole_image_size(w, h, base_size):
    """(W, H): a w x h image resized to base_size (its short side; 0 = as it is) and padded to a multiple of
    WHOLE_IMAGE_MULTIPLE: the size a whole-image pass (--sliding=false, one scale) processes it at."""
    hs, ws = short_side_size(h, w, base_size) if base_size else (h, w)
    m = WHOLE_IMAGE_MULTIPLE
    return -(-ws // m) * m, -(-hs // m) * m


def linear_taps(n_in, n_out):
    """Source indices (i0, i1) and weights (w0, w1) of each of n_out outputs along an axis of n_in, float32: torch's
    upsample_bilinear2d with align_corners=False (src = (i + 0.5) * n_in / n_out - 0.5, clamped at 0)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    # scale * (i + 0.5) - 0.5 rounded once to float32, as torch's kernel computes it (a fused multiply-add): in float64,
    # whose product of two float32s is exact; rounding each step in float32 moves the weights by up to 1e-6
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), 1 - w1, w1


def resize_bilinear(x: np.ndarray, size) -> np.ndarray:
    """(C, H, W) float32 -> (C, h, w), size = (h, w): bilinear, align_corners=False, no antialias; equal to
    F.interpolate(x[None], size, mode="bilinear", align_corners=False)[0] up to float rounding (the same taps and
    weights, along the width first as torch's CPU kernel). The same size returns x itself."""
    h, w = size
    if (h, w) == x.shape[-2:]:
        return x
    r0, r1, a0, a1 = linear_taps(x.shape[-2], h)
    c0, c1, b0, b1 = linear_taps(x.shape[-1], w)
    rows = x[:, :, c0] * b0 + x[:, :, c1] * b1                            # (C, H, w)
    return rows[:, r0] * a0[:, None] + rows[:, r1] * a1[:, None]          # (C, h, w)


def list_images(spec):
    """A folder (its image files, sorted), one image, or comma-separated images -> [Path]."""
    path = Path(spec)
    if spec and path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"--images={spec!r}: " + (f"no such file(s) {missing}" if missing else "no images"))
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"--images: several images are named {dup}; their outputs would overwrite each other")
    return paths


def whole_image_work(base_size):
    """The work_size function open_image checks the budget with, for a whole-image pass at base_size (as
    inference.Protocol.work_size says for --sliding=false at one scale): (w, h) -> (W, H, how)."""
    return lambda w, h: (*whole_image_size(w, h, base_size),
                         f"base_size={base_size}, padded to a multiple of {WHOLE_IMAGE_MULTIPLE}")
