"""Errors a user can fix, how every script reports them, and the one torch.load (whose own errors name no file).

An error is *expected* when its cause lies outside the code: a setting, a data file, a weight file, a label name, a
run that diverged, or the system refusing a file operation (missing file, permission, full disk, quota). Its message
names the file, setting or value at fault, so a traceback adds nothing a user can act on: `run_main` prints it as one
line `error: <message>` on stderr and exits with status 2. Everything else is a bug and keeps its traceback (status
1). That is why the expected errors are our own classes and not every ValueError: a ValueError from a shape check in
losses.py is a bug, and must show where it happened.

  InputError          the base; raise it directly for an expected error that fits no subclass
    ConfigError       a setting, a flag, or a configuration YAML (settings, dataset YAML, label_sentences.yaml)
    DataError         an input data file: image, label map, list, names file, annotations (readers.py raises it)
    WeightsError      a weight file: train.py checkpoints, public pretrained weights, CLIP weights, label tables
    LabelKeyError     a label key, class name or dataset that label_sentences.yaml or a label table lacks
    DivergedError     training diverged: a non-finite loss, or a non-finite model or optimizer state
  OSError             Python's own: a file operation the system refused; its message names the path

Each subclass also derives from the builtin such code raised before (ValueError, KeyError, FloatingPointError), so
callers and tests that catch those keep working. SSIW_TRACEBACK=1 shows the traceback of an expected error too.
"""
import os
import re
import sys
from pathlib import Path

import torch


class InputError(Exception):
    """An expected error (see the module docstring); the message names what is at fault. `hint`: a few short lines
    on how to fix it (e.g. where a dataset comes from), printed above the error line."""

    def __init__(self, message="", hint=""):
        super().__init__(message)
        self.hint = hint

    def __str__(self):
        return Exception.__str__(self)  # KeyError's own __str__ would quote the message


class ConfigError(InputError, ValueError):
    """A setting, a flag, or a configuration YAML is wrong."""


class DataError(InputError, ValueError):
    """A problem with one input data file (or list line); the message starts with the path."""


class WeightsError(InputError, ValueError):
    """A weight file (checkpoint, pretrained weights, CLIP weights, label table) is not what it should be."""


class LabelKeyError(InputError, KeyError):
    """A label key, class name or dataset is missing from label_sentences.yaml or a label table."""


class DivergedError(InputError, FloatingPointError):
    """Training produced non-finite numbers; the message names the step."""


def read_torch_file(path, what: str):
    """torch.load of tensors and plain Python only (weights_only: nothing in the file runs), on the CPU.

    A path that is missing, a folder, or not such a file raises WeightsError naming the path and `what` it should
    be (with where such files come from). torch's own errors name neither, and suggest loading unsafely."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; expected {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # not torch.save's bytes: KeyError, EOFError, RuntimeError (zip), UnpicklingError ...
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        why = (f"it holds a Python object ({found[1]}), which is not loaded: unpickling it could run code" if found
               else f"not a complete file written by torch.save ({type(e).__name__})")
    raise WeightsError(f"{path}: {why}; expected {what}")


def run_main(main, argv=None):
    """A script's entry point: `if __name__ == "__main__": run_main(main)`.

    Runs main(argv); an InputError or OSError becomes one line `error: <message>` on stderr (a message listing
    several files is joined into it) and exit status 2. stdout is flushed first, so the error is the last line of a
    combined log. Other exceptions propagate with their traceback.
    """
    try:
        return main(argv)
    except (InputError, OSError) as e:
        if os.environ.get("SSIW_TRACEBACK"):
            raise
        sys.stdout.flush()
        hint = getattr(e, "hint", "")
        if hint:  # above the error line, so that the error is the last line of a log
            print(hint.rstrip(), file=sys.stderr)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr, flush=True)
        sys.exit(2)
