"""Shared test fixtures.

Tests that need the project's shared data (golden vectors from the reference PyTorch
implementations, the stories260K checkpoint and its token arrays) find it at
``$APIQ_SHARED`` or, by default, the ``shared`` folder beside the repository checkout.
Where the whole folder is absent (a user's machine) those tests skip with the reason;
a folder that exists but lacks a file fails loudly, and CI sets ``APIQ_REQUIRE_SHARED=1``
so a missing folder is a failure there, never a skip. The same variable turns a missing
reference package (torch, transformers: the independent references of the parity tests)
from a skip into a failure (:func:`require_module`), and a run that skipped reference
tests ends with one line saying how many and why.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import jax
import pytest

jax.config.update("jax_enable_x64", False)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("APIQ_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


SHARED_MISSING = "shared test data not found"
MODULE_MISSING = "reference package not installed"


def _required() -> bool:
    return os.environ.get("APIQ_REQUIRE_SHARED") == "1"


def require_module(name: str) -> ModuleType:
    """Import a reference package (e.g. torch) or skip; under ``APIQ_REQUIRE_SHARED=1`` fail instead."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = f"{MODULE_MISSING}: {name} ({e}); `make test` installs it"
        if _required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg, allow_module_level=True)


def require_shared(*parts: str) -> Path:
    """Return a path under the shared folder, or skip (fail under CI) when it is missing."""
    root = _shared_root()
    path = root.joinpath(*parts)
    if not path.exists():
        msg = (
            f"{SHARED_MISSING}: {path} (set APIQ_SHARED to the folder holding "
            "golden/, models/ and data/)"
        )
        # A shared folder that exists but lacks a file is a broken setup: fail loudly.
        # Only a machine with no shared folder at all (a user's checkout) skips.
        if root.exists() or _required():
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared():
    """Fixture form of :func:`require_shared`."""
    return require_shared


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest hook signature
    """One loud line when reference tests were skipped (no shared data, no torch)."""
    counts = {SHARED_MISSING: 0, MODULE_MISSING: 0}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for key in counts:
            if key in reason:
                counts[key] += 1
    if any(counts.values()):
        terminalreporter.write_line(
            f"REFERENCE TESTS SKIPPED: {counts[SHARED_MISSING]} without the shared data (golden files, "
            f"stories260K; set APIQ_SHARED), {counts[MODULE_MISSING]} without a reference package (torch); "
            "their numbers were not checked",
            red=True, bold=True,
        )
