"""clip_image.py: parity of the ViT image tower with HF CLIPVisionModelWithProjection on the same random weights, in
both checkpoint formats; strict loading; preprocessing; the box-target cache command on a synthetic COCO file."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from clip_image import CLIP_MEAN, CLIP_STD, box_crops, load_image_tower, main, preprocess  # noqa: E402
from errors import WeightsError  # noqa: E402

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


def test_preprocess_resizes_shorter_side_and_centre_crops():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = (255, 0, 0)  # left and right quarters red, middle half blue
    img[:, 16:48] = (0, 0, 255)
    img[:, 48:] = (255, 0, 0)
    x = preprocess(Image.fromarray(img), 16)  # 64x32 -> 32x16 -> centre 16x16 = the blue middle
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 4:12, 4:12].mean((1, 2)).numpy(), _normalised((0, 0, 255)), atol=1e-5)


def test_box_crops_cut_the_box_and_stretch_it():
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:20, 30:50] = (0, 255, 0)  # a 20x10 green box
    crops = box_crops(Image.fromarray(img), torch.tensor([[30.0, 10.0, 50.0, 20.0], [55.0, 35.0, 70.0, 45.0],
                                                          [5.0, 5.0, 5.0, 5.0]]), 16)
    assert crops.shape == (3, 3, 16, 16)
    green = torch.tensor(_normalised((0, 255, 0)), dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(crops[0], green.expand(3, 16, 16), atol=1e-5, rtol=0)  # whole box, aspect not kept
    black = torch.tensor(_normalised((0, 0, 0)), dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(crops[1], black.expand(3, 16, 16), atol=1e-5, rtol=0)  # clipped to the image
    torch.testing.assert_close(crops[2], black.expand(3, 16, 16), atol=1e-5, rtol=0)  # empty box: one pixel


def test_box_cache_command(weights, tmp_path):
    rng = np.random.default_rng(0)
    names = ["a.jpg", "b.png", "empty.png"]
    for i, n in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(tmp_path / n, quality=95)
    anns = [(0, [2, 3, 20, 30], 1), (1, [10, 5, 30, 20], 2), (0, [30, 10, 20, 25], 2), (1, [0, 0, 56, 48], 1),
            (0, [5, 5, 0, 0], 1)]  # interleaved images, a whole-image box, a degenerate box
    coco = {"images": [{"id": i, "file_name": n, "width": 56, "height": 40 + 8 * i} for i, n in enumerate(names)],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
            "annotations": [{"id": k, "image_id": i, "bbox": b, "category_id": c} for k, (i, b, c) in enumerate(anns)]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    out = tmp_path / "cache" / "o365.pt"
    main(["--weights", str(weights["openai"]), "--boxes", str(tmp_path / "boxes.json"), "--images", str(tmp_path),
          "--out", str(out), "--batch", "2"])  # batch 2: batches straddle images
    cache = torch.load(out, weights_only=True)
    assert not list(out.parent.glob("*.tmp")) and "openai.pt" in cache["encoder"]
    assert list(cache["targets"]) == names
    assert [tuple(t.shape) for t in cache["targets"].values()] == [(3, 48), (2, 48), (0, 48)]
    assert cache["targets"]["a.jpg"].dtype == torch.float16
    model = load_image_tower(weights["openai"])
    for name, rows in (("a.jpg", [0, 2, 4]), ("b.png", [1, 3])):  # rows in annotation order
        xyxy = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (anns[r][1] for r in rows)])
        with Image.open(tmp_path / name) as img, torch.no_grad():
            want = F.normalize(model.encode_image(box_crops(img, xyxy, 32)), dim=-1)
        torch.testing.assert_close(cache["targets"][name].float(), want, atol=2e-3, rtol=0)  # fp16 storage
    (tmp_path / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        main(["--weights", str(weights["openai"]), "--boxes", str(tmp_path / "boxes.json"), "--images",
              str(tmp_path), "--out", str(out)])
