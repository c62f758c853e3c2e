"""Matplotlib set up in one place for writing figures to files.

Every plot the library writes (loss curves, calibration reports, comparison
charts) goes through this module: :func:`pyplot` selects the non-interactive
``Agg`` backend once and returns ``matplotlib.pyplot``; :func:`save_figure`
writes a figure (creating parent directories) and closes it.

Example:
    >>> import tempfile, pathlib
    >>> from apiq_jax.plotting import pyplot, save_figure
    >>> plt = pyplot()
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([0, 1], [1, 0])
    >>> out = save_figure(fig, pathlib.Path(tempfile.mkdtemp()) / "sub" / "plot.png")
    >>> out.suffix, out.is_file()
    ('.png', True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure"]

_configured = False


def pyplot() -> Any:
    """Return ``matplotlib.pyplot`` configured to render into files.

    The ``Agg`` backend is selected the first time this is called (so no
    display is needed and no window opens); later calls return the same module.

    Returns:
        The ``matplotlib.pyplot`` module.

    Raises:
        ImportError: matplotlib is not installed.
    """
    global _configured
    import matplotlib

    if not _configured:
        matplotlib.use("Agg")
        _configured = True
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` and close it.

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: output file; its suffix picks the format (``.png``, ``.pdf``, ...).
            Missing parent directories are created.
        dpi: resolution in dots per inch (default 100).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        OSError: the file cannot be written (the figure is closed all the same).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path
