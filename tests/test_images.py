"""images.py: the torch-free image steps against torch as the oracle (F.interpolate's bilinear resize, the ImageNet
normalisation in torch), and the modules a deployment imports without torch."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from images import normalized, resize_bilinear, whole_image_size
from overlays import to_uint8

ROOT = Path(__file__).resolve().parent.parent
NO_TORCH = Path(__file__).resolve().parent / "no_torch"
TORCH_FREE = ["images", "overlays", "label_spec", "onnx_text", "wordpiece", "clip_bpe", "text_cache", "score_rules",
              "onnx_segment", "serve_http", "serve_page", "run_onnx", "serve_onnx"]


@pytest.mark.parametrize("size,out", [((37, 53), (64, 96)), ((64, 96), (37, 53)), ((360, 480), (180, 240)),
                                      ((7, 5), (7, 11)), ((1, 9), (4, 3)), ((50, 70), (50, 70))])
def test_resize_bilinear_equals_torch_interpolate(size, out):
    x = np.random.default_rng(0).standard_normal((3, *size)).astype(np.float32)  # (C, H, W)
    want = F.interpolate(torch.from_numpy(x)[None], size=out, mode="bilinear", align_corners=False)[0].numpy()
    got = resize_bilinear(x, out)
    assert got.shape == want.shape == (3, *out) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6


def test_normalized_is_imagenet_normalisation_and_to_uint8_inverts_it():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    want = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std   # (3, H, W)
    got = normalized(Image.fromarray(rgb))
    assert got.shape == (3, 5, 7) and got.dtype == np.float32 and np.abs(got - want.numpy()).max() <= 1e-6
    assert (to_uint8(got) == rgb).all() and (to_uint8(torch.from_numpy(got)) == rgb).all()


def test_whole_image_size():
    assert whole_image_size(480, 360, 360) == (480, 384)      # already at base: padded to multiples of 32
    assert whole_image_size(1000, 500, 250) == (512, 256)
    assert whole_image_size(50, 70, 0) == (64, 96)


@pytest.mark.slow
def test_the_deployment_modules_import_without_torch():
    code = "import " + ", ".join(TORCH_FREE) + "\nimport sys\nassert 'torch' not in sys.modules\n" \
           "try:\n    import torch\nexcept ImportError:\n    print('blocked')"
    env = dict(os.environ, PYTHONPATH=str(NO_TORCH))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "blocked", out.stderr[-2000:]
