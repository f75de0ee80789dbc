"""Train a segmentation-from-sentences model on several datasets at once.

    python train.py configs/demo_synthetic.yaml [--key=value ...]              # one process, CPU or one GPU
    torchrun --nproc_per_node=8 train.py configs/ssiw_segformer_b5.yaml      # DDP: NCCL on CUDA, gloo on CPU

Reads top to bottom: settings -> distributed/device -> label table -> data -> model -> optimizer -> resume -> loop.
"""
import json
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import distributed
from labels import LabelTable, load_label_spec, load_label_table
from losses import compute_losses
from model import ModelConfig, build_model, load_pretrained
from settings import parse_settings, print_settings


@dataclass
class TrainSettings:
    # data: each source is a dict of data.SourceConfig fields (name, root, list, names, taxonomy, encoding, kind, ...)
    sources: list = field(default_factory=list)
    label_table: str = ""          # table .pt from clip_text.py, universal_cat2vec.npy, or "onehot" (ablation)
    crop_size: int = 640           # random crop (SegFormer 640, HRNet 713)
    short_side: int = 1080         # resize the shorter edge to this before random scaling
    scale_min: float = 0.5         # random scale range, relative to short_side
    scale_max: float = 2.0
    batch_size: int = 2            # images per process per step
    workers: int = 4               # DataLoader workers per process
    skip_bad: bool = False         # count and skip unreadable samples instead of stopping
    # model
    backbone: str = "mit_b5"       # mit_b0..mit_b5, hrnet_w18, hrnet_w48, efficientnet_lite0
    embed_dim: int = 512           # pixel embedding width; must equal the label table's
    aux_head: bool = False         # auxiliary FCN head on stage 3 (SegFormer-B5 in the paper)
    pretrained: str = ""           # public weights to start from: a checkpoint path, or efficientnet_lite0_imagenet
    drop_path_rate: float = 0.1    # stochastic depth in the MiT / EfficientNet encoder
    dropout: float = 0.1           # before the decoder's last 1x1 conv
    # losses
    weight_dense: float = 1.0
    weight_coarse: float = 1.0
    weight_boxes: float = 1.0
    weight_aux: float = 0.4
    coarse_drop: float = 0.3       # fraction of the highest-loss pixels dropped per image (L_LD)
    # optimisation
    optimizer: str = "adamw"       # adamw (SegFormer) | sgd (HRNet)
    lr: float = 6e-5
    head_lr_mult: float = 10.0     # decoder/aux heads learn this much faster
    weight_decay: float = 0.01
    momentum: float = 0.9          # sgd only
    warmup_steps: int = 1500
    max_steps: int = 160000
    poly_power: float = 1.0
    grad_clip: float = 0.0         # 0 = off
    amp: str = "auto"              # auto (bf16 where supported) | bf16 | fp16 | off
    # run
    out_dir: str = "runs/ssiw"
    seed: int = 0
    log_every: int = 20
    save_every: int = 1000
    keep_last: int = 3
    resume: str = ""               # "" | "auto" (latest checkpoint in out_dir) | a checkpoint path
    device: str = "auto"           # auto | cpu | cuda


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


def onehot_table(keys, dim):
    """The ablation's labels: orthonormal one-hot vectors instead of sentence embeddings (needs len(keys) <= dim)."""
    if len(keys) > dim:
        raise ValueError(f"label_table=onehot needs at most embed_dim={dim} labels, the sources use {len(keys)}")
    return LabelTable(names=list(keys), sentences=list(keys), embeddings=torch.eye(len(keys), dim), encoder="onehot")


def save_checkpoint(path, payload, keep_last):
    """Write atomically (temp file + rename: a kill mid-write never replaces a good file), then prune old ones."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("ckpt_*.pt"))[:-keep_last]:
        old.unlink()


def find_resume(s):
    if s.resume != "auto":
        return s.resume
    found = sorted(Path(s.out_dir).glob("ckpt_*.pt"))
    return str(found[-1]) if found else ""


def main(argv=None):
    s = parse_settings(TrainSettings, argv)

    # ---- distributed / device -----------------------------------------------------------------------------------
    rank, world, device = distributed.setup(s.device)
    master = rank == 0
    if master:
        print("settings:")
        print_settings(s)
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed + rank)
    random.seed(s.seed + rank)
    np.random.seed(s.seed + rank)

    if s.amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    else:
        amp = s.amp
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- label table and data -------------------------------------------------------------------------------------
    spec = load_label_spec()
    sources = [data.SourceConfig.from_dict(d) for d in s.sources]
    if not sources:
        raise ValueError("settings: `sources` is empty; list at least one training source")
    keys = data.source_label_keys(sources, spec)  # every label key the sources can name, in a stable order
    table = onehot_table(keys, s.embed_dim) if s.label_table == "onehot" else load_label_table(s.label_table)
    if table.embeddings.shape[1] != s.embed_dim:
        raise ValueError(f"label table {s.label_table} has width {table.embeddings.shape[1]}, "
                         f"embed_dim is {s.embed_dim}")
    label_emb = table.embeddings.to(device)  # (N, D), frozen: the text side is never trained
    dataset = data.MultiSourceDataset(sources, spec, table, data.TrainTransform(
        short_side=s.short_side, crop_size=s.crop_size, scale_range=(s.scale_min, s.scale_max)),
        seed=s.seed, skip_bad=s.skip_bad)
    sampler = data.BalancedSampler(dataset.source_sizes, [src.weight for src in sources], batch_size=s.batch_size,
                                   rank=rank, world_size=world, seed=s.seed)

    # ---- model and optimizer --------------------------------------------------------------------------------------
    model_args = ModelConfig(backbone=s.backbone, embed_dim=s.embed_dim, aux_head=s.aux_head,
                             box_head=any(src.kind == "boxes" for src in sources), drop_path_rate=s.drop_path_rate,
                             dropout=s.dropout)
    model = build_model(model_args)
    if s.pretrained:
        load_pretrained(model, s.pretrained)
    model.to(device)
    if world > 1:
        model = distributed.convert_sync_batchnorm(model, device)
    groups = param_groups(model, s)
    if s.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))
    elif s.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    else:
        raise ValueError(f"settings: optimizer must be adamw or sgd, got {s.optimizer!r}")

    # ---- resume ---------------------------------------------------------------------------------------------------
    step = 0
    resume_path = find_resume(s)
    if resume_path:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)  # tensors and plain Python only
        if ckpt["model_args"] != asdict(model_args):
            raise ValueError(f"{resume_path}: model_args {ckpt['model_args']} differ from this run's {asdict(model_args)}")
        if ckpt["label_table"]["names"] != table.names:
            raise ValueError(f"{resume_path}: trained with another label table than {s.label_table}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        sampler.load_state_dict(ckpt["sampler"])
        if master:
            print(f"resumed from {resume_path} at step {step}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        if master:
            payload = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "step": step, "sampler": sampler.state_dict(),
                       "config": asdict(s), "model_args": asdict(model_args),
                       "label_table": asdict(table)}  # small (N x D): evaluation needs no other file
            save_checkpoint(Path(s.out_dir) / f"ckpt_{step:08d}.pt", payload, s.keep_last)

    stop = {"signal": None}  # SIGTERM/SIGINT: finish the step, checkpoint, exit 0
    def request_stop(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # ---- loop -----------------------------------------------------------------------------------------------------
    weights = {"dense": s.weight_dense, "coarse": s.weight_coarse, "boxes": s.weight_boxes, "aux": s.weight_aux}
    loader = data.make_loader(dataset, sampler, workers=s.workers, pin_memory=device.type == "cuda")
    log_file = open(Path(s.out_dir) / "log.jsonl", "a") if master else None
    model.train()
    batches = iter(loader)
    t0, seen = time.time(), 0
    while step < s.max_steps:
        try:
            batch = next(batches)
        except StopIteration:  # epoch done: report skips, reshuffle
            if master and dataset.skip_bad:
                print(f"epoch {sampler.epoch}: skipped {data.skipped_count(loader)} bad samples")
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            continue
        lr = poly_lr(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batch = data.to_device(batch, device)
        # dropout and drop-path draw from the global generator: reseeding it from (seed, step, rank) makes every step's
        # randomness a pure function of the step, so a resumed run needs no saved RNG state (data has its own seeds)
        torch.manual_seed(s.seed + step * world + rank)
        with autocast:
            out = model(batch["image"])
        terms = compute_losses(out, batch, label_emb, raw_model.scale(), weights,  # fp32 inside
                               drop_fraction=s.coarse_drop)
        if not torch.isfinite(terms["loss"]):
            values = {k: round(v.item(), 4) for k, v in terms.items()}
            raise FloatingPointError(f"non-finite loss at step {step}: {values}; sources {batch['source']}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        sampler.advance()  # one more global batch consumed: this is the position a resume continues from
        seen += len(batch["source"]) * world

        if step % s.log_every == 0 or step == s.max_steps:
            logged = distributed.all_reduce_mean(torch.stack([terms[k].detach().float() for k in sorted(terms)]))
            if master:
                elapsed = time.time() - t0
                rate = seen / elapsed
                record = {"step": step, "lr": lr, "images_per_s": rate, "scale": raw_model.scale().item(),
                          **{k: float(v) + 0.0 for k, v in zip(sorted(terms), logged)}}  # + 0.0: no "-0.0" terms
                eta = (s.max_steps - step) * s.batch_size * world / max(rate, 1e-9)
                losses = " ".join(f"{k} {record[k]:.4f}" for k in sorted(terms))
                print(f"step {step}/{s.max_steps} | {losses} | lr {lr:.2e} | {rate:.1f} img/s | "
                      f"eta {eta / 60:.1f} min", flush=True)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        stop_now = torch.tensor([0 if stop["signal"] is None else 1])
        if world > 1:
            dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if step % s.save_every == 0 or step == s.max_steps or stop_now.item():
            checkpoint()
        if stop_now.item():
            if master:
                print(f"stopped by signal at step {step}; checkpoint written")
            break
    if log_file:
        log_file.close()
    if world > 1:
        # gloo finishes its work objects on worker threads that need the GIL; waiting on a barrier (GIL released)
        # lets them finish before the process group is torn down, which otherwise can deadlock at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
