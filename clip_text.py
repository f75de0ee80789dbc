"""CLIP's text side, vendored: the text transformer and its weight loaders (the BPE tokenizer: clip_bpe.py).

Follows OpenAI CLIP (clip/simple_tokenizer.py, clip/model.py) token for token and key for key, so OpenAI's released
`.pt` files load without renames; HF checkpoints are mapped onto the same names by one explicit function.
label_table.py makes label tables with it: `python label_table.py --clip_weights=ViT-B-32.pt --out=T.pt`.
"""
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_bpe
from errors import WeightsError
from torch_files import read_torch_file

WHERE_TO_GET = ("Get OpenAI CLIP .pt files from the URLs in openai/CLIP clip/clip.py (ViT-B/32: https://"
                "openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt), or HF checkpoints "
                "from https://huggingface.co/openai/clip-vit-base-patch32 (model.safetensors).")


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False,
             tokenizer: clip_bpe.Tokenizer | None = None) -> torch.LongTensor:
    """clip_bpe.tokenize as the text tower takes it: LongTensor[N, context_length]."""
    return torch.from_numpy(clip_bpe.tokenize(texts, context_length, truncate, tokenizer))


# --------------------------------------------------------------------------------------------------- text transformer


@dataclass
class TextConfig:  # defaults: the ViT-B/32 text tower
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_width: int = 2048
    embed_dim: int = 512


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)  # the GELU approximation CLIP was trained with


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (OpenAI checkpoints store them so), computed with SDPA. Causal in the
    text tower (a token sees only earlier ones), full in the image tower (clip_image.py)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked in that order
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, h, T, C/h)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_width), gelu=QuickGELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x):  # (B, T, C), pre-LN
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """CLIP's transformer, shared by the text tower (causal) and the image tower (clip_image.py, not causal)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, causal: bool):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp_width, causal)
                                         for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TextTransformer(nn.Module):
    """CLIP's text tower; parameter names are OpenAI's CLIP model minus `visual.*` and `logit_scale`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, causal=True)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialize_parameters (only used by label_table.py --clip_random_init and tests; loading overwrites
        everything)."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (c.width ** -0.5) * ((2 * c.layers) ** -0.5)
        attn_std, fc_std = c.width ** -0.5, (2 * c.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=c.width ** -0.5)

    def encode_text(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """tokens LongTensor[N, T] from `tokenize` -> FloatTensor[N, embed_dim], projected, not normalised.

        trim=True drops the padding columns after the longest sequence's eot. That is exact: with a causal mask no
        position attends to a later one, and only the eot position is read out.
        """
        tokens = tokens.to(self.token_embedding.weight.device)
        # eot has the largest id in the vocabulary, so argmax finds it (the first one, should the text contain the
        # literal marker); the causal model has only seen the whole sentence at its last position, hence eot pooling.
        eot = tokens.argmax(dim=-1)  # (N,)
        if trim:
            tokens = tokens[:, :int(eot.max()) + 1]  # (N, T) -> (N, T')
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (N, T', C)
        x = self.ln_final(self.transformer(x))  # (N, T', C)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (N, C) @ (C, D) -> (N, D)

    forward = encode_text


@torch.no_grad()
def encode_sentences(model: TextTransformer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Texts -> FloatTensor[N, D], L2-normalised in fp32 (the label-table format)."""
    model.eval()
    out = [model.encode_text(tokenize(texts[i:i + batch_size], model.config.context_length)).float()
           for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out), dim=-1).cpu()

# -------------------------------------------------------------------------------------------------------- loading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The safetensors format by hand: u64 little-endian header size, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to the end of the header), then little-endian tensor bytes."""
    data = bytearray(Path(path).read_bytes())
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    try:
        header = json.loads(data[8:8 + n]) if 0 < n <= len(data) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (no JSON header of the size its first 8 bytes give)")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} has dtype {info['dtype']}, "
                               f"supported: {list(SAFETENSORS_DTYPES)}")
        begin, end = (8 + n + o for o in info["data_offsets"])
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if end > len(data) or end - begin != dtype.itemsize * torch.Size(info["shape"]).numel():
            raise WeightsError(f"{path}: tensor {name} has data_offsets {info['data_offsets']} that do not fit "
                               f"shape {info['shape']} {info['dtype']} or the file")
        # copy each tensor's bytes out so it owns aligned memory and the file buffer can be freed
        t = torch.frombuffer(data[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def read_clip_state_dict(path) -> tuple[dict[str, torch.Tensor], str]:
    """A CLIP checkpoint -> (raw state dict with its own key names, "openai" | "hf").

    Accepts OpenAI's released .pt (TorchScript archive, or a plain state dict), an HF model.safetensors or
    pytorch_model.bin, or an HF snapshot directory holding one of those.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin. "
                                    f"{WHERE_TO_GET}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found at {path}. Expected an OpenAI CLIP .pt file or an HF CLIP "
                                f"model.safetensors / pytorch_model.bin. {WHERE_TO_GET}")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:  # OpenAI's TorchScript archive too: its tensors are read without running its code
        sd = read_torch_file(path, f"CLIP weights (an OpenAI CLIP .pt, or an HF model.safetensors or "
                                   f"pytorch_model.bin). {WHERE_TO_GET}")
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}. {WHERE_TO_GET}")
    if any(k.startswith("text_model.") for k in sd):
        return dict(sd), "hf"
    if "token_embedding.weight" in sd:
        return dict(sd), "openai"
    raise WeightsError(f"{path}: no CLIP text tower keys (OpenAI: token_embedding.weight, transformer.resblocks.*; "
                       f"HF: text_model.*); first keys are {list(sd)[:5]}. {WHERE_TO_GET}")


# Keys that are not the text tower, dropped by name (and counted in the log): never a silent filter.
SKIP_PREFIXES = {"openai": ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size"),
                 "hf": ("vision_model.", "visual_projection.", "logit_scale",
                        "text_model.embeddings.position_ids")}  # an arange buffer; positions are implicit here
HF_LAYER_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def pop_hf_layers(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop HF's transformer layers `{prefix}{i}.*` out of `sd` and return them under OpenAI's names
    `transformer.resblocks.{i}.*` (both towers use this)."""
    out = {}
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
    for i in layers:
        hf, ours = f"{prefix}{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):  # nn.MultiheadAttention packs q, k, v into one in_proj
            out[ours + f"attn.in_proj_{p}"] = torch.cat([sd.pop(hf + f"self_attn.{n}_proj.{p}") for n in "qkv"])
            for a, b in HF_LAYER_RENAMES.items():
                out[ours + f"{b}.{p}"] = sd.pop(hf + f"{a}.{p}")
    return out


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys -> OpenAI's. Leftover keys raise, so nothing is dropped unnoticed."""
    sd = dict(sd)
    out = {"token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").t()}  # nn.Linear (D, C) -> OpenAI's matrix (C, D)
    out.update(pop_hf_layers(sd, "text_model.encoder.layers."))
    if sd:
        raise KeyError(f"unexpected HF CLIP keys: {sorted(sd)[:10]}")
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> TextConfig:
    """Sizes from tensor shapes, as OpenAI's build_model does (heads = width // 64 for every released model)."""
    width = sd["ln_final.weight"].shape[0]
    return TextConfig(vocab_size=sd["token_embedding.weight"].shape[0],
                      context_length=sd["positional_embedding"].shape[0], width=width,
                      layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
                      heads=width // 64, mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                      embed_dim=sd["text_projection"].shape[1])


def drop_by_prefix(raw: dict, prefixes: tuple, who: str, what: str) -> dict:
    """`raw` without the keys starting with `prefixes` (the other tower's), saying how many of each were dropped."""
    skipped = {k for k in raw if k.startswith(prefixes)}
    by_prefix = {p: sum(k.startswith(p) for k in skipped) for p in prefixes}
    print(f"{who}: skipping {len(skipped)} {what} keys "
          f"({', '.join(f'{p}*: {n}' if p.endswith('.') else p for p, n in by_prefix.items() if n)})")
    return {k: v for k, v in raw.items() if k not in skipped}


def load(path, device="cpu") -> TextTransformer:
    """CLIP checkpoint (see read_clip_state_dict) -> fp32 TextTransformer in eval mode, loaded strictly."""
    raw, fmt = read_clip_state_dict(path)
    sd = drop_by_prefix(raw, SKIP_PREFIXES[fmt], f"clip_text: {path} ({fmt})", "non-text-tower")
    try:
        sd = hf_to_openai(sd) if fmt == "hf" else sd
        model = TextTransformer(config_from_state_dict(sd))
        model.load_state_dict(sd, strict=True)  # copies into fp32 parameters (OpenAI's .pt files hold fp16)
    except (KeyError, RuntimeError) as e:
        raise WeightsError(f"{path}: weights do not fit a CLIP text tower: {e}. {WHERE_TO_GET}") from e
    return model.to(device).eval()
