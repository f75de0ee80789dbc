"""torch.compile as the inference default (inference.Protocol.compile, runtime.compiled): the compiled network labels
as the eager fp32 one does (up to ties), on each backbone family; whole images of new sizes and sliding windows do not
compile per image (one graph per size); a second compile of the same graph reads the persistent cache; where compiling cannot work, one
`warning:` line and eager; the setting and SSIW_COMPILE turn it off. tests/conftest.py sets SSIW_COMPILE=0 for the
rest of the suite, so only these tests compile (marked slow where they do)."""
import pytest
import torch
import torch.nn.functional as F

import runtime
from errors import ConfigError
from inference import Protocol, infer
from model import ModelConfig, build_model
from settings import parse_settings
from evaluate import EvalSettings

TIE = 0.1  # labels may differ only where the eager top two probabilities are closer than this: twice the 0.05 bound
           # on any probability's bf16 error that tests/test_precision.py holds the bf16 path to


def tiny_model(backbone):
    torch.manual_seed(0)
    if backbone == "efficientnet_lite0+imagenet":  # the CPU recipe's network: the frozen ImageNet branch in the graph
        model = build_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=16, imagenet_branch=True))
        model.imagenet.class_emb.copy_(torch.randn(1000, 16))
        model.imagenet.seen_emb = F.normalize(torch.randn(2, 16), dim=1)
    else:
        model = build_model(ModelConfig(backbone=backbone, embed_dim=16))
    return model.eval()


def assert_same_labels(prob, want, bound):
    """prob, want: (N, H, W) probabilities; labels equal wherever want's top two are not within TIE of each other."""
    assert (prob - want).abs().max() < bound
    top2 = want.topk(2, dim=0).values                                   # (2, H, W)
    clear = (top2[0] - top2[1]) >= TIE
    assert clear.float().mean() > 0.5                                    # the comparison is not vacuous
    assert torch.equal(prob.argmax(0)[clear], want.argmax(0)[clear])


def graphs_compiled():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# one network per backbone family: the variants of a family (mit_b0..b5, hrnet_w18/w48, efficientnet_lite0..2) run
# the same code with other depths and widths
@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mit_b0", "hrnet_w18", "efficientnet_lite0+imagenet"])
def test_compiled_labels_equal_eager_one_graph_per_size(backbone, one_thread, capsys):
    model = tiny_model(backbone)
    emb = F.normalize(torch.randn(5, 16), dim=-1)
    torch._dynamo.reset()
    before = graphs_compiled()
    for h, w in [(64, 96), (70, 90), (64, 96)]:  # whole images of two sizes
        image = torch.randn(3, h, w)
        want, _ = infer(model, image, emb, 10.0, Protocol(base_size=0, sliding=False, precision="fp32", compile=False))
        prob, _ = infer(model, image, emb, 10.0, Protocol(base_size=0, sliding=False, precision="fp32", compile=True))
        assert_same_labels(prob, want, 1e-3)
    assert graphs_compiled() - before == 2  # one graph per size (static shapes), none for a size seen before
    out = capsys.readouterr().out
    assert "compile: on (torch.compile, inductor" in out and "warning" not in out


@pytest.mark.slow
def test_compiled_bf16_and_sliding_windows(one_thread):
    model = tiny_model("mit_b0")
    emb = F.normalize(torch.randn(5, 16), dim=-1)
    torch._dynamo.reset()
    before = graphs_compiled()
    for h, w in [(80, 100), (100, 72)]:  # windows of 64 x 64, whatever the image's size: one graph
        image = torch.randn(3, h, w)
        proto = dict(base_size=0, crop_size=64, sliding=True)
        want, _ = infer(model, image, emb, 10.0, Protocol(**proto, precision="fp32", compile=False))
        prob, _ = infer(model, image, emb, 10.0, Protocol(**proto, precision="bf16", compile=True))
        assert prob.dtype == torch.float32
        assert_same_labels(prob, want, 0.05)
    assert graphs_compiled() - before == 1


@pytest.mark.slow
def test_a_second_compile_reads_the_persistent_cache(one_thread, tmp_path, monkeypatch):
    """After dynamo forgets the compiled graph (as a new process starts without it), compiling the same network
    again is a hit of inductor's FX graph cache in the folder compile_cache_dir names."""
    from torch._dynamo.utils import counters
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("SSIW_CACHE", str(tmp_path))
    assert runtime.compile_cache_dir() == str(tmp_path / "inductor")
    image, emb = torch.randn(3, 64, 64), F.normalize(torch.randn(5, 16), dim=-1)
    proto = Protocol(base_size=0, sliding=False, precision="fp32", compile=True)
    outs = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        outs.append(infer(tiny_model("mit_b0"), image, emb, 10.0, proto)[0])  # a new model: compiled anew
        hits = counters["inductor"]["fxgraph_cache_hit"]
    assert hits >= 1 and any((tmp_path / "inductor").rglob("*"))
    assert torch.equal(outs[0], outs[1])


def test_a_failing_compile_warns_once_and_runs_eager(monkeypatch, capsys):
    """An exception at the first compiled call (an op inductor cannot lower, a compiler error): one warning line,
    then eager, with the eager result."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("inductor: cannot lower aten.some_op\nmore detail")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    model, emb = tiny_model("mit_b0"), F.normalize(torch.randn(5, 16), dim=-1)
    want, _ = infer(model, torch.randn(3, 64, 64), emb, 10.0, Protocol(base_size=0, sliding=False, compile=False,
                                                                       precision="fp32"))
    capsys.readouterr()
    torch.manual_seed(1)
    images = [torch.randn(3, 64, 64) for _ in range(3)]
    proto = Protocol(base_size=0, sliding=False, precision="fp32", compile=True)
    outs = [infer(model, image, emb, 10.0, proto)[0] for image in images]
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: compile: the network runs eager: the first compiled call failed (RuntimeError: "
                        "inductor: cannot lower aten.some_op)"]
    assert calls == [1]                                                  # never tried again
    eager = Protocol(base_size=0, sliding=False, precision="fp32", compile=False)
    for image, prob in zip(images, outs):
        torch.testing.assert_close(prob, infer(model, image, emb, 10.0, eager)[0], rtol=0, atol=0)


def test_a_size_that_fails_to_compile_warns_once_and_runs_eager(monkeypatch, capsys):
    """A later call whose compile fails (a new image size): one warning, eager from then on; an error that is not a
    compile error (the network's own) is raised as it is."""
    import torch._dynamo.exc
    seen = []

    def compile_one_size(fn, **kw):
        def run(x, *a):
            seen.append(tuple(x.shape))
            if x.shape[-1] != 64:
                raise torch._dynamo.exc.TorchDynamoException("bad size")
            return fn(x, *a)
        return run
    monkeypatch.setattr(torch, "compile", compile_one_size)
    model, emb = tiny_model("mit_b0"), F.normalize(torch.randn(5, 16), dim=-1)
    proto = Protocol(base_size=0, sliding=False, precision="fp32", compile=True)
    for w in (64, 96, 96, 64):
        infer(model, torch.randn(3, 64, w), emb, 10.0, proto)
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("warning:")]) == 1
    assert "warning: compile: the network runs eager: compiling failed (TorchDynamoException: bad size)" in out
    assert seen == [(1, 3, 64, 64), (1, 3, 64, 96)]                      # eager after the failure
    # past the first call, the network's own errors are raised as they are, with no warning
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = tiny_model("mit_b0")
    infer(model, torch.randn(3, 64, 64), emb, 10.0, proto)
    with pytest.raises(RuntimeError, match="einsum"):
        infer(model, torch.randn(3, 64, 64), emb[:, :8], 10.0, proto)   # labels of the wrong width
    assert "warning" not in capsys.readouterr().out


def test_no_cpp_compiler_warns_once_and_never_compiles(monkeypatch, capsys):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("Failed to find a working C++ compiler. Tried: ['/nonexistent/c++']")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled without a compiler"))
    model, emb = tiny_model("mit_b0"), F.normalize(torch.randn(5, 16), dim=-1)
    proto = Protocol(base_size=0, sliding=False, precision="fp32", compile=True)
    for _ in range(2):
        infer(model, torch.randn(3, 64, 64), emb, 10.0, proto)
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith(("warning:", "compile:"))] == [
        "warning: compile: the network runs eager: no C++ compiler for inductor's CPU kernels (RuntimeError: Failed "
        "to find a working C++ compiler. Tried: ['/nonexistent/c++']); install g++ or set CXX"]


def test_the_setting_and_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("SSIW_COMPILE", raising=False)
    assert parse_settings(EvalSettings, []).compile is True              # the default, unpinned
    assert parse_settings(EvalSettings, ["--compile=false"]).compile is False
    monkeypatch.setenv("SSIW_COMPILE", "0")                               # what the suite sets
    assert parse_settings(EvalSettings, []).compile is False
    assert parse_settings(EvalSettings, ["--compile=true"]).compile is True  # a flag wins
    monkeypatch.setenv("SSIW_COMPILE", "maybe")
    with pytest.raises(ConfigError, match="SSIW_COMPILE='maybe'"):
        parse_settings(EvalSettings, [])
    monkeypatch.setenv("SSIW_COMPILE", "off")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled although off"))
    model, emb = tiny_model("mit_b0"), F.normalize(torch.randn(5, 16), dim=-1)
    proto = Protocol(base_size=0, sliding=False, precision="fp32")
    for _ in range(2):
        infer(model, torch.randn(3, 64, 64), emb, 10.0, proto)
    assert capsys.readouterr().out.splitlines() == [
        "compile: off (as set; SSIW_COMPILE sets the default; --compile=true to compile the network)"]
