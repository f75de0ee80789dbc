"""Sources, readers, label decoding, bad input and the merged CamVid + LabelMeFacade acceptance batch."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
import label_spec
import labels
from data_fixtures import (CAMVID_NAMES, COLORS, ROW, SPEC, TABLE, readme_sources, write_box_targets, write_coco_boxes,
                           write_color_dataset, write_id_dataset, write_openimages)
from errors import ConfigError, DataError, LabelKeyError
from sampler import BalancedSampler
from transforms import TrainTransform


def id_source(root, **kw):
    return data.SourceConfig.from_dict(dict(dict(name="ids", root=str(root), list="train.txt", names="names.txt",
                                                 taxonomy="toy-ids"), **kw))


# ---- SourceConfig -----------------------------------------------------------------------------------------------------

def test_source_config_rejects_unknown_and_mistyped_keys():
    with pytest.raises(ConfigError, match=r"source cam: unknown key 'lists'"):
        data.SourceConfig.from_dict({"name": "cam", "root": "/x", "lists": "train.txt", "names": "n.txt"})
    with pytest.raises(ConfigError, match=r"source cam: ignore must be list"):
        data.SourceConfig.from_dict({"name": "cam", "root": "/x", "list": "t.txt", "names": "n", "ignore": 11})
    with pytest.raises(ConfigError, match=r"source cam: encoding color needs 'colors'"):
        data.SourceConfig.from_dict({"name": "cam", "root": "/x", "list": "t.txt", "encoding": "color"})
    with pytest.raises(ConfigError, match=r"source o: kind boxes goes with encoding coco_boxes"):
        data.SourceConfig.from_dict({"name": "o", "root": "/x", "list": "t.txt", "names": "n", "kind": "boxes"})
    with pytest.raises(ConfigError, match=r"source o: encoding coco_boxes needs 'box_targets'"):
        data.SourceConfig.from_dict({"name": "o", "root": "/x", "encoding": "coco_boxes", "kind": "boxes",
                                     "images": "i", "index": "o365-index"})
    cfg = data.SourceConfig.from_dict({"name": "cam", "root": "/x", "list": "t.txt", "names": "n", "weight": 2})
    assert cfg.weight == 2.0 and cfg.ignore == [255] and cfg.kind == "dense"


def test_unmapped_class_name_is_an_error_naming_it(tmp_path):
    write_id_dataset(tmp_path)
    (tmp_path / "names.txt").write_text("sky\nroad\ncar\nlamppost\n")
    with pytest.raises(LabelKeyError, match="lamppost"):
        data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)


# ---- readers ----------------------------------------------------------------------------------------------------------

def test_id_png_decodes_to_rows_with_ignore(tmp_path):
    raw = write_id_dataset(tmp_path)
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)
    # names: sky road car junk; junk is mapped to ignore, 255 is the ignore id
    lut = {0: ROW["sky"], 1: ROW["road"], 2: ROW["car"], 3: -1, 255: -1}
    for k, lab in enumerate(raw):
        sample = ds[(0, k, 0, k)]
        expected = np.vectorize(lut.get)(lab)
        assert sample["target"].dtype == torch.int64 and sample["target"].shape == lab.shape
        assert np.array_equal(sample["target"].numpy(), expected)
        assert sample["image"].shape == (3, 30, 40) and sample["kind"] == "dense" and sample["source"] == "ids"
    assert ds[0]["label_rows"].tolist() == sorted([ROW["sky"], ROW["road"], ROW["car"]])


def test_inline_class_names_and_custom_ignore(tmp_path):
    raw = write_id_dataset(tmp_path)
    cfg = data.SourceConfig.from_dict(dict(name="ids", root=str(tmp_path), list="train.txt", taxonomy="toy-ids",
                                           class_names=["sky", "road", "car"], ignore=[3, 255]))
    target = data.MultiSourceDataset([cfg], SPEC, TABLE)[0]["target"].numpy()
    assert np.array_equal(target == -1, np.isin(raw[0], [3, 255]))


def test_mseg_layout_with_shared_names_and_real_yaml(tmp_path, shared_dir):
    """MSeg's prepared ADE20K layout: 150 names from mseg-lists, ignore 255, the real label_sentences.yaml."""
    names_file = shared_dir / "data/mseg-lists/dataset_lists/ade20k-150/ade20k-150_names.txt"
    names = names_file.read_text().split("\n")[:150]
    (tmp_path / "images/training").mkdir(parents=True)
    (tmp_path / "annotations_semseg150/training").mkdir(parents=True)
    Image.new("RGB", (16, 8)).save(tmp_path / "images/training/ADE_train_00000001.jpg")
    lab = np.full((8, 16), 255, np.uint8)
    lab[:, :4], lab[:, 4:8], lab[:, 8:12] = 0, 2, 149  # first, third and last class
    Image.fromarray(lab).save(tmp_path / "annotations_semseg150/training/ADE_train_00000001.png")
    (tmp_path / "train.txt").write_text("images/training/ADE_train_00000001.jpg "
                                        "annotations_semseg150/training/ADE_train_00000001.png\n")
    spec = label_spec.load_label_spec()
    cfg = data.SourceConfig.from_dict(dict(name="ade", root=str(tmp_path), list="train.txt", names=str(names_file),
                                           taxonomy="ade20k-150"))
    keys = data.source_label_keys([cfg], spec)
    table = labels.LabelTable(keys, keys, torch.eye(len(keys)), "test")
    target = data.MultiSourceDataset([cfg], spec, table)[0]["target"]
    expected = label_spec.dataset_label_keys(spec, "ade20k-150", names)
    for col, class_id in [(0, 0), (5, 2), (9, 149)]:
        assert table.names[target[3, col]] == expected[class_id]
    assert (target[:, 12:] == -1).all()


def test_color_png_decodes_rgba_codes(tmp_path):
    colours = write_color_dataset(tmp_path)
    cfg = data.SourceConfig.from_dict(dict(name="facade", root=str(tmp_path), list="train.txt", encoding="color",
                                           colors=COLORS, taxonomy="toy-colors"))
    ds = data.MultiSourceDataset([cfg], SPEC, TABLE)
    for k, rgb in enumerate(colours):
        target = ds[k]["target"].numpy()
        assert np.array_equal(target == ROW["window"], (rgb == [0, 0, 128]).all(-1))
        assert np.array_equal(target == ROW["road"], (rgb == [128, 64, 0]).all(-1))
        assert np.array_equal(target == -1, (rgb == 0).all(-1))  # black = various = ignore


def test_unknown_colour_names_path_and_colour(tmp_path):
    write_color_dataset(tmp_path)
    lab = np.array(Image.open(tmp_path / "labels/1.png"))
    lab[3, 5, :3] = (7, 8, 9)
    Image.fromarray(lab, "RGBA").save(tmp_path / "labels/1.png")
    cfg = data.SourceConfig.from_dict(dict(name="facade", root=str(tmp_path), list="train.txt", encoding="color",
                                           colors=COLORS, taxonomy="toy-colors"))
    ds = data.MultiSourceDataset([cfg], SPEC, TABLE)
    with pytest.raises(DataError, match=r"labels/1.png: colour 7:8:9 at \(x=5, y=3\)"):
        ds[1]


def openimages_source(root):
    return data.SourceConfig.from_dict(dict(name="oi", root=str(root), encoding="openimages", kind="coarse",
                                            taxonomy="toy-oi", index="index", images="images", masks="masks"))


def test_openimages_masks_resize_overlap_and_unlabelled(tmp_path):
    expected = write_openimages(tmp_path)
    ds = data.MultiSourceDataset([openimages_source(tmp_path)], SPEC, TABLE)
    assert ds.source_sizes == [2]
    for k, image_id in enumerate(["a1", "b2"]):  # first-appearance order of the CSV
        sample = ds[k]
        assert sample["kind"] == "coarse"
        assert np.array_equal(sample["target"].numpy(), expected[image_id])
    assert data.source_label_keys([openimages_source(tmp_path)], SPEC) == ["car", "person"]


def box_source(root, **kw):
    return data.SourceConfig.from_dict(dict(dict(name="o365", root=str(root), encoding="coco_boxes", kind="boxes",
                                                 taxonomy="toy-o365", index="index", images="train",
                                                 box_targets="targets"), **kw))


def test_box_source_reads_boxes_and_targets_of_the_index(tmp_path):
    targets = write_coco_boxes(tmp_path)
    ds = data.MultiSourceDataset([box_source(tmp_path)], SPEC, TABLE)
    assert ds.source_sizes == [2] and ds.sources[0].class_names == ["person", "car", "junk"]
    assert ds.sources[0].samples.image(0) == tmp_path / "train/patch7/objects365_v1_00000007.jpg"  # mmdet layout
    sample = ds[0]
    # "junk" maps to ignore: its box and its target row are dropped together
    assert sample["box_rows"].tolist() == [ROW["car"], ROW["person"]]
    assert torch.equal(sample["box_targets"], torch.from_numpy(targets[[0, 2]].astype(np.float32)))
    assert sample["boxes"].dtype == torch.float32
    assert sample["boxes"].tolist() == [[4, 6, 24, 16], [40, 20, 50, 45]]  # COCO x, y, w, h -> x1, y1, x2, y2
    assert (sample["target"] == -1).all() and sample["kind"] == "boxes"
    assert ds[1]["boxes"].shape == (0, 4) and ds[1]["box_targets"].shape == (0, 6)


def test_boxes_without_target_are_dropped(tmp_path):
    """NaN rows: clip_image.py --skip_bad could not read the image when it made the targets."""
    targets = write_coco_boxes(tmp_path)
    targets[2] = np.nan
    build = json.loads((tmp_path / "index/index.json").read_text())["build"]
    write_box_targets(tmp_path / "partial", targets, build)
    sample = data.MultiSourceDataset([box_source(tmp_path, box_targets="partial")], SPEC, TABLE)[0]
    assert sample["box_rows"].tolist() == [ROW["car"]] and sample["boxes"].tolist() == [[4, 6, 24, 16]]


def test_weak_sources_pickle_as_folder_names(tmp_path):
    """A spawned DataLoader worker receives the dataset pickled: the index sources must travel as folder names and
    map the files again (a pickled memmap is a full copy: 26 GB of Objects365 box targets)."""
    write_coco_boxes(tmp_path / "o365")
    write_openimages(tmp_path / "oi")
    ds = data.MultiSourceDataset([box_source(tmp_path / "o365"), openimages_source(tmp_path / "oi")], SPEC, TABLE)
    for source in ds.sources:
        assert len(pickle.dumps(source.samples)) < 3000
    again = pickle.loads(pickle.dumps(ds))
    for key in [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0)]:
        a, b = ds[key], again[key]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "boxes", "box_targets"))


def test_box_targets_must_be_finished_and_of_this_index(tmp_path):
    targets = write_coco_boxes(tmp_path)
    build = json.loads((tmp_path / "index/index.json").read_text())["build"]
    write_box_targets(tmp_path / "unfinished", targets, build, done=[1, 0])
    with pytest.raises(DataError, match=r"unfinished: 1 of 2 shards are not written yet; rerun"):
        data.MultiSourceDataset([box_source(tmp_path, box_targets="unfinished")], SPEC, TABLE)
    write_box_targets(tmp_path / "other", targets, "0123abcd")
    with pytest.raises(DataError, match=r"other: box targets of index build 0123abcd, but .*index is build"):
        data.MultiSourceDataset([box_source(tmp_path, box_targets="other")], SPEC, TABLE)
    write_box_targets(tmp_path / "short", targets[:2], build, done=[1])
    with pytest.raises(DataError, match=r"short/targets.npy: expected float16 \(3, 6\), got float16 \(2, 6\)"):
        data.MultiSourceDataset([box_source(tmp_path, box_targets="short")], SPEC, TABLE)


# ---- bad input ----------------------------------------------------------------------------------------------------------

def test_truncated_image(tmp_path):
    write_id_dataset(tmp_path)
    path = tmp_path / "img/1.png"
    path.write_bytes(path.read_bytes()[:200])
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE, TrainTransform(crop_size=16))
    with pytest.raises(DataError, match=r"img/1.png: unreadable or truncated image"):
        ds[1]
    (tmp_path / "img/2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"img/2.png: unreadable image"):
        ds[2]


def test_label_image_size_mismatch(tmp_path):
    write_id_dataset(tmp_path)
    Image.fromarray(np.zeros((30, 41), np.uint8)).save(tmp_path / "ann/0.png")
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)
    with pytest.raises(DataError, match=r"ann/0.png: label size 41x30 differs from image size 40x30"):
        ds[0]


def test_label_value_outside_names(tmp_path):
    write_id_dataset(tmp_path)
    lab = np.zeros((30, 40), np.uint8)
    lab[0, 0], lab[1, 1] = 4, 200  # 4 classes (0..3) and ignore 255: 4 and 200 are neither
    Image.fromarray(lab).save(tmp_path / "ann/2.png")
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)
    with pytest.raises(DataError, match=r"ann/2.png: label values \[4, 200\] are neither class ids 0..3"):
        ds[2]


def test_missing_file_is_an_error_when_read_and_a_counted_skip_under_skip_bad(tmp_path):
    """Nothing is stat-ed per file at start (MSeg's lists are 180k lines, often on a network filesystem): a file
    that is missing is reported when it is read."""
    write_id_dataset(tmp_path, n=3)
    (tmp_path / "img/0.png").unlink()
    (tmp_path / "ann/2.png").unlink()
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)
    assert ds.source_sizes == [3]
    with pytest.raises(DataError, match=r"img/0.png: file not found"):
        ds[0]
    with pytest.raises(DataError, match=r"ann/2.png: file not found"):
        ds[2]
    skipping = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE, skip_bad=True)
    sample = skipping[(0, 2, 0, 0)]  # 2 is missing, 0 too: replaced by 1
    assert sample["key"] == (0, 1) and len(sample["skipped"]) == 2


def test_empty_list_and_malformed_line(tmp_path):
    write_id_dataset(tmp_path)
    (tmp_path / "train.txt").write_text("\n")
    with pytest.raises(DataError, match=r"train.txt: the list is empty"):
        data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)
    (tmp_path / "train.txt").write_text("img/0.png\n")
    with pytest.raises(DataError, match=r"train.txt:1: expected `image_path label_path`"):
        data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE)


def test_skip_bad_replaces_and_counts_across_workers(tmp_path):
    write_id_dataset(tmp_path, n=4)
    (tmp_path / "img/1.png").write_bytes(b"broken")
    ds = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE, TrainTransform(crop_size=16),
                                 skip_bad=True)
    sample = ds[(0, 1, 0, 5)]
    assert sample["key"] == (0, 2) and len(sample["skipped"]) == 1 and "img/1.png" in sample["skipped"][0]
    sampler = BalancedSampler([4], batch_size=2, batches_per_epoch=4)  # 8 draws: sample 1 drawn twice
    loader = data.make_loader(ds, sampler, workers=1)  # the count must cross the worker process boundary
    batches = list(loader)
    assert all(b["image"].shape == (2, 3, 16, 16) for b in batches)  # replaced, not dropped
    assert loader.skipped == 2
    strict = data.MultiSourceDataset([id_source(tmp_path)], SPEC, TABLE, TrainTransform(crop_size=16))
    with pytest.raises(DataError):
        strict[1]


# ---- acceptance: CamVid + LabelMeFacade in one batch ------------------------------------------------------------------

@pytest.mark.slow
def test_merged_camvid_labelmefacade_batch(data_root):
    """A batch of 4 holds 2 of each source, with labels decoded to the right keys (checked against the raw files).

    short_side=0 and scale 1 keep the original pixels and a 768 crop holds every image whole (top-left, padded), so
    target pixels line up with the raw label files; flips and photometric changes are off."""
    spec = label_spec.load_label_spec()
    sources = [data.SourceConfig.from_dict(d) for d in readme_sources(data_root)]
    keys = data.source_label_keys(sources, spec)
    table = labels.LabelTable(keys, keys, torch.eye(len(keys)), "test")
    still = TrainTransform(short_side=0, crop_size=768, scale_range=(1.0, 1.0), p_flip=0, p_jitter=0, p_blur=0,
                                p_noise=0, p_jpeg=0)
    ds = data.MultiSourceDataset(sources, spec, table, still)
    assert ds.source_sizes == [367, 100]
    sampler = BalancedSampler(ds.source_sizes, batch_size=4, seed=3)
    batch = next(iter(data.make_loader(ds, sampler, workers=0)))
    assert sorted(batch["source"]) == ["camvid", "camvid", "labelmefacade", "labelmefacade"]
    assert batch["image"].shape == (4, 3, 768, 768) and batch["target"].shape == (4, 768, 768)
    checked = {"pole": 0, "window": 0, "black": 0}
    for b, (s, i) in enumerate(batch["key"]):
        target = batch["target"][b].numpy()
        label_path = ds.sources[s].samples.label_path(i)
        if batch["source"][b] == "camvid":
            raw = np.array(Image.open(label_path))  # (360, 480) ids in SegNet's order, 11 = unlabelled
            assert CAMVID_NAMES[2] == "Pole"
            h, w = raw.shape
            assert (target[h:] == -1).all() and (target[:, w:] == -1).all()  # padding
            for y, x in np.argwhere(raw == 2)[:5]:
                assert table.names[target[y, x]] == "pole"
                checked["pole"] += 1
            assert (target[:h, :w][raw == 11] == -1).all()
            road = np.argwhere(raw == 3)[0]
            assert table.names[target[tuple(road)]] == "road"
        else:
            rgb = np.array(Image.open(label_path).convert("RGB"))
            for y, x in np.argwhere((rgb == [0, 0, 128]).all(-1))[:5]:
                assert table.names[target[y, x]] == "window"
                checked["window"] += 1
            for y, x in np.argwhere((rgb == 0).all(-1))[:5]:
                assert target[y, x] == -1
                checked["black"] += 1
        assert set(np.unique(target[target >= 0]).tolist()) <= set(ds.sources[s].label_rows.tolist())
    assert all(checked.values()), checked  # each kind of spot check really ran
    # the CamVid pixels in full: every one is LUT[raw]
    s, i = next(k for k, src in zip(batch["key"], batch["source"]) if src == "camvid")
    raw = np.array(Image.open(ds.sources[s].samples.label_path(i)))
    b = batch["key"].index((s, i))
    assert np.array_equal(batch["target"][b, :360, :480].numpy(), ds.sources[s].lut[raw])


@pytest.mark.slow
def test_whole_real_lists(data_root):
    spec = label_spec.load_label_spec()
    sources = [data.SourceConfig.from_dict(d) for d in readme_sources(data_root)]
    assert data.source_label_keys(sources, spec)[:3] == ["sky", "building", "pole"]
    val = readme_sources(data_root, camvid_split="val")[0]
    keys = data.source_label_keys(sources, spec)
    table = labels.LabelTable(keys, keys, torch.eye(len(keys)), "test")
    assert data.MultiSourceDataset([data.SourceConfig.from_dict(val)], spec, table).source_sizes == [101]
