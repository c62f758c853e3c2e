"""Compile a C++ XLA FFI source of this package into a shared library on first use, and cache it.

The CPU kernels of :mod:`apiq_jax.cpu_kernels` are C++ sources shipped with the package. The
first call of :func:`load_library` compiles one with the machine's C++ compiler (``$CXX``, else
``g++``/``c++``), for this CPU (``-march=native``), against the XLA FFI headers of the installed
jaxlib, and keeps the library in a cache folder keyed by a hash of the source, the flags, the
compiler, jaxlib's version and the CPU's feature flags (a changed source or another machine
sharing the folder gets its own build). Concurrent first uses are safe: each process compiles
to a private file and renames it into place.

The folder is ``$APIQ_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/apiq_jax``, else
``~/.cache/apiq_jax``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

#: compiler flags (besides the include folder)
CXX_FLAGS = ("-O3", "-march=native", "-pthread", "-fPIC", "-shared", "-std=c++17", "-w")
#: seconds a compilation may take
COMPILE_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The kernel library could not be built or loaded (no compiler, a compile error)."""


def cache_dir() -> Path:
    """The folder that holds compiled kernel libraries.

    Returns:
      ``$APIQ_JAX_CACHE``, else ``$XDG_CACHE_HOME/apiq_jax``, else ``~/.cache/apiq_jax``.
    """
    if os.environ.get("APIQ_JAX_CACHE"):
        return Path(os.environ["APIQ_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apiq_jax"


def compiler() -> str:
    """The C++ compiler to use.

    Returns:
      ``$CXX``, else the first of ``g++``, ``c++`` on the PATH.

    Raises:
      BuildError: none is found.
    """
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX, or install g++)")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` code must not move to another CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(keep)))


def _library_name(source: Path, cxx: str) -> str:
    import jaxlib

    h = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(CXX_FLAGS).encode(), cxx.encode(), jaxlib.__version__.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return f"{source.stem}-{h.hexdigest()[:16]}.so"


def build(source: Path) -> Path:
    """Compile ``source`` into the cache folder unless an up-to-date build is there.

    Args:
      source: a C++ file of this package.

    Returns:
      The shared library's path.

    Raises:
      BuildError: no compiler, a compile error (its first lines in the message), or an unwritable cache folder.
    """
    import jax.ffi

    cxx = compiler()
    folder = cache_dir()
    target = folder / _library_name(source, cxx)
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write the kernel cache folder {folder}: {e}") from None
    cmd = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError(f"compiling {source.name} failed: {e}") from None
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        first = " | ".join(proc.stderr.strip().splitlines()[:3])
        raise BuildError(f"compiling {source.name} with {cxx} failed (exit {proc.returncode}): {first}")
    os.replace(tmp, target)
    return target


@functools.cache
def load_library(source_name: str) -> ctypes.CDLL:
    """Build (once per machine and source) and load a kernel library of this package.

    Args:
      source_name: the C++ file's name in this folder, e.g. ``"attention.cc"``.

    Returns:
      The loaded library (its FFI handler symbols are attributes).

    Raises:
      BuildError: as :func:`build`, or the library does not load.
    """
    path = build(Path(__file__).with_name(source_name))
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"loading {path.name} failed: {e}") from None
