"""The open-vocabulary benchmarks' layouts (detectron2 folder pairs, 16-bit ids), a user's dataset YAML with its own
sentences, seen/unseen per class and the provenance of every results file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dataset_yaml
import evaluation
import evaluate as ev
import provenance
from data import SourceConfig
from label_spec import label_texts, load_label_spec
from errors import ConfigError, DataError, LabelKeyError
from test_evaluate import write_checkpoint, write_table

REPO = Path(__file__).resolve().parents[1]

# The detectron2 layouts of the five benchmarks as CAT-Seg prepares and registers them (datasets/README.md,
# datasets/prepare_*.py, cat_seg/data/datasets/register_*.py), paths relative to $DETECTRON2_DATASETS:
# config name -> (image folder, label folder, label suffix, label dtype, ignore id, number of classes).
# ADE20K-847: FC-CLIP's prepare_ade20k_full_sem_seg.py writes uint16 TIFFs, 65535 where no class of the 847 is.
# PASCAL-Context-459: .mat LabelMap - 1 saved as TIFF; SAN and FC-CLIP register ignore_label 65535 (uint16 0 - 1).
LAYOUTS = {
    "ade20k-847": ("ADE20K_2021_17_01/images_detectron2/validation",
                   "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", np.uint16, 65535, 847),
    "pascal-context-459": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val",
                           ".tif", np.uint16, 65535, 459),
    "ade20k-150-ov": ("ADEChallengeData2016/images/validation",
                      "ADEChallengeData2016/annotations_detectron2/validation", ".png", np.uint8, 255, 150),
    "pascal-context-59": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val",
                          ".png", np.uint8, 255, 59),
    "voc-20": ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val", ".png", np.uint8, 255,
               20),
}


def write_layout(root, name, stems=("2008_000002", "2008_000003"), extra_images=("2008_000007",), h=24, w=32):
    """Tiny files in a benchmark's layout under root: JPEG images, id maps whose values span 0..n-1 (ids above 255
    in the 16-bit ones) plus ignore pixels, and images of another split without labels. Returns {stem: label}."""
    images, labels, suffix, dtype, ignore, n = LAYOUTS[name]
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    written = {}
    for stem in list(stems) + list(extra_images):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / images / f"{stem}.jpg")
        if stem in extra_images:
            continue
        label = rng.integers(0, n, (h, w)).astype(dtype)
        label[0, :4] = [0, n - 1, ignore, n // 2]  # the first and last class, ignore and a middle id, for sure
        Image.fromarray(label).save(root / labels / f"{stem}{suffix}")
        written[stem] = label
    return written


def user_yaml(root, name, **extra):
    """A dataset YAML for one layout with its own classes and sentences (the user's-dataset feature), no repo edit."""
    images, labels, suffix, _, ignore, n = LAYOUTS[name]
    names = [f"thing {i}" for i in range(n)]
    d = {"name": f"my-{name}", "root": str(root), "images": images, "labels": labels, "label_suffix": suffix,
         "class_names": names, "ignore": [ignore], "encoding": "id",
         "sentences": {c: f"An image of {c}, a made-up class of this test." for c in names}, **extra}
    path = root / f"my-{name}.yaml"
    path.write_text(yaml.safe_dump(d, width=1000))
    return path


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_benchmark_layouts_read_their_ids(tmp_path, name):
    written = write_layout(tmp_path, name)
    cfg, spec = dataset_yaml.load_dataset_config(str(user_yaml(tmp_path, name)))
    dataset = evaluation.EvalDataset(cfg, spec)
    n, ignore = LAYOUTS[name][5], LAYOUTS[name][4]
    assert len(dataset) == 2 and len(dataset.keys) == n   # the image without a label (another split) is no sample
    for i, (stem, label) in enumerate(sorted(written.items())):
        image, target, got_stem = dataset[i]
        assert got_stem == stem and image.shape == (3, 24, 32)
        want = np.where(label == ignore, -1, label.astype(np.int64))  # every class is its own key: index = id
        np.testing.assert_array_equal(target.numpy(), want)
        assert target.max() == n - 1 and (target == -1).any()


def test_sixteen_bit_labels_end_to_end(tmp_path):
    # ADE20K-847 in its layout, through the CLI: the confusion matrix counts every non-ignored pixel at its 16-bit id
    written = write_layout(tmp_path, "ade20k-847")
    yaml_path = user_yaml(tmp_path, "ade20k-847")
    write_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt.update(trained_keys=["thing 0", "thing 300", "sky"], taxonomies={"somewhere": "some-taxonomy"})
    torch.save(ckpt, tmp_path / "ckpt.pt")
    names = [f"thing {i}" for i in range(847)]
    write_table(tmp_path / "table.pt", names)
    ev.main([f"--dataset={yaml_path}", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--embeddings={tmp_path / 'table.pt'}",
             "--base_size=32", "--crop_size=32", "--sliding=false", "--device=cpu", f"--out_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "my-ade20k-847_32_ss_sentence.json").read_text())
    gt = np.array(result["confusion"]).sum(1)
    labels = np.stack(list(written.values()))
    np.testing.assert_array_equal(gt, np.bincount(labels[labels != 65535], minlength=847))
    assert gt[300:].sum() > 0                                       # ids above 255 arrived intact
    assert [i for i, seen in enumerate(result["seen"]) if seen] == [0, 300]
    split = result["metrics"]["split"]
    assert split["seen"]["classes"] == 2 and split["unseen"]["classes"] == 845
    iou = np.array(result["metrics"]["iou"], dtype=float)
    assert split["seen"]["miou"] == pytest.approx(np.nanmean(iou[[0, 300]]))
    md = (tmp_path / "out" / "my-ade20k-847_32_ss_sentence.md").read_text()
    assert "over unseen classes" in md and "(somewhere: some-taxonomy)" in md and "| thing 300 | thing 300 | yes |" in md
    pairs = "".join(f"{LAYOUTS['ade20k-847'][0]}/{s}.jpg {LAYOUTS['ade20k-847'][1]}/{s}.tif\n" for s in sorted(written))
    assert result["provenance"]["sha256"]["pairs"]["text_sha256"] == provenance.hashlib.sha256(pairs.encode()).hexdigest()


def test_folder_pairs_errors(tmp_path):
    write_layout(tmp_path, "voc-20")
    images, labels = LAYOUTS["voc-20"][:2]
    os.remove(tmp_path / images / "2008_000003.jpg")
    cfg, spec = dataset_yaml.load_dataset_config(str(user_yaml(tmp_path, "voc-20")))
    with pytest.raises(DataError, match="2008_000003"):             # a label without its image is named
        evaluation.EvalDataset(cfg, spec)
    with pytest.raises(ConfigError, match="both 'images' and 'labels'"):
        SourceConfig.from_dict({"name": "x", "root": str(tmp_path), "labels": labels, "class_names": ["a"]})
    with pytest.raises(ConfigError, match="exactly one of"):
        SourceConfig.from_dict({"name": "x", "root": str(tmp_path), "list": "l.txt", "images": images,
                                "labels": labels, "class_names": ["a"]})
    with pytest.raises(DataError, match="no label files ending in '.tif'"):
        evaluation.EvalDataset(*dataset_yaml.load_dataset_config(str(user_yaml(tmp_path, "voc-20", label_suffix=".tif"))))


# ---------------------------------------------------------------------------------------------------------------
# A user's dataset with its own labels

def tiny_clip(path):
    """A random CLIP text tower saved in OpenAI's state-dict format (the tokenizer's vocabulary ships with the repo)."""
    import clip_text
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=32))
    torch.save(tower.state_dict(), path)


def write_user_set(root):
    """A user's folder-pair dataset: classes named in the user's words, some mapped to the repo's keys, one new."""
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "img" / f"shot{i}.png")
        Image.fromarray(rng.integers(0, 5, (30, 40), dtype=np.uint8)).save(root / "gt" / f"shot{i}.png")
    path = root / "my_set.yaml"
    path.write_text(f"""name: my-set
root: {root}
images: img
labels: gt
image_suffix: .png
class_names: [unlabelled, tarmac, heaven, solar panel, sky]
ignore: [0]
taxonomy: {{tarmac: road, heaven: sky}}      # the repository's keys; `sky` and `solar panel` are their own keys
sentences:
  solar panel: An image of a solar panel. A flat dark rectangle of photovoltaic cells on a roof or a frame.
  heaven: An image of the heavens above.
""")
    return path


@pytest.mark.slow
def test_user_dataset_yaml_end_to_end(tmp_path):
    yaml_path = write_user_set(tmp_path / "data")
    write_checkpoint(tmp_path / "ckpt.pt")
    tiny_clip(tmp_path / "clip.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, "evaluate.py", f"--dataset={yaml_path}", f"--checkpoint={tmp_path / 'ckpt.pt'}",
           f"--clip_weights={tmp_path / 'clip.pt'}", "--base_size=32", "--crop_size=32", "--device=cpu",
           f"--out_dir={out}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "my-set_32_ss_sentence.json").read_text())
    assert result["class_names"] == ["tarmac", "heaven+sky", "solar panel"]  # heaven and sky share the key sky
    assert result["keys"] == ["road", "sky", "solar panel"]
    spec = load_label_spec()
    assert result["texts_embedded"] == [spec.sentences["road"], "An image of the heavens above.",
                                        "An image of a solar panel. A flat dark rectangle of photovoltaic cells on "
                                        "a roof or a frame."]
    labels = np.stack([np.asarray(Image.open(tmp_path / "data" / "gt" / f"shot{i}.png")) for i in range(2)])
    gt = np.array(result["confusion"]).sum(1)
    np.testing.assert_array_equal(gt, [np.sum(labels == 1), np.sum((labels == 2) | (labels == 4)), np.sum(labels == 3)])
    prov = result["provenance"]
    assert prov["argv"] == cmd[2:] and prov["command"].startswith("python evaluate.py --dataset=")
    assert prov["sha256"]["checkpoint"]["sha256"] == provenance.sha256_file(tmp_path / "ckpt.pt")
    assert prov["sha256"]["clip_weights"]["sha256"] == provenance.sha256_file(tmp_path / "clip.pt")
    assert result["seen"] == [None] * 3 and result["metrics"]["split"]["seen"] == "unknown"  # no record: no guess


def test_user_labels_errors_name_the_classes(tmp_path):
    yaml_path = write_user_set(tmp_path)
    d = yaml.safe_load(yaml_path.read_text())
    cases = [({"sentences": {"heaven": "An image of the heavens above."}}, r"'solar panel' -> 'solar panel'"),
             ({"taxonomy": {"tarmac": "road", "heavn": "sky"}}, r"\['heavn'\], which are not class names"),
             ({"sentences": {"solar pannel": "An image of one."}}, r"\['solar pannel'\], which are neither"),
             ({"sentences": {"solar panel": 3}}, "non-empty strings")]
    for change, message in cases:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**d, **change}))
        with pytest.raises(ConfigError, match=message):
            dataset_yaml.load_dataset_config(str(tmp_path / "bad.yaml"))
    # without sentences or a taxonomy of its own, a dataset label_sentences.yaml does not know: its classes are
    # their own keys, and those without a sentence are listed in one error
    d.pop("sentences"), d.pop("taxonomy")
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"3 class\(es\) have no sentence: 'tarmac' -> 'tarmac', 'heaven' -> "
                                         r"'heaven', 'solar panel' -> 'solar panel'\. Map each"):
        dataset_yaml.load_dataset_config(str(tmp_path / "bare.yaml"))   # sky is a key, unlabelled is ignored: not listed
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**d, "taxonomy": "camvid-segnett"}))
    with pytest.raises(LabelKeyError, match="unknown dataset 'camvid-segnett'"):  # a named taxonomy must exist
        evaluation.EvalDataset(*dataset_yaml.load_dataset_config(str(tmp_path / "typo.yaml")))


@pytest.mark.slow
def test_provenance_git_state_and_hashes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "a.txt").write_text("one\n")
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(repo) == {"commit": head, "dirty": False, "changed": []}
    (repo / "a.txt").write_text("two\n")
    (repo / "new.txt").write_text("untracked files do not make a checkout dirty\n")
    assert provenance.git_state(repo) == {"commit": head, "dirty": True, "changed": ["a.txt"]}
    assert provenance.git_state(tmp_path)["commit"] is None
    # sha256 as sha256sum computes it: of "two\n"
    assert provenance.sha256_file(repo / "a.txt") == "27dd8ed44a83ff94d557f9fd0412ed5a8cbca69ea04922d88c01184a07300a5a"


# ---------------------------------------------------------------------------------------------------------------
# Seen and unseen classes

def test_seen_unseen_split_by_hand():
    iou = [0.5, float("nan"), 0.25, 0.75, 0.0]
    split = evaluation.split_miou(iou, [True, True, False, True, False])
    assert split["seen"] == {"miou": 0.625, "classes": 3, "with_iou": 2}     # (0.5 + 0.75) / 2, nan left out
    assert split["unseen"] == {"miou": 0.125, "classes": 2, "with_iou": 2}
    assert split["all"]["miou"] == pytest.approx(1.5 / 4)
    assert evaluation.split_miou(iou, [None] * 5)["unseen"] == "unknown"
    ckpt = {"trained_keys": ["road", "sky", "car"]}
    assert evaluation.seen_classes(["sky", "window", "car"], ckpt) == [True, False, True]
    assert evaluation.seen_classes(["sky"], {}) == [None]


# ---------------------------------------------------------------------------------------------------------------
# The five benchmark configs themselves (written on another branch; this runs once they are merged)

@pytest.mark.parametrize("name", list(LAYOUTS))
def test_benchmark_configs_read_their_layouts(tmp_path, name):
    """The shipped config of each benchmark, with only --root given, reads tiny files in that benchmark's layout."""
    images, labels, suffix, _, ignore, n = LAYOUTS[name]
    written = write_layout(tmp_path, name)
    d = yaml.safe_load((dataset_yaml.EVAL_CONFIGS / f"{name}.yaml").read_text())
    assert len(d["class_names"]) == n and d["ignore"] == [ignore]
    assert (d["images"], d["labels"], d["label_suffix"]) == (images, labels, suffix)
    cfg, spec = dataset_yaml.load_dataset_config(name, root=str(tmp_path))
    dataset = evaluation.EvalDataset(cfg, spec)
    assert len(dataset) == len(written) and len(dataset.keys) <= n
    label_texts(spec, dataset.keys)                               # every evaluated key has a sentence
    for i, label in enumerate(written[s] for s in sorted(written)):
        target = dataset[i][1].numpy()
        assert ((target == -1) == (label == ignore)).all()
