"""Shared fixtures: the real recordings in ../shared/realdata and small temporary data folders."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The folder of real recordings; a missing folder fails loudly instead of skipping tests."""
    if not (REALDATA / "README.md").is_file():
        pytest.fail(f"real recordings not found at {REALDATA}: these tests need ../shared/realdata "
                    "beside the project (it is there in CI and in the developers' checkout)")
    return REALDATA
