"""apiq_jax/plotting.py: the Agg backend set up once; figures written and closed."""

from __future__ import annotations

import doctest

import apiq_jax.plotting as plotting
from apiq_jax.plotting import pyplot, save_figure


def test_pyplot_uses_agg():
    import matplotlib

    plt = pyplot()
    assert plt is pyplot()
    assert matplotlib.get_backend().lower() == "agg"


def test_save_figure_writes_png_creates_dirs_and_closes(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [2, 1, 3])
    before = set(plt.get_fignums())
    assert fig.number in before
    path = save_figure(fig, tmp_path / "a" / "b" / "plot.png", dpi=50)
    assert path == tmp_path / "a" / "b" / "plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()  # closed


def test_save_figure_accepts_str_paths_and_other_formats(tmp_path):
    fig, _ = pyplot().subplots()
    path = save_figure(fig, str(tmp_path / "plot.pdf"))
    assert path.suffix == ".pdf" and path.read_bytes()[:4] == b"%PDF"


def test_save_figure_closes_even_when_writing_fails(tmp_path):
    plt = pyplot()
    fig, _ = plt.subplots()
    (tmp_path / "f").write_text("a file where a directory is needed")
    try:
        save_figure(fig, tmp_path / "f" / "plot.png")
    except OSError:
        pass
    assert fig.number not in plt.get_fignums()


def test_docstring_example_runs():
    result = doctest.testmod(plotting, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
