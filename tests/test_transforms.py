"""Transform invariants: label values survive as a subset (+ ignore), flips invert, boxes follow the image,
a sample is a pure function of (seed, epoch, draw), JPEG draft decoding keeps the geometry."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
import label_spec
import labels
from data_fixtures import SPEC, TABLE, readme_sources, write_id_dataset
from transforms import TrainTransform, eval_image, hflip_boxes

STILL = dict(p_jitter=0, p_blur=0, p_noise=0, p_jpeg=0)  # geometry only
from sampler import BalancedSampler


def real_dataset(data_root, transform):
    spec = label_spec.load_label_spec()
    sources = [data.SourceConfig.from_dict(d) for d in readme_sources(data_root)]
    keys = data.source_label_keys(sources, spec)
    return data.MultiSourceDataset(sources, spec, labels.LabelTable(keys, keys, torch.eye(len(keys)), "t"), transform)


@pytest.mark.slow
def test_label_values_are_a_subset_plus_ignore(data_root):
    ds = real_dataset(data_root, TrainTransform())  # the paper's settings, every augmentation on by its chance
    for s, i, draw in [(0, 5, 0), (0, 300, 1), (1, 7, 2), (1, 99, 3)]:
        src = ds.sources[s]
        image = src.samples.image(i)
        raw_rows = set(np.unique(src._target(i, image, Image.open(image).size)).tolist())
        sample = ds[(s, i, 0, draw)]
        assert sample["image"].shape == (3, 640, 640) and sample["target"].shape == (640, 640)
        assert sample["image"].dtype == torch.float32 and sample["target"].dtype == torch.int64
        assert set(sample["target"].unique().tolist()) <= raw_rows | {-1}


@pytest.mark.slow
def test_plan_is_reproducible_per_seed_epoch_draw(data_root):
    ds = real_dataset(data_root, TrainTransform())
    a, b = ds[(1, 3, 2, 17)], ds[(1, 3, 2, 17)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    c = ds[(1, 3, 3, 17)]  # next epoch, same draw position: another augmentation
    assert not torch.equal(a["image"], c["image"])
    ds.seed = 1
    assert not torch.equal(a["image"], ds[(1, 3, 2, 17)]["image"])


@pytest.mark.slow
def test_same_sample_in_a_worker_process(data_root):
    ds = real_dataset(data_root, TrainTransform(crop_size=128, short_side=256))
    sampler = BalancedSampler(ds.source_sizes, batch_size=2, batches_per_epoch=2)
    keys = list(sampler)
    in_worker = list(data.make_loader(ds, sampler, workers=1))
    for batch_keys, batch in zip(keys, in_worker):
        direct = data.collate([ds[k] for k in batch_keys])
        assert torch.equal(direct["image"], batch["image"]) and torch.equal(direct["target"], batch["target"])


def test_flip_twice_is_identity():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 10.0, 4.0]])
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 10), 10), boxes)
    assert hflip_boxes(boxes, 10).tolist() == [[5.0, 2.0, 9.0, 9.0], [0.0, 0.0, 10.0, 4.0]]


def test_flip_mirrors_image_target_and_boxes():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    target = rng.integers(-1, 5, (50, 70)).astype(np.int32)
    boxes = torch.tensor([[3.0, 4.0, 30.0, 20.0]])
    t = TrainTransform(short_side=50, crop_size=80, scale_range=(1.3, 1.3), **STILL)  # 91x65 scaled, 80 crop
    plan = t.plan(70, 50, np.random.default_rng(1))
    plain = t(image, (70, 50), target, boxes, dict(plan, flip=False))
    flipped = t(image, (70, 50), target, boxes, dict(plan, flip=True))
    cw, ch = plan["crop"][2:]
    assert torch.equal(flipped[0][:, :ch, :cw], plain[0][:, :ch, :cw].flip(-1))
    assert torch.equal(flipped[1][:ch, :cw], plain[1][:ch, :cw].flip(-1))
    assert torch.allclose(flipped[2], hflip_boxes(plain[2], cw))


@pytest.mark.parametrize("seed", range(6))
def test_boxes_follow_the_image(seed):
    """A rectangle drawn in the label map and given as a box: after scale/crop/flip the labelled pixels and the
    moved box agree to within a pixel (clipped where the crop cuts it; dropped, with its row, where it vanishes)."""
    w, h = 120, 90
    target = np.full((h, w), 0, np.int32)
    rects = [(20.0, 15.0, 60.0, 50.0), (90.0, 60.0, 115.0, 85.0)]
    for k, (x1, y1, x2, y2) in enumerate(rects, 1):
        target[int(y1):int(y2), int(x1):int(x2)] = k
    image = Image.fromarray(np.zeros((h, w, 3), np.uint8))
    t = TrainTransform(short_side=90, crop_size=100, scale_range=(0.8, 2.0), **STILL)
    plan = t.plan(w, h, np.random.default_rng(seed))
    _, out, boxes, keep = t(image, (w, h), target, torch.tensor(rects), plan)
    kept = [k for k, flag in enumerate(keep.tolist(), 1) if flag]
    assert len(boxes) == len(kept)
    for k, box in zip(kept, boxes.tolist()):
        ys, xs = np.nonzero(out.numpy() == k)
        assert len(xs) > 0
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
    for k in set(range(1, 3)) - set(kept):  # a dropped box's rectangle is (almost) out of the crop
        assert (out.numpy() == k).sum() <= 100


def test_small_image_is_padded_with_mean_and_ignore():
    image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    t = TrainTransform(short_side=0, crop_size=48, scale_range=(1.0, 1.0), p_flip=0, **STILL)
    x, y, _, _ = t(image, (30, 20), np.zeros((20, 30), np.int32), torch.zeros(0, 4), t.plan(30, 20,
                                                                                            np.random.default_rng(0)))
    assert (x[:, 20:, :] == 0).all() and (x[:, :, 30:] == 0).all()  # 0 = the ImageNet mean after normalising
    assert (y[20:] == -1).all() and (y[:, 30:] == -1).all() and (y[:20, :30] == 0).all()
    assert torch.allclose(x[:, :20, :30], eval_image(image))


def test_draft_decodes_large_jpeg_smaller_with_the_same_geometry(tmp_path):
    """4000x3000 JPEG, short side -> 500: `draft` decodes at 1/4 scale; labels stay aligned with the content."""
    w, h = 4000, 3000
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = 255  # left half white
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=95)
    lab = np.zeros((h, w), np.uint8)
    lab[:, w // 2:] = 1
    Image.fromarray(lab).save(tmp_path / "big.png")
    (tmp_path / "names.txt").write_text("sky\nroad\n")
    (tmp_path / "train.txt").write_text("big.jpg big.png\n")
    cfg = data.SourceConfig.from_dict(dict(name="ids", root=str(tmp_path), list="train.txt", names="names.txt",
                                           taxonomy="toy-ids"))
    t = TrainTransform(short_side=500, crop_size=640, scale_range=(1.0, 1.0), p_flip=0, **STILL)
    assert data.decode_rgb(Image.open(tmp_path / "big.jpg"), tmp_path / "big.jpg", (667, 500)).size == (1000, 750)
    for draw in range(3):  # 1/4-scale decode above; below, image and label edges agree in the crop
        sample = data.MultiSourceDataset([cfg], SPEC, TABLE, t)[(0, 0, 0, draw)]
        white = (sample["image"].mean(0) > 0)[10].numpy()  # (C,) row 10: white (positive after normalising)
        road = (sample["target"] == 1)[10].numpy()
        label_edge = int(np.argmax(road))  # first road column
        image_edge = int(np.argmin(white))  # first dark column
        assert 333 - 27 <= label_edge <= 334  # 2000 * 500 / 3000 minus a crop offset in 0..27
        assert abs(image_edge - label_edge) <= 1
        assert white[:image_edge].all() and not white[image_edge + 2:image_edge + 40].any()
        assert not road[:label_edge].any() and road[label_edge:label_edge + 40].all()


def test_photometric_augmentations_change_only_the_image(tmp_path):
    write_id_dataset(tmp_path, n=1, size=(64, 48))
    cfg = data.SourceConfig.from_dict(dict(name="ids", root=str(tmp_path), list="train.txt", names="names.txt",
                                           taxonomy="toy-ids"))
    geometry = dict(short_side=48, crop_size=32, scale_range=(1.0, 1.5), p_flip=0.5)
    still = data.MultiSourceDataset([cfg], SPEC, TABLE, TrainTransform(**geometry, **STILL))[(0, 0, 0, 0)]
    loud = data.MultiSourceDataset([cfg], SPEC, TABLE, TrainTransform(**geometry, p_jitter=1, p_blur=1, p_noise=1,
                                                                       p_jpeg=1))[(0, 0, 0, 0)]
    assert torch.equal(still["target"], loud["target"])
    assert not torch.allclose(still["image"], loud["image"], atol=1e-3)
