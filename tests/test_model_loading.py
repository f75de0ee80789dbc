"""load_pretrained on every public checkpoint layout: a state dict is synthesised from each key listing in
../shared/fixtures/checkpoint-keys (random values, the listed shapes), saved in the file's container format,
loaded, and every tensor is checked BY VALUE at the place an independently written inverse map says it belongs."""
import re

import pytest
import torch

from checkpoints import load_pretrained
from errors import WeightsError
from model import ModelConfig, build_model


def read_listing(path):
    rows = []
    for line in path.read_text().splitlines():
        name, shape, kind = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split(",")) if shape else (), kind))
    return rows


def synthesise(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randint(0, 10**6, shape, generator=g) if name.endswith("num_batches_tracked")
                   else torch.randn(shape, generator=g)) for name, shape, _ in rows}


# --- inverse maps (ours -> public), written from the listings, independently of model.py's remaps -------------

def mit_public(k):  # backbone-relative
    s, rest = re.match(r"stages\.(\d)\.(.*)", k).groups()
    s = int(s) + 1
    if rest.startswith("patch_embed."):
        return f"patch_embed{s}." + rest[len("patch_embed."):]
    if rest.startswith("norm."):
        return f"norm{s}." + rest[len("norm."):]
    i, rest = re.match(r"blocks\.(\d+)\.(.*)", rest).groups()
    rest = rest.replace("attn.sr_norm.", "attn.norm.").replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    return f"block{s}.{i}.{rest}"


def head_public(k):  # decoder-relative
    m = re.match(r"proj\.(\d)\.(.*)", k)
    if m:
        return f"linear_c{int(m[1]) + 1}.proj.{m[2]}"
    for ours, theirs in (("fuse.", "linear_fuse.conv."), ("bn.", "linear_fuse.bn."), ("pred.", "linear_pred.")):
        if k.startswith(ours):
            return theirs + k[len(ours):]


def aux_public(k):
    for ours, theirs in (("conv.", "convs.0.conv."), ("bn.", "convs.0.bn."), ("pred.", "cls_seg.")):
        if k.startswith(ours):
            return theirs + k[len(ours):]


def hrnet_public(k):
    if k.startswith("backbone."):
        return k[len("backbone."):]
    for ours, theirs in (("decoder.fuse.", "last_layer.0."), ("decoder.bn.", "last_layer.1."),
                         ("decoder.pred.", "last_layer.3.")):
        if k.startswith(ours):
            return theirs + k[len(ours):]


def inverse(fmt, k):
    """Our key -> the public key that must hold its value, or None where the format has nothing for it."""
    part, rest = k.split(".", 1) if "." in k else (k, "")
    if fmt == "mit_imagenet":
        return mit_public(rest) if part == "backbone" else None
    if fmt == "segformer_seg":
        if part == "backbone":
            return "backbone." + mit_public(rest)
        if part == "decoder" and not rest.startswith("pred."):
            return "decode_head." + head_public(rest)
        return None
    if fmt == "ssiw":
        if part == "backbone":
            return "module.segmodel.encoder." + mit_public(rest)
        if part == "decoder":
            return "module.segmodel.head." + head_public(rest)
        if part == "aux":
            return "module.segmodel.auxi_net." + aux_public(rest)
        return None
    if fmt.startswith("hrnet"):
        pub = hrnet_public(k)
        if pub is None or (fmt == "hrnet_imagenet" and part == "decoder") or pub.startswith("last_layer.3."):
            return None
        return "model." + pub if fmt == "hrnet_fullmodel" else pub
    raise ValueError(fmt)


# listing -> (our backbone, container, format, expected dropped public keys, expected new (our) key prefixes)
CASES = {
    "mit_b0_imagenet": ("mit_b0", "raw", "mit_imagenet", r"^head\.", ("decoder.", "logit_scale")),
    "mit_b5_imagenet": ("mit_b5", "raw", "mit_imagenet", r"^head\.", ("decoder.", "aux.", "logit_scale")),
    "segformer_b5_ade_640": ("mit_b5", "mmseg", "segformer_seg", r"^decode_head\.(conv_seg|linear_pred)\.",
                             ("decoder.pred.", "aux.", "logit_scale")),
    "ssiw_segformer_7data": ("mit_b5", "state_dict", "ssiw", r"^module\.segmodel\.head\.conv_seg\.",
                             ("logit_scale",)),
    "hrnetv2_w48_imagenet": ("hrnet_w48", "raw", "hrnet_imagenet",
                             r"^(incre_modules|downsamp_modules|final_layer|classifier)\.", ("decoder.", "logit_scale")),
    "hrnet_w48_seg": ("hrnet_w48", "raw", "hrnet_seg", r"^last_layer\.3\.", ("decoder.pred.", "logit_scale")),
    "hrnet_w48_seg.fullmodel_saved": ("hrnet_w48", "state_dict", "hrnet_fullmodel",
                                      r"^(model\.last_layer\.3\.|loss\.criterion\.weight$)",
                                      ("decoder.pred.", "logit_scale")),
}
_models = {}


def get_model(backbone):
    """One model per backbone for the whole module (MiT-B5 and HRNet-W48 are 65-86M parameters)."""
    if backbone not in _models:
        torch.manual_seed(0)
        _models.clear()  # keep at most one large model alive
        _models[backbone] = build_model(ModelConfig(backbone=backbone, embed_dim=512, aux_head=backbone == "mit_b5"))
    return _models[backbone]


def save(sd, container, path):
    obj = {"raw": sd, "state_dict": {"state_dict": sd},
           "mmseg": {"meta": {"CLASSES": ["wall"]}, "state_dict": sd}}[container]
    torch.save(obj, path)


def check_landed(model, src, report, fmt, dropped_re, new_prefixes):
    expected_dropped = {k for k in src if re.search(dropped_re, k)}
    assert set(report["dropped"]) == expected_dropped
    sd = model.state_dict()
    seen = set()
    for k, v in sd.items():
        pub = inverse(fmt, k)
        if pub is None:
            assert k.startswith(new_prefixes), f"{k} has no public source but is not expected to be new"
            assert k in report["new"]
            continue
        assert torch.equal(v, src[pub]), f"{pub} did not land in {k}"
        seen.add(pub)
    # every tensor of the file either landed (once) or was deliberately dropped
    assert seen | expected_dropped == set(src) and not seen & expected_dropped
    assert report["loaded"] == len(seen)


@pytest.mark.slow
@pytest.mark.parametrize("listing", list(CASES))
def test_every_tensor_lands(listing, shared_dir, tmp_path):
    backbone, container, fmt, dropped_re, new_prefixes = CASES[listing]
    rows = read_listing(shared_dir / "fixtures" / "checkpoint-keys" / f"{listing}.keys.tsv")
    src = synthesise(rows)
    save(src, container, tmp_path / "ckpt.pth")
    model = get_model(backbone)
    report = load_pretrained(model, tmp_path / "ckpt.pth")
    assert report["format"] == fmt
    check_landed(model, src, report, fmt, dropped_re, new_prefixes)


@pytest.mark.slow
def test_ssiw_temperature_and_criterion(shared_dir, tmp_path):
    """segformer_7data.pth may also hold criterion.0.logit_scale (taken) and criterion.0.criterion.weight (dropped)."""
    rows = read_listing(shared_dir / "fixtures" / "checkpoint-keys" / "ssiw_segformer_7data.keys.tsv")
    src = synthesise(rows, seed=1)
    src["module.criterion.0.logit_scale"] = torch.tensor([4.2])
    src["module.criterion.0.criterion.weight"] = torch.rand(194)
    save(src, "state_dict", tmp_path / "ckpt.pth")
    model = get_model("mit_b5")
    report = load_pretrained(model, tmp_path / "ckpt.pth")
    assert model.logit_scale.item() == pytest.approx(4.2) and report["logit_scale"] == pytest.approx(4.2)
    assert report["dropped"]["module.criterion.0.criterion.weight"] == "training criterion state"
    assert not report["new"]


# --- bad files raise, naming the key ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def b0_src(shared_dir):
    return synthesise(read_listing(shared_dir / "fixtures" / "checkpoint-keys" / "mit_b0_imagenet.keys.tsv"))


def test_wrong_shape_raises_naming_key(b0_src, tmp_path):
    src = dict(b0_src)
    src["block2.1.attn.kv.weight"] = torch.randn(64, 64)
    save(src, "raw", tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"block2\.1\.attn\.kv\.weight.*\(64, 64\).*stages\.1\.blocks\.1\.attn\.kv"):
        load_pretrained(build_model(ModelConfig(backbone="mit_b0")), tmp_path / "bad.pth")


def test_missing_key_raises_naming_it(b0_src, tmp_path):
    src = dict(b0_src)
    del src["block4.1.mlp.dwconv.dwconv.bias"]
    save(src, "raw", tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"stages\.3\.blocks\.1\.mlp\.dwconv\.bias"):
        load_pretrained(build_model(ModelConfig(backbone="mit_b0")), tmp_path / "bad.pth")


def test_extra_key_raises_naming_it(b0_src, tmp_path):
    src = dict(b0_src)
    src["block1.0.attn.rel_pos.weight"] = torch.randn(3)
    save(src, "raw", tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"block1\.0\.attn\.rel_pos\.weight"):
        load_pretrained(build_model(ModelConfig(backbone="mit_b0")), tmp_path / "bad.pth")


def test_wrong_variant_raises(b0_src, tmp_path):
    save(b0_src, "raw", tmp_path / "b0.pth")  # mit_b0 weights into a mit_b1 model: the first shape differs
    with pytest.raises(WeightsError, match=r"mit_b1.*patch_embed1\.proj\.weight.*\(32, 3, 7, 7\)"):
        load_pretrained(build_model(ModelConfig(backbone="mit_b1")), tmp_path / "b0.pth")
