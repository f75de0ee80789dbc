"""export.py: the ONNX graph, run in onnxruntime, against evaluate.py's whole-image protocol in torch
(inference.whole_image_scores), at several image sizes from one export; on real CamVid images; the command line."""
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
from inference import whole_image_scores
from labels import LabelTable, save_label_table
from model import ModelConfig, build_model
from readers import decode_rgb, open_image
from test_evaluate import write_tiny_run
from tools import bench_export
from transforms import eval_image

BACKBONES = ["mit_b0", "efficientnet_lite0"]


@pytest.fixture(scope="module", params=BACKBONES)
def exported(request, tmp_path_factory):
    """(torch model, label embeddings (5, 16), temperature, onnxruntime session) of one random-weight export."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=request.param, embed_dim=16)).eval()
    with torch.no_grad():  # BatchNorm statistics away from 0/1, so that the exported BN is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    label_emb = F.normalize(torch.randn(5, 16), dim=-1)
    path = tmp_path_factory.mktemp(request.param) / "m.onnx"
    onnx_export.export(onnx_export.Segmenter(model, label_emb, 14.0, with_emb=True), path)
    return model, label_emb, 14.0, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_against_torch(exported, image):
    """image (1, 3, H, W): onnxruntime's ids and scores against the torch protocol's argmax and max probability.
    Returns onnxruntime's embeddings."""
    model, label_emb, scale, session = exported
    ids, score, emb = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        prob = whole_image_scores(model, image, label_emb, scale, flip=False)   # (N, H, W)
    top2 = prob.topk(2, 0).values.numpy()                                  # (2, H, W)
    h, w = image.shape[-2:]
    assert ids.shape == score.shape == (1, h, w) and ids.dtype == np.int64
    assert np.abs(score[0] - top2[0]).max() <= 1e-4
    # ids identical wherever the best label wins by more than float noise; at a tie within it (random weights make
    # a few: 1 pixel of 172800 at a margin of 3e-6) either label may win, but it must be one of the tied best
    decided = top2[0] - top2[1] > 1e-4
    assert decided.mean() > 0.999
    assert np.array_equal(ids[0][decided], prob.argmax(0).numpy()[decided])
    chosen = np.take_along_axis(prob.numpy(), ids, 0)[0]                   # torch's probability of onnx's pick
    assert (chosen >= top2[0] - 1e-4).all()
    return emb


@pytest.mark.parametrize("h, w", [(64, 96), (50, 70)])  # a multiple of 32, and one the graph pads
def test_onnx_matches_torch_at_any_size(exported, h, w):
    torch.manual_seed(h)
    image = torch.randn(1, 3, h, w)
    emb = check_against_torch(exported, image)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32                         # padded up to multiples of 32
    assert emb.shape == (1, 16, hp // 4, wp // 4)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)        # L2-normalised per pixel


def test_onnx_matches_torch_on_real_images(exported, shared_dir):
    folder = shared_dir / "data/camvid-11"
    lines = (folder / "val.txt").read_text().split("\n")[:2]
    for line in lines:
        path = folder / line.split()[0]
        image = eval_image(decode_rgb(open_image(path), path))[None]       # (1, 3, 360, 480)
        assert image.shape[-2:] == (360, 480)
        check_against_torch(exported, image)


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
