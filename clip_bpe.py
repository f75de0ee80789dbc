"""CLIP's byte-level BPE tokenizer, token-identical to OpenAI's clip/simple_tokenizer.py and clip.tokenize, with numpy
and no torch, so a runtime without torch (onnx_text.TextGraph) tokenizes with it too. The vocabulary ships with the
repository (assets/bpe_simple_vocab_16e6.txt.gz, OpenAI's file).

    ids = tokenize(["An image of a dog."])        # (N, 77) int64: sot, BPE ids, eot, zeros
    decode(ids[0])                                # 'an image of a dog . '
"""
import functools
import gzip
import html
from pathlib import Path

import ftfy
import numpy as np
import regex

from errors import ConfigError

BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char, so BPE never sees whitespace/control chars (CLIP's, from GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the 68 unprintable bytes go to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """OpenAI CLIP's byte-level BPE: ftfy + double HTML unescape, whitespace clean, lowercase, CLIP's regex split."""

    def __init__(self, bpe_path: Path = BPE_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [c + "</w>" for c in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49408 entries
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                     r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self.whitespace = regex.compile(r"\s+")
        # Per-word cache: label sentences repeat a small vocabulary, so almost every word after the first is a hit.
        self.bpe = functools.lru_cache(maxsize=1 << 17)(self._bpe)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-split word -> its BPE token ids: map its UTF-8 bytes to chars, merge lowest-ranked pairs first."""
        if word in (SOT, EOT):  # the literal marker text becomes the marker itself, as in OpenAI's tokenizer
            return (self.encoder[word],)
        parts = [self.byte_encoder[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of `best`, left to right, non-overlapping
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def clean(self, text: str) -> str:
        """OpenAI's basic_clean + whitespace_clean + lower, in its order (`regex`'s \\s, not `re`'s, matters)."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return self.whitespace.sub(" ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without start/end markers."""
        return [i for word in self.pattern.findall(self.clean(text)) for i in self.bpe(word)]

    def decode(self, ids: list[int]) -> str:
        """BPE ids -> text, exactly OpenAI's decode: '</w>' becomes a space (so the text ends with one)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False,
             tokenizer: Tokenizer | None = None) -> np.ndarray:
    """Texts -> int64 [N, context_length]: sot, BPE ids, eot, then zero padding (OpenAI's clip.tokenize; the text
    tower takes it as a tensor: clip_text.tokenize).
    tokenizer: a Tokenizer of another copy of the vocabulary (default: the vendored one's).

    Overflow raises ValueError naming the text and its token count, unless truncate=True, which keeps the first
    context_length - 1 tokens and puts eot last (the text tower pools at eot, so it must be present).
    """
    tok = tokenizer or get_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects str texts, got {type(text).__name__} at index {i}: {text!r}")
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ConfigError(f"text {_short(text)!r} is {len(ids)} tokens (with start/end markers), more than "
                                  f"context_length={context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot]
        rows.append(ids + [0] * (context_length - len(ids)))
    return np.array(rows, dtype=np.int64).reshape(len(texts), context_length)


def decode(ids) -> str:
    """One row of token ids (a list, or a 1-D array or tensor) -> text.

    Unlike OpenAI's decode, which renders every id, the markers `tokenize` adds are removed: trailing zeros (padding;
    id 0 is the byte '!' but can never end a real sequence, whose last token always carries '</w>'), one leading sot
    and one final eot. Markers elsewhere (literal marker text) decode to their text. The rest is OpenAI's decode,
    trailing space included.
    """
    if np.ndim(ids) != 1:
        raise ValueError(f"decode takes one row of token ids, got an array of shape {np.shape(ids)}")
    ids = [int(i) for i in ids]
    tok = get_tokenizer()
    while ids and ids[-1] == 0:
        ids.pop()
    if ids and ids[0] == tok.sot:
        ids = ids[1:]
    if ids and ids[-1] == tok.eot:
        ids = ids[:-1]
    return tok.decode(ids)
