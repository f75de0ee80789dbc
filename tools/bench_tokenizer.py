"""Tokenizer throughput: clip_text.tokenize against OpenAI's reference (clip-anytorch), same sentences, same run.

    python -m tools.bench_tokenizer [--n 5000] [--repeats 3]

Each implementation starts from an empty per-word cache (a fresh tokenizer), then tokenizes the same sentences
`repeats` times; the first pass is the cold-cache number, the best later pass the warm one. Both produce
LongTensor[N, 77] (the reference via clip.tokenize's own steps, restated in tests/make_tokenizer_fixture.py because
`import clip` needs torchvision), and the outputs are checked equal.
"""
import random
import time
from dataclasses import dataclass

import torch

import clip_bpe
import clip_text
from errors import InputError, run_main
from settings import parse_settings, require
from tests.make_tokenizer_fixture import LABELS_238, load_reference, reference_tokenize


def label_like_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences shaped like label_sentences.yaml entries: 'An image of X. <a definition>.'"""
    rng = random.Random(seed)
    filler = ("a the of with and on in used for people that is often found near usually made from metal wood "
              "plastic small large outdoor indoor object surface vehicle animal structure part which can").split()
    return [f"An image of a {rng.choice(LABELS_238)}. A {rng.choice(LABELS_238)} is "
            + " ".join(rng.choice(filler) for _ in range(rng.randint(8, 30))) + "." for _ in range(n)]


def timed(fn, texts, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(texts)
        times.append(time.perf_counter() - t0)
    return out, times[0], min(times[1:] or times)


@dataclass
class TokenizerBenchSettings:
    n: int = 5000                  # number of sentences
    repeats: int = 3               # passes over them (the first: cold cache; the best later one: warm)

    def validate(self):
        require(self, "n repeats", lambda v: v >= 1, "must be >= 1")


def main(argv=None):
    args = parse_settings(TokenizerBenchSettings, argv)
    texts = label_like_sentences(args.n)
    ref = load_reference()
    if ref is None:
        raise InputError("the reference tokenizer is missing: pip install clip-anytorch")

    def reference(batch):
        result = torch.zeros(len(batch), 77, dtype=torch.long)
        for i, text in enumerate(batch):
            ids = reference_tokenize(ref, text, truncate=True)
            result[i, :len(ids)] = torch.tensor(ids)
        return result

    clip_bpe.get_tokenizer.cache_clear()  # a fresh tokenizer: empty per-word cache, like the fresh reference;
    clip_bpe.get_tokenizer()  # built (vocabulary read) before timing, as the reference is
    ours, ours_cold, ours_warm = timed(lambda b: clip_text.tokenize(b, truncate=True), texts, args.repeats)
    theirs, ref_cold, ref_warm = timed(reference, texts, args.repeats)
    assert torch.equal(ours, theirs), "token ids differ from the reference"
    n = len(texts)
    print(f"{n} label-like sentences, identical ids: True")
    print(f"{'':12s}{'cold cache':>16s}{'warm cache':>16s}   (sentences/s)")
    print(f"{'clip_text':12s}{n / ours_cold:16.0f}{n / ours_warm:16.0f}")
    print(f"{'reference':12s}{n / ref_cold:16.0f}{n / ref_warm:16.0f}")
    print(f"{'ratio':12s}{ref_cold / ours_cold:15.2f}x{ref_warm / ours_warm:15.2f}x   (clip_text / reference)")


if __name__ == "__main__":
    run_main(main)
