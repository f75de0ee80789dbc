"""All nine training sources of the paper in one run, in their real on-disk layouts.

A miniature of the paper's data is laid out where the shipped configs' paths point (under the data root data/ of
the working directory, as their headers say): the seven MSeg dense sets under mseg_dataset/ with mseg-api's list
lines and real names files under mseg-api/, OpenImages V6 under openimages_v6/ (the masks CSV, classes-segmentation.txt of real
MIDs, the descriptions CSV, images, masks at half the image size), Objects365 V2 under objects365/ (the train JSON
with its fields and the real category names, images in mmdetection's layout); tools/make_weak_data.py writes the
files. The commands of the configs' headers then run as written (CLIP weights: random, tiny, in OpenAI's layout):
the two indexes, the box targets, the label table. Then configs/ssiw_segformer_b5.yaml and configs/ssiw_hrnet_w48.yaml
train as shipped under torchrun with two processes, sizes changed by flags only, and evaluate.py runs on each result.
"""
import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_image
import label_table
import indexes
from clip_image import VisionConfig, VisionTransformer
from clip_text import TextConfig, TextTransformer
from label_spec import dataset_label_keys, load_label_spec
from readers import read_names
from settings import read_yaml
from test_launch import TORCHRUN, finish, start
from tools.make_weak_data import (MSEG_LISTS, SIZE, Linker, class_lists, tiny_files, write_mseg_list,
                                  write_objects365, write_openimages)

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"indexes.py": indexes.main, "clip_image.py": clip_image.main, "label_table.py": label_table.main}
STEPS = 3
LINES = 2  # list lines (images) per dense set
OI_IMAGES, OI_MASKS, O365_IMAGES, O365_BOXES = 3, 6, 3, 30

# The nine sources of the shipped configs, in order: (name, encoding, kind, taxonomy).
SOURCES = [("ade20k-150", "id", "dense", "ade20k-150"), ("bdd", "id", "dense", "bdd"),
           ("cityscapes-19", "id", "dense", "cityscapes-19"), ("coco-panoptic-133", "id", "dense", "coco-panoptic-133"),
           ("idd-39", "id", "dense", "idd-39"), ("mapillary-public65", "id", "dense", "mapillary-public65"),
           ("sunrgbd-37", "id", "dense", "sunrgbd-37"), ("openimages", "openimages", "coarse", ""),
           ("objects365", "coco_boxes", "boxes", "")]
# Every setting each shipped config sets. A key added to or dropped from a shipped config fails here: decide whether
# this test must change it (a size) or may keep it (a recipe setting), then update the set.
SHIPPED = {
    "ssiw_segformer_b5": {"sources", "label_table", "crop_size", "short_side", "scale_min", "scale_max", "batch_size",
                          "workers", "backbone", "embed_dim", "aux_head", "pretrained", "drop_path_rate", "optimizer",
                          "lr", "head_lr_mult", "weight_decay", "warmup_steps", "max_steps", "poly_power", "amp",
                          "out_dir", "save_every", "resume"},
    "ssiw_hrnet_w48": {"sources", "label_table", "crop_size", "short_side", "scale_min", "scale_max", "batch_size",
                       "workers", "backbone", "embed_dim", "pretrained", "optimizer", "lr", "momentum", "head_lr_mult",
                       "weight_decay", "warmup_steps", "max_steps", "poly_power", "amp", "out_dir", "save_every",
                       "resume"},
}
# What the test changes, as flags on the shipped file: sizes for a 2-core CPU, nothing of the recipe. A global batch
# of 2 x 5 = 10 >= 9 sources: the balanced sampler draws every source in every step. hrnet_w18: HRNet's smallest
# width, the W48 recipe's architecture.
SIZES = {"pretrained": "", "crop_size": 64, "short_side": 48, "batch_size": 5, "workers": 1, "max_steps": STEPS,
         "save_every": STEPS, "log_every": 1}
GLOBAL_BATCH = 2 * SIZES["batch_size"]  # 2 processes
FLAGS = {"ssiw_segformer_b5": {**SIZES, "backbone": "mit_b0"}, "ssiw_hrnet_w48": {**SIZES, "backbone": "hrnet_w18"}}


def header_commands(config: Path) -> list[list[str]]:
    """The command lines a config's header comment gives: `#   python ...` / `#   torchrun ...` lines (continued by a
    trailing backslash) and `python ...` in backquotes."""
    comment = [line[1:].strip() for line in config.read_text().splitlines() if line.startswith("#")]
    commands, current = [], ""
    for line in comment:
        if current or line.startswith(("python ", "torchrun ")):
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
        commands += re.findall(r"`((?:python|torchrun) [^`]+)`", line)
    return [shlex.split(c) for c in commands]


def write_random_clip(path: Path) -> None:
    """A tiny CLIP with random weights in OpenAI's released layout (text tower keys, visual.*), 512-d like ViT-B/32:
    a 1-layer, 64-wide text tower over CLIP's 49,408 tokens and a 1-layer ViT on 32x32 images in 16-pixel patches."""
    torch.manual_seed(0)
    text = TextTransformer(TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=512))
    vision = VisionTransformer(VisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=1, mlp_width=128,
                                            embed_dim=512))
    with torch.no_grad():
        for name, p in vision.named_parameters():
            if "ln" not in name:  # the rest is torch.empty (made for loading); LayerNorms start as ones and zeros
                p.normal_(std=0.05)
    sd = {**text.state_dict(), **{f"visual.{k}": v for k, v in vision.state_dict().items()},
          "logit_scale": torch.tensor(4.6052)}
    torch.save({k: v.half() for k, v in sd.items()}, path)  # fp16, as OpenAI's files hold


def run(cmd, cwd: Path, name: str) -> str:
    """`cmd` run to its end in `cwd` (one thread), its output in cwd/NAME.log; a failure or a hang (its workers killed)
    fails with the log's end."""
    return finish(start(cmd, cwd / f"{name}.log", cwd=cwd), cwd / f"{name}.log")


@pytest.fixture(scope="module")
def mini(shared_dir, tmp_path_factory):
    """The miniature (see the module docstring), its indexes, box targets and label table; returns its root and the
    id map every dense label file holds per dataset."""
    root = tmp_path_factory.mktemp("nine_sources")
    data = root / "data"  # the data root (train.py's and evaluate.py's default data/ under the working directory)
    config = REPO / "configs" / "ssiw_segformer_b5.yaml"
    sources = {src["name"]: src for src in read_yaml(config)["sources"]}
    assert [(s["name"], s["encoding"], s["kind"], s.get("taxonomy", "")) for s in sources.values()] == SOURCES
    assert read_yaml(REPO / "configs" / "ssiw_hrnet_w48.yaml")["sources"] == list(sources.values())
    rng = np.random.default_rng(0)
    w, h = SIZE
    links = tiny_files(root / "originals", mask_size=(w // 2, h // 2))  # OpenImages keeps many masks at reduced size
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    png = Linker(root / "originals", "photo.png", lambda p: Image.fromarray(photo).save(p))  # Cityscapes, IDD
    dense_ids = {}
    for name in MSEG_LISTS:
        src = sources[name]
        dataset = data / src["root"]
        names = Path(os.path.normpath(dataset / src["names"]))  # ../../mseg-api/...: beside mseg_dataset/
        names.parent.mkdir(parents=True)
        shutil.copy(shared_dir / "data" / "mseg-lists" / "dataset_lists" / name / f"{name}_names.txt", names)
        n = len(read_names(names))
        # every class id of the dataset and 255 (ignore) in each label, in random places
        ids = rng.permutation(np.resize(np.append(np.arange(n), 255), w * h)).reshape(h, w).astype(np.uint8)
        dense_ids[name] = ids
        id_png = Linker(root / "originals", f"{name}.png", lambda p, ids=ids: Image.fromarray(ids).save(p))
        image = png if MSEG_LISTS[name][2].split()[0].endswith(".png") else links["jpg"]
        write_mseg_list(name, Path(os.path.normpath(dataset / src["list"])), dataset, LINES, id_png, image)
    lists = shared_dir / "data" / "class-lists"
    assert all((lists / f).is_file() for f in ("objects365_v2_classes.tsv", "openimages_v6_segmentation_classes.tsv"))
    o365, oi, others = class_lists(rng, lists)
    (data / "openimages_v6").mkdir()
    (data / "objects365").mkdir()
    write_openimages(data / "openimages_v6", OI_IMAGES, OI_MASKS, oi, others, links["jpg"], links["mask"], rng)
    write_objects365(data / "objects365", O365_IMAGES, O365_BOXES, o365, links["jpg"], rng)

    commands = header_commands(config)
    assert commands == header_commands(REPO / "configs" / "ssiw_hrnet_w48.yaml")
    assert sorted(next(word for word in c if word.endswith(".py")) for c in commands) == [
        "clip_image.py", "indexes.py", "indexes.py", "label_table.py"]
    write_random_clip(root / "ViT-B-32.pt")
    here = os.getcwd()
    os.chdir(root)  # the commands' paths are relative to the miniature's root
    try:  # as written, in this process (a new python per command would import torch 4 more times); clip_image.py
        for cmd in commands:  # in one process: tests/test_clip_image.py runs it under torchrun
            script = next(k for k, word in enumerate(cmd) if word.endswith(".py"))
            assert cmd[:script] in (["python"], ["torchrun", "--nproc_per_node=8"]), cmd
            COMMANDS[cmd[script]](cmd[script + 1:])
    finally:
        os.chdir(here)
    return root, dense_ids


@pytest.mark.slow
def test_the_miniature_holds_every_source_in_its_real_layout(mini):
    root, dense_ids = mini
    for name, (_, classes, pattern) in MSEG_LISTS.items():
        folder = root / "data" / "mseg-api" / "mseg" / "dataset_lists" / name
        names = read_names(folder / f"{name}_names.txt")
        assert len(names) == classes
        assert set(np.unique(dense_ids[name])) == set(range(classes)) | {255}
        assert (folder / "list" / "train.txt").read_text().splitlines()[0] == pattern.format(i=0)
    oi = json.loads((root / "data" / "openimages_v6" / "index_train" / "index.json").read_text())
    assert len(oi["class_names"]) == 350 and oi["counts"]["images"] == OI_IMAGES
    with Image.open(next((root / "data" / "openimages_v6" / "train-masks").iterdir())) as mask:
        assert mask.size == (SIZE[0] // 2, SIZE[1] // 2)
    o365 = json.loads((root / "data" / "objects365" / "index_train" / "index.json").read_text())
    assert len(o365["class_names"]) == 365 and o365["class_names"][0] == "Person"
    assert o365["counts"]["boxes"] == O365_BOXES
    targets = np.load(root / "data" / "objects365" / "clip_b32_targets" / "targets.npy")
    assert targets.shape == (O365_BOXES, 512) and np.allclose(np.linalg.norm(targets.astype(np.float32), axis=1), 1,
                                                               atol=1e-2)
    table = torch.load(root / "label_embeddings.pt", weights_only=True)
    assert table["embeddings"].shape[1] == 512


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ssiw_segformer_b5", "ssiw_hrnet_w48"])
def test_shipped_config_trains_on_all_nine_sources_and_evaluates(mini, config):
    root, dense_ids = mini
    path = REPO / "configs" / f"{config}.yaml"
    shipped = read_yaml(path)
    assert set(shipped) == SHIPPED[config], f"{path} changed its settings: {set(shipped) ^ SHIPPED[config]}"
    flags = [f"--{k}={v}" for k, v in FLAGS[config].items()]
    run([*TORCHRUN, "--nproc_per_node=2", str(REPO / "train.py"), str(path), *flags], root, f"train_{config}")

    out = root / shipped["out_dir"]
    ckpt = torch.load(out / f"ckpt_{STEPS:08d}.pt", map_location="cpu", weights_only=True)
    ran = ckpt["config"]
    for key, value in shipped.items():  # the shipped recipe reached the run, sources included, but for the flags
        assert ran[key] == FLAGS[config].get(key, value), key
    assert ckpt["model_args"]["box_head"] and ckpt["sampler"]["global_batch"] == GLOBAL_BATCH

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    drawn = {name: sum(r["sources"][name] for r in records) for name, *_ in SOURCES}  # images per source, all ranks
    assert sum(drawn.values()) == STEPS * GLOBAL_BATCH and min(drawn.values()) >= 1, drawn
    for r in records:  # G = 10 draws, 9 equal shares: the sampler gives each source floor(10 / 9) = 1 in every step
        assert set(r["sources"]) == set(drawn) and min(r["sources"].values()) >= 1, r
        for term in ("loss_dense", "loss_coarse", "loss_boxes"):
            assert math.isfinite(r[term]) and r[term] > 0, (term, r)

    dataset = root / "idd-39.yaml"  # an MSeg training set as a dataset YAML: 39 names, 9 of them mapped to ignore
    source = {k: v for k, v in read_yaml(path)["sources"][4].items() if k != "kind"}
    assert source["name"] == "idd-39"
    dataset.write_text(json.dumps(dict(source, root=str(root / "data" / source["root"]))))
    run([sys.executable, str(REPO / "evaluate.py"), "--dataset", str(dataset), "--checkpoint",
         str(out / f"ckpt_{STEPS:08d}.pt"), "--base_size", "48", "--crop_size", "64", "--out_dir", str(out / "eval")],
        root, f"evaluate_{config}")
    result = json.loads((out / "eval" / "idd-39_48_ss_sentence.json").read_text())
    assert result["images"] == LINES and result["step"] == STEPS
    assert all(result["seen"])  # idd-39 was a training source
    names = read_names(root / "data" / source["root"] / source["names"])
    labelled = [i for i, key in enumerate(dataset_label_keys(load_label_spec(), "idd-39", names)) if key is not None]
    assert len(labelled) == 30  # 9 of IDD's 39 classes map to ignore: not evaluated
    assert sorted(n for c in result["class_names"] for n in c.split("+")) == sorted(names[i] for i in labelled)
    assert np.sum(result["confusion"]) == LINES * np.isin(dense_ids["idd-39"], labelled).sum()
