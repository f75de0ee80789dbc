"""dataset_yaml.py: one data_root rule; a training source that names a dataset YAML is that YAML with the entry's keys
over it; a dataset added for training with one YAML (its own sentences and taxonomy) and no edit of
label_sentences.yaml: its label table, its batches, a training run."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import data
import label_table
import train
from data_fixtures import write_id_dataset
from dataset_yaml import EVAL_CONFIGS, load_sources, source_fields, under_data_root
from errors import ConfigError
from label_spec import LABELS_YAML, load_label_spec
from labels import load_label_table, onehot_table

NEW_KEY, NEW_SENTENCE = "scrap_heap", "An image of a scrap heap, a pile of discarded metal."


def test_one_data_root_rule():
    assert under_data_root("camvid-11", "data") == str(Path("data", "camvid-11"))
    assert under_data_root("/abs/camvid", "data") == "/abs/camvid"
    assert under_data_root("camvid-11", "") == "camvid-11"


def test_a_source_naming_a_dataset_yaml_is_that_yaml_with_its_keys_over_it():
    camvid, _ = source_fields({"dataset": "camvid-segnet", "name": "camvid", "images": "train",
                               "labels": "trainannot"}, "data")
    shipped = yaml.safe_load((EVAL_CONFIGS / "camvid-segnet.yaml").read_text())
    assert camvid == {**shipped, "name": "camvid", "images": "train", "labels": "trainannot", "list": "",
                      "root": str(Path("data", "camvid-11"))}
    facade, _ = source_fields({"dataset": "labelmefacade", "list": "train.txt"}, "/d")
    assert facade["list"] == "train.txt" and facade["root"] == "/d/labelmefacade" and facade["encoding"] == "color"
    folders, _ = source_fields({"dataset": "labelmefacade", "images": "im", "labels": "lab"}, "/d")
    assert (folders["list"], folders["images"], folders["labels"]) == ("", "im", "lab")  # folders replace its list
    with pytest.raises(ConfigError, match="unknown dataset 'no-such-set'"):
        source_fields({"dataset": "no-such-set"})
    with pytest.raises(ConfigError, match="source camvid: unknown key 'lists'"):
        load_sources([{"dataset": "camvid-segnet", "name": "camvid", "lists": "x.txt"}], "data")


def test_the_cpu_recipe_names_the_eval_yamls():
    """The recipe's config names configs/eval's CamVid and LabelMeFacade instead of copying them (their data is
    not read here: the class names are in the YAMLs)."""
    config = yaml.safe_load((EVAL_CONFIGS.parents[1] / "configs" / "cpu_camvid_facade_lite0.yaml").read_text())
    assert [e.get("dataset") for e in config["sources"]] == ["camvid-segnet", "labelmefacade"]
    sources, spec = load_sources(config["sources"], "/data")
    assert [(s.name, s.root, s.images or s.list) for s in sources] == [
        ("camvid", "/data/camvid-11", "train"), ("labelmefacade", "/data/labelmefacade", "train.txt")]
    assert "door" in data.source_label_keys(sources, spec)


@pytest.fixture
def new_dataset(tmp_path):
    """A dataset label_sentences.yaml has never heard of, described by one YAML: classes sky, road, car (keys of
    label_sentences.yaml) and junk, which it maps to a key of its own with its own sentence."""
    labels = write_id_dataset(tmp_path / "mine")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "root": "mine", "list": "train.txt", "names": "names.txt",
                                    "taxonomy": {"junk": NEW_KEY}, "sentences": {NEW_KEY: NEW_SENTENCE}}))
    return path, labels


def test_a_dataset_added_for_training_with_one_yaml(new_dataset, tmp_path):
    path, labels = new_dataset
    before = LABELS_YAML.read_bytes()
    sources, spec = load_sources([{"dataset": str(path), "weight": 2}], data_root=tmp_path)
    assert NEW_KEY not in load_label_spec().sentences and spec.sentences[NEW_KEY] == NEW_SENTENCE
    keys = data.source_label_keys(sources, spec)
    assert keys == ["sky", "road", "car", NEW_KEY] and sources[0].weight == 2.0
    table = onehot_table(keys, 8)
    target = data.MultiSourceDataset(sources, spec, table)[0]["target"]  # (H, W) table rows, -1 = ignore (255)
    assert torch.equal(target, torch.from_numpy(np.where(labels[0] == 255, -1, labels[0].astype(np.int64))))
    # its label table: label_table.py embeds the YAML's own sentence beside label_sentences.yaml's
    label_table.main([f"--out={tmp_path / 'table.pt'}", f"--datasets={path}", f"--data_root={tmp_path}",
                      f"--labels=sky,{NEW_KEY}",
                      "--clip_random_init", "--text_cache=off"])
    made = load_label_table(tmp_path / "table.pt")
    assert made.names == ["sky", NEW_KEY] and made.sentences[1] == NEW_SENTENCE
    assert LABELS_YAML.read_bytes() == before


@pytest.mark.slow
def test_train_on_a_dataset_added_with_one_yaml(new_dataset, tmp_path):
    path, _ = new_dataset
    out = tmp_path / "run"
    config = {"sources": [{"dataset": str(path)}], "data_root": str(tmp_path), "label_table": "onehot",
              "embed_dim": 8, "backbone": "mit_b0", "crop_size": 32, "short_side": 30, "scale_min": 1.0,
              "scale_max": 1.0, "batch_size": 2, "workers": 0, "max_steps": 2, "warmup_steps": 1, "log_every": 1,
              "save_every": 2, "amp": "off", "threads": 1, "out_dir": str(out)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main([str(tmp_path / "config.yaml")])
    ckpt = torch.load(out / "ckpt_00000002.pt", map_location="cpu", weights_only=True)
    assert ckpt["trained_keys"] == ["sky", "road", "car", NEW_KEY]
