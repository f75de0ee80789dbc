"""Bad input and faults, tried as a user tries them: every case runs a script in a subprocess (python train.py ...,
evaluate.py, predict.py, label_table.py, clip_image.py, tools.synthetic_data) and checks its exit status (2 for an
expected error, printed as one `error: ...` line without a traceback), that the last line names the culprit, and
that nothing good was deleted. The matrix's cases run two at a time (most of each is importing torch); signals, two
runs in one out_dir and torchrun have their own tests below.
"""
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from run_dir import save_checkpoint
from data_fixtures import write_tiny_run
import images
from errors import ConfigError, DataError, DivergedError, WeightsError, run_main
from inference import Protocol
from torch_files import read_torchscript
from labels import LabelTable, save_label_table
from sampler import BalancedSampler

REPO = Path(__file__).resolve().parents[1]
GOOD_STEPS = 3  # the good run every resume case starts from: ckpt_00000001..3.pt


def run(argv, cwd=REPO, timeout=300, **popen):
    """A script as a user runs it: a fresh python, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SSIW_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six 64x48 synthetic scenes, a random 32-d label table, a config for a tiny MiT-B0 run, that run's three
    checkpoints (good/), an evaluation dataset YAML, a text file and a pickle of a Python object."""
    root = tmp_path_factory.mktemp("faults")
    street = write_tiny_run(root, max_steps=GOOD_STEPS, keep_last=5)["sources"][0]
    done = run(["train.py", str(root / "config.yaml"), f"--out_dir={root / 'good'}"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (root / "eval.yaml").write_text(yaml.safe_dump(dict(street, name="street")))
    (root / "notes.txt").write_text("not a weight file\n")
    torch.save({"model": {}, "note": Path("x")}, root / "object.pt")  # a Path: not loadable with weights_only
    return root


# ---------------------------------------------------------------------------------------------------------------
# The matrix

@dataclass
class Case:
    category: str              # settings | data | files | evaluate/predict | tools | faults
    name: str
    argv: list                 # a script and its arguments; {world}, {case}, {config} are filled in
    culprit: str               # regex the last line must match (stderr's on failure, stdout's on success)
    code: int = 2              # expected exit status
    prepare: Callable = None   # (world, case) -> None: writes the bad input into the case's folder
    check: Callable = None     # (world, case) -> None: afterwards, e.g. nothing good was deleted
    anywhere: bool = False     # the culprit may be on any line of stdout (an exit-0 case that reports on its way)

    def __str__(self):
        return f"{self.category}-{self.name}"


def train(*flags, config="{world}/config.yaml"):
    return ["train.py", config, "--out_dir={case}/out", *flags]


def broken_data(damage, **source_changes):
    """prepare: a private copy of the data, damaged by damage(folder), that source a reads (b reads the original)."""
    def prepare(world, case):
        folder = case / "data"
        shutil.copytree(world / "data" / "street-ids", folder)
        damage(folder)
        config = yaml.safe_load((world / "config.yaml").read_text())
        config["sources"][0].update(root=str(folder), **source_changes)
        (case / "config.yaml").write_text(yaml.safe_dump(config))
    return prepare


def good_run_copy(world, case):
    """prepare: a copy of the good run as this case's out_dir."""
    shutil.copytree(world / "good", case / "out")


def good_checkpoints_kept(*steps):
    """check: these checkpoints of the good run are still there and load; no temp file is left."""
    def check(world, case):
        for step in steps:
            ckpt = torch.load(case / "out" / f"ckpt_{step:08d}.pt", weights_only=True)
            assert ckpt["step"] == step
        assert not list((case / "out").glob(".*.tmp"))
    return check


def write(pattern, content):
    """damage: overwrite the files matching pattern (every one: a run of a few steps reads only some)."""
    def damage(folder):
        for path in folder.glob(pattern):
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return damage


def truncate(pattern):
    def damage(folder):
        for path in folder.glob(pattern):
            path.write_bytes(path.read_bytes()[:200])
    return damage


def relabel(pattern, change):
    def damage(folder):
        for path in folder.glob(pattern):
            Image.fromarray(change(np.array(Image.open(path)))).save(path)
    return damage


def checkpoint_without(*keys):
    def prepare(world, case):
        ckpt = torch.load(world / "good" / f"ckpt_{GOOD_STEPS:08d}.pt", weights_only=True)
        torch.save({k: v for k, v in ckpt.items() if k not in keys}, case / "partial.pt")
    return prepare


def poisoned_optimizer(world, case):
    """The good run's latest checkpoint with one Adam second moment set to inf: the loss would stay finite (the
    weights are), so only a check of the state on loading catches it."""
    good_run_copy(world, case)
    path = case / "out" / f"ckpt_{GOOD_STEPS:08d}.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer"]["state"][5]["exp_avg_sq"].fill_(float("inf"))
    torch.save(ckpt, path)


def stale_lock(world, case):
    (case / "out").mkdir()
    (case / "out" / "run.lock").write_text("pid 999999 on a-dead-host, started 2020-01-01 00:00:00\n")
    (case / "out" / ".ckpt_00000001.pt.999999.tmp").write_bytes(b"half a checkpoint")


def assert_stale_lock_taken_over(world, case):
    assert not list((case / "out").glob(".*.tmp"))
    assert (case / "out" / "run.lock").read_text() == ""  # released at the normal exit


def assert_diverged_set_aside(world, case):
    good_checkpoints_kept(GOOD_STEPS)(world, case)
    assert (case / "out" / f"ckpt_{GOOD_STEPS + 1:08d}.pt.diverged").is_file()
    assert not (case / "out" / f"ckpt_{GOOD_STEPS + 1:08d}.pt").exists()


def assert_skips_logged(world, case):
    records = [json.loads(line) for line in (case / "out" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 1


def png_header_only(width, height) -> bytes:
    """A 1-bit PNG whose header says width x height, with no pixel data: the size of a decompression bomb (PIL
    reads it from the header) in ~60 bytes; decoding it would allocate width x height bytes and then fail."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


BOMB = png_header_only(20000, 20000)
BOMB_CULPRIT = r"20000x20000 = 400 MP is over max_pixels=100000000 \(100 MP\).*refused before decoding"


def bomb_eval_dataset(world, case):
    """prepare: the evaluation dataset with every image a bomb."""
    eval_dataset_of(world, case, BOMB)


def eval_dataset_of(world, case, image: bytes):
    """prepare: the evaluation dataset with every image `image`."""
    broken_data(write("images/*.png", image))(world, case)
    (case / "eval.yaml").write_text(yaml.safe_dump(dict(yaml.safe_load((world / "eval.yaml").read_text()),
                                                        root=str(case / "data"))))


class MarkerOnLoad(torch.nn.Module):
    """A module whose TorchScript __setstate__ (run by torch.jit.load) creates the file named in its state."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.w, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        created = torch.from_file(state[1], shared=True, size=1)  # shared=True creates the file
        self.w = state[0] + created.sum() * 0  # used, so TorchScript keeps the call
        self.marker = state[1]
        self.training = state[2]


def code_running_archive(world, case):
    """prepare: case/evil.pt, a TorchScript archive whose loading would create case/MARKER."""
    torch.jit.save(torch.jit.script(MarkerOnLoad(str(case / "MARKER"))), str(case / "evil.pt"))


def no_marker(world, case):
    assert not (case / "MARKER").exists(), "code in the weight file ran"


class RunsOnUnpickle:
    """Unpickling it calls os.mkdir(marker): the payload of a malicious pickle, harmless but visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_pickle(world, case):
    """prepare: case/evil.pt, a plain pickle (protocol 5) of a checkpoint-like dict whose unpickling would create
    case/MARKER (torch.load's weights_only stops such a pickle at its first opcode and names no global)."""
    (case / "evil.pt").write_bytes(pickle.dumps({"model": RunsOnUnpickle(str(case / "MARKER"))}, protocol=5))


EVAL = ["evaluate.py", "--dataset={world}/eval.yaml", "--base_size=48", "--sliding=false", "--max_images=1",
        "--out_dir={case}/eval"]
PREDICT = ["predict.py", "--images={world}/data/street-ids/images/train_0000.png", "--labels=sky,road",
           "--base_size=48", "--sliding=false", "--out_dir={case}/pred"]
CKPT = f"{{world}}/good/ckpt_{GOOD_STEPS:08d}.pt"
# runs the script after it, with writes past 1 MB failing (EFBIG: "File too large"), as a full quota fails them
FILES_UP_TO_1MB = ["-c", "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
                         "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]

CASES = [
    # ---- settings: checked right after parsing, the setting and its value named
    Case("settings", "batch_size_0", train("--batch_size=0"), r"batch_size=0 must be >= 1"),
    Case("settings", "save_every_0", train("--save_every=0"), r"save_every=0 must be >= 1"),
    Case("settings", "log_every_0", train("--log_every=0"), r"log_every=0 must be >= 1"),
    Case("settings", "keep_last_0", train("--keep_last=0"), r"keep_last=0 must be >= 1"),
    Case("settings", "max_steps_negative", train("--max_steps=-1"), r"max_steps=-1 must be >= 1"),
    Case("settings", "scale_min_above_max", train("--scale_min=2", "--scale_max=1"),
         r"scale_max=1\.0 must be >= scale_min=2\.0"),
    Case("settings", "coarse_drop_1.5", train("--coarse_drop=1.5"), r"coarse_drop=1\.5 must be in \[0, 1\)"),
    Case("settings", "lr_overflows_to_inf", train("--lr=1e309"), r"--lr=1e309: lr must be a finite number"),
    Case("settings", "amp_fp8", train("--amp=fp8"), r"amp='fp8' must be one of \('auto', 'bf16', 'fp16', 'off'\)"),
    Case("settings", "optimizer_adam", train("--optimizer=adam"), r"optimizer='adam' must be one of"),
    Case("settings", "loss_resize_pixels", train("--loss_resize=pixels"), r"loss_resize='pixels' must be one of"),
    Case("settings", "backbone_mit_b9", train("--backbone=mit_b9"), r"unknown backbone 'mit_b9'"),
    Case("settings", "label_table_unset", train("--label_table="), r"label_table='' is not set: give a label table"),
    Case("settings", "sources_empty", train("--sources=[]"),
         r"sources=\[\] is empty: give a config .* `python train\.py configs/cpu_camvid_facade_lite0\.yaml`"),
    Case("settings", "unknown_setting", train("--lrr=1"), r"flag --lrr=1: unknown setting 'lrr'"),
    Case("settings", "wrong_type", train("--batch_size=two"), r"batch_size must be int, got str 'two'"),
    Case("settings", "flag_without_value", train("--lr"), r"flag --lr needs a value: --lr VALUE or --lr=VALUE"),
    Case("settings", "settings_file_missing", train(config="{case}/nope.yaml"), r"settings file .*nope\.yaml"),
    Case("settings", "yaml_duplicate_key", train(config="{case}/config.yaml"), r"config\.yaml:\d+:1: duplicate key 'lr'",
         prepare=lambda world, case: (case / "config.yaml").write_text(
             (world / "config.yaml").read_text() + "lr: 0.1\n")),
    Case("settings", "yaml_syntax_error", train(config="{case}/config.yaml"),
         r"config\.yaml:2:6: mapping values are not allowed here",
         prepare=lambda world, case: (case / "config.yaml").write_text("lr: 1\n  bad: indent\n")),
    Case("settings", "source_unknown_key", train(config="{case}/config.yaml"), r"source a: unknown key 'rooot'",
         prepare=broken_data(lambda folder: None, rooot="x")),
    Case("settings", "onehot_too_narrow", train("--label_table=onehot", "--embed_dim=4"),
         r"onehot needs at most embed_dim=4 labels"),
    Case("settings", "resume_past_max_steps", train("--resume=auto", "--max_steps=2"),
         rf"ckpt_{GOOD_STEPS:08d}\.pt is at step {GOOD_STEPS}, past max_steps=2", prepare=good_run_copy,
         check=good_checkpoints_kept(1, 2, 3)),
    Case("settings", "resume_at_max_steps", train("--resume=auto"), r"the run is complete \(max_steps=3\)", code=0,
         prepare=good_run_copy, check=good_checkpoints_kept(1, 2, 3)),
    # ---- data: the file named
    Case("data", "image_garbage", train(config="{case}/config.yaml"), r"images/train_000\d\.png: unreadable image",
         prepare=broken_data(write("images/*.png", b"not a png"))),
    Case("data", "image_truncated", train(config="{case}/config.yaml"), r"images/train_000\d\.png: ",
         prepare=broken_data(truncate("images/*.png"))),
    Case("data", "listed_file_missing", train(config="{case}/config.yaml"),
         r"labels/train_0002\.png: file not found$",
         prepare=broken_data(lambda folder: (folder / "labels" / "train_0002.png").unlink())),
    Case("data", "label_values_out_of_range", train(config="{case}/config.yaml"),
         r"labels/train_000\d\.png: label values \[200\] are neither class ids",
         prepare=broken_data(relabel("labels/*.png", lambda a: np.where(a == a[0, 0], 200, a).astype(np.uint8)))),
    Case("data", "label_size_differs", train(config="{case}/config.yaml"), r"labels/train_000\d\.png: label size 32x48",
         prepare=broken_data(relabel("labels/*.png", lambda a: a[:, :32].copy()))),
    Case("data", "image_over_max_pixels", train(config="{case}/config.yaml"),
         r"images/train_000\d\.png: " + BOMB_CULPRIT, prepare=broken_data(write("images/*.png", BOMB))),
    Case("data", "error_in_a_dataloader_worker_is_its_own_line", train("--workers=1", config="{case}/config.yaml"),
         r"^error: \S+/images/train_000\d\.png: unreadable or truncated image \(image file is truncated\)$",
         prepare=broken_data(truncate("images/*.png"))),
    Case("data", "list_empty", train(config="{case}/config.yaml"), r"train\.txt: the list is empty",
         prepare=broken_data(write("train.txt", "\n"))),
    Case("data", "list_line_malformed", train(config="{case}/config.yaml"), r"train\.txt:1: expected `image_path",
         prepare=broken_data(write("train.txt", "images/train_0000.png\n"))),
    Case("data", "names_blank_line", train(config="{case}/config.yaml"), r"names\.txt:2: blank class name",
         prepare=broken_data(write("names.txt", "Sky\n\nPole\n"))),
    Case("data", "taxonomy_unknown", train(config="{case}/config.yaml"), r"unknown dataset 'nope'",
         prepare=broken_data(lambda folder: None, taxonomy="nope")),
    Case("data", "class_name_unmapped", train(config="{case}/config.yaml"), r"class name\(s\) \['Lamppost'\]",
         prepare=broken_data(write("names.txt", "Sky\nBuilding\nLamppost\n"))),
    Case("data", "skip_bad_counts_and_reports", train("--skip_bad=true", "--max_steps=6", config="{case}/config.yaml"),
         r"^skipped 1 bad samples in this run", code=0, check=assert_skips_logged, anywhere=True,  # 6 steps: each once
         prepare=broken_data(write("images/train_0003.png", b"not a png"))),
    # ---- files that are not what they should be: the path, what it should be, where such files come from
    Case("files", "pretrained_text", train("--pretrained={world}/notes.txt"),
         r"notes\.txt: not a complete file written by torch\.save.*expected pretrained weights.*mit_b0"),
    Case("files", "pretrained_object", train("--pretrained={world}/object.pt"),
         r"object\.pt: it holds objects other than tensors \(pathlib\.\w*Path\), refused for safety"),
    Case("files", "pretrained_label_table", train("--pretrained={world}/table.pt"),
         r"table\.pt: not a state dict of tensors .*expected pretrained weights"),
    Case("files", "label_table_text", train("--label_table={world}/notes.txt"),
         r"notes\.txt: not a complete file written by torch\.save.*expected a label table.*label_table\.py"),
    Case("files", "label_table_folder", train("--label_table={world}"), r"faults\d*: a folder; expected a label table"),
    Case("files", "label_table_npy_text", train("--label_table={case}/table.npy"), r"table\.npy: not a \.npy array",
         prepare=lambda world, case: (case / "table.npy").write_text("0.1 0.2\n")),
    Case("files", "label_table_too_narrow", train("--embed_dim=16"), r"table\.pt has width 32, embed_dim is 16"),
    Case("files", "checkpoint_malicious_pickle", [*EVAL, "--checkpoint={case}/evil.pt"],
         r"evil\.pt: it holds objects other than tensors \(posix\.mkdir\), refused for safety.*train\.py checkpoint",
         prepare=malicious_pickle, check=no_marker),
    Case("files", "label_table_clip_weights_run_code", ["label_table.py", "--clip_weights={case}/evil.pt",
                                                        "--out={case}/t.pt"],
         r"evil\.pt: a TorchScript archive holding __torch__\.[\w.]*MarkerOnLoad, which has its own __setstate__, "
         r"code that torch\.jit\.load would run; refused for safety", prepare=code_running_archive, check=no_marker),
    Case("files", "clip_image_weights_run_code", ["clip_image.py", "--weights={case}/evil.pt", "--index={world}/nope",
                                                  "--images=.", "--out={case}/t", "--device=cpu"],
         r"evil\.pt: a TorchScript archive holding __torch__\.[\w.]*MarkerOnLoad, which has its own __setstate__",
         prepare=code_running_archive, check=no_marker),
    Case("files", "pretrained_runs_code", train("--pretrained={case}/evil.pt"),
         r"evil\.pt: a TorchScript archive holding __torch__\.[\w.]*MarkerOnLoad, which has its own __setstate__.*"
         r"expected pretrained weights", prepare=code_running_archive, check=no_marker),
    Case("files", "resume_text", train("--resume={world}/notes.txt"), r"notes\.txt: .*expected a train\.py checkpoint"),
    Case("files", "resume_missing", train("--resume={case}/ckpt.pt"), r"ckpt\.pt: no such file; expected a train\.py"),
    Case("files", "resume_without_model_args", train("--resume={case}/partial.pt"),
         r"partial\.pt: not a train\.py checkpoint, it lacks \['model_args'\]", prepare=checkpoint_without("model_args")),
    Case("files", "resume_other_model", train("--resume=" + CKPT, "--aux_head=true"), r"model_args .* differ from"),
    Case("files", "resume_other_batch_size", train("--resume=" + CKPT, "--batch_size=4"),
         r"sampler state: global_batch 2 differs from this run's 4"),
    Case("files", "evaluate_checkpoint_text", [*EVAL, "--checkpoint={world}/notes.txt"],
         r"notes\.txt: .*expected a train\.py checkpoint"),
    Case("files", "evaluate_checkpoint_without_model_args", [*EVAL, "--checkpoint={case}/partial.pt"],
         r"partial\.pt: not a train\.py checkpoint, it lacks \['model_args'\]", prepare=checkpoint_without("model_args")),
    Case("files", "evaluate_embeddings_text", [*EVAL, "--checkpoint=" + CKPT, "--embeddings={world}/notes.txt"],
         r"notes\.txt: .*expected a label table"),
    Case("files", "predict_embeddings_object", [*PREDICT, "--checkpoint=" + CKPT, "--embeddings={world}/object.pt"],
         r"object\.pt: it holds objects other than tensors"),
    Case("files", "label_table_clip_weights_text", ["label_table.py", "--clip_weights={world}/notes.txt",
                                                    "--out={case}/t.pt", "--text_cache=off"],
         r"notes\.txt: .*expected CLIP weights.*openai/clip-vit-base-patch32"),
    Case("files", "clip_image_weights_text", ["clip_image.py", "--weights={world}/notes.txt", "--index={world}/nope",
                                              "--images=.", "--out={case}/t.pt", "--device=cpu"],
         r"notes\.txt: .*expected CLIP weights"),
    # ---- evaluate / predict settings
    Case("evaluate/predict", "evaluate_dataset_unknown", ["evaluate.py", "--dataset=nope", "--checkpoint=" + CKPT],
         r"unknown dataset 'nope'"),
    Case("evaluate/predict", "evaluate_checkpoint_unset", EVAL,
         r"evaluate\.py --dataset=\S+ needs --checkpoint CKPT"),
    Case("evaluate/predict", "evaluate_scales_empty", [*EVAL, "--checkpoint=" + CKPT, "--scales=[]"],
         r"scales=\[\] must be a non-empty list"),
    Case("evaluate/predict", "predict_labels_empty", [*PREDICT, "--labels=", "--checkpoint=" + CKPT],
         r"--labels: give the labels to segment into"),
    Case("evaluate/predict", "predict_image_over_max_pixels",
         [*PREDICT[:1], "--images={case}/bomb.png", *PREDICT[2:], "--checkpoint=" + CKPT], r"bomb\.png: " + BOMB_CULPRIT,
         prepare=lambda world, case: (case / "bomb.png").write_bytes(BOMB)),
    Case("evaluate/predict", "evaluate_image_over_max_pixels",
         [*EVAL[:1], "--dataset={case}/eval.yaml", *EVAL[2:], "--checkpoint=" + CKPT],
         r"images/train_000\d\.png: " + BOMB_CULPRIT, prepare=bomb_eval_dataset),
    # ---- the size the model would process, and the aspect ratio, from the header (200x1: a thin strip, 9600x48 at
    #      base 48; a 3000x1 PNG at the default base 720 asks for a 2,160,000x720 tensor)
    Case("evaluate/predict", "predict_image_extreme_aspect",
         [*PREDICT[:1], "--images={case}/thin.png", *PREDICT[2:], "--checkpoint=" + CKPT],
         r"thin\.png: 200x1 has an aspect ratio of 200:1, over max_aspect=20; the model would process it at 9600x64 "
         r"= 0\.6 MP \(base_size=48, padded to a multiple of 32\); refused before decoding it",
         prepare=lambda world, case: (case / "thin.png").write_bytes(png_header_only(200, 1))),
    Case("evaluate/predict", "predict_processed_size_over_max_pixels",
         [*PREDICT[:1], "--images={case}/strip.png", *PREDICT[2:], "--checkpoint=" + CKPT, "--max_pixels=50000"],
         r"strip\.png: 200x10 is processed at 960x64 = 0\.06 MP \(base_size=48, padded to a multiple of 32\), over "
         r"max_pixels=50000 \(0\.05 MP\), the pixel budget of one image; refused before decoding it",
         prepare=lambda world, case: Image.new("RGB", (200, 10)).save(case / "strip.png")),
    Case("evaluate/predict", "evaluate_image_extreme_aspect", [*EVAL[:1], "--dataset={case}/eval.yaml", *EVAL[2:],
                                                               "--checkpoint=" + CKPT],
         r"images/train_000\d\.png: 200x1 has an aspect ratio of 200:1, over max_aspect=20; the model would process "
         r"it at 9600x64", prepare=lambda world, case: eval_dataset_of(world, case, png_header_only(200, 1))),
    Case("data", "image_extreme_aspect", train(config="{case}/config.yaml"),
         r"images/train_000\d\.png: 200x1 has an aspect ratio of 200:1, over max_aspect=20; refused before decoding",
         prepare=broken_data(write("images/*.png", png_header_only(200, 1)))),
    # ---- blank labels and labels that are not text: one line, wherever a label list is read
    Case("evaluate/predict", "predict_label_blank", [*PREDICT[:2], "--labels=sky,,road", *PREDICT[3:],
                                                     "--checkpoint=" + CKPT],
         r"--labels='sky,,road': label 2 of 3 is blank \(label i gets id i: a blank label would shift the ids after "
         r"it\)"),
    Case("evaluate/predict", "predict_label_lone_surrogate", [*PREDICT[:2], "--labels=sky,ro\udcffad", *PREDICT[3:],
                                                              "--checkpoint=" + CKPT],
         r"--labels='sky,ro\\udcffad': label 2 of 2 is not valid Unicode"),
    Case("evaluate/predict", "predict_background_blank", [*PREDICT, "--background=wall,,car", "--checkpoint=" + CKPT],
         r"--background='wall,,car': label 2 of 3 is blank"),
    Case("evaluate/predict", "export_label_blank", ["export.py", "--checkpoint=" + CKPT, "--labels=sky,road,",
                                                    "--out={case}/m.onnx"],
         r"--labels='sky,road,': label 3 of 3 is blank"),
    Case("tools", "label_table_label_blank", ["label_table.py", "--labels=sky, ,road", "--clip_random_init",
                                              "--out={case}/t.pt"], r"--labels='sky, ,road': label 2 of 3 is blank"),
    Case("evaluate/predict", "predict_image_missing", [*PREDICT, "--images={case}/nope.png", "--checkpoint=" + CKPT],
         r"no such file\(s\) \['.*nope\.png'\]"),
    Case("tools", "synthetic_data_small_size", ["-m", "tools.synthetic_data", "--out={case}/syn",
                                                "--size", "64x48", "--train", "8"],
         r"wrote SYNTHETIC data \(8 train \+ 16 val scenes, 64x48\)", code=0),
    # ---- faults: a diverged run, a poisoned state, a full disk, a killed run's lock
    Case("faults", "diverged_after_resume", train("--resume=auto", "--lr=1e30", "--max_steps=8", "--keep_last=1"),
         rf"non-finite loss at step {GOOD_STEPS + 1}.*renamed ckpt_{GOOD_STEPS + 1:08d}\.pt\.diverged; "
         rf"--resume=auto continues from .*ckpt_{GOOD_STEPS:08d}\.pt", prepare=good_run_copy,
         check=assert_diverged_set_aside),
    Case("faults", "non_finite_optimizer_state", train("--resume=auto", "--max_steps=8"),
         rf"ckpt_{GOOD_STEPS:08d}\.pt holds NaN or inf in 1 tensors \(optimizer\.state\.5\.exp_avg_sq\), from which "
         rf"training cannot recover; the newest finite checkpoint before it is ckpt_{GOOD_STEPS - 1:08d}\.pt",
         prepare=poisoned_optimizer,
         check=good_checkpoints_kept(1, 2, 3)),
    Case("faults", "disk_full_on_save", [*FILES_UP_TO_1MB, *train("--resume=auto", "--max_steps=8")],
         rf"could not write checkpoint .*ckpt_{GOOD_STEPS + 1:08d}\.pt: File too large; the older checkpoints are kept",
         prepare=good_run_copy, check=good_checkpoints_kept(1, 2, 3)),
    Case("faults", "stale_lock_taken_over", train("--max_steps=1"),
         r"run\.lock: taking over from a run that did not exit normally \(pid 999999 on a-dead-host", code=0,
         anywhere=True, prepare=stale_lock, check=assert_stale_lock_taken_over),
]

# ---- the command line: ranges named, one style, one error line for every script and tool
CASES += [
    Case("settings", "lr_overflows_float32_steps", train("--lr=3e38"),
         r"lr=3e\+38 x head_lr_mult=10 overflows float32 in the optimizer's step"),
    Case("settings", "float_beyond_float32", train("--weight_decay=1e39"),
         r"flag --weight_decay=1e39: weight_decay=1e\+39 is beyond float32's range"),
    Case("evaluate/predict", "predict_unknown_below_5", [*PREDICT, "--checkpoint=" + CKPT, "--unknown_below=5"],
         r"unknown_below=5\.0 must be in \[-1, 1\] \(a cosine similarity; -1 = off\)"),
    Case("evaluate/predict", "evaluate_max_images_negative", [*EVAL, "--checkpoint=" + CKPT, "--max_images=-1"],
         r"max_images=-1 must be >= 0"),
    Case("tools", "bench_export_backbones_not_names", ["-m", "tools.bench_export", "--backbones=[1, 2]"],
         r"backbones\[0\] must be str, got int 1"),
    Case("tools", "plot_log_not_a_log", ["-m", "tools.plot_log", "{world}/notes.txt", "--out={case}/loss.png"],
         r"notes\.txt:1: not a JSON record"),
    Case("tools", "indexes_without_command", ["indexes.py", "--json=x.json"],
         r"give a command first: coco_boxes \| openimages \(got '--json=x\.json'\)"),
    Case("tools", "indexes_out_missing", ["indexes.py", "coco_boxes", "--json=x.json", "--images=."],
         r"--out is required \(index folder to write\)"),
    Case("tools", "indexes_json_missing", ["indexes.py", "coco_boxes", "--json={case}/nope.json", "--images={case}",
                                           "--out={case}/index"], r"No such file or directory: .*nope\.json"),
    Case("tools", "indexes_help", ["indexes.py", "coco_boxes", "--help"],
         r"^  --json +str +'' +e\.g\. objects365/zhiyuan_objv2_train\.json$", code=0, anywhere=True),
    Case("tools", "label_table_two_encoders", ["label_table.py", "--clip_weights={world}/notes.txt",
                                               "--clip_random_init", "--out={case}/t.pt"],
         r"clip_weights and clip_random_init are both set; choose one encoder"),
    Case("tools", "label_table_out_missing", ["label_table.py", "--clip-random-init"],
         r"--out is required \(the label table to write \(\.pt\)\)"),
]


def run_case(case, world):
    folder = world / "cases" / str(case)
    folder.mkdir(parents=True)
    if case.prepare:
        case.prepare(world, folder)
    argv = [a.format(world=world, case=folder) for a in case.argv]
    return run(argv, timeout=600)


@pytest.fixture(scope="module")
def outcomes(request, world):
    """The selected cases, two at a time."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", "") == "test_case"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(map(str, selected), pool.map(lambda case: run_case(case, world), selected)))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case, outcomes, world):
    done = outcomes[str(case)]
    log = f"exit {done.returncode}\nstdout: {done.stdout[-1500:]}\nstderr: {done.stderr[-3000:]}"
    assert done.returncode == case.code, log
    assert "Traceback" not in done.stderr, log
    if case.code == 2:
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and re.search(case.culprit, last), log
    else:
        last = done.stdout if case.anywhere else done.stdout.strip().splitlines()[-1]
        assert re.search(case.culprit, last, re.MULTILINE), log
    if case.check:
        case.check(world, world / "cases" / str(case))


def test_matrix_counts():
    """The matrix's size by category (for the record; the categories are the ones named in each case)."""
    counts = {}
    for case in CASES:
        counts[case.category] = counts.get(case.category, 0) + 1
    assert len({str(c) for c in CASES}) == len(CASES)
    assert set(counts) == {"settings", "data", "files", "evaluate/predict", "tools", "faults"}, counts


# ---------------------------------------------------------------------------------------------------------------
# Faults that need timing: signals, two runs in one out_dir, torchrun

def start_train(world, out, *flags, session=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "train.py", str(world / "config.yaml"), f"--out_dir={out}",
                             "--max_steps=500", "--save_every=100", *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=session)


def read_until(proc, prefix):
    """Lines of proc's output up to and including the first that starts with prefix."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the run ended (exit {proc.wait()}) before printing {prefix!r}: {''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_finishes_the_step_and_checkpoints(world):
    """kill -- -PGID (what batch schedulers do) reaches the DataLoader workers too; they must not die of it."""
    out = world / "sigterm_group"
    proc = start_train(world, out, "--workers=2", session=True)
    read_until(proc, "step 2/")
    os.killpg(proc.pid, signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest[-3000:]
    assert "stopped by signal at step" in rest and "Traceback" not in rest, rest[-3000:]
    saved = sorted(out.glob("ckpt_*.pt"))
    assert len(saved) == 1 and torch.load(saved[0], weights_only=True)["step"] >= 2


@pytest.mark.slow
def test_a_second_run_in_the_same_out_dir_is_refused_and_deletes_nothing(world):
    out = world / "two_runs"
    first = start_train(world, out, "--save_every=1", "--keep_last=100")
    read_until(first, "step 2/")
    second = run(["train.py", str(world / "config.yaml"), f"--out_dir={out}", "--save_every=1", "--keep_last=1"])
    before = sorted(p.name for p in out.glob("ckpt_*.pt"))
    first.send_signal(signal.SIGTERM)
    rest = first.stdout.read()
    assert first.wait(timeout=120) == 0, rest[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(out))} is in use by another training run \(pid {first.pid} on .*\); "
                        r".*give this one another --out_dir, or stop the other", last), last
    after = sorted(p.name for p in out.glob("ckpt_*.pt"))
    assert set(before) <= set(after) and len(after) >= 2  # the first run's checkpoints, none pruned by the second
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved log lines


@pytest.mark.slow
def test_skips_of_every_rank_are_counted_under_torchrun(world, tmp_path):
    """A bad file only rank 1 draws: the log lines, log.jsonl and the end of the run count it (the epoch is not
    finished: 2 of its 3 global batches)."""
    data = tmp_path / "data"
    shutil.copytree(world / "data" / "street-ids", data)
    config = yaml.safe_load((world / "config.yaml").read_text())
    config["sources"][0]["root"] = str(data)  # source a reads the damaged copy, source b the original
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # what rank 1 of 2 draws of source a in the first global batch (train.py's sampler, sizes 6 and 6, batch 2 per rank)
    rank1 = BalancedSampler([6, 6], batch_size=2, rank=1, world_size=2, seed=0)
    sample = next(i for s, i, *_ in next(iter(rank1)) if s == 0)
    rank0_draws = {i for batch in BalancedSampler([6, 6], batch_size=2, rank=0, world_size=2, seed=0)
                   for s, i, *_ in batch[:2] if s == 0}
    assert sample not in rank0_draws
    image = data / f"images/train_{sample:04d}.png"
    image.write_bytes(image.read_bytes()[:200])  # truncated
    done = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                str(tmp_path / "config.yaml"), f"--out_dir={tmp_path / 'out'}", "--skip_bad=true", "--max_steps=2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(rf"skipped: source a sample {sample}: .*train_{sample:04d}\.png", done.stdout), done.stdout
    assert re.search(r"^step 1/2 .*\| skipped 1$", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^skipped 1 bad samples in this run", done.stdout, re.MULTILINE), done.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [1, 1]


# ---------------------------------------------------------------------------------------------------------------
# What counts as expected (errors.run_main)

def test_expected_errors_are_one_line_and_exit_2_bugs_keep_their_traceback(capsys):
    def fails(error):
        def main(argv):
            raise error
        return main

    for error in (DataError("a.png: unreadable"), ConfigError("settings: x=1 must be >= 2"),
                  FileNotFoundError(2, "No such file or directory", "b.txt")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(fails(error))
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(ValueError, match="a shape bug"):  # a bare ValueError is a bug, not bad input
        run_main(fails(ValueError("a shape bug")))


# ---------------------------------------------------------------------------------------------------------------
# Pruning and the state check, in process (save_checkpoint)

def state(step, value=1.0):
    return {"step": step, "model": {"w": torch.full((2,), value)}, "optimizer": {"state": {0: {"v": torch.ones(2)}}}}


def test_pruning_keeps_the_checkpoint_before_the_newest_and_never_the_new_one(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"ckpt_{step:08d}.pt", state(step), keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    # resumed from an older checkpoint while newer ones of an earlier run exist: the new one is never pruned
    save_checkpoint(tmp_path / "ckpt_00000001.pt", state(1), keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt", "ckpt_00000002.pt", "ckpt_00000003.pt"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_state_is_neither_written_nor_prunes(tmp_path, value):
    save_checkpoint(tmp_path / "ckpt_00000001.pt", state(1), keep_last=1)
    with pytest.raises(DivergedError, match=r"step 2: .* 1 tensors \(e\.g\. model\.w\); ckpt_00000002\.pt is not written"):
        save_checkpoint(tmp_path / "ckpt_00000002.pt", state(2, value), keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001.pt"]


# ---------------------------------------------------------------------------------------------------------------
# The pixel budget, TorchScript archives read without their code, a box-target folder that cannot be resumed,
# torchrun's summary

def test_open_image_refuses_an_image_over_max_pixels_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(BOMB)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"bomb\.png: " + BOMB_CULPRIT):
        images.open_image(tmp_path / "bomb.png")
    try:
        images.set_image_budget(64 * 48, 20)
        assert images.open_image(tmp_path / "small.png").size == (64, 48)
        images.set_image_budget(64 * 48 - 1, 20)
        with pytest.raises(DataError, match=r"small\.png: 64x48 = 0 MP is over max_pixels=3071 \(0 MP\)"):
            images.open_image(tmp_path / "small.png")
        with pytest.raises(ConfigError, match=r"max_pixels=0 must be >= 1"):
            images.set_image_budget(0, 20)
        with pytest.raises(ConfigError, match=r"max_aspect=0\.5 must be >= 1"):
            images.set_image_budget(100, 0.5)
    finally:
        images.set_image_budget(100_000_000, 20)


@pytest.mark.parametrize("w, h", [(3000, 1), (100_000, 1), (1, 100_000)])
def test_an_extreme_aspect_ratio_is_refused_from_the_header_in_under_a_second(tmp_path, w, h):
    # a 3000x1 PNG at base_size 720 would be a 2,160,000x720 tensor; 100000x1, 72,000,000x720
    (tmp_path / "thin.png").write_bytes(png_header_only(w, h))
    work = Protocol().work_size                                       # predict's and evaluate's defaults
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=rf"thin\.png: {w}x{h} has an aspect ratio of {max(w, h)}:1, over "
                                        rf"max_aspect=20; the model would process it at \d+x\d+ = [\d.]+ MP "
                                        rf"\(base_size=720, padded to crop_size=640\); refused before decoding it"):
        images.open_image(tmp_path / "thin.png", work)
    assert time.perf_counter() - t0 < 1


def test_the_size_the_model_processes_has_the_pixel_budget_too(tmp_path):
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")       # 8000 pixels, 20:1
    proto = Protocol(base_size=720, scales=[1.0, 1.5], sliding=False)
    with pytest.raises(DataError, match=r"strip\.png: 400x20 is processed at 21600x1088 = 23\.5 MP "
                                        r"\(base_size=720, scale 1\.5, padded to a multiple of 32\), over "
                                        r"max_pixels=10000000 \(10\.0 MP\)"):
        try:
            images.set_image_budget(10_000_000, 20)
            images.open_image(tmp_path / "strip.png", proto.work_size)
        finally:
            images.set_image_budget(100_000_000, 20)
    assert images.open_image(tmp_path / "strip.png", proto.work_size).size == (400, 20)


class Block(torch.nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock: the mask is a plain tensor attribute, neither parameter nor buffer."""

    def __init__(self, width, heads, mask=None):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.attn_mask = mask

    def forward(self, x):  # (L, B, C)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TinyCLIP(torch.nn.Module):
    """CLIP's layout (text and image towers, the buffers OpenAI's released archives carry), at toy size."""

    def __init__(self, width=16, ctx=6, vocab=20):
        super().__init__()
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(ctx, width))
        self.transformer = torch.nn.Sequential(Block(width, 2, mask), Block(width, 2, mask))
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, 8))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, width, 8, stride=8, bias=False)
        self.visual.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.visual.proj = torch.nn.Parameter(torch.randn(width, 8))
        for name, value in (("input_resolution", 16), ("context_length", ctx), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, text):  # (B, ctx) -> (B, 8)
        x = self.token_embedding(text) + self.positional_embedding  # (B, ctx, C)
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(-1)] @ self.text_projection


@pytest.mark.parametrize("how", ["trace_fp16", "script"])
def test_torchscript_archive_tensors_equal_jit_load_state_dict(tmp_path, how):
    """read_torchscript returns torch.jit.load's state dict: the same keys in the same order, dtypes, shapes,
    strides and values (OpenAI's archives are traced and fp16)."""
    torch.manual_seed(0)
    model = TinyCLIP().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    if how == "script":
        archive = torch.jit.script(model)
    else:
        archive = torch.jit.trace(model, torch.randint(0, 20, (2, 6))).half()
    torch.jit.save(archive, str(tmp_path / "clip.pt"))
    want = torch.jit.load(str(tmp_path / "clip.pt")).state_dict()
    got = read_torchscript(tmp_path / "clip.pt", "CLIP weights")
    assert list(got) == list(want) and "transformer.0.attn_mask" not in got and "vocab_size" in got
    for k, v in want.items():
        assert (got[k].dtype, got[k].shape, got[k].stride()) == (v.dtype, v.shape, v.stride()), k
        assert torch.equal(got[k], v), k


def test_a_torchscript_archive_whose_class_runs_code_is_refused_unrun(tmp_path):
    torch.jit.save(torch.jit.script(MarkerOnLoad(str(tmp_path / "MARKER"))), str(tmp_path / "evil.pt"))
    with pytest.raises(WeightsError, match=r"evil\.pt: a TorchScript archive holding __torch__\.[\w.]*MarkerOnLoad, "
                                           r"which has its own __setstate__"):
        read_torchscript(tmp_path / "evil.pt", "CLIP weights")
    assert not (tmp_path / "MARKER").exists()


def tiny_clip_state_dict():
    """OpenAI-layout CLIP weights with a 1-layer 32-px ViT image tower (random), for clip_image.py's command."""
    from clip_image import VisionConfig, VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(VisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=1, mlp_width=128,
                                           embed_dim=16))
    sd = {"visual." + k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}
    return {**sd, "token_embedding.weight": torch.zeros(4, 8)}


def test_box_targets_resume_into_a_folder_whose_done_npy_is_a_pickle_names_folder_and_file(tmp_path):
    import clip_image
    import indexes
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "boxes.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.png", "width": 40, "height": 40}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": k, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]} for k in range(2)]}))
    indexes.build_coco_boxes(tmp_path / "boxes.json", tmp_path, tmp_path / "index")
    torch.save(tiny_clip_state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "targets"
    args = ["--weights", str(tmp_path / "clip.pt"), "--index", str(tmp_path / "index"), "--out", str(out),
            "--workers", "0", "--device", "cpu"]
    clip_image.main(args)
    np.save(out / "done.npy", np.array([{"shard": 0}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=rf"^{re.escape(str(out))}/done\.npy: unreadable \(Object arrays cannot be "
                                        rf"loaded.*\); .* so {re.escape(str(out))} cannot be resumed"):
        clip_image.main(args)
    np.save(out / "done.npy", np.zeros(3, np.float32))
    with pytest.raises(DataError, match=r"done\.npy: float32 \(3,\), expected uint8 \(1,\)"):
        clip_image.main(args)


@pytest.mark.slow
def test_under_torchrun_the_failure_summary_ends_with_the_rank_error_line(world, tmp_path):
    """torchrun prints its report after the rank exits; the rank's one line must be its last word there."""
    data = tmp_path / "data"
    shutil.copytree(world / "data" / "street-ids", data)
    truncate("images/*.png")(data)
    config = yaml.safe_load((world / "config.yaml").read_text())
    for source in config["sources"]:
        source["root"] = str(data)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                str(tmp_path / "config.yaml"), f"--out_dir={tmp_path / 'out'}"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "train.py FAILED" in done.stderr, done.stderr[-3000:]
    assert re.fullmatch(r"=+", lines[-1]), done.stderr[-3000:]
    assert re.fullmatch(r"\s*traceback : error: \S+/images/train_000\d\.png: unreadable or truncated image "
                        r"\(image file is truncated\)", lines[-2]), done.stderr[-3000:]


# Flags and the settings file

@pytest.mark.slow
def test_flag_before_config_file_still_wins(world, tmp_path):
    """`train.py --max_steps=2 config.yaml` (whose max_steps is 3): the flag wins wherever it stands, the printed
    settings show it, and the run stops at step 2."""
    done = run(["train.py", "--max_steps=2", str(world / "config.yaml"), f"--out_dir={tmp_path / 'out'}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^  max_steps = 2$", done.stdout, re.MULTILINE), done.stdout[-3000:]
    assert re.search(r"^threads: 1 \(set by OMP_NUM_THREADS", done.stdout, re.MULTILINE), done.stdout[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Resuming safely: onto the same label embeddings, from a finite state, never over an earlier run by accident

def train_in(world, out, *flags):
    return run(["train.py", str(world / "config.yaml"), f"--out_dir={out}", *flags])


def last_error(done):
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_resuming_onto_other_label_embeddings_is_refused_unless_meant(world, tmp_path):
    """Same keys, other embeddings and encoder: the model would silently learn other targets."""
    shutil.copytree(world / "good", tmp_path / "out")
    table = torch.load(world / "table.pt", weights_only=True)
    other = torch.nn.functional.normalize(torch.randn(table["embeddings"].shape,
                                                      generator=torch.Generator().manual_seed(1)), dim=1)
    save_label_table(tmp_path / "t2.pt", LabelTable(table["names"], table["sentences"], other, "other encoder"))
    flags = ["--resume=auto", f"--label_table={tmp_path / 't2.pt'}", f"--max_steps={GOOD_STEPS + 1}"]
    last = last_error(train_in(world, tmp_path / "out", *flags))
    assert re.fullmatch(rf"error: .*ckpt_{GOOD_STEPS:08d}\.pt was trained with label table sha256 [0-9a-f]{{12}} "
                        r"\(random test table, \d+ labels\), this run's .*t2\.pt is sha256 [0-9a-f]{12} \(other "
                        r"encoder, \d+ labels\): .*--allow_new_label_table=true if the change is meant", last), last
    assert not (tmp_path / "out" / f"ckpt_{GOOD_STEPS + 1:08d}.pt").exists()
    done = train_in(world, tmp_path / "out", *flags, "--allow_new_label_table=true")
    assert done.returncode == 0 and "allowed by --allow_new_label_table" in done.stdout, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "out" / f"ckpt_{GOOD_STEPS + 1:08d}.pt", weights_only=True)
    assert torch.equal(ckpt["label_table"]["embeddings"], other) and ckpt["label_table"]["encoder"] == "other encoder"
    # the hash is of the names and the embeddings' bytes, computed here independently of run_dir.py
    want = hashlib.sha256(json.dumps(table["names"]).encode() + str(tuple(other.shape)).encode()
                          + other.numpy().tobytes()).hexdigest()
    assert ckpt["label_table_sha256"] == want


def poison(path, *where):
    """Set one tensor of a checkpoint to NaN: where = ("optimizer", "state", 5, "exp_avg_sq") etc."""
    ckpt = torch.load(path, weights_only=True)
    node = ckpt
    for key in where:
        node = node[key]
    node.fill_(float("nan"))
    torch.save(ckpt, path)


@pytest.mark.slow
def test_resuming_from_a_non_finite_state_names_it_and_the_newest_finite_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "good", out)
    newest = out / f"ckpt_{GOOD_STEPS:08d}.pt"
    poison(newest, "optimizer", "state", 5, "exp_avg_sq")
    done = train_in(world, out, "--resume=auto", "--max_steps=8")
    last = last_error(done)
    assert re.fullmatch(rf"error: {re.escape(str(newest))} holds NaN or inf in 1 tensors \(optimizer\.state\.5\."
                        rf"exp_avg_sq\), from which training cannot recover; the newest finite checkpoint before it "
                        rf"is ckpt_{GOOD_STEPS - 1:08d}\.pt: resume with --resume=.*ckpt_{GOOD_STEPS - 1:08d}\.pt",
                        last), last
    assert f"step {GOOD_STEPS + 1}/" not in done.stdout  # refused before training, not at the next save
    for step in range(1, GOOD_STEPS):
        poison(out / f"ckpt_{step:08d}.pt", "model", "logit_scale")
    last = last_error(train_in(world, out, "--resume=auto", "--max_steps=8"))
    assert re.search(rf"; no older checkpoint in {re.escape(str(out))} is finite: start over", last), last
    assert sorted(p.name for p in out.glob("ckpt_*")) == [f"ckpt_{s:08d}.pt" for s in range(1, GOOD_STEPS + 1)]


@pytest.mark.slow
def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused_unless_resumed_or_overwritten(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "good", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"}
    last = last_error(train_in(world, out, "--max_steps=2"))
    assert re.fullmatch(rf"error: {re.escape(str(out))} holds {GOOD_STEPS} checkpoint\(s\) of an earlier run "
                        rf"\(ckpt_00000001\.pt \.\. ckpt_{GOOD_STEPS:08d}\.pt\), which a new run would replace: "
                        r"--resume=auto continues that run, --overwrite=true deletes them and starts over \(keeping "
                        r"its log\.jsonl as log-<time>\.jsonl\), or give another --out_dir", last), last
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.lock"} == before  # nothing touched
    done = train_in(world, out, "--max_steps=2", "--overwrite=true")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "--overwrite: deleted 3 checkpoint(s) of an earlier run" in done.stdout
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    kept = list(out.glob("log-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_bytes() == before["log.jsonl"], kept  # the earlier run's log, whole
    assert f"log.jsonl of an earlier run is kept as {kept[0].name}" in done.stdout
