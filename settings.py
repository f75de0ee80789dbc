"""Settings for the scripts: a dataclass of defaults, overridden by a YAML file and then by flags.

Flags are `--key=value` or `--key value`; a bool setting also takes `--key` alone (= true). An argument starting with
`--` is always a flag, never a value; negative numbers (`--lr -1`) are values.

nanoGPT's configurator without `exec`: every override is type-checked against the default's type and an unknown
key raises, naming the key and where it came from. train.py and evaluate.py each open with their own dataclass.
"""
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

import yaml


def _coerce(name, value, default, where):
    """Check `value` against the type of `default`; ints are accepted for floats."""
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if want is bool or type(value) is bool:  # bool is an int subclass: insist on the exact type
        if type(value) is not want:
            raise TypeError(f"{where}: {name} must be {want.__name__}, got {value!r}")
        return value
    if not isinstance(value, want):
        raise TypeError(f"{where}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_flag_value(text):
    """'3' -> 3, '1e-4' -> 1e-4, 'true' -> True, '[1, 2]' -> [1, 2], anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_settings(cls, argv=None):
    """Build `cls` from its defaults, then an optional YAML file (first positional argument), then flags
    (--key=value, --key value, --flag for a bool).

    Returns the settings instance. Raises on unknown keys, wrong types, or malformed flags.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    overrides = []  # (key, value, where)
    if any(arg in ("-h", "--help") for arg in argv):
        script = sys.modules.get("__main__")
        print((script.__doc__ or "").strip(), "\n\nSettings (defaults; override with a YAML file and --key=value or "
              "--key value):\n")
        for klass in reversed(cls.__mro__):  # the dataclass itself and those it extends: names, defaults, comments
            if dataclasses.is_dataclass(klass):
                print(inspect.getsource(klass))
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:  # --key value, or a bool's --key alone
                if key not in fields:
                    raise KeyError(f"flag {arg}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
                after = argv[i] if i < len(argv) else None
                if isinstance(getattr(settings, key), bool) and str(after).lower() not in ("true", "false"):
                    text = "true"  # --flag alone; what follows is not its value
                elif after is None or after.startswith("--"):
                    raise ValueError(f"flag {arg} needs a value: {arg} VALUE or {arg}=VALUE")
                else:
                    text, i = after, i + 1
                arg = f"{arg} {text}"
            if key in fields and isinstance(getattr(settings, key), str):
                value = text  # a string setting takes the flag's text as written (--name=3 is the name "3")
            else:
                value = _parse_flag_value(text)
            overrides.append((key, value, f"flag {arg}"))
        else:
            path = Path(arg)
            if not path.is_file():
                raise FileNotFoundError(f"settings file {path} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of settings at the top level")
            overrides.extend((key, value, str(path)) for key, value in loaded.items())
    for key, value, where in overrides:
        if key not in fields:
            raise KeyError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        setattr(settings, key, _coerce(key, value, getattr(settings, key), where))
    return settings


def print_settings(settings):
    """One line per setting, so a log shows exactly what ran."""
    for key, value in dataclasses.asdict(settings).items():
        print(f"  {key} = {value!r}")
