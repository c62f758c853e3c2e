"""Building and caching the C++ kernel libraries."""

from __future__ import annotations

import shutil

import pytest

from apiq_jax.cpu_kernels import build

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")

SOURCE = """#include "xla/ffi/api/ffi.h"
extern "C" int apiq_answer() { return %d; }
"""


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("APIQ_JAX_CACHE", str(tmp_path / "c"))
    assert build.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("APIQ_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert build.cache_dir() == tmp_path / "x" / "apiq_jax"


@needs_compiler
def test_build_compiles_once_and_rebuilds_a_changed_source(monkeypatch, tmp_path):
    import ctypes

    monkeypatch.setenv("APIQ_JAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "answer.cc"
    src.write_text(SOURCE % 42)
    first = build.build(src)
    assert ctypes.CDLL(str(first)).apiq_answer() == 42
    stamp = first.stat().st_mtime_ns
    assert build.build(src) == first and first.stat().st_mtime_ns == stamp  # cached, not recompiled
    src.write_text(SOURCE % 7)
    second = build.build(src)
    assert second != first and ctypes.CDLL(str(second)).apiq_answer() == 7
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])  # no temp files


@needs_compiler
def test_compile_error_is_a_build_error_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("APIQ_JAX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "broken.cc"
    src.write_text("this is not C++;\n")
    with pytest.raises(build.BuildError, match=r"^compiling broken\.cc with .* failed \(exit 1\): .*broken\.cc"):
        build.build(src)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_compiler_is_a_build_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(build.BuildError, match=r"^no C\+\+ compiler found \(set CXX, or install g\+\+\)$"):
        build.compiler()
