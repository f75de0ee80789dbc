"""evaluate.py: mIoU against numpy, the MSeg protocol's invariants (inference.py), distributed == single process,
the CLI end to end."""
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

import dataset_yaml
import evaluation
import overlays
import evaluate as ev
from errors import ConfigError, LabelKeyError
import inference as inf
from label_source import label_embeddings
from transforms import eval_image
from label_spec import LabelSpec, label_texts, load_label_spec
from labels import LabelTable, save_label_table
from model import ModelConfig, build_model, similarity


class PatchModel(nn.Module):
    """A stand-in network: (B, 3, H, W) -> (B, D, H/stride, W/stride), a patchify conv then a 1x1 conv.

    With stride 1 each output pixel is a function of its input pixel alone, so padding, windowing and mirroring the
    input cannot change it: sliding-window and whole-image inference must then agree exactly.
    """

    def __init__(self, dim=8, stride=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, 16, stride, stride)
        self.proj = nn.Conv2d(16, dim, 1)

    def forward(self, x):
        return self.proj(torch.tanh(self.patch(x)))  # (B, 3, H, W) -> (B, D, H/s, W/s)


def random_image(h, w, seed=0):
    """(3, H, W) ImageNet-normalised, as transforms.eval_image returns."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return eval_image(Image.fromarray(rgb))


def label_emb(n=5, dim=8, seed=1):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)  # (N, D)


# ---------------------------------------------------------------------------------------------------------------

def numpy_iou(pred, target, n):
    """Independent per-class IoU: loop over classes, count with boolean masks."""
    valid = (target >= 0) & (target < n)
    ious = []
    for c in range(n):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
    return np.array(ious)


def test_miou_equals_numpy_on_random_predictions():
    rng = np.random.default_rng(0)
    n = 7
    pred = rng.integers(0, n, (4, 50, 60))
    target = rng.integers(-1, n, (4, 50, 60))      # -1 = ignore
    target[0, :10] = 255                           # an out-of-range id is ignored too
    target[target == 6] = 5                        # class 6 never in the ground truth ...
    pred[pred == 6] = 0                            # ... nor predicted: its IoU is undefined
    conf = sum(evaluation.confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), n) for p, t in zip(pred, target))
    m = evaluation.metrics_from_confusion(conf)
    want = numpy_iou(pred, target, n)
    np.testing.assert_allclose(m["iou"], want, rtol=1e-12)
    assert math.isnan(m["iou"][6])
    assert m["miou"] == pytest.approx(np.nanmean(want), rel=1e-12)
    assert m["miou_mseg"] == pytest.approx(np.nan_to_num(want).mean(), rel=1e-12)
    valid = (target >= 0) & (target < n)
    assert m["allacc"] == pytest.approx(np.mean(pred[valid] == target[valid]), rel=1e-12)
    assert conf.sum() == valid.sum()


def test_window_grid_follows_mseg():
    # hand-derived with MSeg's formulas: stride = ceil(640 * 2/3) = 427, n = ceil((size - crop) / stride) + 1
    assert inf.window_starts(640, 640, 427) == [0]
    assert inf.window_starts(720, 640, 427) == [0, 80]
    assert inf.window_starts(1280, 640, 427) == [0, 427, 640]
    assert inf.resize_short_side(torch.zeros(1, 3, 360, 480), 720).shape[-2:] == (720, 960)
    assert inf.resize_short_side(torch.zeros(1, 3, 683, 512), 360).shape[-2:] == (480, 360)  # round(360/512*683)


def test_single_scale_without_flip_is_the_plain_forward():
    # float64 throughout: float32 results here moved by ~1e-4 between test orders (allocation-dependent kernels),
    # which would hide a protocol error of that size; in float64 the two paths must agree to rounding
    model, emb, scale = PatchModel(stride=4).eval().double(), label_emb().double(), 20.0
    image = random_image(48, 72).double()          # shorter side 48 -> 64: (64, 96), multiples of 32, so no padding
    proto = inf.Protocol(base_size=64, scales=[1.0], flip=False, sliding=False, precision="fp32")
    prob, _ = inf.infer(model, image, emb, scale, proto)
    # the plain forward, written out: resize, network, cosine x scale, upsample, softmax, resize back
    x = F.interpolate(image[None], size=(64, 96), mode="bilinear", align_corners=False)  # (1, 3, 64, 96)
    with torch.no_grad():
        logits = similarity(model(x), emb, scale)                          # (1, N, 16, 24)
    logits = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    want = F.interpolate(logits.softmax(1), size=(48, 72), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(prob, want, atol=1e-10, rtol=0)
    assert torch.equal(prob.argmax(0), want.argmax(0))


@pytest.mark.parametrize("crop,flip", [(48, False), (80, False), (48, True)])
def test_sliding_window_covering_the_image_equals_whole_image(crop, flip):
    model, emb = PatchModel(stride=1).eval(), label_emb()
    image = random_image(48, 72)                   # -> (64, 96) at base size 64
    whole = inf.Protocol(base_size=64, sliding=False, precision="fp32")
    slide = inf.Protocol(base_size=64, crop_size=crop, sliding=True, flip=flip, window_batch=2, precision="fp32")
    stride = math.ceil(crop * 2 / 3)
    n_windows = len(inf.window_starts(max(64, crop), crop, stride)) * len(inf.window_starts(max(96, crop), crop, stride))
    assert n_windows > 1                           # overlapping windows (crop 80 also pads the height)
    a, cos_a = inf.infer(model, image, emb, 20.0, whole, with_cos=True)
    b, cos_b = inf.infer(model, image, emb, 20.0, slide, with_cos=True)
    # per-pixel model: each pixel's scores are the same in every window; averaging k equal floats may move 1 ulp
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(cos_a, cos_b, atol=1e-6, rtol=0)
    assert torch.equal(a.argmax(0), b.argmax(0))


@pytest.mark.parametrize("batch", [2, 5, 64])
def test_windows_batched_across_scales_and_flips_equal_one_window_at_a_time(batch):
    # the scales' windows counted by hand: at base 64, crop 32, stride ceil(32 * 2/3) = 22 -> window_starts:
    # 0.5: 32x45 -> 1x2 windows; 1.0: 64x90 -> 3x4; 1.5: 96x134 -> 4x6; 38 in all, so batches of 2 and 5 span scales
    model, emb = PatchModel(stride=4).eval(), label_emb()
    image = random_image(40, 56)
    proto = dict(base_size=64, crop_size=32, scales=[0.5, 1.0, 1.5], flip=True, precision="fp32")
    one, cos_one = inf.infer(model, image, emb, 10.0, inf.Protocol(**proto, window_batch=1), with_cos=True)
    many, cos_many = inf.infer(model, image, emb, 10.0, inf.Protocol(**proto, window_batch=batch), with_cos=True)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=0)
    torch.testing.assert_close(cos_many, cos_one, atol=1e-6, rtol=0)
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    inf.infer(model, image, emb, 10.0, inf.Protocol(**proto, window_batch=batch))
    assert sum(calls) == 2 * 38 and calls[0] == 2 * min(batch, 38)  # every window and its mirror image, once


def test_multi_scale_is_the_mean_of_single_scales():
    model, emb = PatchModel(stride=4).eval(), label_emb()
    image = random_image(40, 56)
    proto = dict(base_size=64, crop_size=64, precision="fp32")
    one = [inf.infer(model, image, emb, 10.0, inf.Protocol(**proto, scales=[s]))[0] for s in (0.5, 1.0, 1.5)]
    multi, _ = inf.infer(model, image, emb, 10.0, inf.Protocol(**proto, scales=[0.5, 1.0, 1.5]))
    torch.testing.assert_close(multi, sum(one) / 3, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# distributed == single process

class ListSamples:
    """(image, target, stem) items made from a seed, the same in every process."""

    def __init__(self, n=5, classes=5):
        rng = np.random.default_rng(3)
        sizes = [(40, 56), (48, 48), (56, 40), (40, 64), (44, 52)]
        self.items = [(random_image(*sizes[i % 5], seed=i),
                       torch.from_numpy(rng.integers(-1, classes, sizes[i % 5])), f"im{i}") for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


PROTO = inf.Protocol(base_size=48, crop_size=32, scales=[1.0, 1.25], flip=True, precision="fp32")


def _distributed_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        conf = evaluation.evaluate_images(PatchModel(stride=4).eval(), ListSamples(), label_emb(), 10.0, PROTO, rank, world)
        if rank == 0:
            torch.save(conf, out_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_two_gloo_processes_equal_single_process(tmp_path):
    single = evaluation.evaluate_images(PatchModel(stride=4).eval(), ListSamples(), label_emb(), 10.0, PROTO)
    out = tmp_path / "conf.pt"
    mp.spawn(_distributed_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    both = torch.load(out)
    assert single.sum() > 0 and torch.equal(both, single)


# ---------------------------------------------------------------------------------------------------------------
# the CLI on a tiny dataset in the SegNet CamVid format, with a tiny random MiT-B0 checkpoint

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]


def write_tiny_camvid(root, n=3, h=40, w=56):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        Image.fromarray(rng.integers(0, 12, (h, w), dtype=np.uint8)).save(root / "lab" / f"{i}.png")  # 11 = ignore
        lines.append(f"img/{i}.png lab/{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    (root / "names.txt").write_text("\n".join(CAMVID) + "\n")
    yaml_path = root / "tiny.yaml"
    yaml_path.write_text(f"name: tiny-camvid\nroot: {root}\nlist: val.txt\nnames: names.txt\n"
                         f"taxonomy: camvid-segnet\nencoding: id\nignore: [11]\n")
    return yaml_path


def write_checkpoint(path, dim=32):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_b0", embed_dim=dim, drop_path_rate=0.0, dropout=0.0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "model_args": cfg.__dict__.copy(), "label_names": [], "config": {},
                "step": 7}, path)


def write_table(path, keys, dim=32):
    emb = F.normalize(torch.randn(len(keys), dim, generator=torch.Generator().manual_seed(2)), dim=1)
    save_label_table(path, LabelTable(list(keys), [""] * len(keys), emb, "random test table"))


def write_tiny_run(folder):
    """A tiny CamVid-shaped dataset, a random MiT-B0 checkpoint and a random table of every label key, in `folder`:
    (dataset YAML, checkpoint, table) paths, for the tools that evaluate a checkpoint."""
    write_checkpoint(folder / "ckpt.pt")
    write_table(folder / "table.pt", sorted(load_label_spec().sentences))
    return write_tiny_camvid(folder / "data"), folder / "ckpt.pt", folder / "table.pt"


def test_evaluate_cli_end_to_end(tmp_path):
    yaml_path = write_tiny_camvid(tmp_path / "data")
    write_checkpoint(tmp_path / "ckpt.pt")
    spec = load_label_spec()
    keys = list(spec.datasets["camvid-segnet"].values())
    write_table(tmp_path / "table.pt", keys)
    args = [f"--dataset={yaml_path}", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--embeddings={tmp_path / 'table.pt'}",
            "--base_size=64", "--crop_size=64", "--device=cpu", f"--out_dir={tmp_path / 'out'}",
            f"--save_pred={tmp_path / 'pred'}", "--print_every=1"]
    ev.main(args)
    result = json.loads((tmp_path / "out" / "tiny-camvid_64_ss_sentence.json").read_text())
    labels = np.stack([np.asarray(Image.open(tmp_path / "data" / "lab" / f"{i}.png")) for i in range(3)])
    conf = np.array(result["confusion"])
    assert conf.shape == (11, 11) and conf.sum() == np.sum(labels != 11)
    np.testing.assert_array_equal(conf.sum(1), [np.sum(labels == c) for c in range(11)])
    # the saved id PNGs are raw CamVid ids, and re-scoring them gives the same confusion matrix
    preds = np.stack([np.asarray(Image.open(tmp_path / "pred" / f"{i}.png")) for i in range(3)])
    again = evaluation.confusion_matrix(torch.from_numpy(preds.astype(np.int64)),
                                torch.from_numpy(np.where(labels == 11, -1, labels).astype(np.int64)), 11)
    np.testing.assert_array_equal(again.numpy(), conf)
    assert (tmp_path / "pred" / "0_overlay.png").is_file()
    assert "| Sky | sky |" in (tmp_path / "out" / "tiny-camvid_64_ss_sentence.md").read_text()

    write_table(tmp_path / "short.pt", [k for k in keys if k != "pole"])
    with pytest.raises(LabelKeyError, match="pole"):
        ev.main(args[:2] + [f"--embeddings={tmp_path / 'short.pt'}"] + args[3:])


def test_save_prediction_png_depth_follows_the_label_count(tmp_path):
    image = np.zeros((4, 6, 3), np.uint8)
    ids = np.arange(24).reshape(4, 6) * 12                                # up to 276
    overlays.save_prediction(tmp_path, "wide", image, ids, [f"c{i}" for i in range(300)])
    assert np.asarray(Image.open(tmp_path / "wide.png")).dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "wide.png")), ids)
    overlays.save_prediction(tmp_path, "byte", image, ids % 256, [f"c{i}" for i in range(256)])
    assert np.asarray(Image.open(tmp_path / "byte.png")).dtype == np.uint8  # 256 classes: ids 0..255 fit a byte
    with pytest.raises(ValueError, match=r"ids \[264, 276\] are neither label ids 0..255"):
        overlays.save_prediction(tmp_path, "bad", image, ids, [f"c{i}" for i in range(256)])


def test_evaluate_saves_raw_ids_of_300_classes(tmp_path, monkeypatch):
    """A dataset of 300 classes (ADE20K-847 and OpenImages + Objects365 pseudo-labels are larger still): 16-bit label
    files in, 16-bit raw-id predictions out, re-scored to the same confusion matrix."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        Image.fromarray(rng.integers(250, 300, (40, 56)).astype(np.uint16)).save(root / "lab" / f"{i}.png")
    (root / "val.txt").write_text("img/0.png lab/0.png\nimg/1.png lab/1.png\n")
    names = [f"class{i}" for i in range(300)]
    (root / "names.txt").write_text("\n".join(names) + "\n")
    (root / "wide.yaml").write_text(f"name: wide\nroot: {root}\nlist: val.txt\nnames: names.txt\nencoding: id\n"
                                    f"ignore: [65535]\n")
    keys = [f"key{i}" for i in range(300)]
    spec = LabelSpec({k: f"An image of {k}." for k in keys}, {"wide": dict(zip(names, keys))})
    monkeypatch.setattr(dataset_yaml, "load_label_spec", lambda: spec)
    write_checkpoint(tmp_path / "ckpt.pt")
    write_table(tmp_path / "table.pt", keys)
    ev.main([f"--dataset={root / 'wide.yaml'}", f"--checkpoint={tmp_path / 'ckpt.pt'}",
             f"--embeddings={tmp_path / 'table.pt'}", "--base_size=64", "--crop_size=64", "--device=cpu",
             f"--out_dir={tmp_path / 'out'}", f"--save_pred={tmp_path / 'pred'}"])
    conf = np.array(json.loads((tmp_path / "out" / "wide_64_ss_sentence.json").read_text())["confusion"])
    preds = [np.asarray(Image.open(tmp_path / "pred" / f"{i}.png")) for i in range(2)]
    assert all(p.dtype == np.uint16 for p in preds)
    labels = [np.asarray(Image.open(root / "lab" / f"{i}.png")).astype(np.int64) for i in range(2)]
    again = sum(evaluation.confusion_matrix(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(t), 300)
                for p, t in zip(preds, labels))
    np.testing.assert_array_equal(again.numpy(), conf)
    assert conf.sum() == 2 * 40 * 56 and conf[250:].sum() == conf.sum()


def test_label_embeddings_from_clip_weights_sentence_and_word(tmp_path):
    import clip_text
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=32))
    torch.save(tower.state_dict(), tmp_path / "clip.pt")                   # a plain OpenAI-format state dict
    spec = load_label_spec()
    keys = ["sky", "sidewalk_pavement"]
    sentences, words = label_texts(spec, keys, "sentence"), label_texts(spec, keys, "word")
    assert words == ["sky", "sidewalk pavement"] and sentences[0].startswith("An image of")
    got = label_embeddings(keys, sentences, clip_weights=str(tmp_path / "clip.pt"))
    torch.testing.assert_close(got, clip_text.encode_sentences(tower.eval(), sentences))
    got_words = label_embeddings(keys, words, clip_weights=str(tmp_path / "clip.pt"))
    torch.testing.assert_close(got_words, clip_text.encode_sentences(tower, words))
    assert not torch.allclose(got, got_words)
    with pytest.raises(ConfigError, match="--embeddings"):
        label_embeddings(keys, sentences)
    # without --embeddings / --clip_weights: the rows of the table the checkpoint was trained with, by key
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    trained = {"names": ["road", "sky", "sidewalk_pavement"], "sentences": ["", "", ""], "embeddings": emb,
               "encoder": "test"}
    torch.testing.assert_close(label_embeddings(keys, sentences, trained_table=trained), emb[[1, 2]])


def shipped_dataset(name, data_root):
    """A shipped dataset YAML read from the README's data root."""
    return evaluation.EvalDataset(*dataset_yaml.load_dataset_config(name, data_root=str(data_root)))


@pytest.mark.slow
def test_shipped_dataset_yamls_read_the_downloaded_layouts(data_root):
    camvid = shipped_dataset("camvid-segnet", data_root)
    assert len(camvid) == 101 and camvid.class_names == CAMVID
    image, target, stem = camvid[0]
    raw = np.asarray(Image.open(camvid.source.samples.label_path(0))).astype(np.int64)
    assert image.shape == (3, 360, 480) and stem == "0016E5_07959"
    np.testing.assert_array_equal(target.numpy(), np.where(raw == 11, -1, raw))
    facade = shipped_dataset("labelmefacade", data_root)
    tests = (data_root / "labelmefacade" / "test.txt").read_text().split("\n")
    assert len(facade) == len([line for line in tests if line.strip()]) and len(facade.class_names) == 8 and "various" not in facade.class_names
    image, target, _ = facade[0]
    rgb = np.asarray(Image.open(facade.source.samples.label_path(0)).convert("RGB"))
    assert target.shape == image.shape[1:]
    np.testing.assert_array_equal(target.numpy() == -1, (rgb == 0).all(-1))  # black = various = ignored
    assert (target.numpy()[(rgb == (0, 0, 128)).all(-1)] == facade.class_names.index("window")).all()
    # the seen-only variant: the same pixels, window and door (navy, olive) ignored, the other six classes kept
    seen = shipped_dataset("labelmefacade-seen", data_root)
    assert seen.keys == ["building", "car", "sidewalk_pavement", "road", "sky", "vegetation"]
    _, seen_target, _ = seen[0]
    dropped = (rgb == 0).all(-1) | (rgb == (0, 0, 128)).all(-1) | (rgb == (128, 128, 0)).all(-1)
    np.testing.assert_array_equal(seen_target.numpy() == -1, dropped)
    kept = [facade.keys.index(k) for k in seen.keys]  # the full variant's index of each kept class
    np.testing.assert_array_equal(np.asarray(kept)[seen_target.numpy()[~dropped]], target.numpy()[~dropped])


@pytest.mark.parametrize("name", ["camvid-11", "kitti-19", "voc2012", "pascal-context-60", "scannet-20",
                                  "wilddash-19", "nyuv2-40"])
def test_mseg_dataset_yamls_match_names_files_and_taxonomy(name, shared_dir):
    d = yaml.safe_load((dataset_yaml.EVAL_CONFIGS / f"{name}.yaml").read_text())
    assert set(d["class_names"]) <= set(load_label_spec().datasets[d["taxonomy"]])
    names_file = shared_dir / "data" / "mseg-lists" / "dataset_lists" / name / f"{name}_names.txt"
    if name != "nyuv2-40":  # MSeg's own names file: same classes, same order (line index = id)
        assert d["class_names"] == [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    with pytest.raises(ConfigError, match="--root") as missing:
        dataset_yaml.load_dataset_config(name)
    assert f"configs/eval/{name}.yaml says where the data comes from" in missing.value.hint


def test_mseg_camvid_without_data_names_the_segnet_copy_in_the_data_root(tmp_path):
    """A user holding README.md's CamVid (data/camvid-11, the SegNet layout) who asks for MSeg's camvid is told which
    --dataset reads what they have; without that folder the message does not mention it."""
    with pytest.raises(ConfigError) as without:
        dataset_yaml.load_dataset_config("camvid", data_root=str(tmp_path))
    assert "camvid-segnet" not in str(without.value)
    (tmp_path / "camvid-11").mkdir()
    with pytest.raises(ConfigError, match="--root DIR") as held:
        dataset_yaml.load_dataset_config("camvid", data_root=str(tmp_path))
    assert str(held.value).endswith(f"; or --dataset=camvid-segnet, which reads the copy in {tmp_path / 'camvid-11'}")
    assert "mseg_download_camvid.sh" in held.value.hint  # MSeg's instructions stay, above the error line
    with pytest.raises(ConfigError) as kitti:
        dataset_yaml.load_dataset_config("kitti", data_root=str(tmp_path))
    assert "camvid-segnet" not in str(kitti.value)


def test_window_batch_auto_is_one_window_on_a_cpu_and_four_on_a_gpu():
    assert inf.window_batch(0, "cpu") == 1 and inf.window_batch(0, "cuda:0") == 4
    assert inf.window_batch(3, "cpu") == 3 and inf.window_batch(3, torch.device("cuda")) == 3


@pytest.mark.slow
def test_labelmefacade_own_lists_name_the_image_alone(tmp_path, data_root):
    """The repository's own train.txt/test.txt hold `images/X.jpg` alone: the label is labels/X.png. The same images
    with `image label` pairs per line (a copy's lists) give the same samples."""
    own, paired = tmp_path / "own" / "labelmefacade", tmp_path / "paired" / "labelmefacade"
    lines = [line.split() for line in (data_root / "labelmefacade" / "test.txt").read_text().splitlines() if line.strip()]
    for folder, text in ((own, "".join(f[0] + "\n" for f in lines)),
                         (paired, "".join(f"{f[0]} labels/{Path(f[0]).stem}.png\n" for f in lines))):
        folder.mkdir(parents=True)
        for sub in ("images", "labels"):
            (folder / sub).symlink_to(data_root / "labelmefacade" / sub)
        (folder / "test.txt").write_text(text)
    alone = shipped_dataset("labelmefacade", tmp_path / "own")
    pairs = shipped_dataset("labelmefacade", tmp_path / "paired")
    assert len(alone) == len(pairs) == len(lines) > 0
    assert [str(alone.source.samples.label_path(i)) for i in (0, len(lines) - 1)] == \
        [str(pairs.source.samples.label_path(i)).replace("paired", "own") for i in (0, len(lines) - 1)]
    assert alone.source.samples.label_path(0).is_file()


def test_a_label_has_one_colour_in_every_dataset_and_label_set():
    """Colours come from the label's name: Cityscapes' for the common street labels, a hash of the name otherwise,
    so road is the same purple whichever dataset or label list names it."""
    assert overlays.label_colour("road") == overlays.label_colour(" Road ") == (128, 64, 128)
    assert overlays.label_colour("sidewalk pavement") == overlays.label_colour("sidewalk_pavement") == (244, 35, 232)
    tower = overlays.label_colour("tower")
    assert tower == overlays.label_colour("tower") and tower != overlays.UNKNOWN_COLOUR
    assert all(0 <= c <= 255 for c in tower) and tower != overlays.label_colour("towers")
    # a named colour stays clear of every Cityscapes colour (window was a green next to vegetation's)
    assert overlays.label_colour("window") != overlays.label_colour("vegetation")
    for name in ["window", "door", "awning", "tower"] + [f"label {i}" for i in range(500)]:
        lab = overlays.cielab(overlays.label_colour(name))
        assert min(math.dist(lab, overlays.cielab(c)) for c in overlays.KNOWN_COLOURS.values()) >= 30, name
    assert math.dist(overlays.cielab((97, 179, 46)), overlays.cielab(overlays.KNOWN_COLOURS["vegetation"])) < 30
    assert overlays.cielab((255, 255, 255)) == pytest.approx((100, 0, 0), abs=0.05)  # D65 white
    assert overlays.cielab((255, 0, 0)) == pytest.approx((53.24, 80.09, 67.20), abs=0.05)  # sRGB red's published Lab
    a, _ = overlays.colour_map(np.array([[0, 1]]), ["sky", "road"])
    b, _ = overlays.colour_map(np.array([[1, 0]]), ["road", "sky"])
    assert (a == b).all()  # the same labels in another order: the same picture
