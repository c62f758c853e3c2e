"""Every public function and method of the library documents its arguments and its result.

Google style: an ``Args:`` section when the function takes parameters, and ``Returns:`` (or
``Yields:``). Properties are exempt (their one-line docstring is their return value).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("apiq_jax", "pallas_kernels") for p in (ROOT / d).rglob("*.py"))


def _public_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    out = []
    for node in tree.body:
        members = [node]
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members += list(node.body)
        for fn in members:
            if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                continue
            if any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
                continue
            out.append(fn)
    return out


def undocumented(source: str) -> list[str]:
    """Names of the public functions of ``source`` whose docstring lacks Args/Returns."""
    bad = []
    for fn in _public_functions(ast.parse(source)):
        doc = ast.get_docstring(fn) or ""
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
        if (params and "Args:" not in doc) or not ("Returns:" in doc or "Yields:" in doc):
            bad.append(f"{fn.name} (line {fn.lineno})")
    return bad


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_public_functions_have_args_and_returns(path):
    assert not undocumented(path.read_text()), f"{path.relative_to(ROOT)}: {undocumented(path.read_text())}"


def test_the_check_can_fail():
    src = '''
def good(x):
    """Doc.

    Args:
      x: a thing.

    Returns:
      Another.
    """


def bad(x):
    """No sections."""


def _private(x):
    pass
'''
    assert undocumented(src) == ["bad (line 13)"]
