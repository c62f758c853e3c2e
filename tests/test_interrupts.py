"""Ctrl-C remembered even when its exception is swallowed (apiq_jax/interrupts.py), and
what run_command makes of it."""

from __future__ import annotations

import argparse
import gc
import signal

import pytest

from apiq_jax import interrupts
from apiq_jax.commands.common import INTERRUPTED_EXIT, run_command

# the swallowed KeyboardInterrupt is reported by Python as unraisable: that is the case tested
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _PressesCtrlCWhenCollected:
    """Sends SIGINT from ``__del__``: Python prints "Exception ignored" and swallows the
    KeyboardInterrupt, as it does when the signal lands in JAX's gc callback."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def _swallowed_ctrl_c() -> None:
    obj = _PressesCtrlCWhenCollected()
    del obj
    gc.collect()


def test_a_swallowed_ctrl_c_is_remembered_and_raised_at_the_next_check():
    with interrupts.catch_sigint():
        _swallowed_ctrl_c()  # returns normally: the exception did not get out of __del__
        assert interrupts.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert not interrupts.requested()  # cleared on exit
    interrupts.check()


def test_catch_sigint_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.catch_sigint():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


def _args(func) -> argparse.Namespace:
    return argparse.Namespace(command="quantize", func=func, resume_hint=lambda: "block 2/4")


def test_run_command_reports_a_raised_ctrl_c(capsys):
    def func(args):
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("not reached: the handler raises")

    assert run_command(_args(func)) == INTERRUPTED_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["apiq-jax quantize: interrupted; re-running the same command resumes from block 2/4"]


def test_run_command_stops_at_the_next_check_after_a_swallowed_ctrl_c(capsys):
    done = []

    def func(args):
        for unit in range(3):
            interrupts.check()
            done.append(unit)
            if unit == 0:
                _swallowed_ctrl_c()
        return 0

    assert run_command(_args(func)) == INTERRUPTED_EXIT
    assert done == [0]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("apiq-jax quantize: interrupted; re-running")


def test_run_command_says_so_when_the_ctrl_c_came_during_the_last_unit(capsys):
    def func(args):
        _swallowed_ctrl_c()
        return 0

    assert run_command(_args(func)) == INTERRUPTED_EXIT
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "apiq-jax quantize: interrupted after the run had finished (exit code 0); its output is complete"


def test_a_swallowed_ctrl_c_prints_no_traceback(tmp_path):
    """Python reports the swallowed KeyboardInterrupt as "Exception ignored ... Traceback" on
    stderr; under catch_sigint it is remembered instead (the CI failure of a real Ctrl-C)."""
    import subprocess
    import sys

    script = (
        "import gc, signal\n"
        "from apiq_jax import interrupts\n"
        "class P:\n"
        "    def __del__(self):\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "with interrupts.catch_sigint():\n"
        "    p = P(); del p; gc.collect()\n"
        "    print('requested', interrupts.requested())\n"
        "import sys; sys.stderr.write('--- outside\\n'); sys.stderr.flush()\n"
        "p = P(); del p; gc.collect()\n"  # outside: Python's own report again
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "requested True"
    before, _, after = out.stderr.partition("--- outside")
    assert "Traceback" not in before and "KeyboardInterrupt" not in before  # nothing while caught
    assert "KeyboardInterrupt" in after  # the previous hook is back after the block
