"""Settings for the scripts: a dataclass of defaults, overridden by a YAML file and then by flags.

Flags are `--key=value` or `--key value`; a bool setting also takes `--key` alone (= true). An argument starting with
`--` is always a flag, never a value; negative numbers (`--lr -1`) are values.

nanoGPT's configurator without `exec`: every override is type-checked against the default's type and an unknown
key raises, naming the key and where it came from. train.py and evaluate.py each open with their own dataclass.
"""
import ast
import dataclasses
import inspect
import math
import sys
from pathlib import Path

import yaml

from errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that raises on a duplicate mapping key (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path):
    """The one YAML reader of the project (settings, dataset configs, label_sentences.yaml, sentence files): safe,
    and strict about duplicate keys. A YAML error raises ConfigError `path:line:column: problem`."""
    try:
        with open(path, encoding="utf-8") as f:  # a file stream, so the error marks carry the file's name
            return yaml.load(f, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: {e.problem}" + (f" ({e.context})" if e.context else "")) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from None


def _coerce(name, value, default, where):
    """Check `value` against the type of `default`; ints are accepted for floats, which must be finite."""
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if want is bool or type(value) is bool:  # bool is an int subclass: insist on the exact type
        if type(value) is not want:
            raise ConfigError(f"{where}: {name} must be {want.__name__}, got {value!r}")
        return value
    if not isinstance(value, want):
        raise ConfigError(f"{where}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):  # e.g. --lr=1e309, which Python reads as inf
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
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

    Returns the settings instance, checked by its `validate()` where the class has one. Raises ConfigError on
    unknown keys, wrong types, malformed flags or values out of range.
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
                    raise ConfigError(f"flag {arg}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
                after = argv[i] if i < len(argv) else None
                if isinstance(getattr(settings, key), bool) and str(after).lower() not in ("true", "false"):
                    text = "true"  # --flag alone; what follows is not its value
                elif after is None or after.startswith("--"):
                    raise ConfigError(f"flag {arg} needs a value: {arg} VALUE or {arg}=VALUE")
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
            loaded = read_yaml(path) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings at the top level")
            overrides.extend((key, value, str(path)) for key, value in loaded.items())
    for key, value, where in overrides:
        if key not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        setattr(settings, key, _coerce(key, value, getattr(settings, key), where))
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def require(settings, names, ok, want):
    """For validate(): raise ConfigError naming the setting and its value unless ok(value) holds for each of the
    space-separated `names`. E.g. require(s, "batch_size save_every", lambda v: v >= 1, "must be >= 1")."""
    for name in names.split():
        value = getattr(settings, name)
        if not ok(value):
            raise ConfigError(f"settings: {name}={value!r} {want}")


def one_of(settings, name, choices):
    """For validate(): the setting must be one of `choices`."""
    require(settings, name, lambda v: v in choices, f"must be one of {tuple(choices)}")


def print_settings(settings):
    """One line per setting, so a log shows exactly what ran."""
    for key, value in dataclasses.asdict(settings).items():
        print(f"  {key} = {value!r}")
