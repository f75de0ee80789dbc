"""Shared test fixtures. Tests that read ../shared (real data, key listings) get it from `shared_dir`."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (real data, checkpoint key listings); SSIW_SHARED overrides the path."""
    path = Path(os.environ.get("SSIW_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set SSIW_SHARED to its path)")
    return path


@pytest.fixture(scope="session", autouse=True)
def text_cache_in_tmp(tmp_path_factory):
    """Label texts embedded during tests are cached under the session's temporary folder (text_cache.py), never in the
    user's ~/.cache/ssiw; the processes tests start inherit the setting. Session-scoped, so that it is set before the
    module- and session-scoped fixtures that embed texts too (test_nine_sources' miniature)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSIW_CACHE", str(tmp_path_factory.getbasetemp() / "ssiw_cache"))
        yield
