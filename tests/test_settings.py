"""settings.py: defaults <- YAML <- flags, type-checked, unknown keys rejected."""
from dataclasses import dataclass, field

import pytest

from errors import ConfigError
from settings import parse_settings, read_yaml, require


@dataclass
class Demo:
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    amp: bool = False
    scales: list = field(default_factory=lambda: [1.0])


def test_yaml_then_flags_override_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2\nsteps: 5\nname: yaml\n")
    s = parse_settings(Demo, [str(path), "--steps=7", "--amp=true", "--scales=[0.5, 1.0]"])
    assert s == Demo(lr=2.0, steps=7, name="yaml", amp=True, scales=[0.5, 1.0])
    assert isinstance(s.lr, float)
    assert parse_settings(Demo, ["--name=3"]).name == "3"  # a string setting keeps the flag's text  # an int in YAML is accepted for a float default, and becomes a float


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'stepz'"):
        parse_settings(Demo, [str(path)])
    with pytest.raises(ConfigError, match="'lrr'"):
        parse_settings(Demo, ["--lrr=1"])


@pytest.mark.parametrize("flag", ["--steps=1.5", "--amp=1", "--lr=fast", "--scales=0.5", "--lr=1e309", "--lr=nan"])
def test_wrong_types_and_non_finite_floats_raise(flag):
    with pytest.raises(ConfigError, match=flag.split("=")[0][2:]):
        parse_settings(Demo, [flag])


def test_key_space_value_and_a_bare_bool_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2\nname: yaml\n")
    argv = ["--steps", "7", str(path), "--amp", "--name", "3", "--scales", "[0.5, 1.0]", "--lr", "-1"]
    assert parse_settings(Demo, argv) == Demo(lr=-1.0, steps=7, name="3", amp=True, scales=[0.5, 1.0])
    assert parse_settings(Demo, argv) == parse_settings(Demo, ["--steps=7", str(path), "--amp=true", "--name=3",
                                                               "--scales=[0.5, 1.0]", "--lr=-1"])
    assert parse_settings(Demo, ["--amp", "false"]).amp is False and parse_settings(Demo, ["--amp"]).amp is True
    assert parse_settings(Demo, ["--amp", str(path)]) == Demo(lr=2.0, name="yaml", amp=True)  # a file, not its value


def test_flag_without_value_and_missing_file_raise(tmp_path):
    for argv in (["--steps"], ["--name", "--steps=3"]):  # an argument starting with -- is a flag, never a value
        with pytest.raises(ConfigError, match=f"{argv[0]} needs a value: {argv[0]} VALUE or {argv[0]}=VALUE"):
            parse_settings(Demo, argv)
    with pytest.raises(ConfigError, match="'stepz'"):
        parse_settings(Demo, ["--stepz", "3"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_settings(Demo, [str(tmp_path / "nope.yaml")])


def test_help_prints_the_settings_dataclass_and_exits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(Demo, ["--help"])
    assert exit_info.value.code == 0
    assert "scales: list = field(default_factory=lambda: [1.0])" in capsys.readouterr().out


def test_one_strict_yaml_reader_names_file_line_and_duplicate_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nsteps: 2\nlr: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:1: duplicate key 'lr'"):
        parse_settings(Demo, [str(path)])
    path.write_text("lr: 1\nscales: [1, 2\nname: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:5: expected ',' or ']'") as err:
        read_yaml(path)
    assert "<unicode string>" not in str(err.value) and "\n" not in str(err.value)


@dataclass
class Checked(Demo):
    def validate(self):
        require(self, "steps", lambda v: v >= 1, "must be >= 1")


def test_validate_runs_after_parsing_and_names_setting_and_value():
    assert parse_settings(Checked, ["--steps=3"]).steps == 3
    with pytest.raises(ConfigError, match=r"settings: steps=0 must be >= 1"):
        parse_settings(Checked, ["--steps=0"])
