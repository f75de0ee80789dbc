"""Train a segmentation-from-sentences model on several datasets at once.

    python train.py configs/demo_synthetic.yaml [--key=value ...]              # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py configs/ssiw_segformer_b5.yaml      # DDP: NCCL on CUDA, gloo on CPU
    python train.py configs/ssiw_segformer_b5.yaml --accum_steps 8           # 1 GPU, the same global batch of 16

Reads top to bottom: settings -> distributed/device -> label table -> data -> model -> optimizer -> resume -> loop.
"""
import random
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import distributed
from checkpoints import load_imagenet_branch, load_pretrained
from dataset_yaml import load_sources
from errors import ConfigError, DivergedError, WeightsError, run_main
from label_spec import imagenet_keys
from labels import label_table_sha256, load_label_table, onehot_table
from losses import RESIZE_MODES, compute_losses
from model import ModelConfig, build_model
from images import MAX_ASPECT, MAX_PIXELS, set_image_budget
from run_dir import Progress, claim_out_dir, find_resume, restore_checkpoint, save_checkpoint, set_aside
from runtime import choose_precision, compiled, set_threads
from sampler import BalancedSampler
from settings import FLOAT32_MAX, one_of, parse_settings, print_settings, require
from transforms import TrainTransform


@dataclass
class TrainSettings:
    # data: each source is a dict of data.SourceConfig fields (name, root, list, names, taxonomy, encoding, kind, ...)
    sources: list = field(default_factory=list)  # one mapping per source, or {dataset: NAME, ...} (dataset_yaml.py)
    data_root: str = "data"        # a source's relative root is a folder in here (dataset_yaml.py; README)
    label_table: str = ""          # table .pt from label_table.py, universal_cat2vec.npy, or "onehot" (ablation)
    crop_size: int = 640           # random crop (SegFormer 640, HRNet 713)
    short_side: int = 1080         # resize the shorter edge to this before random scaling
    scale_min: float = 0.5         # random scale range, relative to short_side
    scale_max: float = 2.0         # ... up to this
    batch_size: int = 2            # images per process per micro-batch
    accum_steps: int = 1           # micro-batches per optimizer step: global batch = batch_size x processes x this
    workers: int = 4               # DataLoader workers per process
    skip_bad: bool = False         # count and skip unreadable samples instead of stopping
    max_pixels: int = MAX_PIXELS   # an image (or label) larger than this is refused before decoding (100 MP)
    max_aspect: float = MAX_ASPECT # ... and one whose longer side is more than this times its shorter
    # model
    backbone: str = "mit_b5"       # mit_b0..mit_b5, hrnet_w18, hrnet_w48, efficientnet_lite0/1/2
    embed_dim: int = 512           # pixel embedding width; must equal the label table's
    decoder_dim: int = 0           # SegFormer MLP decoder width; 0 = 256 for mit_b0/b1 and lite0, 768 for the others
    aux_head: bool = False         # auxiliary FCN head on stage 3 (SegFormer-B5 in the paper)
    pretrained: str = ""           # public weights to start from: a checkpoint path, or efficientnet_lite0_imagenet
    imagenet_branch: bool = False  # EfficientNet-Lite: its ImageNet classifier as a frozen branch for labels never
                                   # seen in training (model.ImageNetBranch; from `pretrained`'s ImageNet weights)
    drop_path_rate: float = 0.1    # stochastic depth in the MiT / EfficientNet encoder
    dropout: float = 0.1           # before the decoder's last 1x1 conv
    # losses
    weight_dense: float = 1.0      # L_HD, dense labels
    weight_coarse: float = 1.0     # L_LD, coarse masks (OpenImages)
    weight_boxes: float = 1.0      # L_WD, boxes with CLIP image targets (Objects365)
    weight_aux: float = 0.4        # the auxiliary head's (mmseg's FCN auxiliary weight; not in the paper)
    weight_imagenet: float = 0.0   # distilling the ImageNet branch into the pixel embeddings (needs imagenet_branch)
    coarse_drop: float = 0.3       # fraction of the highest-loss pixels dropped per image (L_LD)
    loss_resize: str = "logits"    # logits | embeddings | labels (~4x less memory): losses.RESIZE_MODES
    # optimisation
    optimizer: str = "adamw"       # adamw (SegFormer) | sgd (HRNet)
    lr: float = 6e-5               # peak learning rate of the backbone
    head_lr_mult: float = 10.0     # decoder/aux heads learn this much faster
    weight_decay: float = 0.01     # decoupled (AdamW) or L2 (SGD); none on norms, biases, temperature
    momentum: float = 0.9          # sgd only
    warmup_steps: int = 1500       # linear warm-up from 0 to lr
    max_steps: int = 160000        # optimizer steps of the whole run
    poly_power: float = 1.0        # poly decay to 0 at max_steps
    grad_clip: float = 0.0         # 0 = off
    compile: bool = False          # torch.compile the network, DDP included (inductor, cache ~/.cache/ssiw/inductor);
                                   # off by default: it gained nothing on a 2-core CPU (0.95x; docs/speed.md)
    amp: str = "auto"              # auto (bf16 on GPUs and on CPUs with bf16 units, else off) | bf16 | fp16 | off
    # run
    out_dir: str = "runs/ssiw"     # checkpoints, log.jsonl
    seed: int = 0                  # offset by rank
    log_every: int = 20            # steps between log lines
    save_every: int = 1000         # steps between checkpoints
    keep_last: int = 3             # newest checkpoints kept (and always the one before the newest)
    resume: str = ""               # "" | "auto" (latest checkpoint in out_dir) | a checkpoint path
    overwrite: bool = False        # start over in an out_dir holding checkpoints: deletes them (log.jsonl is kept)
    allow_new_label_table: bool = False  # resume with another label table than the checkpoint's, on purpose
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch's CPU threads per process; 0 = usable cores / processes - workers

    def validate(self):
        """Every setting in range (parse_settings calls this): a bad value stops here, named, not deep inside."""
        require(self, "batch_size accum_steps max_steps log_every save_every keep_last crop_size short_side embed_dim",
                lambda v: v >= 1, "must be >= 1")
        require(self, "workers decoder_dim warmup_steps weight_decay poly_power grad_clip weight_dense weight_coarse "
                "weight_boxes weight_aux weight_imagenet", lambda v: v >= 0, "must be >= 0")
        require(self, "weight_imagenet", lambda v: not v or self.imagenet_branch, "needs imagenet_branch: true (the "
                "distillation target is that branch's output)")
        require(self, "lr head_lr_mult scale_min", lambda v: v > 0, "must be > 0")
        # torch steps in float32 and AdamW's first step divides by 1 - beta1 = 0.1: a larger lr overflows inside it
        top = FLOAT32_MAX / 10 / max(1.0, self.head_lr_mult)
        require(self, "lr", lambda v: v <= top, f"x head_lr_mult={self.head_lr_mult:g} overflows float32 in the "
                f"optimizer's step: lr must be <= {top:.3g}")
        require(self, "scale_max", lambda v: v >= self.scale_min, f"must be >= scale_min={self.scale_min}")
        require(self, "coarse_drop drop_path_rate dropout momentum", lambda v: 0 <= v < 1, "must be in [0, 1)")
        one_of(self, "amp", ("auto", "bf16", "fp16", "off"))
        one_of(self, "optimizer", ("adamw", "sgd"))
        one_of(self, "loss_resize", RESIZE_MODES)
        require(self, "sources", bool, "is empty: give a config that lists the training sources, e.g. `python "
                "train.py configs/cpu_camvid_facade_lite0.yaml` (README.md's CPU recipe, with its data) or "
                "configs/demo_synthetic.yaml (demo.sh makes its data); configs/ holds the others")
        require(self, "overwrite", lambda v: not (v and self.resume), f"contradicts resume={self.resume!r}: "
                "overwrite starts over, resume continues")
        require(self, "label_table", bool, "is not set: give a label table .pt made by label_table.py, the authors' "
                "universal_cat2vec.npy, or onehot")


def poly_lr(step, s):
    """Linear warm-up, then polynomial decay to zero at max_steps (mmseg's schedule)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    return s.lr * (1 - min(step, s.max_steps) / s.max_steps) ** s.poly_power


def param_groups(model, s):
    """Backbone vs heads (x head_lr_mult); no weight decay on norms, biases, the temperature and position params."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = not name.startswith("backbone.")
        decay = p.ndim > 1 and "pos" not in name
        key = (head, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr_mult": s.head_lr_mult if head else 1.0,
                           "weight_decay": s.weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
    return list(groups.values())


def training_label_table(s, keys):
    """The label table the run trains against: one-hot rows for "onehot", else the file, as wide as embed_dim."""
    table = onehot_table(keys, s.embed_dim) if s.label_table == "onehot" else load_label_table(s.label_table)
    if table.embeddings.shape[1] != s.embed_dim:
        raise WeightsError(f"label table {s.label_table} has width {table.embeddings.shape[1]}, "
                           f"embed_dim is {s.embed_dim}")
    return table


def make_optimizer(model, s):
    """AdamW (SegFormer) or SGD with momentum (HRNet) over param_groups."""
    groups = param_groups(model, s)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)  # sgd: validate() allows no other


def mixed_precision(precision, device):
    """The one autocast context and the GradScaler of a run in `precision` (fp32 | bf16 | fp16) on `device`. The
    scaler is enabled only for fp16 (bf16 has fp32's range). Returns (autocast context, scaler)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


class StopSignal:
    """SIGTERM/SIGINT ask the run to finish its step, checkpoint and exit 0 (batch schedulers send SIGTERM first)."""

    def __init__(self):
        self.signal = None
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.signal = signum

    def agreed(self, device) -> bool:
        """Whether any rank was signalled: every rank must call it, and all stop at the same step."""
        return distributed.any_rank(self.signal is not None, device)


def stop_diverged(step, terms, batch, out_dir):
    """Raise DivergedError for a non-finite loss, naming the step, the terms and the sources. With out_dir (rank 0,
    when the newest checkpoint holds the state that gave the loss), that checkpoint is set aside first."""
    values = {k: round(v.item(), 4) for k, v in terms.items()}
    aside = set_aside(Path(out_dir) / f"ckpt_{step:08d}.pt") if out_dir else ""
    raise DivergedError(f"non-finite loss at step {step}: {values}; sources {batch['source']}"
                        + (f"; {aside}" if aside else ""))


def checkpoint_meta(s, precision, model_args, table, keys, sources):
    """What every checkpoint of the run carries besides the training state: enough to rebuild, evaluate and resume
    it without any other file."""
    return {"config": asdict(s), "precision": precision,  # what amp meant on this machine
            "model_args": asdict(model_args),
            "label_table": asdict(table),  # small (N x D): evaluation needs no other file
            "label_table_sha256": label_table_sha256(asdict(table)),  # a resume onto other embeddings is refused
            # what "seen" means to evaluate.py: the keys the sources can name, and their taxonomies
            "trained_keys": keys, "taxonomies": {src.name: src.taxonomy or src.name for src in sources}}


def resume(s, model, optimizer, scaler, sampler, meta, master) -> int:
    """The step the run starts at: 0, or that of the checkpoint s.resume names (restored into the given objects)."""
    path = find_resume(s.resume, s.out_dir)
    if not path:
        return 0
    step = restore_checkpoint(path, model, optimizer, scaler, sampler, meta, s.allow_new_label_table, master)
    if step > s.max_steps:
        raise ConfigError(f"{path} is at step {step}, past max_steps={s.max_steps}")
    if master:
        print(f"resumed from {path} at step {step}")
        if step == s.max_steps:
            print(f"the run is complete (max_steps={s.max_steps}): nothing to train; raise max_steps to go on")
    return step


def main(argv=None):
    s = parse_settings(TrainSettings, argv)
    set_image_budget(s.max_pixels, s.max_aspect)

    # ---- distributed / device -----------------------------------------------------------------------------------
    rank, world, device = distributed.setup(s.device)
    master = rank == 0
    set_threads(s.threads, verbose=master)
    precision, why = choose_precision(s.amp, device)
    if master:
        print("settings:")
        print_settings(s)
        print(why)
        if s.max_steps < s.warmup_steps:
            print(f"warning: max_steps={s.max_steps} < warmup_steps={s.warmup_steps}: the run ends in the warm-up, "
                  f"its learning rate never reaches lr={s.lr}")
        claim_out_dir(s.out_dir, s.resume, s.overwrite)  # one run per out_dir, and not over an earlier run's
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(s.seed + rank)
    autocast, scaler = mixed_precision(precision, device)

    # ---- label table and data -------------------------------------------------------------------------------------
    sources, spec = load_sources(s.sources, s.data_root)  # + the label keys and sentences the sources bring
    keys = data.source_label_keys(sources, spec)  # every label key the sources can name, in a stable order
    table = training_label_table(s, keys)
    label_emb = table.embeddings.to(device)  # (N, D), frozen: the text side is never trained
    dataset = data.MultiSourceDataset(sources, spec, table, TrainTransform(
        short_side=s.short_side, crop_size=s.crop_size, scale_range=(s.scale_min, s.scale_max)),
        seed=s.seed, skip_bad=s.skip_bad)
    sampler = BalancedSampler(dataset.source_sizes, [src.weight for src in sources], batch_size=s.batch_size,
                              rank=rank, world_size=world, seed=s.seed, accum_steps=s.accum_steps)

    # ---- model and optimizer --------------------------------------------------------------------------------------
    model_args = ModelConfig(backbone=s.backbone, embed_dim=s.embed_dim, decoder_dim=s.decoder_dim,
                             aux_head=s.aux_head, box_head=any(src.kind == "boxes" for src in sources),
                             drop_path_rate=s.drop_path_rate, dropout=s.dropout, imagenet_branch=s.imagenet_branch)
    model = build_model(model_args)
    if s.pretrained:
        loaded = load_pretrained(model, s.pretrained)
    if model.imagenet is not None:
        if s.pretrained and loaded["format"] == "efficientnet_lite_imagenet":
            load_imagenet_branch(model, s.pretrained)
        elif not s.pretrained or any(k.startswith("imagenet.net.") for k in loaded["new"]):
            raise ConfigError(f"imagenet_branch needs pretrained={s.backbone}_imagenet (or a checkpoint with the "
                              f"branch): the branch is the ImageNet network, frozen")
        # the 1000 classes' rows of this run's table: the branch speaks the same label space as the labels
        model.imagenet.class_emb.copy_(table.embeddings[table.rows(imagenet_keys(spec))])
    model.to(device)
    if world > 1:
        model = distributed.convert_sync_batchnorm(model, device)
    optimizer = make_optimizer(model, s)

    # ---- resume ---------------------------------------------------------------------------------------------------
    meta = checkpoint_meta(s, precision, model_args, table, keys, sources)
    step = resume(s, model, optimizer, scaler, sampler, meta, master)
    saved_at = step  # the step of the newest checkpoint: if the next loss is non-finite, its state gave it
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # compiled after the DDP wrap, as PyTorch's DDP notes ask: dynamo then splits the graph at DDP's gradient buckets
    # (its DDPOptimizer), so each bucket's all-reduce still starts while the backward of the layers below runs;
    # compiling the bare module and wrapping that would hide the buckets from dynamo. Crops are all crop_size: one
    # graph. Where compiling fails at the first step: one warning line, eager.
    forward = compiled(model, s.compile, device, "the training network")

    # ---- loop -----------------------------------------------------------------------------------------------------
    weights = {"dense": s.weight_dense, "coarse": s.weight_coarse, "boxes": s.weight_boxes, "aux": s.weight_aux,
               "imagenet": s.weight_imagenet}
    loader = data.make_loader(dataset, sampler, workers=s.workers, pin_memory=device.type == "cuda")
    stop, progress = StopSignal(), Progress(s, sources, world, device, master, step)
    model.train()
    batches = iter(loader)
    while step < s.max_steps:
        try:  # one global batch: accum_steps micro-batches, never split across epochs by the sampler
            micro_batches = [next(batches) for _ in range(s.accum_steps)]
        except StopIteration:  # epoch done: reshuffle
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            continue
        lr = poly_lr(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        # dropout and drop-path draw from the global generator: reseeding it from (seed, step, rank) makes every step's
        # randomness a pure function of the step, so a resumed run needs no saved RNG state (data has its own seeds)
        torch.manual_seed(s.seed + step * world + rank)
        optimizer.zero_grad(set_to_none=True)
        terms = {}  # the mean over the micro-batches: what the global batch's loss was
        for micro, batch in enumerate(micro_batches):
            batch = data.to_device(batch, device)
            last = micro == len(micro_batches) - 1
            # gradients add up locally; DDP all-reduces them once, in the last micro-batch's backward
            with model.no_sync() if world > 1 and not last else nullcontext():
                with autocast:
                    out = forward(batch["image"])
                    if s.weight_imagenet:  # the frozen branch's view of the same crops: no gradients, in label space
                        out["imagenet"] = raw_model.imagenet(batch["image"])
                loss = compute_losses(out, batch, label_emb, raw_model.scale(), weights,  # fp32 inside
                                      resize=s.loss_resize, drop_fraction=s.coarse_drop)
                if not torch.isfinite(loss["loss"]):
                    stop_diverged(step, loss, batch, s.out_dir if master and saved_at == step else "")
                # each micro-batch's loss is its mean: dividing by their number makes the sum the global batch's mean
                scaler.scale(loss["loss"] / s.accum_steps).backward()
            for k, v in loss.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / s.accum_steps
            progress.count(batch)
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        sampler.advance()  # one more global batch consumed: this is the position a resume continues from

        if step % s.log_every == 0 or step == s.max_steps:
            progress.log(step, lr, terms, raw_model.scale().item(), loader.skipped)
        stop_now = stop.agreed(device)
        if step % s.save_every == 0 or step == s.max_steps or stop_now:
            saved_at = step
            if master:
                save_checkpoint(Path(s.out_dir) / f"ckpt_{step:08d}.pt", {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "step": step, "sampler": sampler.state_dict(), **meta}, s.keep_last)
        if stop_now:
            if master:
                print(f"stopped by signal at step {step}; checkpoint written")
            break
    progress.close(step, Path(s.out_dir) / f"ckpt_{saved_at:08d}.pt", loader.skipped)
    del model, forward  # DDP before the process group (distributed.teardown says why); `forward` holds it too
    distributed.teardown()


if __name__ == "__main__":
    run_main(main)
