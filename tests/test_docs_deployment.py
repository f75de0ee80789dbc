"""docs/deployment.md's commands, run as written in a fresh copy of the repository on the README's own checkpoint
path and data: its ```bash blocks (read from the doc, not copied here) and its ```python block. The checkpoint is
the README recipe's config trained for one step on small crops (runs/cpu_lite0/ckpt_00000001.pt stands for
ckpt_00000800.pt), the label table is the README's command's; what the doc's commands need that the README does
not make is a stand-in: a random CLIP text tower at ViT-B-32.pt. Adapted to a test, as tests/test_quickstart.py
adapts the README: serve.py listens on a free port (each serve command is started, asked the doc's request, and
stopped), the benchmarks send a few requests and time one call."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_eval_suite import tiny_clip
from test_quickstart import fresh_copy

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deployment.md"
STEP = 1
# blocks that record how a measurement was made on another checkout: not a user's command
NOT_RUN = {"# /tmp/before": "needs a checkout whose onnx_export.Segmenter has the first head",
           "# parity on CamVid val": "101 photos through both; tests/test_deploy.py checks the same on small photos",
           "# the torch-free install": "needs PyPI",
           "cd deploy && python serve_onnx.py": "a server; tests/test_deploy.py starts serve_onnx.py and asks it"}
SHRINK = {"tools.bench_serve": ["--requests=4", "--clients=2", "--rounds=2"],
          "tools.bench_export": ["--rounds=1", "--calls=1", "--max_images=2"]}


def doc_blocks(language, doc=DOC):
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(), re.S)


def logical_lines(block):
    """The block's commands: backslash continuations joined, comment lines dropped (a quoted newline stays)."""
    return [line for line in re.sub(r"\\\n\s*", "", block).split("\n") if line.strip()
            and not line.lstrip().startswith("#")]


def as_run_here(line):
    """A command as this test runs it: the checkpoint of STEP steps; the benchmarks shrunk (SHRINK, flags added
    before a trailing comment)."""
    line = re.sub(r"ckpt_\d{8}\.pt", f"ckpt_{STEP:08d}.pt", line)
    for tool, flags in SHRINK.items():
        if f"-m {tool} " in line:
            line = f"{line.partition('  #')[0].rstrip()} {' '.join(flags)}"
    return line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, cwd, env, timeout=900):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\nexited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def wait_for_health(port, proc, log, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve.py exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                return json.load(r)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"serve.py did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def copy(data_root, tmp_path_factory):
    """A fresh copy with the README's data in data/, its label table, a STEP-step checkpoint of its recipe's config,
    a stand-in ViT-B-32.pt, and `python` on PATH the interpreter running the tests."""
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-dev.txt")
    root = tmp_path_factory.mktemp("deployment")
    fresh_copy(root)
    (root / "data").mkdir()
    for folder in ("camvid-11", "labelmefacade"):
        (root / "data" / folder).symlink_to(data_root / folder)
    (root / "bin").mkdir()
    (root / "bin" / "python").symlink_to(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
           "PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    run("python label_table.py --out=runs/tables/minilm_sentence.pt", root, env)
    run(f"python train.py configs/cpu_camvid_facade_lite0.yaml --max_steps={STEP} --save_every={STEP} "
        "--warmup_steps=1 --crop_size=64 --short_side=96 --batch_size=2 --workers=0 --log_every=1", root, env)
    assert (root / f"runs/cpu_lite0/ckpt_{STEP:08d}.pt").is_file()
    tiny_clip(root / "ViT-B-32.pt")
    return root, env


def test_the_doc_names_the_readme_checkpoint_and_data():
    text = "\n".join(doc_blocks("bash") + doc_blocks("python"))
    for placeholder in ("CKPT", "TABLE", "PHOTO", "photo.jpg", "FOLDER", " ...", "T.pt"):
        assert placeholder not in text, placeholder
    assert "runs/cpu_lite0/ckpt_00000800.pt" in text and "data/camvid-11/val/0016E5_07959.png" in text
    first_serve = next(line for block in doc_blocks("bash") for line in logical_lines(block) if "serve.py" in line)
    assert shlex.split(first_serve, comments=True) == ["python", "serve.py",
                                                        "--checkpoint=runs/cpu_lite0/ckpt_00000800.pt"]


@pytest.mark.slow
def test_serve_commands_answer_the_docs_request(copy):
    root, env = copy
    blocks = doc_blocks("bash")
    serves = [line for block in blocks for line in logical_lines(block) if line.startswith("python serve.py")]
    request = next(block for block in blocks if "curl " in block)
    assert len(serves) == 2 and "127.0.0.1:8000" in request
    for n, line in enumerate(serves):
        port = free_port()
        command = as_run_here(line.partition("  #")[0]).replace("--port=8000", f"--port={port}")
        command += "" if f"--port={port}" in command else f" --port={port}"
        log = root / f"serve{n}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=root, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            health = wait_for_health(port, proc, log)
            assert health["status"] == "ok"
            (root / "ids.png").unlink(missing_ok=True)
            printed = run(request.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), root, env)
            assert printed.startswith("{") and "'building': " in printed, printed  # the shares, not an error
            assert (root / "ids.png").stat().st_size > 0
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.mark.slow
def test_the_other_commands_run_as_written(copy):
    root, env = copy
    ran = 0
    for block in doc_blocks("bash"):
        if "serve.py" in block or "curl " in block:
            continue  # test_serve_commands_answer_the_docs_request
        if any(block.startswith(mark) for mark in NOT_RUN):
            continue
        for line in logical_lines(block):
            run(as_run_here(line), root, env)
            ran += 1
    assert ran >= 10, ran
    for name in ("camvid.onnx", "m.onnx", "open.onnx", "open320.onnx", "text.onnx", "clip_text.onnx"):
        assert (root / name).is_file(), name
    m = json.loads(subprocess.run([sys.executable, "-c", "import onnx, json, sys; print(json.dumps({p.key: p.value "
                                   "for p in onnx.load('m.onnx').metadata_props}))"], cwd=root, capture_output=True,
                                  text=True, check=True).stdout)
    assert json.loads(m["texts"])[-1] == "An image of a fabric awning over a shop window."
    # the python example: on the graphs the commands above wrote
    (python_block,) = doc_blocks("python")
    (root / "doc_example.py").write_text(python_block)
    shapes = subprocess.run([sys.executable, "-c", "import runpy; g = runpy.run_path('doc_example.py'); "
                             "print(g['ids'].shape, g['score'].shape, g['emb'].shape)"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert shapes.returncode == 0, shapes.stderr[-3000:]
    assert shapes.stdout.split("\n")[0] == "(1, 360, 480) (1, 360, 480) (3, 384)"
