"""Training data from several datasets with conflicting taxonomies, as batches of label-table rows.

A source (SourceConfig) is one dataset on disk, described in YAML (dataset_yaml.py). Its class names map to label
keys of label_sentences.yaml or of its own YAML (label_spec.dataset_label_keys), the keys to rows of the label table, and
a lookup table (LUT, raw id -> row, -1 ignore) turns each decoded label map into rows with one numpy index. From
then on everything speaks table rows.

MSeg's prepared layouts of the seven dense SSIW training sets are id PNGs with 255 = ignore: encoding "id",
ignore [255], names = mseg-api's mseg/dataset_lists/<name>/<name>_names.txt, taxonomy = <name>. Their list
lines (mseg-api mseg/dataset_lists/<name>/list/train.txt), relative to each dataset's root:
  ade20k-150          images/training/ADE_train_00000001.jpg annotations_semseg150/training/ADE_train_00000001.png
  bdd                 seg/images/train/0004a4c0-d4dff0ad.jpg seg/labels/train/0004a4c0-d4dff0ad_train_id.png
  cityscapes-19       leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
                      gtFine_19cls/train/aachen/aachen_000000_000019_gtFine_labelIds.png
  coco-panoptic-133   images/train2017/<id>.jpg semantic_annotations133/train2017/<id>.png  (as its val lists)
  idd-39              leftImg8bit/train/0/005506_leftImg8bit.png gtFine39/train/0/005506_gtFine_labelids.png
  mapillary-public65  training/images/--NSVcUgfVhFd6uzkqHOOg.jpg training_semseg65/labels/--NSVcUgfVhFd6uzkqHOOg.png
  sunrgbd-37          image/train/img-000001.jpg semseg-label37/train/00000001.png
(the "-relabeled" variants use the same images with relabelled PNGs and their own names files.)

Workers and skips: DataLoader workers are separate processes, so a counter bumped there never reaches the trainer.
With skip_bad, a bad sample is replaced by the next sample of its source (batch size and balance stay intact, which
DDP needs) and its error message rides in the batch under "skipped"; `make_loader`'s wrapper counts them in the main
process as the batches reach the trainer (`loader.skipped`), and train.py sums the counts of all ranks.

Workers and signals: SIGTERM or SIGINT sent to the whole process group (Ctrl-C, `kill -- -PGID`) or to every process
of a job (batch schedulers) reaches the workers too. They ignore it: the trainer finishes its step, checkpoints, and
shuts them down itself (worker_ignores_stop_signals).
"""
from __future__ import annotations  # the field named `list` below would otherwise shadow the builtin in annotations

import gc
import os
import signal
import threading
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from errors import ConfigError, DataError, LabelKeyError
from images import decode_rgb, open_image
from label_spec import dataset_label_keys
from readers import FORMATS
from sampler import BalancedSampler
from transforms import TrainTransform, draft_size, eval_image

KINDS = ("dense", "coarse", "boxes")
NOT_A_CLASS = -2  # LUT value of a raw id that is neither a class nor ignore: decoding it is an error


@dataclass
class SourceConfig:
    name: str                  # unique; shown in batches, logs and errors
    root: str                  # relative paths below are joined to this (a relative root: under --data_root)
    list: str = ""             # id/color: MSeg-style list, `image label` per line, relative to root (or images + labels)
    names: str = ""            # id: names file, line index = class id (or give class_names inline)
    class_names: list = field(default_factory=lambda: [])
    taxonomy: str = ""         # dataset mapping in label_sentences.yaml ("" = name; a YAML's own mapping: dataset_yaml)
    encoding: str = "id"       # the on-disk format: a key of readers.FORMATS (id | color | openimages | coco_boxes)
    ignore: list = field(default_factory=lambda: [255])  # id: raw ids that are ignored (CamVid 11, MSeg 255)
    colors: dict = field(default_factory=dict)  # color: {"R:G:B": class name}
    kind: str = "dense"        # dense (L_HD) | coarse (L_LD) | boxes (L_WD)
    weight: float = 1.0        # sampling weight (equal weights = the paper's balance)
    index: str = ""            # openimages/coco_boxes: index folder written by `python indexes.py` (index_format.Index)
    images: str = ""           # openimages/coco_boxes: image folder (openimages: <ImageID>.jpg); id/color: with labels
    labels: str = ""           # id/color, instead of list: label folder, paired with `images` by file stem
    image_suffix: str = ".jpg"  # id/color folder pairs: the image file of stem s is s + image_suffix
    label_suffix: str = ".png"  # ... and its label s + label_suffix (".tif": detectron2's 16-bit maps)
    label_folder: str = ""     # id/color lists: lines may hold the image alone, its label is label_folder/<stem>
                               # + label_suffix (LabelMeFacade's own train.txt)
    masks: str = ""            # openimages: folder of the mask PNGs (the MaskPath column)
    box_targets: str = ""      # boxes: CLIP box-target folder written by clip_image.py
    rest: str = ""             # evaluation only: the class that stands for everything else (weizmann-horses'
                               # background), predicted wherever a label of evaluate.py's --background wins

    @classmethod
    def from_dict(cls, d: dict) -> SourceConfig:
        """Build from a mapping of fields (dataset_yaml.py reads them from YAML and applies the data root); unknown keys
        and wrongly typed values raise, naming source and key."""
        name = d.get("name", "?")
        known = {f.name: f for f in fields(cls)}
        for key, value in d.items():
            if key not in known:
                raise ConfigError(f"source {name}: unknown key {key!r} (known: {', '.join(known)})")
            f = known[key]
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            expected = str if default is MISSING else type(default)  # name and root have no default
            if expected is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"source {name}: {key} must be {expected.__name__}, got {value!r}")
        for key in ("name", "root"):
            if key not in d:
                raise ConfigError(f"source {name}: missing required key {key!r}")
        cfg = cls(**{k: float(v) if k == "weight" else v for k, v in d.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.encoding not in FORMATS:
            raise ConfigError(f"source {self.name}: encoding must be one of {tuple(FORMATS)}, got {self.encoding!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"source {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not all(isinstance(i, int) and 0 <= i < 65536 for i in self.ignore):
            raise ConfigError(f"source {self.name}: ignore must list raw ids in 0..65535, got {self.ignore}")
        if not self.weight > 0:
            raise ConfigError(f"source {self.name}: weight must be > 0, got {self.weight}")
        for need in FORMATS[self.encoding].required:
            if isinstance(need, tuple):
                if sum(bool(getattr(self, key)) for key in need) != 1:
                    raise ConfigError(f"source {self.name}: encoding {self.encoding} needs exactly one of {need}")
            elif not getattr(self, need):
                raise ConfigError(f"source {self.name}: encoding {self.encoding} needs {need!r}")
        FORMATS[self.encoding].check(self)
        if (self.kind == "boxes") != (self.encoding == "coco_boxes"):
            raise ConfigError(f"source {self.name}: kind boxes goes with encoding coco_boxes (and only with it)")
        if self.kind == "boxes" and not self.box_targets:
            raise ConfigError(f"source {self.name}: encoding {self.encoding} needs 'box_targets'")

    def path(self, rel: str) -> Path:
        """`rel` joined to root (absolute paths are kept)."""
        return Path(self.root) / rel


def source_class_names(cfg: SourceConfig) -> list[str]:
    """The source's class names; list index = raw class id."""
    return FORMATS[cfg.encoding].class_names(cfg)


def source_label_keys(sources: list[SourceConfig], spec) -> list[str]:
    """Every label key the sources can name, in a stable order (sources, then class ids), without repeats."""
    keys = []
    for cfg in sources:
        for key in dataset_label_keys(spec, cfg.taxonomy or cfg.name, source_class_names(cfg)):
            if key is not None and key not in keys:
                keys.append(key)
    return keys


class Source:
    """A SourceConfig resolved against the label spec and table: its samples (readers.FORMATS) and the raw-id ->
    table-row lookup."""

    def __init__(self, cfg: SourceConfig, spec, row_of: dict[str, int]):
        self.cfg = cfg
        fmt = FORMATS[cfg.encoding]
        self.class_names = fmt.class_names(cfg)
        keys = dataset_label_keys(spec, cfg.taxonomy or cfg.name, self.class_names)  # KeyError names the class
        missing = sorted({k for k in keys if k is not None and k not in row_of})
        if missing:
            raise LabelKeyError(f"source {cfg.name}: label keys {missing} are not in the label table")
        rows = [row_of[k] if k is not None else -1 for k in keys]
        self.label_rows = torch.tensor(sorted({r for r in rows if r >= 0}), dtype=torch.int64)
        n = len(self.class_names)
        self.ignore = fmt.ignore(cfg, n)
        # (max id + 1,) int64: raw id -> table row; -1 ignore; NOT_A_CLASS for ids that should not occur.
        # An id listed in `ignore` is ignored even if the names file names it.
        self.lut = np.full(max([n] + [i + 1 for i in self.ignore]), NOT_A_CLASS, np.int64)
        self.lut[:n] = rows
        self.lut[self.ignore] = -1
        self.samples = fmt.open(cfg)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int, transform: TrainTransform | None, rng: np.random.Generator | None = None,
             work_size=None) -> dict:
        """Sample i: decode, map labels to rows, augment (when `transform`, drawing from `rng`). Bad files raise
        DataError, and so does an image over the pixel budget (images.open_image; `work_size`: the size a model
        processes it at, for evaluation; training processes crops)."""
        if transform is not None and rng is None:
            raise ValueError("Source.load: a transform needs an rng (np.random.Generator) to draw its augmentation")
        image_path = self.samples.image(i)
        im = open_image(image_path, work_size)
        size = im.size  # (w, h) of the original, before any draft
        plan = transform.plan(*size, rng) if transform is not None else None
        image = decode_rgb(im, image_path, draft_size(plan) if plan else None)
        target = self._target(i, image_path, size)  # (h, w) int32 rows or None
        boxes, box_rows, box_targets = self._boxes(i)
        if transform is not None:
            image, target, boxes, keep = transform(image, size, target, boxes, plan)
            box_rows, box_targets = box_rows[keep], box_targets[keep]
        else:
            image = eval_image(image)  # (3, h, w)
            target = (torch.from_numpy(target).long() if target is not None
                      else torch.full(size[::-1], -1, dtype=torch.int64))
        return {"image": image, "target": target, "label_rows": self.label_rows, "boxes": boxes,
                "box_rows": box_rows, "box_targets": box_targets}

    def _target(self, i: int, image_path: Path, size: tuple[int, int]) -> np.ndarray | None:
        """(h, w) int32 label-table rows (-1 = ignore), checked against the image size and the class list."""
        label = self.samples.label(i, size)
        if label is None:
            return None
        raw, label_path = label
        w, h = size
        if raw.shape != (h, w):
            raise DataError(f"{label_path}: label size {raw.shape[1]}x{raw.shape[0]} differs from image size "
                            f"{w}x{h} ({image_path})")
        inside = (raw >= 0) & (raw < len(self.lut))
        rows = self.lut[np.where(inside, raw, 0)]
        bad = ~inside | (rows == NOT_A_CLASS)
        if bad.any():
            values = np.unique(raw[bad])
            raise DataError(f"{label_path}: label values {values[:10].tolist()} are neither class ids "
                            f"0..{len(self.class_names) - 1} of source {self.cfg.name} nor ignore {self.ignore}")
        return rows.astype(np.int32)

    def _boxes(self, i: int):
        """boxes (K, 4) xyxy original pixels, rows (K,) int64, targets (K, C); boxes of ignored classes dropped."""
        found = self.samples.boxes(i)
        if found is None:
            return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
        boxes, raw_ids, targets = found
        rows = torch.from_numpy(self.lut[raw_ids.numpy()])
        keep = rows >= 0
        return boxes[keep], rows[keep], targets[keep]


class MultiSourceDataset(torch.utils.data.Dataset):
    """All sources behind one index. Keys are (source, sample, epoch, draw) from BalancedSampler; a plain int is a
    global index (sources concatenated, epoch 0). Per-sample randomness is seeded by (seed, epoch, draw, source,
    sample), so a sample is the same in any worker, process or rerun.

    table: anything with `.names` (the label table's keys, row order), e.g. labels.LabelTable.
    """

    def __init__(self, sources: list[SourceConfig], spec, table, transform: TrainTransform | None = None,
                 seed: int = 0, skip_bad: bool = False, max_retries: int = 10):
        names = [cfg.name for cfg in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"source names must be unique, got {names}")
        row_of = {key: row for row, key in enumerate(table.names)}
        self.sources = [Source(cfg, spec, row_of) for cfg in sources]
        self.source_sizes = [len(s) for s in self.sources]
        self.transform, self.seed, self.skip_bad, self.max_retries = transform, seed, skip_bad, max_retries

    def __len__(self) -> int:
        return sum(self.source_sizes)

    def __getitem__(self, key) -> dict:
        if isinstance(key, (int, np.integer)):
            s, i = self._locate(int(key))
            key = (s, i, 0, int(key))
        s, i, epoch, draw = key
        src, skipped = self.sources[s], []
        for _ in range(self.max_retries + 1):
            rng = np.random.default_rng([self.seed, epoch, draw, s, i])
            try:
                sample = src.load(i, self.transform, rng)
                break
            except DataError as e:
                if not self.skip_bad:
                    raise
                skipped.append(f"source {src.cfg.name} sample {i}: {e}")
                i = (i + 1) % len(src)  # replace it with the next sample of the same source
        else:
            raise DataError(f"source {src.cfg.name}: {len(skipped)} bad samples in a row; last: {skipped[-1]}")
        sample.update(source=src.cfg.name, kind=src.cfg.kind, key=(s, i), skipped=skipped)
        return sample

    def _locate(self, index: int) -> tuple[int, int]:
        for s, n in enumerate(self.source_sizes):
            if index < n:
                return s, index
            index -= n
        raise IndexError(f"index out of range for {len(self)} samples")


def collate(samples: list[dict]) -> dict:
    """Samples -> the batch contract (see the losses helper): image (B, 3, H, W), target (B, H, W) int64,
    source/kind lists, label_rows list, boxes (K, 5) [image index, x1, y1, x2, y2], box_rows (K,),
    box_targets (K, C); plus key (source, sample) per image and skipped (messages of replaced bad samples)."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: images of different sizes {sorted(shapes)}; train with a crop (TrainTransform)")
    boxes = [torch.cat([torch.full((len(s["boxes"]), 1), float(b)), s["boxes"]], dim=1)  # (K_b, 4) -> (K_b, 5)
             for b, s in enumerate(samples)]
    widths = {s["box_targets"].shape[1] for s in samples if len(s["box_targets"])}
    if len(widths) > 1:
        raise ValueError(f"collate: box targets of different widths {sorted(widths)} (mixed target caches?)")
    width = widths.pop() if widths else 0
    return {"image": torch.stack([s["image"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples]),
            "source": [s["source"] for s in samples], "kind": [s["kind"] for s in samples],
            "label_rows": [s["label_rows"] for s in samples],
            "boxes": torch.cat(boxes) if boxes else torch.zeros(0, 5),
            "box_rows": torch.cat([s["box_rows"] for s in samples]),
            "box_targets": torch.cat([s["box_targets"].reshape(len(s["boxes"]), width) for s in samples]),
            "key": [s["key"] for s in samples], "skipped": [m for s in samples for m in s["skipped"]]}


class Loader:
    """A DataLoader plus the number of bad samples replaced in the batches it has yielded (`skipped`, counted in the
    main process); the first `show` messages are printed as they arrive."""

    def __init__(self, loader: DataLoader, show: int = 10):
        self.loader, self.skipped, self.show, self.frozen = loader, 0, show, False

    def __iter__(self):
        if not self.frozen:
            # The workers are forked now. gc.freeze() puts every object alive in the trainer out of the collector's
            # reach, so a full collection in a worker does not write to, and so copy, every page of the inherited
            # heap: 16 instead of 51 MiB private memory per worker (tools/bench_weak_data.py --compare_freeze).
            gc.freeze()
            self.frozen = True
        for batch in self.loader:
            for message in batch["skipped"]:
                self.skipped += 1
                if self.skipped <= self.show:
                    more = " (further skips are counted, not shown)" if self.skipped == self.show else ""
                    print(f"skipped: {message}{more}", flush=True)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore SIGINT, and SIGTERM from anyone but the parent.

    A group-wide SIGTERM would otherwise kill the workers mid-step and the trainer would die with "DataLoader worker
    ... is killed by signal" instead of finishing the step and checkpointing. SIGTERM from the parent still ends the
    worker, as torch's own handler does: torch and multiprocessing use it to stop workers that did not exit, and a
    worker ignoring it would hang the trainer's exit. Python handlers do not see the sender, so SIGTERM is blocked
    and taken by a thread that waits for it with its sender's pid.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the thread below inherits the mask

    def wait_for_parent_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)
    threading.Thread(target=wait_for_parent_sigterm, daemon=True).start()


def make_loader(dataset: MultiSourceDataset, sampler: BalancedSampler, workers: int = 4, pin_memory: bool = False,
                prefetch_factor: int = 4) -> Loader:
    """The DataLoader training uses. Persistent workers keep each worker's opened sources across epochs (the
    epoch rides in the sampler's keys, so nothing in a worker goes stale); prefetch_factor 4 keeps a few batches
    queued to absorb slow decodes (large JPEGs, many OpenImages masks). tools/bench_data.py measures the workers
    needed. Workers ignore stop signals meant for the trainer (worker_ignores_stop_signals)."""
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=prefetch_factor if workers > 0 else None,
                        worker_init_fn=worker_ignores_stop_signals)
    return Loader(loader)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and lists of tensors) to `device`; other values unchanged."""
    non_blocking = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=non_blocking)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=non_blocking) for t in v]
        else:
            out[k] = v
    return out
