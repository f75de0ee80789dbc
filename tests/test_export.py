"""export.py: the ONNX graphs, run in onnxruntime, against evaluate.py's whole-image protocol in torch
(inference.whole_image_scores / infer), at several image sizes from one export: labels baked in, and labels as an
input (any number, or padded to a static number); on real CamVid images; named dimensions; the command line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import onnx
    import onnxruntime as ort
except ImportError as e:  # tests/run.sh installs both from requirements-dev.txt
    pytest.skip(f"export tests need onnx and onnxruntime (pip install -r requirements-dev.txt): {e}",
                allow_module_level=True)

import onnx_export
import export as ex
from errors import ConfigError
from inference import Protocol, infer, whole_image_scores
from labels import LabelTable, save_label_table
from model import ModelConfig, build_model
from images import decode_rgb, open_image
from test_evaluate import write_tiny_run
from tools import bench_export
from transforms import eval_image

BACKBONES = ["mit_b0", "efficientnet_lite0"]


def random_model(backbone):
    """A random-weight model of embedding width 16, BatchNorm statistics away from 0/1 (so the exported BN is
    exercised)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embed_dim=16)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return model


def ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=BACKBONES)
def exported(request, tmp_path_factory):
    """(torch model, label embeddings (5, 16), temperature, onnxruntime session) of one random-weight export."""
    model = random_model(request.param)
    label_emb = F.normalize(torch.randn(5, 16), dim=-1)
    path = tmp_path_factory.mktemp(request.param) / "m.onnx"
    onnx_export.export(onnx_export.Segmenter(model, label_emb, 14.0, with_emb=True), path)
    return model, label_emb, 14.0, ort_session(path)


def assert_same_labels(ids, score, prob):
    """ids, score (1, H, W) from onnxruntime against the torch protocol's probabilities prob (N, H, W): the same
    best score, and the same label wherever the best label wins by more than float noise; at a tie within it
    (random weights make a few: 1 pixel of 172800 at a margin of 3e-6) either label may win, but it must be one of
    the tied best."""
    top2 = prob.topk(min(2, len(prob)), 0).values.numpy()                 # (2, H, W), or (1, H, W) for 1 label
    assert ids.shape == score.shape == (1, *prob.shape[1:]) and ids.dtype == np.int64
    assert np.abs(score[0] - top2[0]).max() <= 1e-4
    chosen = np.take_along_axis(prob.numpy(), ids, 0)[0]                   # torch's probability of onnx's pick
    assert (chosen >= top2[0] - 1e-4).all()                                # where they differ: a tie within 1e-4
    differ = ids[0] != prob.argmax(0).numpy()
    assert differ.mean() < 1e-3, f"{differ.sum()} of {differ.size} pixels labelled differently"


def check_against_torch(exported, image):
    """image (1, 3, H, W): onnxruntime's ids and scores against the torch protocol's. Returns onnxruntime's
    embeddings."""
    model, label_emb, scale, session = exported
    ids, score, emb = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        prob = whole_image_scores(model, image, label_emb, scale, flip=False)   # (N, H, W)
    assert_same_labels(ids, score, prob)
    return emb


@pytest.mark.parametrize("h, w", [(64, 96), (50, 70)])  # a multiple of 32, and one the graph pads
def test_onnx_matches_torch_at_any_size(exported, h, w):
    torch.manual_seed(h)
    image = torch.randn(1, 3, h, w)
    emb = check_against_torch(exported, image)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32                         # padded up to multiples of 32
    assert emb.shape == (1, 16, hp // 4, wp // 4)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)        # L2-normalised per pixel


@pytest.mark.slow
def test_onnx_matches_torch_on_real_images(exported, data_root):
    for path in sorted((data_root / "camvid-11" / "val").glob("*.png"))[:2]:
        image = eval_image(decode_rgb(open_image(path), path))[None]       # (1, 3, 360, 480)
        assert image.shape[-2:] == (360, 480)
        check_against_torch(exported, image)


# ----------------------------------------------------------------------------------------------------------------
# labels at run time

MAX_LABELS = 320


@pytest.fixture(scope="module", params=BACKBONES)
def open_vocab(request, tmp_path_factory):
    """(torch model, temperature, session of the dynamic-K graph, session of the graph padded to MAX_LABELS rows),
    exported once per backbone for every size and label count below."""
    model = random_model(request.param)
    scale = float(model.scale().detach())
    folder = tmp_path_factory.mktemp(request.param)
    onnx_export.export(onnx_export.OpenVocabSegmenter(model, scale), folder / "open.onnx")
    onnx_export.export(onnx_export.OpenVocabSegmenter(model, scale, max_labels=MAX_LABELS), folder / "padded.onnx")
    return model, scale, ort_session(folder / "open.onnx"), ort_session(folder / "padded.onnx")


def labels_and_image(k, h, w):
    """k label embeddings (k, 16), not normalised (the graph normalises them), and an image (1, 3, h, w)."""
    g = torch.Generator().manual_seed(1000 * k + h)
    return 3 * torch.randn(k, 16, generator=g), torch.randn(1, 3, h, w, generator=g)


@pytest.mark.parametrize("h, w", [(37, 53), (64, 96)])  # one the graph pads (odd), one a multiple of 32
@pytest.mark.parametrize("k", [1, 11, 300])
def test_open_vocab_matches_evaluate_protocol(open_vocab, k, h, w):
    model, scale, session, _ = open_vocab
    label_emb, image = labels_and_image(k, h, w)
    ids, score = session.run(None, {"image": image.numpy(), "label_emb": label_emb.numpy()})
    proto = Protocol(base_size=0, sliding=False, precision="fp32")        # evaluate.py's whole image, no resize
    prob, _ = infer(model, image[0], F.normalize(label_emb, dim=-1), scale, proto)  # (k, h, w)
    assert_same_labels(ids, score, prob)
    assert ids.max() < k and (k > 1 or (score == 1).all())


@pytest.mark.parametrize("h, w", [(37, 53), (64, 96)])
def test_padded_labels_change_nothing(open_vocab, h, w):
    _, _, session, padded = open_vocab
    label_emb, image = labels_and_image(11, h, w)
    ids, score = session.run(None, {"image": image.numpy(), "label_emb": label_emb.numpy()})
    for pad in (torch.zeros, torch.randn):  # zero rows, and rows that would win most pixels were they labels
        rows = torch.cat([label_emb, 10 * pad(MAX_LABELS - 11, 16)])         # (320, 16)
        ids_p, score_p = padded.run(None, {"image": image.numpy(), "label_emb": rows.numpy(),
                                           "label_count": np.array([11])})
        assert np.array_equal(ids_p, ids) and np.abs(score_p - score).max() <= 1e-6
    ids_all, _ = padded.run(None, {"image": image.numpy(), "label_emb": rows.numpy(),
                                   "label_count": np.array([MAX_LABELS])})
    assert ids_all.max() >= 11  # the same rows counted as labels do win: the mask is what kept them out


@pytest.mark.parametrize("count", [0, -2, MAX_LABELS + 1, MAX_LABELS + 3])
def test_a_label_count_outside_1_to_max_labels_is_refused(open_vocab, count):
    # M + 3 would count zero padding rows as labels (one may win pixels); 0 or less, no label at all (every pixel 0
    # at score 1/M): the graph fails instead, in onnxruntime and in torch
    model, scale, _, padded = open_vocab
    label_emb, image = labels_and_image(11, 37, 53)
    rows = torch.cat([label_emb, torch.zeros(MAX_LABELS - 11, 16)])       # (320, 16)
    with pytest.raises(Exception, match=r"label_count_outside_1_to_max_labels"):
        padded.run(None, {"image": image.numpy(), "label_emb": rows.numpy(), "label_count": np.array([count])})
    segmenter = onnx_export.OpenVocabSegmenter(model, scale, max_labels=MAX_LABELS)
    with pytest.raises(IndexError):
        segmenter(image, rows, torch.tensor([count]))


def declared_dims(path):
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}


def test_dynamic_dims_are_named(tmp_path):
    model = random_model("mit_b0")
    onnx_export.export(onnx_export.Segmenter(model, torch.randn(3, 16), 14.0, with_emb=True), tmp_path / "f.onnx")
    onnx_export.export(onnx_export.OpenVocabSegmenter(model, 14.0), tmp_path / "o.onnx")
    onnx_export.export(onnx_export.OpenVocabSegmenter(model, 14.0, max_labels=8), tmp_path / "p.onnx")
    image, out = [1, 3, "height", "width"], [1, "height", "width"]
    assert declared_dims(tmp_path / "f.onnx") == {"image": image, "ids": out, "score": out,
                                                  "emb": [1, 16, "emb_height", "emb_width"]}
    assert declared_dims(tmp_path / "o.onnx") == {"image": image, "label_emb": ["labels", 16], "ids": out,
                                                  "score": out}
    assert declared_dims(tmp_path / "p.onnx") == {"image": image, "label_emb": [8, 16], "label_count": [1],
                                                  "ids": out, "score": out}


def test_cli_open_vocab_records_encoder(tmp_path):
    cfg = ModelConfig(backbone="mit_b0", embed_dim=16)
    table = {"names": ["sky"], "sentences": ["An image of sky."], "embeddings": F.normalize(torch.ones(1, 16)),
             "encoder": "clip-text ViT-tiny.pt (sentence)"}                # what train.py stores
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy(), "label_table": table,
                "step": 3}, ckpt)
    ex.main([f"--checkpoint={ckpt}", "--open_vocab", "--max_labels=4", f"--out={tmp_path / 'open.onnx'}"])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "open.onnx")).metadata_props}
    assert meta["encoder"] == table["encoder"] and meta["embed_dim"] == "16" and meta["max_labels"] == "4"
    assert json.loads(meta["input"])["mean"] == [0.485, 0.456, 0.406] and meta["step"] == "3"
    session = ort_session(tmp_path / "open.onnx")
    assert [i.name for i in session.get_inputs()] == ["image", "label_emb", "label_count"]
    with pytest.raises(ConfigError, match="drop --dataset/--labels"):
        ex.main([f"--checkpoint={ckpt}", "--open_vocab", "--labels=sky", f"--out={tmp_path / 'x.onnx'}"])


def test_cli_open_vocab_without_table_needs_encoder(tmp_path):
    cfg = ModelConfig(backbone="mit_b0", embed_dim=16)
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy()}, tmp_path / "ckpt.pt")
    args = [f"--checkpoint={tmp_path / 'ckpt.pt'}", "--open_vocab", f"--out={tmp_path / 'o.onnx'}"]
    with pytest.raises(ConfigError, match="records no label table: give --encoder"):
        ex.main(args)
    ex.main(args + ["--encoder=clip-text ViT-B-32.pt"])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
    assert meta["encoder"] == "clip-text ViT-B-32.pt"


def test_cli_bakes_labels_and_metadata(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_b0", embed_dim=16)
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy(), "step": 7},
               tmp_path / "ckpt.pt")
    rows = ["deer", "grass", "sky", "hill"]
    save_label_table(tmp_path / "t.pt", LabelTable(rows, rows, F.normalize(torch.randn(4, 16), dim=1), "random"))
    ex.main([f"--checkpoint={tmp_path / 'ckpt.pt'}", "--labels=sky, deer", f"--embeddings={tmp_path / 't.pt'}",
             f"--out={tmp_path / 'm.onnx'}"])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["labels"]) == ["sky", "deer"] and meta["step"] == "7"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["ids", "score"]
    ids, score = session.run(None, {"image": np.random.default_rng(0).normal(size=(1, 3, 40, 72)).astype("f4")})
    assert set(np.unique(ids)) <= {0, 1} and ((score >= 0.5) & (score <= 1)).all()  # 2 labels: the max is >= 1/2


def test_dataset_labels_are_evaluate_pys():
    s = ex.ExportSettings(dataset="camvid")
    names, keys, texts = ex.labels_and_texts(s)
    assert names[:3] == ["Building", "Tree", "Sky"] and keys[:3] == ["building", "vegetation", "sky"]
    assert len(names) == len(keys) == len(texts) == 11
    with pytest.raises(ConfigError, match="exactly one of"):
        ex.labels_and_texts(ex.ExportSettings(dataset="camvid", labels="a,b"))


def test_missing_onnx_is_named(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)          # `import onnx` raises ImportError
    with pytest.raises(ConfigError, match="pip install onnx"):
        onnx_export.import_onnx()


def test_bench_export_runs(tmp_path):
    yaml_path, _, _ = write_tiny_run(tmp_path)
    bench_export.main(['--backbones=["mit_b0"]', "--height=40", "--width=56", "--embed_dim=16", "--rounds=2", "--calls=1",
                       "--threads=1",
                       f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--dataset={yaml_path}",
                       f"--embeddings={tmp_path / 'table.pt'}", "--base_size=40", f"--out={tmp_path / 'b.json'}"])
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["latency_s"]) == {"mit_b0"} and set(result["latency_s"]["mit_b0"]) == {"torch", "onnxruntime"}
    real = result["real_images"]
    assert real["images"] == 3 and real["pixels"] == 3 * 40 * 56 and real["max_score_difference"] <= 1e-4
    assert real["pixels_labelled_differently"] <= 3  # ties within float noise only (see check_against_torch)
