"""clip_text.py: tokenizer parity with OpenAI's (fixture + live), text-tower parity with HF transformers on the same
random weights in both public formats, trimming, loader errors, and the label-embedding CLI end to end."""
import hashlib
import importlib
import json
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import clip_bpe
import clip_text
from errors import ConfigError, WeightsError
from make_tokenizer_fixture import FIXTURE, load_reference, random_texts, reference_tokenize

REPO = Path(__file__).resolve().parents[1]
WIDTH, LAYERS, HEADS, EMBED = 128, 2, 2, 64  # heads = width // 64, as in every OpenAI model
SENTENCES = ["a dog", "An image of a sidewalk. A paved path for pedestrians beside a road.", "", "cafÃ© 🐶 &amp; 42",
             "<|endoftext|> literal marker then more words", "traffic light"]

# ------------------------------------------------------------------------------------------------------- tokenizer


def test_vendored_vocabulary_checksum():
    digest = hashlib.sha256((REPO / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert "MIT License" in (REPO / "assets" / "LICENSE-clip-bpe.txt").read_text()
    tok = clip_bpe.get_tokenizer()
    assert len(tok.encoder) == 49408 and (tok.sot, tok.eot) == (49406, 49407)


def test_tokenizer_matches_reference_fixture():
    cases = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 490
    for case in cases:
        text, ctx, truncate = case["text"], case["context_length"], case["truncate"]
        if "overflow_tokens" in case:
            with pytest.raises(ConfigError, match=f"is {case['overflow_tokens']} tokens"):
                clip_text.tokenize(text, ctx, truncate)
            continue
        expected = torch.zeros(1, ctx, dtype=torch.long)
        expected[0, :len(case["ids"])] = torch.tensor(case["ids"])
        assert torch.equal(clip_text.tokenize(text, ctx, truncate), expected), case["name"]
        assert clip_bpe.decode(expected[0]) == case["decoded"], case["name"]


def test_tokenizer_matches_reference_live():
    ref = load_reference()
    if ref is None:
        pytest.skip("clip-anytorch not installed (pip install clip-anytorch): live reference comparison skipped")
    texts = random_texts(500, seed=1)
    ours = clip_text.tokenize(texts, truncate=True)
    for i, text in enumerate(texts):
        ids = reference_tokenize(ref, text, truncate=True)
        assert ours[i, :len(ids)].tolist() == ids and not ours[i, len(ids):].any(), repr(text)
        assert clip_bpe.get_tokenizer().encode(text) == ref.encode(text), repr(text)
        assert clip_bpe.decode(ours[i]) == ref.decode(ids[1:-1]), repr(text)


def test_overflow_raises_naming_text_and_count():
    text = "pedestrian " * 100  # one token per word
    with pytest.raises(ConfigError, match=r"'pedestrian pedestrian .*\.\.\.' is 102 tokens .*context_length=77"):
        clip_text.tokenize(["short", text])


def test_truncate_keeps_eot_last_and_batches_pad_with_zeros():
    ids = clip_text.tokenize(["pedestrian " * 100, "a dog"], truncate=True)
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and (ids[0, 1:-1] == ids[0, 1]).all()
    assert ids[1, :4].tolist() == [49406, 320, 1929, 49407] and not ids[1, 4:].any()


def test_tokenizers_import_and_run_without_torch(monkeypatch):
    """clip_bpe.py and wordpiece.py need numpy, ftfy and regex only: a runtime without torch tokenizes with them."""
    for name in ("clip_bpe", "wordpiece", "errors"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torch` in any of them now raises ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    bpe, wp = importlib.import_module("clip_bpe"), importlib.import_module("wordpiece")
    ids = bpe.tokenize(["a dog"])
    assert ids.dtype == np.int64 and ids[0, :4].tolist() == [49406, 320, 1929, 49407]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "##s"])}
    ids, mask = wp.WordPieceTokenizer(vocab).tokenize(["A dogs", "a"])
    assert ids.tolist() == [[2, 5, 6, 7, 3], [2, 5, 3, 0, 0]] and mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def test_decode_strips_padding_and_markers_but_keeps_inner_byte_zero():
    ids = clip_text.tokenize("hi !~ there")[0]
    assert ids[2] == 0  # "!" inside the word "!~" is byte token 0, the same id as padding
    assert clip_bpe.decode(ids) == "hi !~ there "
    assert clip_bpe.decode(ids.tolist()) == clip_bpe.decode(ids)


# ------------------------------------------------------------------------------------------------ weights, models


def randomise(module: nn.Module, seed: int):
    """Every parameter random (HF inits biases/LayerNorm to constants, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    return module


def hf_text_config(**kw):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, max_position_embeddings=77, projection_dim=EMBED,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, **kw)


class OpenAIBlock(nn.Module):
    """OpenAI clip/model.py ResidualAttentionBlock, with its nn.MultiheadAttention (seq-first) and mask."""

    def __init__(self, width, heads, attn_mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=clip_text.QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute, as in OpenAI's code: not part of the state dict

    def forward(self, x):
        x = x + self.attn(*[self.ln_1(x)] * 3, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIStyleCLIP(nn.Module):
    """OpenAI's CLIP text path with its exact parameter names, plus stand-ins for the keys a released .pt also holds."""

    def __init__(self):
        super().__init__()
        mask = torch.full((77, 77), float("-inf")).triu_(1)
        self.token_embedding = nn.Embedding(49408, WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(77, WIDTH))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[OpenAIBlock(WIDTH, HEADS, mask) for _ in range(LAYERS)])
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.empty(WIDTH, EMBED))
        self.visual = nn.Conv2d(3, 8, 4)  # stands in for the vision tower: must be skipped by name
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for name in ("input_resolution", "context_length", "vocab_size"):  # build_model deletes these if present
            self.register_buffer(name, torch.tensor(77))

    def forward(self, text):  # OpenAI's encode_text
        x = self.token_embedding(text) + self.positional_embedding  # (N, 77, C)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)  # seq-first through the blocks
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def openai_from_hf(hf_sd):
    """The test's own HF -> OpenAI conversion (written independently of clip_text.hf_to_openai)."""
    out = {}
    for k, v in hf_sd.items():
        k = k.replace("text_model.embeddings.token_embedding.", "token_embedding.")
        k = k.replace("text_model.embeddings.position_embedding.weight", "positional_embedding")
        k = k.replace("text_model.final_layer_norm.", "ln_final.").replace("text_model.encoder.layers.",
                                                                            "transformer.resblocks.")
        for a, b in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("fc1", "c_fc"), ("fc2", "c_proj"),
                     ("self_attn.", "attn.")]:
            k = k.replace(a, b)
        out[k] = v.t() if k == "text_projection.weight" else v
    out["text_projection"] = out.pop("text_projection.weight")
    for i in range(LAYERS):
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [out.pop(f"transformer.resblocks.{i}.attn.{n}_proj.{p}") for n in "qkv"])
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One set of random text-tower weights, written as an HF folder and as an OpenAI TorchScript archive."""
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip_weights")
    hf = randomise(CLIPTextModelWithProjection(hf_text_config()), seed=0).eval()
    hf.save_pretrained(root / "hf")
    tokens = clip_text.tokenize(SENTENCES)
    with torch.no_grad():
        expected = hf(input_ids=tokens).text_embeds  # (N, EMBED)
        # HF pools at the first eos_token_id (49407, current configs) or, for the old openai configs that say
        # eos_token_id=2, at argmax(ids) like OpenAI; on tokenize's output both must agree
        old = CLIPTextModelWithProjection(hf_text_config(eos_token_id=2)).eval()
        old.load_state_dict(hf.state_dict())
        assert hf.config.eos_token_id == 49407 and torch.equal(old(input_ids=tokens).text_embeds, expected)
        openai = randomise(OpenAIStyleCLIP(), seed=1).eval()
        missing, unexpected = openai.load_state_dict(openai_from_hf(hf.state_dict()), strict=False)
        assert set(missing) == {"visual.weight", "visual.bias", "logit_scale", "input_resolution", "context_length",
                                "vocab_size"} and not unexpected
        with warnings.catch_warnings():  # nn.MultiheadAttention's shape checks warn under tracing; harmless here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(openai, tokens)
    torch.jit.save(traced, str(root / "ViT-tiny.pt"))
    return {"root": root, "hf": hf, "tokens": tokens, "expected": expected, "openai": openai}


@pytest.mark.parametrize("fmt", ["torchscript", "openai_state_dict", "hf_safetensors", "hf_folder", "hf_bin"])
def test_encode_text_matches_hf_on_same_weights(weights, fmt, tmp_path, capsys):
    root = weights["root"]
    if fmt == "openai_state_dict":
        torch.save(weights["openai"].state_dict(), tmp_path / "plain.pt")
    if fmt == "hf_bin":  # an old-style HF file, which also stores the position_ids buffer
        sd = dict(weights["hf"].state_dict(), **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
        torch.save(sd, tmp_path / "pytorch_model.bin")
    path = {"torchscript": root / "ViT-tiny.pt", "openai_state_dict": tmp_path / "plain.pt",
            "hf_safetensors": root / "hf" / "model.safetensors", "hf_folder": root / "hf",
            "hf_bin": tmp_path / "pytorch_model.bin"}[fmt]
    model = clip_text.load(path)
    assert model.config == clip_text.TextConfig(49408, 77, WIDTH, LAYERS, HEADS, 4 * WIDTH, EMBED)
    with torch.no_grad():
        got = model.encode_text(weights["tokens"])
    assert got.shape == (len(SENTENCES), EMBED)
    assert (got - weights["expected"]).abs().max() <= 1e-5
    if fmt == "torchscript":  # the archive itself runs OpenAI's encode_text: a second, independent reference
        assert (got - torch.jit.load(str(path))(weights["tokens"])).abs().max() <= 1e-5
        log = capsys.readouterr().out
        assert "skipping 6 non-text-tower keys (visual.*: 2, logit_scale, input_resolution, context_length, " \
               "vocab_size)" in log


def test_full_hf_clip_checkpoint_skips_vision_by_name(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    cfg = CLIPConfig(text_config=hf_text_config().to_dict(), vision_config=vision, projection_dim=EMBED)
    hf = randomise(CLIPModel(cfg), seed=2).eval()
    hf.save_pretrained(tmp_path)
    model = clip_text.load(tmp_path)
    n_vision = sum(k.startswith("vision_model.") for k in hf.state_dict())
    assert f"skipping {n_vision + 2} non-text-tower keys (vision_model.*: {n_vision}, visual_projection.*: 1, " \
           f"logit_scale)" in capsys.readouterr().out
    tokens = clip_text.tokenize(SENTENCES)
    with torch.no_grad():
        out = hf.get_text_features(input_ids=tokens)
        expected = out if torch.is_tensor(out) else out.pooler_output
        assert (model.encode_text(tokens) - expected).abs().max() <= 1e-5


def test_trimmed_equals_untrimmed_and_batched_equals_single(weights):
    model = clip_text.load(weights["root"] / "ViT-tiny.pt")
    tokens = weights["tokens"]
    with torch.no_grad():
        trimmed, full = model.encode_text(tokens), model.encode_text(tokens, trim=False)
        single = torch.cat([model.encode_text(t[None]) for t in tokens])
    assert int(tokens.argmax(-1).max()) + 1 < 77 / 2  # the trim really drops most columns
    # equal up to float summation order (different matrix shapes); a leak from padding would be ~1e-1
    assert (trimmed - full).abs().max() <= 1e-5 and (trimmed - single).abs().max() <= 1e-5


def test_bf16_autocast_close_to_fp32(weights):
    model = clip_text.load(weights["root"] / "ViT-tiny.pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.encode_text(weights["tokens"])
    assert got.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(got.float(), weights["expected"], dim=-1)
    assert cos.min() > 0.999 and (got.float() - weights["expected"]).abs().max() < 0.05, cos  # measured 0.99997, 0.013


def test_encode_sentences_is_normalised_and_matches_encode_text(weights):
    model = clip_text.load(weights["root"] / "ViT-tiny.pt")
    emb = clip_text.encode_sentences(model, SENTENCES, batch_size=4)  # two batches of different trimmed lengths
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-6)
    assert (emb - torch.nn.functional.normalize(weights["expected"], dim=-1)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,width,embed_dim", [("ViT-B/32", 512, 512), ("ViT-B/16", 512, 512),
                                                  ("ViT-L/14", 768, 768), ("RN50", 512, 1024)])
def test_released_text_tower_sizes_load(name, width, embed_dim):
    """OpenAI's text-tower layouts (shapes from its model card table), checked on the meta device: no memory."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed_dim)}
    for i in range(12):
        b = f"transformer.resblocks.{i}."
        shapes.update({b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                       b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                       b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                       b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
        shapes.update({b + f"{ln}.{p}": (width,) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")})
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = clip_text.config_from_state_dict(sd)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.embed_dim) == (width, 12, width // 64, embed_dim)
    with torch.device("meta"):
        model = clip_text.TextTransformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)


def test_loader_errors_say_what_is_expected(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="openaipublic.*openai/clip-vit-base-patch32"):
        clip_text.load(tmp_path / "ViT-B-32.pt")
    torch.save({"backbone.conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no CLIP text tower keys.*backbone.conv.weight"):
        clip_text.load(tmp_path / "other.pt")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="model.safetensors: not a safetensors file"):
        clip_text.load(tmp_path / "model.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.bin: not a complete file written by torch.save.*expected CLIP weights"):
        clip_text.load(tmp_path / "junk.bin")
    sd = dict(weights["openai"].state_dict())
    sd["transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="Unexpected key.*transformer.resblocks.0.attn.extra"):
        clip_text.load(tmp_path / "extra.pt")
    sd = dict(weights["hf"].state_dict())
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="text_model.encoder.layers.1.mlp.fc2.bias"):
        clip_text.load(tmp_path / "pytorch_model.bin")


def test_safetensors_reader_matches_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(-3, 9).view(3, 4),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, lib = clip_text.read_safetensors(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert ours.keys() == lib.keys()
    for k in lib:
        assert ours[k].dtype == lib[k].dtype and ours[k].shape == lib[k].shape and torch.equal(ours[k], lib[k]), k


# ------------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_writes_label_table_from_torchscript_weights(weights, tmp_path):
    import label_spec
    import labels
    spec = label_spec.load_label_spec()
    keys = list(spec.sentences)[:3]
    for mode in ("sentence", "word"):
        out = tmp_path / f"table_{mode}.pt"
        cmd = [sys.executable, str(REPO / "label_table.py"), "--clip_weights", str(weights["root"] / "ViT-tiny.pt"),
               "--out", str(out), "--mode", mode, "--labels", ",".join(keys)]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        table = labels.load_label_table(out)
        texts = label_spec.label_texts(spec, keys, mode=mode)
        assert table.names == keys and table.sentences == texts and table.embeddings.shape == (3, EMBED)
        with torch.no_grad():
            expected = torch.nn.functional.normalize(weights["hf"](input_ids=clip_text.tokenize(texts)).text_embeds)
        assert (table.embeddings - expected).abs().max() <= 1e-5
        assert "ViT-tiny.pt" in table.encoder
        assert table.weights_sha256 == hashlib.sha256((weights["root"] / "ViT-tiny.pt").read_bytes()).hexdigest()
