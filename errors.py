"""Errors a user can fix, and how every script reports them (run_main).

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

They derive from InputError alone: a ValueError, KeyError or FloatingPointError is a bug's, never one of these.
SSIW_TRACEBACK=1 shows the traceback of an expected error too.
"""
import json
import os
import sys
import time


class InputError(Exception):
    """An expected error (see the module docstring); the message names what is at fault. `hint`: a few short lines
    on how to fix it (e.g. where a dataset comes from), printed above the error line."""

    def __init__(self, message="", hint=""):
        super().__init__(message)
        self.hint = hint


class ConfigError(InputError):
    """A setting, a flag, or a configuration YAML is wrong."""


class DataError(InputError):
    """A problem with one input data file (or list line); the message starts with the path."""


class WeightsError(InputError):
    """A weight file (checkpoint, pretrained weights, CLIP weights, label table) is not what it should be."""


class LabelKeyError(InputError):
    """A label key, class name or dataset is missing from label_sentences.yaml or a label table."""


class DivergedError(InputError):
    """Training produced non-finite numbers; the message names the step."""


def run_main(main, argv=None):
    """A script's entry point: `if __name__ == "__main__": run_main(main)`.

    Runs main(argv); an InputError or OSError becomes one line `error: <message>` on stderr (a message listing
    several files is joined into it) and exit status 2. stdout is flushed first, so the error is the last line of a
    combined log. Under torchrun the line also goes to the launcher's error file, so torchrun's failure summary,
    printed after the rank has exited, ends with it (docs/troubleshooting.md). Other exceptions propagate with their
    traceback.
    """
    try:
        return main(argv)
    except (InputError, OSError) as e:
        if os.environ.get("SSIW_TRACEBACK"):
            raise
        line = "error: " + " ".join(part.strip() for part in original_message(e).splitlines())
        sys.stdout.flush()
        hint = getattr(e, "hint", "")
        if hint:  # above the error line, so that the error is the last line of a log
            print(hint.rstrip(), file=sys.stderr)
        print(line, file=sys.stderr, flush=True)
        tell_torchrun(line)
        sys.exit(2)


def original_message(e: BaseException) -> str:
    """str(e), or for an error raised in a DataLoader worker its own message. torch re-raises a worker's error in
    the main process as the same class whose message is "Caught <class> in DataLoader worker process N." and the
    worker's whole traceback (torch.utils._utils.ExceptionWrapper); that traceback ends with the line
    `<module>.<class>: <message>` (traceback.format_exception), and the message is what follows it."""
    text, cls = str(e), type(e)
    if not (text.startswith(f"Caught {cls.__name__} in ") and "\nOriginal Traceback" in text):
        return text
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    return text.rsplit(f"\n{name}: ", 1)[-1].rstrip("\n")


def tell_torchrun(line: str) -> None:
    """Under torchrun (TORCHELASTIC_ERROR_FILE set, one file per rank), write the error line where the launcher
    reads a failed rank's message: its summary shows it as the rank's `traceback :` instead of a link to the docs.
    The JSON is the plain form torch.distributed.elastic's ProcessFailure accepts ({"message": str, "timestamp"})."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:  # the launcher's temp folder is gone: the line is on stderr anyway
            pass
