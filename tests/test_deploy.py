"""export.py --deploy_dir and the torch-free deployment it writes: the folder's contents; run_onnx.py and serve_onnx.py
run from the folder alone in processes where `import torch` fails (tests/no_torch), against predict.py and serve.py in
torch on the same random-weight checkpoint (ids equal on >= 99.9% of the pixels), the text cache, the same errors, and
the page in headless Chromium."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import onnx
    import onnxruntime  # noqa: F401 (the deployment needs it)
except ImportError as e:  # tests/run.sh installs both from requirements-dev.txt
    pytest.skip(f"deployment tests need onnx and onnxruntime (pip install -r requirements-dev.txt): {e}",
                allow_module_level=True)

import clip_text
import export as ex
import predict as pr
import serve
from model import ModelConfig, build_model
from test_clip_text import EMBED, OpenAIStyleCLIP, randomise

NO_TORCH = Path(__file__).resolve().parent / "no_torch"
LABELS = "road,sky,car,tree"
BASE = 40  # the photos below are 50x70 and 70x44: resized down, then the scores resized up, as predict.py does


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A random tiny CLIP text tower (OpenAI's layout), a random MiT-B0 checkpoint whose table came from it, two
    photos and `export.py --deploy_dir`: {root, ckpt, clip, deploy, images, printed}."""
    root = tmp_path_factory.mktemp("deploy")
    openai = randomise(OpenAIStyleCLIP(), seed=3).eval()
    with warnings.catch_warnings():  # nn.MultiheadAttention's shape checks warn under tracing; harmless here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(openai, clip_text.tokenize(["a dog"])), str(root / "ViT-tiny.pt"))
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_b0", embed_dim=EMBED)
    table = {"names": ["sky"], "sentences": ["An image of sky."], "embeddings": F.normalize(torch.ones(1, EMBED)),
             "encoder": "clip-text ViT-tiny.pt (sentence)"}                # what train.py stores
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy(), "label_table": table,
                "step": 3}, root / "ckpt.pt")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for name, (h, w) in {"a": (50, 70), "b": (70, 44)}.items():  # smooth colour blobs, so labels form regions
        blobs = rng.integers(0, 256, (h // 10 + 2, w // 10 + 2, 3), dtype=np.uint8)
        Image.fromarray(blobs).resize((w, h), Image.BILINEAR).save(root / "img" / f"{name}.png")
    out = io.StringIO()
    sys.stdout, saved = out, sys.stdout
    try:
        ex.main([f"--checkpoint={root / 'ckpt.pt'}", f"--deploy_dir={root / 'deploy'}",
                 f"--clip_weights={root / 'ViT-tiny.pt'}"])
    finally:
        sys.stdout = saved
    return {"root": root, "ckpt": root / "ckpt.pt", "clip": root / "ViT-tiny.pt", "deploy": root / "deploy",
            "images": root / "img", "printed": out.getvalue()}


def copy_of(deployment, tmp_path):
    """The deployment folder copied where nothing of the repository is beside it."""
    return Path(shutil.copytree(deployment["deploy"], tmp_path / "deploy"))


def torch_free(cmd, folder, tmp_path, **kwargs):
    """Run cmd in folder with torch blocked and the text cache under tmp_path."""
    env = dict(os.environ, PYTHONPATH=str(NO_TORCH), SSIW_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *cmd], cwd=folder, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_the_folder_holds_the_graphs_code_pins_and_readme(deployment):
    deploy = deployment["deploy"]
    names = {p.name for p in deploy.iterdir()}
    assert {"image.onnx", "text.onnx", "bpe_simple_vocab_16e6.txt.gz", "run_onnx.py", "serve_onnx.py",
            "requirements.txt", "README.md", "label_sentences.yaml"} <= names
    graph = onnx.load(str(deploy / "image.onnx"))
    assert [o.name for o in graph.graph.output] == ["ids", "score", "prob", "cos"]
    pins = dict(line.split("==") for line in (deploy / "requirements.txt").read_text().split())
    assert set(pins) == {"onnxruntime", "numpy", "pillow", "ftfy", "regex", "pyyaml"}
    assert all(pins[name] == metadata.version(name) for name in pins)
    readme = (deploy / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "python run_onnx.py" in readme and "serve_onnx.py" in readme
    size = sum(p.stat().st_size for p in deploy.rglob("*") if p.is_file())
    assert f"{size / 1e6:.1f} MB" in deployment["printed"]


@pytest.mark.slow
def test_runner_without_torch_equals_predict(deployment, tmp_path):
    deploy = copy_of(deployment, tmp_path)
    for extra in ([], ["--unknown_below=0.0", "--background=grass"]):
        out = tmp_path / f"onnx{len(extra)}"
        run = torch_free(["run_onnx.py", f"--images={deployment['images']}", f"--labels={LABELS}",
                          f"--base_size={BASE}", f"--out_dir={out}", "--threads=1", *extra], deploy, tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        hits = 4 if extra else 0  # the second run's texts: the 4 labels' from the first run's cache, and grass
        assert f"(clip-text ViT-tiny.pt; {hits} from the text cache)" in run.stdout
        pr.main([f"--images={deployment['images']}", f"--labels={LABELS}", f"--checkpoint={deployment['ckpt']}",
                 f"--clip_weights={deployment['clip']}", f"--base_size={BASE}", "--sliding=false", "--precision=fp32",
                 "--device=cpu", "--threads=1", f"--out_dir={tmp_path / f'torch{len(extra)}'}", *extra])
        for stem, shape in (("a", (50, 70)), ("b", (70, 44))):
            ids, want = (np.asarray(Image.open(tmp_path / f"{kind}{len(extra)}" / f"{stem}.png"))
                         for kind in ("onnx", "torch"))
            assert ids.shape == want.shape == shape and (ids == want).mean() >= 0.999
            assert len(np.unique(want)) >= 2 and (out / f"{stem}_overlay.png").is_file()
            if extra:  # the threshold and the background at work: some pixels unknown, not all
                assert 0 < (want == 255).mean() < 1
        got, expected = (json.loads((tmp_path / f"{kind}{len(extra)}" / "labels.json").read_text())
                         for kind in ("onnx", "torch"))
        assert got["ids"] == expected["ids"] and got["unknown"] == expected["unknown"]
        assert got["background"] == expected["background"]


def start_torch_free_server(folder, tmp_path, *args):
    """serve_onnx.py in folder, torch blocked, on a free port: (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=str(NO_TORCH), SSIW_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "serve_onnx.py", "--port=0", "--threads=1", *args], cwd=folder, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", (tmp_path / "serve.log").read_text())
        if found:
            return proc, found.group(1)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError((tmp_path / "serve.log").read_text()[-3000:])


def post(url, body):
    """POST body as JSON -> (status, decoded JSON answer)."""
    req = urllib.request.Request(url + "api/segment", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def decode_png(text):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.mark.slow
def test_server_without_torch_answers_as_serve_py(deployment, tmp_path):
    deploy = copy_of(deployment, tmp_path)
    proc, url = start_torch_free_server(deploy, tmp_path, f"--base_size={BASE}")
    try:
        with urllib.request.urlopen(url + "api/health", timeout=30) as r:
            health = json.load(r)
        assert health["status"] == "ok" and health["base_size"] == BASE and health["limits"]["max_labels"] == 256
        photo = base64.b64encode((deployment["images"] / "a.png").read_bytes()).decode()
        body = {"image": photo, "labels": LABELS, "unknown_below": 0.0, "maps": True}
        status, got = post(url, body)
        assert status == 200, got
        s = serve.ServeSettings(checkpoint=str(deployment["ckpt"]), clip_weights=str(deployment["clip"]),
                                base_size=BASE, sliding=False, precision="fp32", device="cpu")
        want = serve.TorchSegmenter(s, torch.device("cpu")).segment(base64.b64decode(photo), LABELS.split(","),
                                                                   unknown_below=0.0, maps=True)
        assert got["size"] == want["size"] == [56, 40] and got["labels"] == want["labels"]
        for key in ("ids_png", "winner_png"):
            assert (decode_png(got[key]) == decode_png(want[key])).mean() >= 0.999
        # the same errors as serve.py (serve_http.py: one implementation)
        status, answer = post(url, {**body, "labels": "sky, ,road"})
        assert status == 400 and answer["error"].startswith("labels: label 2 of 3 is blank")
        status, answer = post(url, {**body, "colour": 1})
        assert status == 400 and answer["error"].startswith("unknown field(s) ['colour']")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "nowhere", timeout=30)
        assert missing.value.code == 404
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_page_on_the_torch_free_server_in_headless_chromium(deployment, tmp_path, data_root):
    from test_serve import check_page, chromium_or_skip
    binary = chromium_or_skip()
    deploy = copy_of(deployment, tmp_path)
    proc, url = start_torch_free_server(deploy, tmp_path, "--base_size=240")
    try:
        check_page(binary, url, data_root / "camvid-11" / "val" / "0016E5_07959.png", tmp_path)
    finally:
        proc.terminate()
        proc.wait(30)
