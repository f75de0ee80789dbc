"""BERT's WordPiece tokenizer as HF `tokenizers` runs it for sentence-transformers (BertNormalizer, BertPreTokenizer,
WordPiece), with numpy and no torch, so a runtime without torch (onnx_text.TextGraph) tokenizes with it too.

    tok = load_tokenizer(folder, max_length=256, st_lowercase=False)  # tokenizer.json, or vocab.txt
    ids, mask = tok.tokenize(["An image of a dog."])                  # (B, T) int64 each: [CLS] ... [SEP], padded
"""
import functools
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from errors import WeightsError


def read_json(path: Path, what: str, hint: str = ""):
    """A JSON file of a model folder; a missing or broken one raises WeightsError naming it, what it should be and
    `hint` (where such folders come from)."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing; expected {what}. {hint}".rstrip())
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); expected {what}") from e


# Unicode's White_Space property, which Rust's char::is_whitespace tests (Python's isspace also takes \x1c-\x1f).
WHITE_SPACE = (set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")
               | {chr(c) for c in range(0x2000, 0x200b)})
# tokenizers' (Rust) is_chinese_char ranges: the sixth starts at 0x2B920 there, at 0x2B820 in the Python BertTokenizer
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class CharMap(dict):
    """A str.translate table filled on first sight of each character (translate looks up missing keys through
    __missing__), so normalising a text costs one C-level pass once its characters have been seen."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, c: int) -> str:
        self[c] = out = self.fn(chr(c))
        return out


def clean_char(c: str, chinese: bool) -> str:
    """BertNormalizer's clean_text and handle_chinese_chars for one character: drop NUL, U+FFFD and the Cc, Cf, Co,
    Cs categories (not Cn: the Rust crate keeps unassigned characters) but tab/newline/return; White_Space becomes
    ' '; a CJK ideograph gets a space either side."""
    if c in "\x00\ufffd" or (c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")):
        return ""  # first: \x0b, \x0c and \x85 are White_Space, but as controls they are dropped, not spaces
    if c in WHITE_SPACE:
        return " "
    if chinese and any(lo <= ord(c) <= hi for lo, hi in CJK_RANGES):
        return f" {c} "
    return c


def is_punctuation(c: str) -> bool:
    """BertPreTokenizer's split points: ASCII punctuation (which includes $+<=>^`|~, not Unicode P*) or P*."""
    return (c.isascii() and not c.isalnum() and 33 <= ord(c) <= 126) or unicodedata.category(c)[0] == "P"


class WordPieceTokenizer:
    """HF's BERT tokenizer (tokenizers' BertNormalizer + BertPreTokenizer + WordPiece) with [CLS] text [SEP].

    Steps, in the Rust order: split out special tokens ([CLS], [MASK] ... matched in the raw text, longest first);
    optional sentence-transformers lowercasing (do_lower_case in sentence_bert_config.json); clean text; pad CJK
    ideographs; strip accents (NFD, drop Mn; on when lowercasing unless set); lowercase (per character); split on
    whitespace and around each punctuation character; greedy longest-match WordPiece with '##' continuations, a word
    of more than `max_chars` characters or with no full cover becoming [UNK].
    """

    def __init__(self, vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None,
                 chinese: bool = True, specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                 unk: str = "[UNK]", cls: str = "[CLS]", sep: str = "[SEP]", pad: str = "[PAD]",
                 prefix: str = "##", max_chars: int = 100, max_length: int = 512, st_lowercase: bool = False):
        missing = [t for t in (unk, cls, sep, pad, *specials) if t not in vocab]
        if missing:
            raise WeightsError(f"tokenizer vocabulary lacks the special token(s) {missing}")
        self.vocab, self.prefix, self.max_chars, self.max_length = vocab, prefix, max_chars, max_length
        self.unk, self.cls, self.sep, self.pad = vocab[unk], vocab[cls], vocab[sep], vocab[pad]
        self.specials = {t: vocab[t] for t in specials}
        # leftmost match, longest first among tokens starting there (the added-vocabulary matcher's rule)
        self.special_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
                                     + ")")
        strip = lowercase if strip_accents is None else strip_accents
        self.st_lower = CharMap(str.lower) if st_lowercase else None
        self.clean = CharMap(functools.partial(clean_char, chinese=chinese))
        self.strip = strip  # NFD runs on the whole text: its canonical reordering spans characters
        self.final = CharMap(lambda c: "" if strip and unicodedata.category(c) == "Mn" else
                             (c.lower() if lowercase else c))  # lower() of one char: no final-sigma context
        self.word_ids = functools.lru_cache(maxsize=1 << 17)(self._word_ids)

    def normalize(self, text: str) -> str:
        """One special-token-free segment -> the normalised text (before whitespace/punctuation splitting)."""
        if self.st_lower is not None:
            text = text.translate(self.st_lower)
        text = text.translate(self.clean)
        if self.strip:
            text = unicodedata.normalize("NFD", text)
        return text.translate(self.final)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """One whitespace-free normalised word -> ids: split around punctuation, then WordPiece each piece."""
        pieces, start = [], 0
        for i, c in enumerate(word):
            if is_punctuation(c):
                pieces += [word[start:i], c] if i > start else [c]
                start = i + 1
        pieces += [word[start:]] if start < len(word) else []
        return tuple(i for piece in pieces for i in self.wordpiece(piece))

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk]  # no piece covers this position: the whole word is unknown
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> token ids without [CLS]/[SEP] and without truncation."""
        ids = []
        for k, segment in enumerate(self.special_re.split(text)):
            if k % 2:  # re.split with one group: odd items are the matched special tokens
                ids.append(self.specials[segment])
            elif segment:
                ids += [i for word in self.normalize(segment).split() for i in self.word_ids(word)]
        return ids

    def tokenize(self, texts: str | list[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids int64 [B, T], mask int64 [B, T]): [CLS] ids [SEP], cut to max_length (default: the model's
        max_seq_length) by dropping word pieces from the end as sentence-transformers does, padded with [PAD]
        (mask 0) to the batch's longest row."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = (max_length or self.max_length) - 2
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenize expects str texts, got {type(text).__name__} at index {i}: {text!r}")
            rows.append([self.cls] + self.encode(text)[:n] + [self.sep])
        T = max(map(len, rows), default=2)
        ids = np.full((len(rows), T), self.pad, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(rows), T), dtype=np.int64)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask


def load_tokenizer(folder: Path, max_length: int, st_lowercase: bool, hint: str = "") -> WordPieceTokenizer:
    """tokenizer.json (what transformers 5 reads) when present, else BertTokenizer's vocab.txt +
    tokenizer_config.json. Anything but a BERT WordPiece pipeline raises, naming the part that differs; `hint` (where
    such folders come from) ends the message of a missing file."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        vocab_file = folder / "vocab.txt"
        if not vocab_file.is_file():
            raise WeightsError(f"{folder}: no tokenizer.json or vocab.txt. {hint}".rstrip())
        vocab = {line.rstrip("\n"): i for i, line in enumerate(vocab_file.read_text(encoding="utf-8").split("\n")[:-1])}
        cfg = read_json(folder / "tokenizer_config.json", "BertTokenizer settings", hint) if \
            (folder / "tokenizer_config.json").is_file() else {}
        return WordPieceTokenizer(vocab, lowercase=cfg.get("do_lower_case", True),
                                  strip_accents=cfg.get("strip_accents"), chinese=cfg.get("tokenize_chinese_chars",
                                                                                          True),
                                  max_length=max_length, st_lowercase=st_lowercase)
    tj = read_json(path, "an HF tokenizers file", hint)
    norm, pre, model, post = (tj.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model", "post_processor"))
    found = (norm.get("type"), pre.get("type"), model.get("type"), post.get("type"))
    if found[:3] != ("BertNormalizer", "BertPreTokenizer", "WordPiece") or found[3] not in ("TemplateProcessing",
                                                                                           "BertProcessing"):
        raise WeightsError(f"{path}: (normalizer, pre_tokenizer, model, post_processor) types are {found}; only a "
                           f"BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, WordPiece, "
                           f"TemplateProcessing/BertProcessing) is implemented")
    if post["type"] == "TemplateProcessing":
        single = [next(iter(p.values()))["id"] for p in post["single"]]
        if len(single) != 3 or single[1] != "A":
            raise WeightsError(f"{path}: post_processor template {single} is not [CLS] A [SEP]")
        cls, sep = single[0], single[2]
    else:
        cls, sep = post["cls"][0], post["sep"][0]
    odd = [t["content"] for t in tj.get("added_tokens", []) if not t["special"] or t["normalized"] or t["lstrip"]
           or t["rstrip"] or t["single_word"]]
    if odd:
        raise WeightsError(f"{path}: added tokens {odd} are not plain special tokens (not implemented)")
    if not norm["clean_text"]:
        raise WeightsError(f"{path}: BertNormalizer clean_text=false is not implemented")
    pad = (tj.get("padding") or {}).get("pad_token", "[PAD]")
    return WordPieceTokenizer(model["vocab"], lowercase=norm["lowercase"], strip_accents=norm["strip_accents"],
                              chinese=norm["handle_chinese_chars"],
                              specials=tuple(t["content"] for t in tj.get("added_tokens", [])),
                              unk=model["unk_token"], cls=cls, sep=sep, pad=pad,
                              prefix=model["continuing_subword_prefix"], max_chars=model["max_input_chars_per_word"],
                              max_length=max_length, st_lowercase=st_lowercase)
