"""clip_image.py: parity of the ViT image tower with HF CLIPVisionModelWithProjection on the same random weights, in
both checkpoint formats; strict loading; preprocessing; the box-target command on a small index, its resumption
after SIGKILL under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import indexes  # noqa: E402
from clip_image import CLIP_MEAN, CLIP_STD, box_pixels, load_image_tower, main, normalise  # noqa: E402
from errors import ConfigError, DataError, WeightsError  # noqa: E402
from index_format import open_box_targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu")  # heads = width // 64, CLIP's rule
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, vocab_size=99,
            max_position_embeddings=16, bos_token_id=97, eos_token_id=98, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def hf_clip():
    """A tiny random HF CLIPModel (both towers, as released checkpoints are), every weight perturbed so that a
    swapped LayerNorm or a transposed projection cannot hide behind an identity init."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=48)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _reference(hf_clip):
    """HF CLIPVisionModelWithProjection loaded strictly with the CLIPModel's vision weights."""
    vcfg = transformers.CLIPVisionConfig(**VISION, projection_dim=48)
    ref = transformers.CLIPVisionModelWithProjection(vcfg).eval()
    sd = {k: v for k, v in hf_clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    ref.load_state_dict(sd, strict=True)
    return ref


def _to_openai(sd):
    """HF CLIP names -> OpenAI's released layout (visual.* + text keys), written independently of clip_image."""
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T, "logit_scale": sd["logit_scale"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T}
    for tower, prefix, n in (("text_model", "transformer", TEXT["num_hidden_layers"]),
                             ("vision_model", "visual.transformer", VISION["num_hidden_layers"])):
        for i in range(n):
            h, o = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for p in ("weight", "bias"):
                out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[o + f"attn.out_proj.{p}"] = sd[h + f"self_attn.out_proj.{p}"]
                out[o + f"ln_1.{p}"], out[o + f"ln_2.{p}"] = sd[h + f"layer_norm1.{p}"], sd[h + f"layer_norm2.{p}"]
                out[o + f"mlp.c_fc.{p}"], out[o + f"mlp.c_proj.{p}"] = sd[h + f"mlp.fc1.{p}"], sd[h + f"mlp.fc2.{p}"]
    return out


@pytest.fixture(scope="module")
def weights(hf_clip, tmp_path_factory):
    """The same random weights as an HF snapshot folder (model.safetensors) and as an OpenAI-layout .pt (a plain
    state dict in fp32; OpenAI's fp16 TorchScript archive is clip_text.read_clip_state_dict's business)."""
    d = tmp_path_factory.mktemp("clip")
    sd = {k: v.contiguous() for k, v in hf_clip.state_dict().items()}
    (d / "hf").mkdir()
    safetensors_torch.save_file(sd, str(d / "hf" / "model.safetensors"))
    torch.save(_to_openai(sd), d / "openai.pt")
    return {"hf": d / "hf", "openai": d / "openai.pt"}


@pytest.mark.parametrize("fmt", ["hf", "openai"])
def test_parity_with_hf_vision_model(fmt, hf_clip, weights, capsys):
    model = load_image_tower(weights[fmt])
    skipped = capsys.readouterr().out
    n_text = sum(not k.startswith(("vision_model.", "visual_projection.")) for k in hf_clip.state_dict())
    if fmt == "openai":
        n_text = sum(not k.startswith("visual.") for k in _to_openai(hf_clip.state_dict()))
    assert f"skipping {n_text} non-image-tower keys" in skipped
    c = model.config
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.mlp_width, c.embed_dim) == (32, 8, 128, 2, 2,
                                                                                                   256, 48)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.encode_image(images)
        ref = _reference(hf_clip)(pixel_values=images).image_embeds
    err = (ours - ref).abs().max().item()
    print(f"image tower parity ({fmt}): max abs diff {err:.2e}")
    assert err <= 1e-5


def test_strict_loading_errors(hf_clip, tmp_path):
    sd = _to_openai(hf_clip.state_dict())
    torch.save({**sd, "visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "rn.pt")
    with pytest.raises(WeightsError, match="ResNet"):
        load_image_tower(tmp_path / "rn.pt")
    torch.save({**sd, "visual.extra_token": torch.zeros(4)}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="extra_token"):
        load_image_tower(tmp_path / "extra.pt")
    del sd["visual.ln_post.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="ln_post.bias"):
        load_image_tower(tmp_path / "missing.pt")


def test_wrong_resolution_raises(weights):
    model = load_image_tower(weights["openai"])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode_image(torch.zeros(1, 3, 64, 64))


def _normalised(rgb):
    return (np.array(rgb) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)


def test_box_crops_cut_the_box_and_stretch_it():
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:20, 30:50] = (0, 255, 0)  # a 20x10 green box
    boxes = torch.tensor([[30.0, 10.0, 50.0, 20.0], [55.0, 35.0, 70.0, 45.0], [5.0, 5.0, 5.0, 5.0]])
    crops = normalise(box_pixels(Image.fromarray(img), boxes, 16))  # (3, 3, 16, 16)
    assert crops.shape == (3, 3, 16, 16)
    green = torch.tensor(_normalised((0, 255, 0)), dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(crops[0], green.expand(3, 16, 16), atol=1e-5, rtol=0)  # whole box, aspect not kept
    black = torch.tensor(_normalised((0, 0, 0)), dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(crops[1], black.expand(3, 16, 16), atol=1e-5, rtol=0)  # clipped to the image
    torch.testing.assert_close(crops[2], black.expand(3, 16, 16), atol=1e-5, rtol=0)  # empty box: one pixel


def write_box_index(root, n_images=3, boxes_per_image=(5, 0, 4), seed=0):
    """A COCO box JSON with images of different sizes (one without boxes), interleaved annotations, and its index."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        w, h = 56, 40 + 8 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": w, "height": h})
        for _ in range(boxes_per_image[i % len(boxes_per_image)]):
            x, y = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
            anns.append({"image_id": 100 + i, "category_id": 1,
                         "bbox": [x, y, rng.uniform(1, w - x), rng.uniform(1, h - y)]})
    order = rng.permutation(len(anns))  # annotations of different images interleaved
    coco = {"images": images, "categories": [{"id": 1, "name": "thing"}],
            "annotations": [dict(anns[k], id=j) for j, k in enumerate(order)]}
    (root / "boxes.json").write_text(json.dumps(coco))
    return indexes.build_coco_boxes(root / "boxes.json", root, root / "index")


def test_box_targets_command(weights, tmp_path):
    index = write_box_index(tmp_path)
    out = tmp_path / "targets"
    main(["--weights", str(weights["openai"]), "--index", str(tmp_path / "index"), "--out", str(out),
          "--shard_rows", "3", "--batch", "2", "--workers", "1"])  # shards straddle images, batches straddle nothing
    targets = open_box_targets(out, index)
    assert targets.shape == (9, 48) and targets.dtype == np.float16
    assert not list(tmp_path.glob(".targets*")) and np.load(out / "done.npy").tolist() == [1, 1, 1]
    model = load_image_tower(weights["openai"])
    boxes, offsets = index.arrays["boxes"], index.arrays["box_offsets"]
    for image in range(3):
        rows = slice(offsets[image], offsets[image + 1])
        with Image.open(tmp_path / f"{image}.png") as img, torch.no_grad():
            want = F.normalize(model.encode_image(normalise(box_pixels(img, boxes[rows], 32))), dim=-1)
        torch.testing.assert_close(torch.from_numpy(targets[rows].astype(np.float32)), want, atol=2e-3, rtol=0)
    with pytest.raises(ConfigError, match=r"holds box targets with other shard_rows"):
        main(["--weights", str(weights["openai"]), "--index", str(tmp_path / "index"), "--out", str(out),
              "--shard_rows", "4"])


def run_targets(weights, root, out, torchrun=0, background=False):
    cmd = [sys.executable, "clip_image.py", "--weights", str(weights["openai"]), "--index", str(root / "index"),
           "--out", str(out), "--shard_rows", "4", "--batch", "2", "--workers", "0", "--device", "cpu"]
    if torchrun:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "clip_image.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same arithmetic in every process: results compare bitwise
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def kill_tree(pid):
    """SIGKILL a process and its descendants, children first (torchrun starts each rank in a session of its own,
    so killing its process group would leave the ranks running)."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        kill_tree(int(child))
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_torchrun_resumes_with_the_unfinished_shards_only(weights, tmp_path):
    """SIGKILL two ranks mid-run, rerun: the targets equal an uninterrupted one-process run, bit for bit."""
    index = write_box_index(tmp_path, n_images=40, boxes_per_image=(30, 0, 20, 12))
    rows = index.meta["counts"]["boxes"]
    shards = -(-rows // 4)
    run_targets(weights, tmp_path, tmp_path / "whole")
    proc = run_targets(weights, tmp_path, tmp_path / "killed", torchrun=2, background=True)
    done_file, start = tmp_path / "killed" / "done.npy", time.time()
    while not (done_file.exists() and np.load(done_file).sum() >= 4):
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stdout.read()[-3000:]}"
        assert time.time() - start < 300, "no shard finished"
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait()
    finished = int(np.load(done_file).sum())
    assert 4 <= finished < shards, f"{finished} of {shards} shards done at the kill: not mid-run"
    log = run_targets(weights, tmp_path, tmp_path / "killed", torchrun=2)
    todo = [int(m) for m in re.findall(r"rank \d/2: (\d+) of (\d+) unfinished shards", log)[0]]
    assert todo[1] == shards - finished  # only what was not done is done again
    whole, resumed = (np.load(tmp_path / d / "targets.npy") for d in ("whole", "killed"))
    assert whole.shape == (rows, 48) and np.abs(whole).sum(1).min() > 0  # every row written
    assert np.array_equal(resumed, whole)


def test_unreadable_image_stops_the_run_or_gets_nan_rows(weights, tmp_path):
    index = write_box_index(tmp_path, n_images=4, boxes_per_image=(3, 2))
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:100])  # truncated
    args = ["--weights", str(weights["openai"]), "--index", str(tmp_path / "index"), "--shard_rows", "4",
            "--workers", "0"]
    with pytest.raises(DataError, match=r"2.png: unreadable or truncated image"):
        main(args + ["--out", str(tmp_path / "strict")])
    main(args + ["--out", str(tmp_path / "lenient"), "--skip_bad"])
    targets = open_box_targets(tmp_path / "lenient", index)
    offsets = index.arrays["box_offsets"]
    nan = np.isnan(targets).any(1)
    assert nan.tolist() == [offsets[2] <= r < offsets[3] for r in range(len(targets))]  # image 2's rows only
    assert np.isnan(targets[nan]).all() and np.isfinite(targets[~nan]).all()


@pytest.mark.slow
def test_an_out_folder_that_is_not_box_targets_is_one_error_line(weights, tmp_path):
    """python clip_image.py --out=<a folder of something else>: exit 2, one `error:` line naming the folder, and the
    folder untouched."""
    write_box_index(tmp_path, n_images=2, boxes_per_image=(2,))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me\n")
    cmd = [sys.executable, "clip_image.py", "--weights", str(weights["openai"]), "--index", str(tmp_path / "index"),
           "--out", str(tmp_path / "mine"), "--workers=0", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SSIW_TRACEBACK", None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'mine'} exists and is not a box-target "
                                                    "folder (no targets.json); choose another --out")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
