"""model.py: shapes and modes, parameter counts against the published ones, numerical parity with HF transformers'
SegFormer on the same random weights, the folded decoders against the plain concat computation, similarity."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from errors import ConfigError
from model import ModelConfig, build_model, similarity, upsample_logits
from segformer import MIT_VARIANTS
from settings import parse_settings
from train import TrainSettings


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_published():
    with torch.device("meta"):  # sizes only: no memory, no init
        counts = {b: count(build_model(ModelConfig(backbone=b)).backbone) for b in MIT_VARIANTS}
        b5_ade = build_model(ModelConfig(backbone="mit_b5", embed_dim=150))  # SegFormer-B5, ADE20K's 150 classes
        ours = build_model(ModelConfig(backbone="mit_b5", embed_dim=512, aux_head=True))
        hrnet = build_model(ModelConfig(backbone="hrnet_w48", embed_dim=19))  # HRNetV2-W48, Cityscapes' 19
    print(f"\nMiT encoders: { {b: f'{n / 1e6:.2f}M' for b, n in counts.items()} }")
    # exact: the NVlabs ImageNet listings without their classifier (NOTES.md)
    assert counts == {"mit_b0": 3_319_392, "mit_b1": 13_151_424, "mit_b2": 24_196_288, "mit_b3": 44_072_128,
                      "mit_b4": 60_842_688, "mit_b5": 81_443_008}
    assert round(counts["mit_b5"] / 1e6, 1) == 81.4  # published MiT-B5
    seg = count(b5_ade) - 1  # minus logit_scale
    print(f"SegFormer-B5, 150-class head: {seg:,}")
    assert seg == 84_728_044 - 19_350  # the NVlabs listing minus its never-used conv_seg
    assert round(seg / 1e6, 1) == 84.7  # published SegFormer-B5
    n = count(ours)
    print(f"ours, MiT-B5 + 512-d head + aux head + logit_scale: {n:,} "
          f"(backbone {count(ours.backbone):,}, decoder {count(ours.decoder):,}, aux {count(ours.aux):,})")
    assert n - 1 == 85_922_496 - 66_048  # SSIW's listing minus conv_seg
    assert count(hrnet) - 1 == 65_859_379  # the HRNet-W48 Cityscapes listing; published 65.8M


@pytest.mark.parametrize("backbone", ["mit_b0", "hrnet_w18"])
def test_output_shapes_and_modes(backbone, one_thread):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embed_dim=24, aux_head=True, box_head=True, box_dim=16))
    x = torch.randn(2, 3, 64, 96)
    out = model.train()(x)
    assert out["emb"].shape == (2, 24, 16, 24)
    assert out["aux"].shape == (2, 24, 4, 6)
    assert out["box"].shape == (2, 16, 16, 24)
    sum(v.float().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and n != "logit_scale"]
    assert not no_grad, no_grad
    emb = model.eval()(x)
    assert torch.is_tensor(emb) and emb.shape == (2, 24, 16, 24)
    # batched == one at a time (eval BN), and channels_last input gives the same numbers
    # (relative to the largest value: an untrained HRNet in eval mode reaches ~1e8 with identity BN statistics)
    one = torch.cat([model(x[i:i + 1]) for i in range(2)])
    cl = model(x.contiguous(memory_format=torch.channels_last))
    for other in (one, cl):
        assert (other - emb).abs().max() <= 1e-5 * emb.abs().max()


def test_decoder_dim_sets_the_decoder_width_and_is_refused_where_it_has_no_meaning():
    with torch.device("meta"):  # sizes only
        def width(**kw):
            return build_model(ModelConfig(embed_dim=24, **kw)).decoder.fuse.out_channels
        assert width(backbone="mit_b0") == 256 and width(backbone="mit_b2") == 768  # 0 = the published widths
        assert width(backbone="efficientnet_lite0") == 256
        assert width(backbone="mit_b0", decoder_dim=128) == 128
        assert width(backbone="efficientnet_lite0", decoder_dim=96) == 96
        with pytest.raises(ConfigError, match="decoder_dim=64 is for MiT and EfficientNet"):
            build_model(ModelConfig(backbone="hrnet_w18", decoder_dim=64))
    with pytest.raises(ConfigError, match=r"decoder_dim=-1 must be >= 0"):
        parse_settings(TrainSettings, ["--decoder_dim=-1"])


def test_scale_is_clamped_temperature():
    model = build_model(ModelConfig(backbone="mit_b0", embed_dim=8))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0


def test_similarity_is_scaled_cosine():
    pixel = torch.zeros(1, 2, 1, 2)
    pixel[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # |.| = 5
    pixel[0, :, 0, 1] = torch.tensor([0.0, -2.0])
    labels = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    logits = similarity(pixel, labels, 10.0)
    assert logits.shape == (1, 2, 1, 2)
    # hand-derived: cos([3,4],[1,0]) = 0.6, cos([3,4],[0,1]) = 0.8, cos([0,-2],[1,0]) = 0, cos([0,-2],[0,1]) = -1
    expected = torch.tensor([[[[6.0, 0.0]], [[8.0, -10.0]]]])
    torch.testing.assert_close(logits, expected)
    up = upsample_logits(logits, (4, 8))
    assert up.shape == (1, 2, 4, 8) and up[0, 1, 0, 0] == 8.0 and up[0, 1, 0, -1] == -10.0


def test_folded_decoders_equal_concat_then_conv():
    """The heads run concat + 1x1 conv in a folded order; check against the literal computation."""
    torch.manual_seed(0)
    for backbone in ("mit_b0", "hrnet_w18"):
        model = build_model(ModelConfig(backbone=backbone, embed_dim=16)).eval()
        _randomise_bn(model)
        dims = model.backbone.dims
        # unit-scale features at strides 4..32 of a 68x100 image (sizes 17x25, 9x13, 5x7, 3x4)
        feats = [torch.randn(2, c, h, w) for c, (h, w) in zip(dims, [(17, 25), (9, 13), (5, 7), (3, 4)])]
        with torch.no_grad():
            dec = model.decoder
            size = feats[0].shape[2:]
            up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
            if backbone.startswith("mit"):  # SegFormerHead: Linear per stage, upsample, concat [c4, c3, c2, c1]
                parts = [up(proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:]))
                         for f, proj in zip(feats, dec.proj)]
                cat = torch.cat(parts[::-1], dim=1)
            else:  # seg_hrnet: upsample, concat [x0, x1, x2, x3]
                cat = torch.cat([feats[0]] + [up(f) for f in feats[1:]], dim=1)
            ref = dec.pred(F.relu(dec.bn(dec.fuse(cat))))
            torch.testing.assert_close(dec(feats), ref, atol=1e-5, rtol=1e-5)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


# ---------------------------------------------------------------------------------------------------------------
# parity with HF transformers (test-only oracle)

def _hf_key(ours: str):
    """Our key -> the transformers>=5 SegformerForSemanticSegmentation key(s) holding the same tensor."""
    m = re.match(r"backbone\.stages\.(\d)\.(.*)", ours)
    if m:
        s, rest = m[1], m[2]
        p = f"segformer.stages.{s}."
        rest = (rest.replace("patch_embed.norm.", "patch_embeddings.layer_norm.")
                .replace("patch_embed.proj.", "patch_embeddings.proj.")
                .replace("norm1.", "layernorm_before.").replace("norm2.", "layernorm_after.")
                .replace("attn.sr_norm.", "attention.sequence_reduction.layer_norm.")
                .replace("attn.sr.", "attention.sequence_reduction.sequence_reduction.")
                .replace("attn.q.", "attention.q_proj.").replace("attn.proj.", "attention.o_proj.")
                .replace("mlp.dwconv.", "mlp.dwconv.dwconv."))
        if rest.startswith("norm."):
            rest = "layer_norm." + rest[len("norm."):]
        if "attn.kv." in rest:  # one (2C, C) Linear in the original, split into k_proj / v_proj by HF
            return [p + rest.replace("attn.kv.", "attention.k_proj."), p + rest.replace("attn.kv.", "attention.v_proj.")]
        return [p + rest]
    m = re.match(r"decoder\.proj\.(\d)\.(.*)", ours)
    if m:
        return [f"decode_head.linear_projections.{m[1]}.proj.{m[2]}"]
    rest = ours[len("decoder."):]
    for a, b in (("fuse.", "linear_fuse."), ("bn.", "batch_norm."), ("pred.", "classifier.")):
        if rest.startswith(a):
            return ["decode_head." + b + rest[len(a):]]
    raise KeyError(ours)


def _hf_model(variant, embed_dim):
    transformers = pytest.importorskip("transformers")
    dims, depths = MIT_VARIANTS[variant]
    cfg = transformers.SegformerConfig(depths=depths, hidden_sizes=dims, decoder_hidden_size=256 if variant in (
        "mit_b0", "mit_b1") else 768, num_labels=embed_dim, hidden_dropout_prob=0.0, drop_path_rate=0.0)
    hf = transformers.SegformerForSemanticSegmentation(cfg).eval()
    # HF builds every LayerNorm with eps 1e-5; the original (and ours) use 1e-6 for block and stage norms. Give the
    # oracle the original's value so that the comparison tests the computation, not this known HF deviation.
    changed = 0
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) and re.search(r"layernorm_(before|after)$|stages\.\d\.layer_norm$", name):
            mod.eps = 1e-6
            changed += 1
    assert changed == 2 * sum(depths) + 4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make every tensor distinct so that a swapped pair cannot go unnoticed
        for name, t in hf.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.ndim == 1:  # norm weights around 1, biases around 0
                base = 1.0 if re.search(r"(norm|layer_norm|layernorm_\w+|batch_norm)\.weight$", name) else 0.0
                t.copy_(base + 0.05 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.02 * torch.randn(t.shape, generator=g))
    return hf


def _copy_hf_into_ours(hf, model):
    hf_sd = hf.state_dict()
    ours = {}
    used = set()
    for k, v in model.state_dict().items():
        if k.startswith(("backbone.", "decoder.")):
            names = _hf_key(k)
            ours[k] = torch.cat([hf_sd[n] for n in names]) if len(names) > 1 else hf_sd[names[0]]
            used.update(names)
        else:
            ours[k] = v
    assert used == set(hf_sd), set(hf_sd) ^ used  # every HF tensor has exactly one home in ours
    model.load_state_dict(ours, strict=True)


@pytest.mark.parametrize("variant,size", [("mit_b0", (64, 96)), ("mit_b0", (72, 100)), ("mit_b5", (64, 64))])
def test_parity_with_hf_segformer(variant, size):
    torch.manual_seed(0)
    hf = _hf_model(variant, embed_dim=512)
    model = build_model(ModelConfig(backbone=variant, embed_dim=512)).eval()
    _copy_hf_into_ours(hf, model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        feats = model.backbone(x)
        emb = model(x)
    errors = [(a - b).abs().max().item() for a, b in zip(feats, out.hidden_states)]
    errors.append((emb - out.logits).abs().max().item())
    print(f"\n{variant} {size}: max abs error, stages 1-4 and decoder: {['%.1e' % e for e in errors]}")
    assert [f.shape for f in feats] == [h.shape for h in out.hidden_states]
    assert emb.shape == out.logits.shape == (2, 512, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert max(errors) <= 1e-5
