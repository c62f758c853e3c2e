"""Text for the offline demo: the Python standard library's own source files.

Every Python install carries its standard library as ``.py`` files, so the demo model
(``apiq_jax/assets/demo_model``) was trained on them and the demo calibrates and
evaluates on a few modules that were held out of training. Nothing has to be
downloaded.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Held out of training. All exist in every CPython from 3.8 on.
CALIB_MODULES: tuple[str, ...] = ("difflib.py", "textwrap.py", "shlex.py", "fractions.py")
EVAL_MODULES: tuple[str, ...] = ("argparse.py", "calendar.py", "heapq.py")
HELDOUT_MODULES: tuple[str, ...] = CALIB_MODULES + EVAL_MODULES

#: the bundled demo model (HF format, with its tokenizer); see its README.md
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library sources.

    Returns:
        ``sysconfig.get_paths()["stdlib"]`` as a Path.
    """
    return Path(sysconfig.get_paths()["stdlib"])


def training_modules(root: Path | None = None) -> list[str]:
    """Sorted names of the top-level stdlib ``*.py`` files used for training (held-out ones excluded).

    Args:
        root: the standard library directory (default: :func:`stdlib_dir`).

    Returns:
        File names such as ``"abc.py"``, without :data:`HELDOUT_MODULES`.

    Raises:
        FileNotFoundError: ``root`` holds no ``*.py`` files.
    """
    root = stdlib_dir() if root is None else root
    names = sorted(p.name for p in root.glob("*.py") if p.is_file())
    if not names:
        raise FileNotFoundError(
            f"no *.py files in the standard library directory {root}; this Python install "
            "ships without its library sources"
        )
    held = set(HELDOUT_MODULES)
    return [n for n in names if n not in held]


def read_modules(names: tuple[str, ...] | list[str], root: Path | None = None) -> list[str]:
    """The source text of each stdlib module in ``names`` (UTF-8, undecodable bytes replaced).

    Args:
        names: file names under ``root`` (e.g. :data:`CALIB_MODULES`).
        root: the standard library directory (default: :func:`stdlib_dir`).

    Returns:
        One text per name, in order.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    root = stdlib_dir() if root is None else root
    texts = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"standard library file {path} not found; the demo needs the sources of "
                f"{list(names)} from the running Python install"
            )
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def demo_text(kind: str, root: Path | None = None) -> str:
    """The held-out text of ``kind``: its modules joined by blank lines.

    Args:
        kind: ``"calib"`` (:data:`CALIB_MODULES`) or ``"eval"`` (:data:`EVAL_MODULES`).
        root: the standard library directory (default: :func:`stdlib_dir`).

    Returns:
        The text.

    Raises:
        ValueError: another ``kind``.
    """
    if kind not in ("calib", "eval"):
        raise ValueError(f"kind={kind!r} is not supported; accepted: 'calib', 'eval'")
    names = CALIB_MODULES if kind == "calib" else EVAL_MODULES
    return "\n\n".join(read_modules(names, root))
