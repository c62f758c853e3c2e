"""benchmarks/_timing.py: the interleaved timing helper (order, medians) and the shared model arguments."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_timing = _load("_timing")


def _fake_clock(monkeypatch: pytest.MonkeyPatch, durations: dict[str, list[float]]):
    """Fake runs that advance a fake ``perf_counter`` by their next duration, and the log of their calls."""
    now = [0.0]
    calls: list[str] = []
    monkeypatch.setattr(_timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def make(name: str):
        def run() -> None:
            now[0] += durations[name][sum(c == name for c in calls)]
            calls.append(name)
        return run

    return {name: make(name) for name in durations}, calls


def test_interleaved_medians_alternates_the_runs_and_returns_their_medians(monkeypatch):
    # medians 3, 20, 7: neither the first, the last, the mean nor the minimum of any run
    durations = {"a": [5.0, 1.0, 3.0, 9.0, 2.0], "b": [10.0, 30.0, 20.0, 40.0, 15.0], "c": [7.0, 7.5, 1.0, 6.0, 8.0]}
    runs, calls = _fake_clock(monkeypatch, durations)
    med = _timing.interleaved_medians(runs, reps=5)
    assert calls == ["a", "b", "c"] * 5  # round after round, each run once in the given order
    assert med == {"a": 3.0, "b": 20.0, "c": 7.0}
    assert list(med) == ["a", "b", "c"]


def test_interleaved_medians_of_an_even_count_average_the_middle_two(monkeypatch):
    runs, calls = _fake_clock(monkeypatch, {"x": [4.0, 1.0, 2.0, 8.0], "y": [1.0, 1.0, 1.0, 1.0]})
    assert _timing.interleaved_medians(runs, reps=4) == {"x": 3.0, "y": 1.0}
    assert calls == ["x", "y"] * 4


def _parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("reps", [5, 3])  # finetune_speed.py's and forward.py's defaults before the helper
def test_add_model_arguments_defaults(monkeypatch, tmp_path, reps):
    monkeypatch.delenv("APIQ_SHARED", raising=False)
    args = _parse(lambda p: _timing.add_model_arguments(p, reps=reps, reps_help="r"), [])
    assert vars(args) == {"stories": REPO_ROOT.parent / "shared" / "models" / "stories260K", "batch": 8,
                          "seqlen": 256, "reps": reps, "vocab": 32000}
    monkeypatch.setenv("APIQ_SHARED", str(tmp_path))
    args = _parse(lambda p: _timing.add_model_arguments(p, reps=reps, reps_help="r"),
                  ["--batch", "2", "--seqlen", "16", "--reps", "1", "--vocab", "64"])
    assert vars(args) == {"stories": tmp_path / "models" / "stories260K", "batch": 2, "seqlen": 16, "reps": 1,
                          "vocab": 64}
    assert isinstance(args.stories, Path)


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script, extra", [
    ("finetune_speed", {"reps": 5, "calib_samples": 32, "calib_epochs": 2, "skip_calibration": False}),
    ("forward", {"reps": 3}),
])
def test_the_scripts_keep_their_defaults(monkeypatch, script, extra):
    """The scripts' parsed defaults, stopped right after parsing (nothing is benchmarked)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put benchmarks/ on it
    monkeypatch.delenv("APIQ_SHARED", raising=False)
    module = _load(script)
    parse = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed) as parsed:
        module.main([])
    assert vars(parsed.value.args[0]) == {"stories": REPO_ROOT.parent / "shared" / "models" / "stories260K",
                                          "batch": 8, "seqlen": 256, "vocab": 32000, **extra}
