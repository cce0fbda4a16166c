"""Shared fixtures: the real datasets and vocabularies from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def require_shared(relative: str) -> Path:
    """Path to a file in ../shared; skip when absent locally, fail when CI=true."""
    path = SHARED_DIR / relative
    if not path.exists():
        message = f"{relative} not found beside the checkout (expected {path})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require_shared("data/MANIFEST.md")
    return SHARED_DIR
