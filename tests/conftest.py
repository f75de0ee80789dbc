"""Shared test fixtures. Tests that read ../shared (real data, key listings) get it from `shared_dir`."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the product is a flat set of scripts, not an installed package


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder (real data, checkpoint key listings); SSIW_SHARED overrides the path."""
    path = Path(os.environ.get("SSIW_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set SSIW_SHARED to its path)")
    return path
