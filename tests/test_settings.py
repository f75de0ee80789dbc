"""settings.py: defaults <- YAML <- flags, type-checked, unknown keys rejected; --help's table."""
from dataclasses import dataclass, field

import pytest

from errors import ConfigError
from settings import help_text, parse_command, parse_settings, read_yaml, require, required


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


@pytest.mark.parametrize("flag", ["--steps=1.5", "--amp=1", "--lr=fast", "--scales=0.5,fast", "--scales=[true]",
                                  "--lr=1e309", "--lr=nan", "--lr=4e38", "--scales=1,-1e39"])
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


def test_flags_win_over_the_yaml_wherever_they_stand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlr: 2\n")
    for argv in (["--steps=7", str(path)], [str(path), "--steps=7"], ["--steps", "7", str(path)]):
        assert parse_settings(Demo, argv) == Demo(lr=2.0, steps=7)


def test_lists_take_the_comma_form_and_their_elements_are_type_checked(tmp_path):
    assert parse_settings(Demo, ["--scales", "0.5,1"]).scales == [0.5, 1.0]
    assert all(type(x) is float for x in parse_settings(Demo, ["--scales=0.5, 1"]).scales)  # ints become floats
    assert parse_settings(Demo, ["--scales=0.75"]).scales == [0.75]
    assert parse_settings(Demo, ["--scales="]).scales == []

    @dataclass
    class Names:
        backbones: list = field(default_factory=lambda: ["mit_b0"])
        anything: list = field(default_factory=list)  # empty default: elements unchecked
    assert parse_settings(Names, ["--backbones", "efficientnet_lite0,mit_b0"]).backbones == ["efficientnet_lite0",
                                                                                              "mit_b0"]
    assert parse_settings(Names, ["--backbones=[efficientnet_lite0]"]).backbones == ["efficientnet_lite0"]  # YAML
    assert parse_settings(Names, ["--anything=1,a"]).anything == [1, "a"]
    with pytest.raises(ConfigError, match=r"flag --backbones=\[1, 2\]: backbones\[0\] must be str, got int 1"):
        parse_settings(Names, ["--backbones=[1, 2]"])
    path = tmp_path / "c.yaml"
    path.write_text("scales: [1, x]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: scales\[1\] must be float, got str 'x'"):
        parse_settings(Demo, [str(path)])


def test_floats_beyond_float32_are_refused_by_name():
    assert parse_settings(Demo, ["--lr=3.4e38"]).lr == 3.4e38  # the largest float32 is 3.4028e38
    with pytest.raises(ConfigError, match=r"flag --lr=3\.5e38: lr=3\.5e\+38 is beyond float32's range"):
        parse_settings(Demo, ["--lr=3.5e38"])


@dataclass
class Documented:
    """Settings of a tool."""
    size: int = 64                 # image side, pixels
    mode: str = "fast"             # fast | exact: exact runs every step
                                   # twice (a continued comment)
    # a section comment, not a field's
    names: list = field(default_factory=lambda: ["a"], metadata={"help": "from the field's metadata"})
    bare: bool = False


def test_help_prints_the_docstring_and_a_table_of_flag_type_default_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(Documented, ["--size=3", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(__doc__) and "Settings of a tool." in out
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in out.splitlines() if line.startswith("  --")}
    assert rows == {"--size": ["int", "64", "image side, pixels"],
                    "--mode": ["str", "'fast'", "fast | exact: exact runs every step twice (a continued comment)"],
                    "--names": ["list[str]", "['a']", "from the field's metadata"], "--bare": ["bool", "False"]}
    assert "@dataclass" not in out and "section comment" not in out
    assert "scales: list" not in help_text(Demo) and "  --scales  list[float]  [1.0]" in help_text(Demo)


def test_required_names_the_flag_and_what_it_is():
    @dataclass
    class Needs(Documented):
        out: str = ""              # the file to write

        def validate(self):
            required(self, "out")
    assert parse_settings(Needs, ["--out=x"]).out == "x"
    with pytest.raises(ConfigError, match=r"^settings: --out is required \(the file to write\)$"):
        parse_settings(Needs, [])


def test_a_command_word_picks_the_settings_and_positional_arguments_fill_a_list(tmp_path):
    commands = {"demo": Demo, "documented": Documented}
    assert parse_command(commands, ["documented", "--size=3"]) == ("documented", Documented(size=3))
    for argv, got in (([], ""), (["--size=3"], r" \(got '--size=3'\)")):
        with pytest.raises(ConfigError, match=rf"^give a command first: demo \| documented{got}$"):
            parse_command(commands, argv)

    @dataclass
    class Files:
        logs: list = field(default_factory=list)
        out: str = ""
    assert parse_settings(Files, ["a.jsonl", "--out=p.png", "b.jsonl"], positional="logs") == Files(
        ["a.jsonl", "b.jsonl"], "p.png")


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
