"""export.py --int8 (onnx_quant.py): static int8 in QDQ form with per-channel weights, calibrated on real images and
refused without them; never dynamic; labels close to the fp32 graph's; the mIoU it reports is the one evaluate.py's
whole-image protocol gives."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import onnx
    import onnxruntime  # noqa: F401
except ImportError as e:  # tests/run.sh installs both from requirements-dev.txt
    pytest.skip(f"int8 tests need onnx and onnxruntime (pip install -r requirements-dev.txt): {e}",
                allow_module_level=True)

import dataset_yaml
import evaluation
import export as ex
import onnx_quant
from checkpoints import load_checkpoint
from errors import ConfigError
from inference import Protocol
from label_source import label_embeddings
from model import ModelConfig, build_model
from settings import parse_settings
from test_evaluate import write_tiny_run


def test_int8_needs_real_images(tmp_path):
    with pytest.raises(ConfigError, match="needs real calibration images"):
        ex.main(["--labels=sky,road", "--int8", f"--out={tmp_path / 'm.onnx'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        ex.main(["--labels=sky,road", "--int8", f"--calibration={tmp_path / 'empty'}", f"--out={tmp_path / 'm.onnx'}"])
    with pytest.raises(ConfigError, match="not with --open_vocab"):
        parse_settings(ex.ExportSettings, ["--int8", "--open_vocab"])
    assert not (tmp_path / "m.onnx").exists()                            # refused before exporting anything


def test_missing_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)   # `import onnxruntime` raises ImportError
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        onnx_quant.import_onnxruntime()


@pytest.mark.slow  # exports, calibrates and measures: 13 s
def test_export_int8_is_static_per_channel_and_close_to_fp32(tmp_path, capsys):
    yaml_path, _, table = write_tiny_run(tmp_path)
    torch.manual_seed(0)  # the CPU recipe's backbone, random weights, BatchNorm statistics away from 0/1
    cfg = ModelConfig(backbone="efficientnet_lite0", embed_dim=32)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "lite0.pt"
    torch.save({"model": model.state_dict(), "model_args": cfg.__dict__.copy(), "step": 7}, ckpt)
    photos = tmp_path / "photos"                                          # a folder of calibration photos
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    out = tmp_path / "m.onnx"
    ex.main([f"--checkpoint={ckpt}", f"--dataset={yaml_path}", f"--embeddings={table}", f"--out={out}", "--int8",
             f"--calibration={photos}", "--base_size=0", "--threads=1"])  # 0: the labels' size
    said = capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "m.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops                  # QDQ
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}  # never dynamic
    weights = {i.name: i for i in graph.graph.initializer}
    per_channel = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in weights
                   and len(weights[n.input[1]].dims) == 1 and weights[n.input[1]].dims[0] > 1]
    assert per_channel                                                    # a scale per output channel
    meta = {p.key: p.value for p in graph.metadata_props}
    assert "4 calibration images" in meta["quantization"] and json.loads(meta["labels"])[0] == "Sky"

    # labels and scores: int8 against fp32 on a calibration image
    fp32, int8 = onnx_quant.session(out, 1), onnx_quant.session(tmp_path / "m.int8.onnx", 1)
    x = onnx_quant.calibration_images(str(photos), 0, 1)[0]
    (ids, score), (ids8, score8) = fp32.run(None, {"image": x}), int8.run(None, {"image": x})
    assert 0 < np.abs(score - score8).mean() < 0.03                      # it ran in int8, and close (0.012 measured)
    assert (ids == ids8).mean() > 0.95                                     # 98.9% measured

    # the fp32 mIoU it reports is evaluate.py's whole-image protocol (up to ties)
    cfg, spec = dataset_yaml.load_dataset_config(str(yaml_path))
    dataset = evaluation.EvalDataset(cfg, spec)
    model, _ = load_checkpoint(ckpt, "cpu")
    conf = evaluation.evaluate_images(model, dataset, label_embeddings(dataset.keys, [], str(table)),
                                      float(model.scale().detach()), Protocol(base_size=0, sliding=False, precision="fp32",
                                                                     compile=False))
    want = 100 * evaluation.metrics_from_confusion(conf)["miou"]
    assert f"mIoU fp32 {want:.2f}, int8 " in said and "images/s fp32 " in said
