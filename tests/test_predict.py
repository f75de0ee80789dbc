"""predict.py: ids match a model built to agree with the labels, the unknown threshold, the embedding export, the CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from errors import ConfigError, LabelKeyError
import label_spec
import score_rules
import predict as pr
from transforms import eval_image
from inference import Protocol, resolve_precision
from label_spec import load_label_spec
from labels import LabelTable, save_label_table
from model import ModelConfig, build_model

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


class ColourModel(nn.Module):
    """Pixel embedding = the (normalised) colour itself, averaged over 4x4 cells: (B, 3, H, W) -> (B, 3, H/4, W/4).
    With a label embedding = the normalised colour of that label, a region of pure colour c has cosine 1 with c."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # so the model has a device

    def forward(self, x):
        return F.avg_pool2d(x, 4)


def colour_emb(names):
    """(N, 3) label embeddings: each name's pure colour as transforms.eval_image normalises it."""
    px = np.array([[RGB[n] for n in names]], np.uint8)                    # (1, N, 3)
    return F.normalize(eval_image(Image.fromarray(px))[:, 0].T, dim=1)    # (3, 1, N) -> (N, 3)


def write_stripes(path, colours, h=32, w=16):
    """Vertical stripes of pure colour, each w pixels wide (a multiple of 4, so the cells do not mix colours)."""
    img = np.concatenate([np.tile(np.array(RGB[c], np.uint8), (h, w, 1)) for c in colours], axis=1)
    Image.fromarray(img).save(path)
    return path


def stripe_ids(ids, n, w=16, margin=4):
    """The id of each stripe's interior (bilinear upsampling blends within ~4 px of a border)."""
    out = []
    for i in range(n):
        inner = ids[:, i * w + margin:(i + 1) * w - margin]
        assert (inner == inner.flat[0]).all(), f"stripe {i} is not one id: {np.unique(inner)}"
        out.append(int(inner.flat[0]))
    return out


PROTO = Protocol(base_size=0, sliding=False, precision="fp32")  # keep the image's size


def test_ids_follow_the_label_order(tmp_path):
    path = write_stripes(tmp_path / "a.png", ["red", "blue", "green", "red"])
    labels = ["blue", "green", "red"]                                      # ids 0, 1, 2
    out = pr.predict_images(ColourModel(), [path], labels, colour_emb(labels), 50.0, PROTO, tmp_path / "out")
    written = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    np.testing.assert_array_equal(written, out["a"])
    assert stripe_ids(written, 4) == [2, 0, 1, 2]
    assert Image.open(tmp_path / "out" / "a_overlay.png").size[1] > 32    # the legend strip below the image


def test_unknown_threshold(tmp_path):
    path = write_stripes(tmp_path / "a.png", ["red", "green", "blue"])
    labels = ["red", "blue"]                                               # no label fits green
    emb = colour_emb(labels)
    plain = pr.predict_images(ColourModel(), [path], labels, emb, 50.0, PROTO, tmp_path / "o1")["a"]
    assert score_rules.unknown_id(2) not in plain                                   # threshold off: every pixel gets a label
    ids = pr.predict_images(ColourModel(), [path], labels, emb, 50.0, PROTO, tmp_path / "o2", unknown_below=0.5)["a"]
    assert stripe_ids(ids, 3) == [0, 255, 1] and score_rules.unknown_id(2) == 255
    # the cosine of green with red and blue, by hand: the threshold sits between it and 1
    g = colour_emb(["green"])[0]
    assert float((emb @ g).max()) < 0.5
    everything = pr.predict_images(ColourModel(), [path], labels, emb, 50.0, PROTO, tmp_path / "o3",
                                   unknown_below=1.01)["a"]
    assert (everything == 255).all()


def test_the_printed_line_names_every_label_with_its_share(tmp_path, capsys):
    """Stripes of red, green (no label fits: unknown) and blue twice, labels red, blue and white: every label is
    printed with its share, largest first, the one that won no pixel too, and unknown's share last."""
    path = write_stripes(tmp_path / "a.png", ["red", "green", "blue", "blue"])
    labels = ["red", "blue", "white"]
    ids = pr.predict_images(ColourModel(), [path], labels, colour_emb(labels), 50.0, PROTO, tmp_path / "o",
                            unknown_below=0.5)["a"]
    share = {name: 100 * float((ids == i).mean()) for i, name in zip([0, 1, 2, 255], labels + ["unknown"])}
    assert share["blue"] > share["red"] > 0 and share["white"] == 0 and share["unknown"] > 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"[1/1] a.png: blue {share['blue']:.1f}%, red {share['red']:.1f}%, white 0.0%, "
                    f"unknown {share['unknown']:.1f}%")
    assert pr.share_line(np.array([[1, 1, 0, 1]], np.uint8), ["road", "sky"]) == "sky 75.0%, road 25.0%"


def test_300_labels_give_16_bit_ids(tmp_path):
    """Beyond 255 labels the ids and the unknown id (65535) live in a 16-bit PNG; below, PNGs stay 8-bit."""
    path = write_stripes(tmp_path / "a.png", ["red", "green", "blue"])
    labels = [f"filler{i}" for i in range(300)]
    labels[299], labels[260] = "red", "blue"                               # green is nobody's colour
    emb = colour_emb([n if n in RGB else "white" for n in labels])         # fillers: white, far from green
    ids = pr.predict_images(ColourModel(), [path], labels, emb, 50.0, PROTO, tmp_path / "o", unknown_below=0.5)["a"]
    assert ids.dtype == np.uint16 and score_rules.unknown_id(300) == 65535
    assert stripe_ids(ids, 3) == [299, 65535, 260]
    written = Image.open(tmp_path / "o" / "a.png")
    assert written.mode.startswith("I") and np.array_equal(np.asarray(written), ids)  # 16-bit grey, ids intact
    assert Image.open(tmp_path / "o" / "a_overlay.png").size[1] > 32
    with pytest.raises(ValueError, match="1..65535"):
        score_rules.unknown_id(65536)


def test_background_vocabulary_makes_its_pixels_unknown(tmp_path):
    path = write_stripes(tmp_path / "a.png", ["red", "green", "blue"])
    labels = ["red", "blue"]
    forced = pr.predict_images(ColourModel(), [path], labels, colour_emb(labels), 50.0, PROTO, tmp_path / "o1")["a"]
    assert stripe_ids(forced, 3)[1] in (0, 1)                              # green is forced into red or blue
    background = score_rules.background_labels("green,red", labels)                 # red is asked for: not background
    assert background == ["green"]
    emb = colour_emb(labels + background)                                  # (3, 3): rows past the labels = background
    ids = pr.predict_images(ColourModel(), [path], labels, emb, 50.0, PROTO, tmp_path / "o2")["a"]
    assert stripe_ids(ids, 3) == [0, score_rules.unknown_id(len(labels)), 1]
    assert score_rules.background_labels("default", ["sky", "deer"]) == [b for b in score_rules.DEFAULT_BACKGROUND if b != "sky"]
    assert set(score_rules.DEFAULT_BACKGROUND) <= set(load_label_spec().sentences)  # each has its sentence


def test_embedding_export_pca_reconstructs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 4, 4), nn.Tanh(), nn.Conv2d(6, 8, 1))  # (B, 3, H, W) -> (B, 8, H/4, W/4)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "r.png")
    emb = pr.pixel_embeddings(model, eval_image(Image.fromarray(rgb)), PROTO)  # (8, 8, 12)
    for k, tol in [(8, 1e-2), (3, None)]:
        pr.predict_images(model, [tmp_path / "r.png"], ["red", "blue"], F.normalize(torch.randn(2, 8), dim=1), 10.0,
                          PROTO, tmp_path / f"k{k}", export_emb=True, emb_dims=k)
        z = np.load(tmp_path / f"k{k}" / "r.npz")
        assert z["emb"].shape == (k, 8, 12) and z["emb"].dtype == np.float16 and z["basis"].shape == (k, 8)
        np.testing.assert_array_equal(z["ids"], np.asarray(Image.open(tmp_path / f"k{k}" / "r.png")))
        recon = np.einsum("kd,khw->dhw", z["basis"].astype(np.float32), z["emb"].astype(np.float32)) \
            + z["mean"][:, None, None]
        err = np.abs(recon - emb.numpy()).max()
        if tol:
            assert err < tol                                               # all 8 components: lossless but fp16
        else:
            # 3 components keep the 3 largest variances: the residual is what the other 5 carry
            x = emb.reshape(8, -1).T.double()
            ev = torch.linalg.eigvalsh(torch.cov(x.T))                     # ascending
            resid = ((recon - emb.numpy()) ** 2).sum(0).mean()
            assert resid == pytest.approx(float(ev[:5].sum()) * (x.shape[0] - 1) / x.shape[0], rel=2e-2)


def test_label_texts():
    spec = load_label_spec()
    assert label_spec.label_texts_for(["sky", "deer_antler"], spec=spec) == [spec.sentences["sky"], "deer antler"]
    assert label_spec.label_texts_for(["sky"], mode="word", spec=spec) == ["sky"]


def test_label_texts_from_user_yaml(tmp_path):
    (tmp_path / "s.yaml").write_text("sky: An image of heaven.\n")
    assert label_spec.label_texts_for(["sky"], str(tmp_path / "s.yaml")) == ["An image of heaven."]
    (tmp_path / "bad.yaml").write_text("- sky\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        label_spec.label_texts_for(["sky"], str(tmp_path / "bad.yaml"))


def test_cli_with_a_checkpoint_and_a_table(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_b0", embed_dim=32, drop_path_rate=0.0, dropout=0.0)
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy(), "step": 1},
               tmp_path / "ckpt.pt")
    names = ["deer", "grass", "sky"]
    rows = names + ["hill"]
    save_label_table(tmp_path / "t.pt", LabelTable(rows, rows, F.normalize(torch.randn(4, 32), dim=1), "random"))
    for i in range(2):
        write_stripes(tmp_path / f"im{i}.png", ["red", "green"], h=40, w=24)
    pr.main([f"--images={tmp_path}", "--labels=deer, grass,sky", f"--checkpoint={tmp_path / 'ckpt.pt'}",
             f"--embeddings={tmp_path / 't.pt'}", "--base_size=64", "--crop_size=64", "--device=cpu",
             f"--out_dir={tmp_path / 'out'}", "--unknown_below=0.0", "--background=sky,hill", "--mode=word"])
    meta = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert [meta["ids"][str(i)]["label"] for i in range(3)] == names and meta["unknown"] == 255
    assert meta["background"] == {"hill": "hill"}                         # sky is asked for: not background
    assert meta["precision"] == resolve_precision("auto", "cpu")          # what the network ran in, recorded
    for i in range(2):
        ids = np.asarray(Image.open(tmp_path / "out" / f"im{i}.png"))
        assert ids.shape == (40, 48) and set(np.unique(ids)) <= {0, 1, 2, 255}
    with pytest.raises(LabelKeyError, match="moose"):
        pr.main([f"--images={tmp_path / 'im0.png'}", "--labels=deer,moose", f"--checkpoint={tmp_path / 'ckpt.pt'}",
                 f"--embeddings={tmp_path / 't.pt'}", "--device=cpu", f"--out_dir={tmp_path / 'out2'}"])


@pytest.mark.parametrize("given, words", [("road,,sky", "label 2 of 3 is blank"), ("road, ", "label 2 of 2 is blank"),
                                          ("road,s\udcffky", "label 2 of 2 is not valid Unicode")])
def test_a_blank_label_is_refused_not_dropped(tmp_path, given, words):
    # dropping it would give sky id 1, against "label i gets id i"
    write_stripes(tmp_path / "im.png", ["red"])
    with pytest.raises(ConfigError, match=f"--labels={given!r}: {words}".replace("\\", "\\\\")):
        pr.main([f"--images={tmp_path / 'im.png'}", f"--labels={given}", "--checkpoint=none.pt", "--device=cpu",
                 f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"--background='wall,,car': label 2 of 3 is blank"):
        score_rules.background_labels("wall,,car", ["road"])
