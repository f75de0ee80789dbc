"""Memory and start time of training with all nine sources, on synthetic files shaped like the real ones
(tools/make_weak_data.py), at several fractions of full size: the indexes of this branch against the readers of main
at 4243516 (which parse the raw JSON/CSV and a torch box-target cache in every process), in the same run.

    python -m tools.bench_weak_data --work /tmp/weak_bench --fractions 0.025,0.1,0.25 [--baseline_commit 4243516]
        [--baseline_max 0.25] [--workers 4] [--batches 100] [--dim 512] [--compare_freeze] [--reuse_data]

Per fraction: the one-time index build (`python indexes.py ...`: CPU and wall time, peak RSS), then one training-like
process per code base, started fresh: the nine sources of configs/ssiw_segformer_b5.yaml (seven MSeg lists at their
real sizes, OpenImages, Objects365 with 512-d box targets) -> data.MultiSourceDataset ("start": from the first
SourceConfig to the built dataset, class names included, as train.py does it; the weak sources' annotation, index
and target files evicted from the page cache first, as on a node that did not write them), then data.Loader
with make_loader's settings, `workers` workers and 100 balanced batches of 9 (tiny images: decoding is not what is
measured). After the 100 batches: the trainer's RSS from /proc/self/status, and each worker's USS (Private_Clean +
Private_Dirty of its /proc/self/smaps_rollup: the pages no other process maps) and its dirty part (memory the worker
wrote: allocated, or copied from the trainer by writes such as reference counts and the garbage collector's), read
by the worker itself before and after a full garbage collection (which a long run does sooner or later).
Box targets of this branch are a sparse file marked done (never encoded): reading them is what is measured. Also the
MiB read from disk when 50 images' boxes are read from a cold boxes.npy, through index_format.map_npy (MADV_RANDOM) and
through numpy.load(mmap_mode="r"); with --compare_freeze, the index run again without data.Loader's gc.freeze().
main's code comes from `git archive <commit>` into the work folder. Its run is skipped where the memory it would
need (extrapolated from the smaller fractions) is not available; the table says so.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MSEG = {"ade20k-150": "ade20k-150", "bdd": "bdd", "cityscapes-19": "cityscapes-19",
        "coco-panoptic-133": "coco-panoptic-133", "idd-39": "idd-39", "mapillary-public65": "mapillary-public65",
        "sunrgbd-37": "sunrgbd-37"}


def mseg_sources(mseg: Path) -> list[dict]:
    return [dict(name=n, root=str(mseg / n), list="list/train.txt", names=f"{n}_names.txt", encoding="id",
                 ignore=[255], kind="dense") for n in MSEG]


def sources(data: Path, mseg: Path, old: bool) -> list[dict]:
    """The nine sources as this branch's config lists them, or as main's did (raw CSV/JSON and a .pt cache)."""
    oi, o365 = data / "openimages_v6", data / "objects365"
    if old:
        weak = [dict(name="openimages", root=str(oi), encoding="openimages", kind="coarse", images="train",
                     masks="train-masks", masks_csv="train-annotations-object-segmentation.csv",
                     class_descriptions="oidv6-class-descriptions-segmentation.csv"),
                dict(name="objects365", root=str(o365), encoding="coco_boxes", kind="boxes", images="as_in_json",
                     boxes_json="zhiyuan_objv2_train.json", box_targets="objects365_clip_b32.pt")]
    else:
        weak = [dict(name="openimages", root=str(oi), encoding="openimages", kind="coarse", index="index_train",
                     images="train", masks="train-masks"),
                dict(name="objects365", root=str(o365), encoding="coco_boxes", kind="boxes", index="index_train",
                     images="train", box_targets="clip_b32_targets")]
    return mseg_sources(mseg) + weak


# ---------------------------------------------------------------------------------------------- the measured process

def proc_fields(path: str, names) -> dict:
    """kB values of `names` in a /proc status-like file, in MiB."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            out[key] = int(rest.split()[0]) / 1024
    return out


def children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def uss() -> tuple[float, float]:
    """This process's unique set size, MiB (the pages no other process maps), and its dirty part: memory it wrote,
    i.e. allocated or copied from the parent. The clean rest is file pages that only this process has mapped (page
    cache around the index rows it read: shared with any process that maps them, reclaimable, not a copy)."""
    f = proc_fields("/proc/self/smaps_rollup", ["Private_Clean", "Private_Dirty"])
    return f["Private_Clean"] + f["Private_Dirty"], f["Private_Dirty"]


def child(spec: dict) -> None:
    """One training-like process (see the module docstring); prints a JSON line of figures."""
    t0 = time.perf_counter()
    import gc
    import itertools

    import torch  # the code under test comes first on sys.path (PYTHONPATH)

    import data
    import label_spec
    import labels
    from sampler import BalancedSampler
    from transforms import TrainTransform
    torch.set_num_threads(1)
    imported, imported_cpu = time.perf_counter(), time.process_time()
    rss_imports = proc_fields("/proc/self/status", ["VmRSS"])["VmRSS"]
    cfgs = [data.SourceConfig.from_dict(d) for d in spec["sources"]]
    keys = [f"k{i}" for i in range(20)]
    mapping = {cfg.name: {n: keys[i % 20] for i, n in enumerate(data.source_class_names(cfg))} for cfg in cfgs}
    spec_ = label_spec.LabelSpec({k: f"An image of {k}." for k in keys}, mapping)
    used = data.source_label_keys(cfgs, spec_)
    table = labels.LabelTable(used, used, torch.eye(len(used)), "bench")
    ds = data.MultiSourceDataset(cfgs, spec_, table, TrainTransform(short_side=0, crop_size=32, scale_range=(1, 1)))
    started, started_cpu = time.perf_counter(), time.process_time()
    rss_start = proc_fields("/proc/self/status", ["VmRSS"])["VmRSS"]

    class Probe(torch.utils.data.Dataset):
        """The dataset, plus a key that makes a worker report its USS before and after a full garbage collection
        (a long run does full collections; each one writes to every tracked Python object the worker inherited)."""

        def __len__(self):
            return len(ds)

        def __getitem__(self, key):
            if key == "gc":
                before = uss()
                gc.collect()
                return {"probe": (before, uss()), "skipped": []}
            return ds[key]

    def collate(samples):
        return samples[0] if "probe" in samples[0] else data.collate(samples)

    # make_loader's settings (data.Loader around a DataLoader with persistent workers, prefetch 4, data.collate),
    # then one probe batch per worker: batch i goes to worker i % workers
    w = spec["workers"]
    batches = list(itertools.islice(BalancedSampler(ds.source_sizes, batch_size=9, seed=0), spec["batches"]))
    loader = torch.utils.data.DataLoader(Probe(), batch_sampler=batches + [["gc"]] * w, num_workers=w,
                                         collate_fn=collate, persistent_workers=True, prefetch_factor=4)
    out = list(data.Loader(loader) if spec.get("loader", True) else loader)  # without: no gc.freeze() (compare)
    status = proc_fields("/proc/self/status", ["VmRSS", "RssAnon", "RssFile", "VmHWM"])
    probes = [b["probe"] for b in out[spec["batches"]:]]
    print(json.dumps({"import_s": imported - t0, "start_s": started - imported,
                      "start_cpu_s": started_cpu - imported_cpu, "sizes": ds.source_sizes,
                      "boxes_in_batches": sum(len(b["boxes"]) for b in out[:spec["batches"]]),
                      "rss_imports": rss_imports, "rss_start": rss_start, "rss": status["VmRSS"],
                      "rss_anon": status["RssAnon"], "rss_file": status["RssFile"], "peak_rss": status["VmHWM"],
                      "worker_uss": [b[0] for b, _ in probes], "worker_dirty": [b[1] for b, _ in probes],
                      "worker_uss_after_gc": [a[0] for _, a in probes],
                      "worker_dirty_after_gc": [a[1] for _, a in probes]}))
    sys.stdout.flush()
    os._exit(0)  # the loader's workers are torn down with the process


def drop_cache(paths) -> None:
    """Evict files from the page cache (posix_fadvise DONTNEED on those files only), so that a process reads them
    cold, as on a training node that did not write them."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def annotation_files(srcs: list[dict]) -> list[Path]:
    """The annotation, index and box-target files of the weak sources (not the images, masks or lists)."""
    files = []
    for d in srcs[-2:]:
        root = Path(d["root"])
        for key in ("masks_csv", "class_descriptions", "boxes_json", "box_targets", "index"):
            if d.get(key):
                path = root / d[key]
                files += sorted(path.iterdir()) if path.is_dir() else [path]
    return files


def cold_reads(index: Path, samples: int = 50) -> dict:
    """MiB read from disk for `samples` random images' boxes from a cold boxes.npy: index_format.map_npy (MADV_RANDOM)
    against numpy.load(mmap_mode="r") (the kernel reads read_ahead_kb around each page fault)."""
    code = ("import os, sys, numpy as np, index_format; a = index_format.map_npy(sys.argv[1]) if sys.argv[2] == 'map_npy' else "
            "np.load(sys.argv[1], mmap_mode='r'); io = lambda: int(open('/proc/self/io').read()"
            ".split('read_bytes:')[1].split()[0]); r0 = io(); rng = np.random.default_rng(0); "
            "[np.array(a[r:r + 15]) for r in rng.integers(0, len(a) - 15, int(sys.argv[3]))]; "
            "print((io() - r0) / 2 ** 20)")
    out = {}
    for how in ("map_npy", "numpy.load"):
        drop_cache([index / "boxes.npy"])
        done = subprocess.run([sys.executable, "-c", code, str(index / "boxes.npy"), how, str(samples)], cwd=REPO,
                              capture_output=True, text=True, check=True)
        out[how] = float(done.stdout.split()[-1])
    return out


def measure(code: Path, srcs: list[dict], workers: int, batches: int, loader: bool = True) -> dict:
    """Run `child` in a fresh interpreter whose imports resolve to `code` first, the weak sources' annotation files
    cold in the page cache; loader=False iterates the DataLoader itself instead of data.Loader (no gc.freeze())."""
    drop_cache(annotation_files(srcs))
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    spec = json.dumps({"sources": srcs, "workers": workers, "batches": batches, "loader": loader})
    done = subprocess.run([sys.executable, __file__, "--child", spec], env=env, cwd=code, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement with {code} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- the run

def run_index_command(args: list[str]) -> dict:
    """`python indexes.py ARGS` in a fresh interpreter: its wall and CPU seconds (user + system: on a shared machine
    the steadier figure), and its peak RSS (VmHWM as it ends)."""
    code = ("import runpy, sys; sys.argv = ['indexes.py'] + sys.argv[1:]; runpy.run_path('indexes.py', "
            "run_name='__main__'); print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"indexes.py {' '.join(args)} failed:\n{stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss": int(stdout.split("VmHWM")[-1]) / 1024}


def build_indexes(data: Path, dim: int) -> dict:
    """The two index commands, and finished-looking box targets for the Objects365 index."""
    import shutil

    import numpy as np

    from index_format import Index, prepare_targets
    oi, o365 = data / "openimages_v6", data / "objects365"
    out = {"o365": run_index_command(["coco_boxes", "--json", str(o365 / "zhiyuan_objv2_train.json"), "--images",
                                      str(o365 / "train"), "--out", str(o365 / "index_train"), "--overwrite"]),
           "oi": run_index_command(["openimages", "--csv", str(oi / "train-annotations-object-segmentation.csv"),
                                    "--classes", str(oi / "classes-segmentation.txt"), "--images", str(oi / "train"),
                                    "--masks", str(oi / "train-masks"), "--out", str(oi / "index_train"),
                                    "--overwrite"])}
    index = Index(o365 / "index_train", "coco_boxes")
    targets = o365 / "clip_b32_targets"
    shutil.rmtree(targets, ignore_errors=True)
    prepare_targets(targets, index, dim, 1024, "synthetic: a sparse file, never encoded")
    np.save(targets / "done.npy", np.ones_like(np.load(targets / "done.npy")))
    return out


def mem_available() -> float:
    return proc_fields("/proc/meminfo", ["MemAvailable"])["MemAvailable"]


def baseline_code(work: Path, commit: str) -> Path:
    code = work / f"code-{commit}"
    if not code.exists():
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code


def table(rows: list[dict]) -> str:
    """The figures as a markdown table (index = this branch, main = the readers of the baseline commit)."""
    def both(row, fmt):
        new, old = fmt(row["new"]), fmt(row["old"]) if row.get("old") else "not run"
        return f"{new} / {old}"

    lines = ["| fraction: O365 boxes, OI masks | index build CPU s: O365 + OI (peak RSS MiB) | start s, wall (CPU): "
             "index / main | trainer RSS MiB, over imports: index / main | worker USS MiB after 100 batches "
             "(dirty): index / main | worker USS MiB after a full gc (dirty): index / main | MiB read for 50 "
             "images' boxes, cold: map_npy / numpy.load |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["index"]
        lines.append(" | ".join([
            f"| {r['fraction']:g}: {r['counts']['o365_boxes']:,}, {r['counts']['oi_masks']:,}",
            f"{b['o365']['cpu_s']:.0f} + {b['oi']['cpu_s']:.0f} ({max(b[k]['peak_rss'] for k in b):,.0f})",
            both(r, lambda m: f"{m['start_s']:.1f} ({m['start_cpu_s']:.1f})"),
            both(r, lambda m: f"{m['rss'] - m['rss_imports']:,.0f}"),
            both(r, lambda m: f"{max(m['worker_uss']):,.0f} ({max(m['worker_dirty']):,.0f})"),
            both(r, lambda m: f"{max(m['worker_uss_after_gc']):,.0f} ({max(m['worker_dirty_after_gc']):,.0f})"),
            f"{r['cold_reads']['map_npy']:.1f} / {r['cold_reads']['numpy.load']:.1f}"]) + " |")
    return "\n".join(lines)


@dataclass
class WeakBenchSettings:
    work: str = "/tmp/weak_bench"  # folder for the synthetic files, main's code and results.json
    fractions: list = field(default_factory=lambda: [0.025, 0.1, 0.25])  # of full size, in order
    baseline_commit: str = "4243516"  # main's readers to compare with (git archive)
    baseline_max: float = 1.0      # largest fraction to run main's readers at
    workers: int = 4               # DataLoader workers
    batches: int = 100             # balanced batches of 9 read per run
    dim: int = 512                 # box-target width
    compare_freeze: bool = False   # also measure the index code base without data.Loader's gc.freeze()
    reuse_data: bool = False       # keep files a previous run generated (where main's readers do not run)

    def validate(self):
        from settings import require
        require(self, "fractions", lambda v: v and all(0 < f <= 1 for f in v), "must be fractions in (0, 1]")
        require(self, "workers batches dim", lambda v: v >= 1, "must be >= 1")


def main(argv=None):
    from settings import parse_settings  # not at the top: a child imports the measured code base's modules only
    from tools.make_weak_data import write_all
    a = parse_settings(WeakBenchSettings, argv)

    work = Path(a.work)
    old_code = baseline_code(work, a.baseline_commit)
    rows, results = [], work / "results.json"
    for fraction in a.fractions:
        data = work / f"f{fraction:g}"
        row = {"fraction": fraction, "workers": a.workers}
        done_old = [r for r in rows if r.get("old")]
        run_old = fraction <= a.baseline_max
        if run_old and len(done_old) >= 2:  # peak RSS linear in the fraction, from the two largest measured
            (f1, p1), (f2, p2) = [(r["fraction"], r["old"]["peak_rss"]) for r in done_old[-2:]]
            need = p2 + (p2 - p1) / (f2 - f1) * (fraction - f2)
            if need * 1.3 + 2048 > mem_available():
                run_old = False
                row["old_skipped"] = f"needs ~{need / 1024:.1f} GiB, {mem_available() / 1024:.1f} GiB available"
                print(f"{fraction:g}: main's readers not run: {row['old_skipped']}", flush=True)
        if a.reuse_data and not run_old and (data / "counts.json").is_file():
            row["counts"] = json.loads((data / "counts.json").read_text())
        else:
            row["counts"] = write_all(data, fraction, old_formats=run_old, dim=a.dim, mseg=work / "mseg")
            (data / "counts.json").write_text(json.dumps(row["counts"]))
        row["index"] = build_indexes(data, a.dim)
        print(f"{fraction:g}: index build {row['index']}", flush=True)
        row["new"] = measure(REPO, sources(data, work / "mseg", old=False), a.workers, a.batches)
        print(f"{fraction:g}: index readers {row['new']}", flush=True)
        if a.compare_freeze:
            row["new_unfrozen"] = measure(REPO, sources(data, work / "mseg", old=False), a.workers, a.batches, False)
            print(f"{fraction:g}: worker USS MiB after 100 batches, with data.Loader's gc.freeze() / without: "
                  f"{max(row['new']['worker_uss']):.0f} / {max(row['new_unfrozen']['worker_uss']):.0f}; after a "
                  f"full gc {max(row['new']['worker_uss_after_gc']):.0f} / "
                  f"{max(row['new_unfrozen']['worker_uss_after_gc']):.0f}", flush=True)
        row["cold_reads"] = cold_reads(data / "objects365" / "index_train")
        print(f"{fraction:g}: MiB read from a cold boxes.npy for 50 images' boxes {row['cold_reads']}", flush=True)
        if run_old:
            row["old"] = measure(old_code, sources(data, work / "mseg", old=True), a.workers, a.batches)
            print(f"{fraction:g}: main's readers {row['old']}", flush=True)
            (data / "objects365" / "objects365_clip_b32.pt").unlink()  # GBs at the larger fractions
        rows.append(row)
        results.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"(figures in {results})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # internal: one measurement, importing only the code base on PYTHONPATH
        child(json.loads(sys.argv[2]))
    else:
        sys.path.insert(0, str(REPO))
        from errors import run_main
        run_main(main)
