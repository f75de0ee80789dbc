"""Text encoders' ONNX graphs at run time, with onnxruntime and the project's tokenizers (numpy; no torch): `TextGraph`
embeds new labels for an open-vocabulary graph (export.py --open_vocab). onnx_text_export.py writes the graphs.

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
from pathlib import Path

import numpy as np

import clip_bpe
from errors import ConfigError, WeightsError
from wordpiece import load_tokenizer


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("embedding texts with an ONNX text graph needs onnxruntime: pip install onnxruntime "
                          "(or pip install -r requirements-dev.txt)") from None
    return onnxruntime


def open_session(path, threads=0):
    """An onnxruntime session of the graph at path on the CPU, `threads` intra-op threads (0 = its default); a file
    it cannot run raises WeightsError naming it."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes for a missing or broken file
        raise WeightsError(f"{path}: not an ONNX graph onnxruntime can run ({e})") from None


class TextGraph:
    """A text graph written by export.py --text_encoder, run by onnxruntime with the tokenizer beside it."""

    def __init__(self, path, threads=0):
        """path: the .onnx file; threads: onnxruntime's intra-op threads (0 = its default)."""
        path = Path(path)
        self.session = open_session(path, threads)
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
