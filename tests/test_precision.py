"""The network's precision (inference.Protocol.precision, train.py's amp): what auto resolves to, the same in
training and inference and in torchrun workers, the fp32 path unchanged, the bf16 path close to it, and a bad value
named."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dataset_yaml
import evaluation
from checkpoints import load_checkpoint
from runtime import choose_precision
from errors import ConfigError
from evaluate import EvalSettings
from inference import Protocol, in_precision, infer, resolve_precision
from label_source import label_embeddings
from model import ModelConfig, build_model, label_logits
from settings import parse_settings
from test_evaluate import write_tiny_run
from test_train import REPO, final, setup  # noqa: F401 (setup is a fixture)
from tools import compare_precision


@pytest.mark.parametrize("caps, want", [({"amx_bf16": True}, "bf16"), ({"avx512_bf16": True}, "bf16"),
                                        ({"avx2": True, "amx_bf16": False}, "fp32"), ({}, "fp32")])
def test_auto_follows_the_cpu(monkeypatch, caps, want):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_auto_without_get_capabilities_is_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("supported, want", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_gpu(monkeypatch, supported, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", "cuda:0") == want


@pytest.mark.parametrize("units", [True, False])
def test_training_and_inference_mean_the_same_auto_and_say_why(monkeypatch, units):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": units, "amx_bf16": False})
    want = "bf16" if units else "fp32"
    assert choose_precision("auto", torch.device("cpu")) == (want, f"precision: {want} (auto; cpu, bf16 units: "
                                                                   f"{'yes' if units else 'no'})")
    assert resolve_precision("auto", "cpu") == want                      # inference's precision=auto
    # train's amp: off is fp32, an explicit choice stands whatever the CPU, and the line says it was set
    assert choose_precision("off", "cpu")[0] == "fp32" and choose_precision("fp16", "cpu")[0] == "fp16"
    said = "yes" if units else "no"
    assert choose_precision("bf16", "cpu")[1] == f"precision: bf16 (as set; cpu, bf16 units: {said})"


# torch.cpu.get_capabilities as a CPU with (1) or without (0) bf16 units reports it, in every python that starts with
# this folder on PYTHONPATH (torchrun's workers included): the variable is read by a sitecustomize
SITECUSTOMIZE = """import os
if os.environ.get("FAKE_BF16_UNITS") in ("0", "1"):
    import torch
    units = os.environ["FAKE_BF16_UNITS"] == "1"
    torch.cpu.get_capabilities = lambda: {"avx512_bf16": units, "amx_bf16": units}
"""


@pytest.mark.slow
@pytest.mark.parametrize("units", ["1", "0"])
def test_torchrun_workers_train_in_what_auto_means_on_their_cpu(setup, tmp_path, units):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, OMP_NUM_THREADS="1", FAKE_BF16_UNITS=units,
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", str(setup / "config.yaml"), f"--out_dir={out}", "--amp=auto", "--max_steps=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    want = "bf16" if units == "1" else "fp32"
    assert f"precision: {want} (auto; cpu, bf16 units: {'yes' if units == '1' else 'no'})" in done.stdout
    assert final(out, 1)["precision"] == want  # what the run trained in, recorded


def test_bad_precision_is_named():
    with pytest.raises(ConfigError, match="precision"):
        parse_settings(EvalSettings, ["--precision=fp16"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mit_b0", embed_dim=16)).eval()
    image = torch.randn(3, 64, 96)                     # multiples of 32: the whole-image protocol pads nothing
    label_emb = F.normalize(torch.randn(5, 16), dim=-1)
    return model, image, label_emb


def test_fp32_path_is_the_plain_network(tiny, monkeypatch):
    model, image, label_emb = tiny
    x = image[None]
    with torch.no_grad():  # fp32: model.label_logits itself, no autocast around it
        torch.testing.assert_close(in_precision(model, "fp32", "cpu")(x, label_emb, 10.0),
                                   label_logits(model, x, label_emb, 10.0), rtol=0, atol=0)
    with torch.no_grad():  # by hand: the network, cosine x temperature, upsample, softmax
        emb = F.normalize(model(image[None]), dim=1)                       # (1, D, 16, 24)
        label = F.normalize(label_emb, dim=1)                               # model.similarity normalises again
        logits = 10.0 * torch.einsum("bdhw,nd->bnhw", emb, label)         # (1, N, 16, 24)
        want = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False).softmax(1)[0]
    for precision in ("fp32", "auto"):  # auto on a CPU without bf16 units is fp32
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
        prob, _ = infer(model, image, label_emb, 10.0, Protocol(base_size=0, sliding=False, precision=precision))
        assert torch.equal(prob, want)


def test_bf16_path_is_close(tiny):
    model, image, label_emb = tiny
    fp32, _ = infer(model, image, label_emb, 10.0, Protocol(base_size=0, sliding=False, precision="fp32"))
    bf16, cos = infer(model, image, label_emb, 10.0, Protocol(base_size=0, sliding=False, precision="bf16"),
                      with_cos=True)
    assert bf16.dtype == torch.float32 and cos.dtype == torch.float32   # only the network ran in bf16
    assert not torch.equal(bf16, fp32)                                   # ... and it did run in bf16
    assert torch.allclose(bf16.sum(0), torch.ones(64, 96), atol=1e-5)   # the softmax stayed fp32
    assert (bf16 - fp32).abs().max() < 0.05
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean() > 0.95


def test_compare_precision_runs_and_matches_evaluate(tmp_path):
    yaml_path, _, _ = write_tiny_run(tmp_path)
    compare_precision.main([f"--dataset={yaml_path}", f"--checkpoint={tmp_path / 'ckpt.pt'}",
                            f"--embeddings={tmp_path / 'table.pt'}", "--base_size=32", "--sliding=false",
                            f"--out={tmp_path / 'c.json'}"])
    result = json.loads((tmp_path / "c.json").read_text())
    # each precision's mIoU is evaluate.py's with --precision set to it
    cfg, spec = dataset_yaml.load_dataset_config(str(yaml_path))
    dataset = evaluation.EvalDataset(cfg, spec)
    model, _ = load_checkpoint(tmp_path / "ckpt.pt", "cpu")
    label_emb = label_embeddings(dataset.keys, [], str(tmp_path / "table.pt"))
    for p in ("fp32", "bf16"):
        conf = evaluation.evaluate_images(model, dataset, label_emb, float(model.scale()),
                                        Protocol(base_size=32, sliding=False, precision=p))
        assert result["miou"][p] == evaluation.metrics_from_confusion(conf)["miou"]
    assert result["pixels"] == 3 * 40 * 56 and 0 <= result["pixels_differing"] <= result["pixels"]
    assert result["labelled_pixels_differing"] <= result["pixels_differing"]
