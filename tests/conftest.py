"""Shared test fixtures.

Tests that need the project's shared data (golden vectors from the reference PyTorch
implementations, the stories260K checkpoint and its token arrays) find it at
``$APIQ_SHARED`` or, by default, the ``shared`` folder beside the repository checkout.
Where the whole folder is absent (a user's machine) those tests skip with the reason;
a folder that exists but lacks a file fails loudly, and CI sets ``APIQ_REQUIRE_SHARED=1``
so a missing folder is a failure there, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", False)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("APIQ_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def require_shared(*parts: str) -> Path:
    """Return a path under the shared folder, or skip (fail under CI) when it is missing."""
    root = _shared_root()
    path = root.joinpath(*parts)
    if not path.exists():
        msg = (
            f"shared test data not found: {path} (set APIQ_SHARED to the folder holding "
            "golden/, models/ and data/)"
        )
        # A shared folder that exists but lacks a file is a broken setup: fail loudly.
        # Only a machine with no shared folder at all (a user's checkout) skips.
        if root.exists() or os.environ.get("APIQ_REQUIRE_SHARED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared():
    """Fixture form of :func:`require_shared`."""
    return require_shared
