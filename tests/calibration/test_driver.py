"""The block loop (apiq_jax/calibration/driver.py): one block at a time from any block source,
skipping finished blocks, saving and reporting in order."""

from __future__ import annotations

import pytest

from apiq_jax.calibration.driver import BlockOutput, frozen_model, run_blocks
from apiq_jax.calibration.reports import BlockReport


class LazySource:
    """A block source that loads layer i when asked (records the order)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.loaded.append(i)
        return {"w": i}


def _step(i, layer, streams, bar):
    assert layer == {"w": i}
    return BlockOutput(frozen={"w": -i}, report=BlockReport(i, error_before=1.0, error_after=0.5),
                       streams=streams + [i], state={"i": i})


def test_blocks_run_in_order_one_at_a_time():
    source = LazySource(4)
    events = []
    outputs = run_blocks(_step, source, [], desc="t", save=lambda i, o: events.append(("save", i, o.streams)),
                         on_block_end=lambda i, r: events.append(("end", i, r.index)))
    assert source.loaded == [0, 1, 2, 3]
    assert [o.frozen for o in outputs] == [{"w": 0}, {"w": -1}, {"w": -2}, {"w": -3}]
    assert all(o.streams is None for o in outputs)  # only the next block gets the streams
    assert events[:4] == [("save", 0, [0]), ("end", 0, 0), ("save", 1, [0, 1]), ("end", 1, 1)]
    assert all(o.report.seconds >= 0 for o in outputs)
    assert frozen_model({"layers": [], "norm": 1}, outputs) == {"layers": [o.frozen for o in outputs], "norm": 1}


def test_keep_slims_what_stays_in_memory_after_the_save():
    saved = []
    outputs = run_blocks(_step, LazySource(3), [], desc="t", save=lambda i, o: saved.append(o.state),
                         keep=lambda o: BlockOutput(frozen=o.frozen, report=o.report))
    assert saved == [{"i": 0}, {"i": 1}, {"i": 2}]  # the save saw everything
    assert [o.state for o in outputs] == [None, None, None] and [o.frozen for o in outputs][2] == {"w": -2}


def test_finished_blocks_are_skipped():
    source = LazySource(3)
    done = [BlockOutput(frozen={"w": 0}, report=BlockReport(0))]
    outputs = run_blocks(_step, source, [0], desc="t", done=done)
    assert source.loaded == [1, 2] and outputs[0] is done[0] and len(outputs) == 3


def test_an_error_stops_the_loop_and_closes_the_bars(capsys):
    def failing(i, layer, streams, bar):
        raise RuntimeError(f"block {i}")

    with pytest.raises(RuntimeError, match="block 0"):
        run_blocks(failing, LazySource(2), None, desc="t", progress=True)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_swallowed_ctrl_c_stops_before_the_next_block_with_the_last_one_saved():
    from apiq_jax import interrupts
    from tests.test_interrupts import _swallowed_ctrl_c

    saved = []

    def step(i, layer, streams, bar):
        if i == 1:
            _swallowed_ctrl_c()  # pressed while block 1 computes; the exception is lost
        return _step(i, layer, streams, bar)

    with interrupts.catch_sigint(), pytest.raises(KeyboardInterrupt):
        run_blocks(step, LazySource(4), [], desc="t", save=lambda i, o: saved.append(i))
    assert saved == [0, 1]
