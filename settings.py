"""Settings for the scripts: a dataclass of defaults, overridden by YAML files and then by flags.

Flags are `--key=value` or `--key value`; a bool setting also takes `--key` alone (= true). An argument starting with
`--` is always a flag, never a value; negative numbers (`--lr -1`) are values. `--batch-size` is read as `--batch_size`.
Flags win over the YAML wherever they stand on the command line: `train.py --max_steps=2 cfg.yaml` runs 2 steps.
A list setting takes a YAML/Python list (`--scales=[0.5, 1.0]`) or the plain comma form (`--scales 0.5,1.0`).

nanoGPT's configurator without `exec`: every override is type-checked against the default's type (a list's elements
against the default list's first element) and an unknown key raises, naming the key and where it came from. A float
beyond float32's range is refused here, by name, rather than overflowing inside torch. `--help` prints the script's
docstring and a table of the settings, whose meanings are the trailing comments of the dataclass's field lines.
"""
import ast
import dataclasses
import inspect
import io
import math
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml

from errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: what a float setting becomes on a device


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


def _coerce_scalar(name, value, want, where):
    """`value` as type `want`: ints are accepted for floats, which must be finite and within float32's range."""
    if want is float and type(value) is int:
        value = float(value)
    if want is bool or type(value) is bool:  # bool is an int subclass: insist on the exact type
        if type(value) is not want:
            raise ConfigError(f"{where}: {name} must be {want.__name__}, got {value!r}")
        return value
    if not isinstance(value, want):
        raise ConfigError(f"{where}: {name} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):  # e.g. --lr=1e309, which Python reads as inf
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    if want is float and abs(value) > FLOAT32_MAX:  # finite in Python, inf (or an overflow error) in a float32 tensor
        raise ConfigError(f"{where}: {name}={value!r} is beyond float32's range (+-{FLOAT32_MAX:.4g})")
    return value


def _coerce(name, value, default, where):
    """Check `value` against the type of `default`; a list's elements against the type of the default's first
    element (none checked when the default list is empty)."""
    value = _coerce_scalar(name, value, type(default), where)
    if isinstance(default, list) and default:
        want = type(default[0])
        value = [_coerce_scalar(f"{name}[{i}]", v, want, where) for i, v in enumerate(value)]
    return value


def _parse_flag_value(text, default, flag):
    """A flag's text as a value of the default's kind: a string setting takes the text as written (--name=3 is the
    name "3"); a list takes `[..]` (Python or YAML) or `a,b,c`; anything else '3' -> 3, '1e-4' -> 1e-4,
    'true' -> True, and what does not parse stays a string (for the type check to name)."""
    if isinstance(default, str):
        return text
    if isinstance(default, list):
        if text.lstrip().startswith("["):
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):  # a YAML flow list: [efficientnet_lite0, mit_b0]
                try:
                    return yaml.load(text, Loader=_StrictLoader)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{flag}: not a list ({str(e).splitlines()[0]})") from None
        if not text.strip():
            return []
        strings = bool(default) and isinstance(default[0], str)
        return [part.strip() if strings else _parse_flag_value(part.strip(), None, flag) for part in text.split(",")]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_settings(cls, argv=None, positional=None):
    """Build `cls` from its defaults, then the YAML files among the positional arguments (in order), then the flags
    (--key=value, --key value, --flag for a bool; in order), wherever they stand. With `positional` = the name of a
    list setting, positional arguments are appended to it instead of being read as YAML files.

    Returns the settings instance, checked by its `validate()` where the class has one. Raises ConfigError on
    unknown keys, wrong types, malformed flags or values out of range; --help prints help() and exits.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(cls, positional))
        sys.exit(0)
    from_files, from_flags, extra = [], [], []  # (key, value, where); positional values
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"flag {arg}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
            if not eq:  # --key value, or a bool's --key alone
                after = argv[i] if i < len(argv) else None
                if isinstance(getattr(settings, key), bool) and str(after).lower() not in ("true", "false"):
                    text = "true"  # --flag alone; what follows is not its value
                elif after is None or after.startswith("--"):
                    raise ConfigError(f"flag {arg} needs a value: {arg} VALUE or {arg}=VALUE")
                else:
                    text, i = after, i + 1
                arg = f"{arg} {text}"
            from_flags.append((key, _parse_flag_value(text, getattr(settings, key), f"flag {arg}"), f"flag {arg}"))
        elif positional:
            extra.append(arg)
        else:
            path = Path(arg)
            if not path.is_file():
                raise FileNotFoundError(f"settings file {path} does not exist")
            loaded = read_yaml(path) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings at the top level")
            from_files.extend((key, value, str(path)) for key, value in loaded.items())
    for key, value, where in from_files + from_flags:  # flags last: they win over any file
        if key not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        setattr(settings, key, _coerce(key, value, getattr(settings, key), where))
    if extra:
        setattr(settings, positional, getattr(settings, positional) + extra)
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def parse_command(commands, argv=None):
    """A command line whose first word picks the settings class: `indexes.py coco_boxes --json ...`.
    commands: {word: dataclass}. Returns (word, settings from parse_settings)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    words = " | ".join(commands)
    if argv and argv[0] in commands:
        return argv[0], parse_settings(commands[argv[0]], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(_script_doc(next(iter(commands.values()))) + f"\n\nCommands: {words}; `COMMAND --help` lists each "
              "one's settings.")
        sys.exit(0)
    raise ConfigError(f"give a command first: {words}" + (f" (got {argv[0]!r})" if argv else ""))


# ----------------------------------------------------------------------------------------------------------------
# --help: the meanings of the settings are the trailing comments of the dataclass's lines

def _class_comments(klass):
    """{field name: its comment} for the field lines of `klass`'s own source: the trailing `# comment` of the line,
    joined with the comment-only lines right below it that start in the same column (a comment continued)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # defined where no source is kept (an interactive session)
        return {}
    comments, depth, line, current, column = {}, 0, [], None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NL and line and all(t.type == tokenize.COMMENT for t in line):
            if current and line[0].start[1] == column:  # a comment-only line under the field's comment
                comments[current] += " " + line[0].string.lstrip("#").strip()
            else:
                current = None
            line = []
        elif tok.type == tokenize.NEWLINE:
            names = [t for t in line if t.type not in (tokenize.COMMENT, tokenize.NL)]
            comment = [t for t in line if t.type == tokenize.COMMENT]
            current = None
            if depth == 1 and len(names) > 1 and names[0].type == tokenize.NAME and names[1].string == ":":
                if comment:  # field: type = default  # comment
                    current, column = names[0].string, comment[-1].start[1]
                    comments[current] = comment[-1].string.lstrip("#").strip()
            line = []
        elif tok.type not in (tokenize.ENCODING, tokenize.ENDMARKER):
            line.append(tok)
    return comments


def field_meanings(cls):
    """{setting: one-line meaning} from field metadata "help", else the field line's comment (of `cls` or the
    dataclass it extends that declares the field)."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_class_comments(klass))
    return {f.name: f.metadata.get("help") or comments.get(f.name, "") for f in dataclasses.fields(cls)}


def _type_name(default):
    if isinstance(default, list):
        return f"list[{type(default[0]).__name__}]" if default else "list"
    return type(default).__name__


def _script_doc(cls):
    """The docstring of the module that defines `cls` (the script, also when run as __main__)."""
    module = sys.modules.get(cls.__module__)
    return ((module.__doc__ if module else None) or "").strip()


def help_text(cls, positional=None, width=118):
    """The script's docstring, then one row per setting: flag, type, default, meaning."""
    settings, meanings = cls(), field_meanings(cls)
    rows = [(f"--{f.name}", _type_name(getattr(settings, f.name)), repr(getattr(settings, f.name)), meanings[f.name])
            for f in dataclasses.fields(cls)]
    cols = [min(max(len(r[k]) for r in rows + [("flag", "type", "default", "")]), cap)
            for k, cap in enumerate((24, 12, 24))]
    indent = sum(cols) + 2 * 3 + 2
    lines = []
    for row in [("flag", "type", "default", "meaning")] + rows:
        cells = "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, cols)) + "  "
        wrapped = textwrap.wrap(row[3], max(width - indent, 30)) or [""]
        if len(cells) > indent:  # a long default: the meaning goes under its column
            lines.append(cells.rstrip())
            cells = " " * indent
        lines.append(cells + wrapped[0])
        lines.extend(" " * indent + more for more in wrapped[1:])
    own = cls.__dict__.get("__doc__") or ""
    own = "" if own.startswith(cls.__name__ + "(") else own.strip() + "\n\n"  # dataclass's generated signature
    files = f"positional arguments (added to --{positional})" if positional else "a YAML file (a positional argument)"
    return (f"{_script_doc(cls)}\n\n{own}Settings: the defaults below, overridden by {files}, then by --key=value or "
            "--key value flags\n(flags win wherever they stand; a bool also takes --key alone; a list takes [a, b] or "
            "a,b):\n\n" + "\n".join(lines).rstrip())


# ----------------------------------------------------------------------------------------------------------------
# validate() helpers

def require(settings, names, ok, want):
    """For validate(): raise ConfigError naming the setting and its value unless ok(value) holds for each of the
    space-separated `names`. E.g. require(s, "batch_size save_every", lambda v: v >= 1, "must be >= 1")."""
    for name in names.split():
        value = getattr(settings, name)
        if not ok(value):
            raise ConfigError(f"settings: {name}={value!r} {want}")


def required(settings, names):
    """For validate(): each of the space-separated settings must be given (not empty); the error names the flag
    and says what it is."""
    for name in names.split():
        if not getattr(settings, name):
            meaning = field_meanings(type(settings))[name]
            raise ConfigError(f"settings: --{name} is required" + (f" ({meaning})" if meaning else ""))


def one_of(settings, name, choices):
    """For validate(): the setting must be one of `choices`."""
    require(settings, name, lambda v: v in choices, f"must be one of {tuple(choices)}")


def print_settings(settings):
    """One line per setting, so a log shows exactly what ran."""
    for key, value in dataclasses.asdict(settings).items():
        print(f"  {key} = {value!r}")
