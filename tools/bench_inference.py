"""Images/s of the inference paths on this CPU, in one run: HF transformers' SegFormer-B0 eager fp32 (the peer), ours
eager fp32, ours as evaluate.py runs by default (compiled, precision auto), our ONNX export in onnxruntime fp32 and
static int8 (onnx_quant.py); for MiT-B0 at 512 x 512 and EfficientNet-Lite0 at 360 x 480, on one thread and on all
usable cores; plus the compile time of our default path, first (empty compile cache) and cached (a fresh compile
reading the cache, as a second run does).

    python -m tools.bench_inference                                   # both networks, 1 thread and all cores
    python -m tools.bench_inference --calls=2 --rounds=2 --out=docs/results/bench_inference.json

Every path does the same work per image: the network on one whole image (batch 1), the class scores upsampled to
the image's size, the argmax (HF: its logits bilinearly upsampled, as its docs do; ours: inference.whole_image_scores,
evaluate.py's protocol without resizing; ONNX: the export's graph, onnx_export.Segmenter). Random weights (speed does
not depend on them), --classes labels; the int8 graph is calibrated on --calibration_images real photos of
--calibration (a static graph needs real activations; onnx_quant.py). The engines take turns: one warm-up call each,
then --rounds rounds of --calls calls each, the order reversing every round; the median call is reported. Needs
transformers, onnx and onnxruntime (requirements-dev.txt) for those rows; a row whose package is missing is skipped
and says so.
"""
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from errors import run_main
from inference import in_precision, whole_image_scores
from model import ModelConfig, build_model
from runtime import choose_precision, cpu_has_bf16, set_threads, usable_cores
from settings import parse_settings
from tools.bench_export import alternate


@dataclass
class BenchSettings:
    cases: list = field(default_factory=lambda: ["mit_b0@512x512", "efficientnet_lite0@360x480"])  # backbone@HxW
    threads: list = field(default_factory=lambda: [1, 0])  # thread counts to run at; 0 = all usable cores
    classes: int = 11
    embed_dim: int = 512
    rounds: int = 2                # the engines alternate, the order reversing every round
    calls: int = 3                 # calls per engine per round (after one warm-up call each)
    calibration: str = "data/camvid-11/train"  # real photos to calibrate the int8 graph on (a folder or dataset)
    calibration_images: int = 8
    precision: str = "auto"        # the default path's precision (evaluate.py's default: auto); with bf16 units the
                                   # other precision is compiled and timed too
    out: str = ""                  # results JSON ("" = none)


def hf_segformer(classes):
    """HF SegFormer-B0 (SegformerConfig's defaults are MiT-B0's) with random weights: nothing downloaded."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    return SegformerForSemanticSegmentation(SegformerConfig(num_labels=classes)).eval()


def compile_times(model, image, label_emb, precision):
    """Seconds of the first call of our default path with an empty compile cache (main points
    TORCHINDUCTOR_CACHE_DIR at a new folder), then of a fresh compile of the same network reading that cache: what a
    second run pays."""
    times = []
    for _ in range(2):
        torch._dynamo.reset()  # dynamo forgets the graph, as a new process starts without it
        vars(model).pop("_scorers", None)
        run = in_precision(model, precision, "cpu", compile=True)
        start = time.perf_counter()
        whole_image_scores(run, image, label_emb, 14.0, flip=False)
        times.append(time.perf_counter() - start)
    return times


def case_engines(backbone, h, w, s, folder):
    """{name: fn} of one network and size, and the compile times."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embed_dim=s.embed_dim)).eval()
    label_emb = F.normalize(torch.randn(s.classes, s.embed_dim), dim=1)
    image = torch.randn(1, 3, h, w)
    engines, skipped = {}, []
    try:
        hf = hf_segformer(s.classes)

        def run_hf():
            with torch.no_grad():
                logits = hf(pixel_values=image).logits                      # (1, N, h/4, w/4)
                F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)
        engines["HF SegFormer-B0 eager fp32"] = run_hf
    except ImportError:
        skipped.append("HF SegFormer-B0 (pip install transformers)")
    for p in ["fp32"] + (["bf16"] if cpu_has_bf16() else []):  # compile's own share: eager in each precision
        eager = in_precision(model, p, "cpu", compile=False)
        engines[f"ours eager {p}"] = lambda run=eager: whole_image_scores(run, image, label_emb, 14.0,
                                                                         flip=False).argmax(0)
    precision = choose_precision(s.precision, "cpu")[0]
    first, cached = compile_times(model, image, label_emb, precision)
    # the default path, and compiled in the other precision where the CPU has bf16 units (the per-backbone choice)
    for p in [precision] + [q for q in ("fp32", "bf16") if q != precision and cpu_has_bf16()]:
        run = in_precision(model, p, "cpu", compile=True)
        name = f"ours compiled {p}" + (" (default)" if p == precision else "")
        engines[name] = lambda run=run: whole_image_scores(run, image, label_emb, 14.0, flip=False).argmax(0)
    try:
        import onnx_quant
        from onnx_export import Segmenter, export
        onnx_quant.import_onnxruntime()
        fp32, int8 = Path(folder) / f"{backbone}.onnx", Path(folder) / f"{backbone}.int8.onnx"
        export(Segmenter(model, label_emb, 14.0), fp32)
        onnx_quant.quantize(fp32, int8, onnx_quant.calibration_images(s.calibration, min(h, w),
                                                                       s.calibration_images))
        feed = {"image": image.numpy()}
        engines["ONNX fp32 (onnxruntime)"] = ("onnx", fp32, feed)
        engines["ONNX int8 (onnxruntime)"] = ("onnx", int8, feed)
    except Exception as e:  # noqa: BLE001  a missing package or a failed export: said in the table's notes
        skipped.append(f"ONNX ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return engines, (first, cached), skipped


def at_threads(engines, n):
    """The engines with ONNX sessions opened at n intra-op threads (torch's count is set by the caller)."""
    import_ok = {}
    for name, e in engines.items():
        if isinstance(e, tuple):
            import onnx_quant
            sess, feed = onnx_quant.session(e[1], n), e[2]
            import_ok[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
        else:
            import_ok[name] = e
    return import_ok


def main(argv=None):
    s = parse_settings(BenchSettings, argv)
    precision, why = choose_precision(s.precision, "cpu")
    print(why)
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    cpu = f"{caps.get('cpu_name', '?')}, {usable_cores()} usable cores, avx512_bf16: {caps.get('avx512_bf16')}, " \
          f"amx_bf16: {caps.get('amx_bf16')}, avx512_vnni: {caps.get('avx512_vnni')}"
    print(f"cpu: {cpu}; torch {torch.__version__}")
    results = {"cpu": cpu, "torch": torch.__version__, "precision": precision, "settings": asdict(s), "cases": {}}
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")  # empty: the first compile is cold
        for case in s.cases:
            backbone, size = case.split("@")
            h, w = map(int, size.split("x"))
            set_threads(1, verbose=False)
            engines, (first, cached), skipped = case_engines(backbone, h, w, s, folder)
            row = {"compile_first_s": first, "compile_cached_s": cached, "skipped": skipped, "images_per_s": {}}
            print(f"{backbone} {h}x{w}: compile (default path, first call) {first:.1f} s with an empty cache, "
                  f"{cached:.1f} s cached" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""), flush=True)
            for n in s.threads:
                n = set_threads(n or usable_cores(), verbose=False)
                med = alternate(at_threads(engines, n), s)
                row["images_per_s"][str(n)] = {name: 1 / t for name, t in med.items()}
                peer = med.get("HF SegFormer-B0 eager fp32")
                for name, t in med.items():
                    ratio = f"  {peer / t:.2f}x HF" if peer else ""
                    print(f"  {n} thread(s)  {name:28s} {1 / t:7.2f} images/s{ratio}", flush=True)
            results["cases"][case] = row
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {s.out}")


if __name__ == "__main__":
    run_main(main)
