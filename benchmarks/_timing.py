"""Helpers shared by the benchmark scripts: interleaved timing and the common model arguments.

The scripts are run as ``python benchmarks/<name>.py`` and import this module as a sibling
(``from _timing import ...``, with ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

#: the project's shared data folder (models, token arrays) beside the checkout, unless ``$APIQ_SHARED``
DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


def interleaved_medians(runs: Mapping[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternating: round after round, each run once in order.

    Interleaving spreads slow drifts of the machine (other load, thermal state) over all the
    candidates instead of charging them to whichever ran last. Warm the runs up (compile) first:
    every call here is timed.

    Args:
      runs: name -> a callable that does (and waits for) one measured run.
      reps: rounds (each run is timed ``reps`` times); at least 1.

    Returns:
      name -> median wall-clock seconds (``time.perf_counter``) of its ``reps`` runs, in the order of ``runs``.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def add_model_arguments(parser: argparse.ArgumentParser, *, reps: int, reps_help: str,
                        stories_help: str = "stories260K HF directory (rows skipped when absent)",
                        vocab_help: str = "vocab of the 4x512 model") -> None:
    """Add ``--stories``, ``--batch``, ``--seqlen``, ``--reps`` and ``--vocab`` (the speed benchmarks' shared ones).

    Defaults: ``--stories`` ``$APIQ_SHARED/models/stories260K`` (:data:`DEFAULT_SHARED` when the
    variable is unset), ``--batch`` 8, ``--seqlen`` 256, ``--vocab`` 32000.

    Args:
      parser: the script's parser.
      reps: default of ``--reps``.
      reps_help: help of ``--reps`` (how the repetitions are reduced).
      stories_help: help of ``--stories``.
      vocab_help: help of ``--vocab``.

    Returns:
      None.
    """
    shared = Path(os.environ.get("APIQ_SHARED", DEFAULT_SHARED))
    parser.add_argument("--stories", type=Path, default=shared / "models" / "stories260K", help=stories_help)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--reps", type=int, default=reps, help=reps_help)
    parser.add_argument("--vocab", type=int, default=32000, help=vocab_help)
