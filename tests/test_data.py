"""apiq_jax/data.py: file reading, id checks and windows, against numpy-built expectations."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import apiq_jax.data as D
from apiq_jax.data import check_ids, load_ids, load_tokens, sample_windows, split_windows, windows
from apiq_jax.demo_data import DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from apiq_jax.models import load_tokenizer

    return load_tokenizer(DEMO_MODEL_DIR)


TEXT = "def add(a, b):\n    return a + b\n\n" * 30


# --- .npy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arr", [np.arange(7, dtype=np.int64), np.arange(12, dtype=np.int32).reshape(3, 4),
                                 np.array([5, 1], dtype=np.uint16)])
def test_load_ids_keeps_1d_and_2d_int_arrays(tmp_path, arr):
    path = tmp_path / "ids.npy"
    np.save(path, arr)
    got = load_ids(path)
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == arr.dtype


def test_load_ids_refuses_pickled_object_arrays(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([1, "two", None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled object array.*refused"):
        load_ids(path, name="--data obj.npy")
    with pytest.raises(ValueError, match="^--data obj.npy: "):
        load_ids(path, name="--data obj.npy")


@pytest.mark.parametrize("arr,message", [
    (np.ones((2, 4)), "token ids must be integers, got dtype float64"),
    (np.ones(3, np.float32), "token ids must be integers, got dtype float32"),
    (np.array([True, False]), "token ids must be integers, got dtype bool"),
    (np.zeros((2, 3, 4), np.int32), r"expected \[n, seqlen\] or 1-D ids, got shape \(2, 3, 4\)"),
    (np.array(3, np.int32), r"expected \[n, seqlen\] or 1-D ids, got shape \(\)"),
    (np.zeros((0, 5), np.int32), r"no token ids \(shape \(0, 5\)\)"),
])
def test_load_ids_refusals(tmp_path, arr, message):
    path = tmp_path / "x.npy"
    np.save(path, arr)
    with pytest.raises(ValueError, match=message):
        load_ids(path)


def test_load_ids_refuses_unreadable_files(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"not an array")
    with pytest.raises(ValueError, match="cannot read as a .npy array"):
        load_ids(path)


# --- files --------------------------------------------------------------------------------------
def test_load_tokens_by_suffix(tmp_path, tokenizer):
    txt = tmp_path / "a.TXT"
    txt.write_text(TEXT)
    ids = load_tokens(txt, tokenizer=tokenizer)
    expected = np.asarray(tokenizer(TEXT, add_special_tokens=True)["input_ids"], np.int64)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(load_tokens(txt, tokenizer=DEMO_MODEL_DIR), expected)  # a model dir works too
    npy = tmp_path / "a.npy"
    np.save(npy, expected[:10])
    np.testing.assert_array_equal(load_tokens(npy), expected[:10])


def test_load_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--calib nope.npy: file not found"):
        load_tokens(tmp_path / "nope.npy", name="--calib nope.npy")
    csv = tmp_path / "a.csv"
    csv.write_text("1,2")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; accepted: \.npy .* or \.txt"):
        load_tokens(csv)
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        load_tokens(txt)
    txt.write_text(" \n\t")
    with pytest.raises(ValueError, match="the text file is empty"):
        load_tokens(txt, tokenizer=DEMO_MODEL_DIR)


def test_text_that_is_not_utf8_is_refused(tmp_path, tokenizer):
    """Bytes that are not UTF-8 are refused with their offset (never silently replaced or guessed)."""
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"def f():\n    return 1 \xff\xfe\n" * 5)
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0xff at offset 22\)"):
        load_tokens(txt, tokenizer=tokenizer)


# --- check_ids ----------------------------------------------------------------------------------
def test_check_ids_accepts_the_range():
    ids = np.array([[0, 5, 9], [1, 2, 3]], np.int64)
    assert check_ids(ids, 10) is not None
    np.testing.assert_array_equal(check_ids(ids, 10), ids)
    check_ids(np.zeros((0,), np.int32), 10)


@pytest.mark.parametrize("ids,bad,pos", [
    (np.array([[1, 2, 600, 4]]), 600, "(0, 2)"),
    (np.array([3, 4, -1, 7, 900]), -1, "2"),
    (np.array([[1, 2], [3, 512]]), 512, "(1, 1)"),
])
def test_check_ids_names_id_position_and_range(ids, bad, pos):
    first = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= 512))[0])  # numpy's row-major first
    assert ids[first] == bad
    with pytest.raises(ValueError) as e:
        check_ids(ids, 512)
    msg = str(e.value)
    assert f"token id {bad} at position {pos} is out of range" in msg
    assert "accepted: 0 <= id < 512 (vocab_size)" in msg


def test_check_ids_refuses_floats():
    with pytest.raises(ValueError, match="must be integers"):
        check_ids(np.ones(3), 10)


# --- windows --------------------------------------------------------------------------------------
def test_split_windows_drops_the_tail():
    ids = np.arange(23)
    got = split_windows(ids, 5)
    np.testing.assert_array_equal(got, ids[:20].reshape(4, 5))
    assert got.dtype == np.int32
    with pytest.raises(ValueError, match="only 3 tokens, fewer than one window of seqlen 5"):
        split_windows(np.arange(3), 5)
    with pytest.raises(ValueError, match="seqlen=1 must be an int >= 2"):
        split_windows(ids, 1)
    with pytest.raises(ValueError, match="expected 1-D"):
        split_windows(ids.reshape(1, -1), 5)


def test_sample_windows_matches_seeded_numpy_starts():
    stream = np.arange(1000, 1100, dtype=np.int64)
    got = sample_windows(stream, 6, 10, seed=4)
    starts = np.random.default_rng(4).integers(0, 100 - 10 + 1, size=6)
    np.testing.assert_array_equal(got, np.stack([stream[s:s + 10] for s in starts]))
    assert got.dtype == np.int32
    with pytest.raises(ValueError, match="--calib x: only 100 tokens, fewer than one window of seqlen 101"):
        sample_windows(stream, 2, 101, name="--calib x")
    with pytest.raises(ValueError, match="nsamples=0 must be a positive int"):
        sample_windows(stream, 0, 10)


def test_windows_of_ids_and_rows():
    ids = np.arange(50)
    np.testing.assert_array_equal(windows(ids, seqlen=8), ids[:48].reshape(6, 8))
    got = windows(ids, seqlen=8, nsamples=3, seed=2)
    np.testing.assert_array_equal(got, sample_windows(ids, 3, 8, seed=2))
    np.testing.assert_array_equal(windows(ids, seqlen=8, nsamples=3), sample_windows(ids, 3, 8, seed=0))
    rows = np.arange(40).reshape(4, 10)
    np.testing.assert_array_equal(windows(rows, seqlen=10), rows)
    np.testing.assert_array_equal(windows(rows, seqlen=6, nsamples=2), rows[:2, :6])
    for out in (windows(ids, seqlen=8), windows(rows, seqlen=10)):
        assert out.dtype == np.int32
    with pytest.raises(ValueError, match="seqlen 11 exceeds the row length 10"):
        windows(rows, seqlen=11)
    with pytest.raises(ValueError, match="nsamples 5 for 4 rows"):
        windows(rows, seqlen=10, nsamples=5)
    with pytest.raises(ValueError, match="seed= only applies with nsamples="):
        windows(ids, seqlen=8, seed=1)
    with pytest.raises(ValueError, match="must be integers"):
        windows(np.ones(20), seqlen=4)
    with pytest.raises(ValueError, match="expected"):
        windows(np.zeros((2, 2, 2), np.int32), seqlen=2)


def test_windows_of_text_and_files(tmp_path, tokenizer):
    stream = np.asarray(tokenizer(TEXT, add_special_tokens=True)["input_ids"])
    n = stream.size // 16
    expected = stream[: n * 16].reshape(n, 16)
    np.testing.assert_array_equal(windows(TEXT, seqlen=16, tokenizer=tokenizer), expected)
    np.testing.assert_array_equal(windows(TEXT, seqlen=16, tokenizer=DEMO_MODEL_DIR), expected)
    txt = tmp_path / "t.txt"
    txt.write_text(TEXT)
    np.testing.assert_array_equal(windows(txt, seqlen=16, tokenizer=tokenizer), expected)
    np.testing.assert_array_equal(windows(str(txt), seqlen=16, tokenizer=tokenizer), expected)
    npy = tmp_path / "ids.npy"
    np.save(npy, stream)
    np.testing.assert_array_equal(windows(npy, seqlen=16), expected)
    np.testing.assert_array_equal(windows(str(npy), seqlen=16, nsamples=4, seed=1),
                                  sample_windows(stream, 4, 16, seed=1))
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        windows(TEXT, seqlen=16)
    with pytest.raises(FileNotFoundError, match="file not found"):
        windows(str(tmp_path / "missing.txt"), seqlen=16, tokenizer=tokenizer)


def test_doctest_examples_run():
    result = doctest.testmod(D, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


def test_load_ids_refuses_raw_pickles(tmp_path):
    import pickle

    path = tmp_path / "p.npy"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not in the .npy format"):
        load_ids(path)


# --- memory-mapped training windows -------------------------------------------------------------
def test_load_ids_mmap_and_block_wise_check(tmp_path, monkeypatch):
    arr = np.random.default_rng(0).integers(0, 100, (50, 7)).astype(np.int32)
    arr[37, 5] = 100
    np.save(tmp_path / "ids.npy", arr)
    mm = load_ids(tmp_path / "ids.npy", mmap=True)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    np.testing.assert_array_equal(mm, arr)
    monkeypatch.setattr(D, "CHECK_BLOCK", 20)  # blocks of 2 rows: the bad id is found in a later block
    with pytest.raises(ValueError, match=r"token id 100 at position \(37, 5\) is out of range"):
        check_ids(mm, 100)
    with pytest.raises(ValueError, match=r"token id 100 at position 264 is out of range"):
        check_ids(arr.ravel(), 100)  # 1-D: a flat position
    assert check_ids(mm[:37], 100) is not None
    np.save(tmp_path / "obj.npy", np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled object array.*refused"):
        load_ids(tmp_path / "obj.npy", mmap=True)


def test_training_windows_are_memory_mapped_views(tmp_path):
    stream = np.arange(103, dtype=np.int64) % 50
    np.save(tmp_path / "s.npy", stream)
    w = D.training_windows(tmp_path / "s.npy", seqlen=None, default_seqlen=10, tokenizer_dir=tmp_path,
                           cache_dir=tmp_path / "c", vocab_size=50)
    np.testing.assert_array_equal(w, split_windows(stream, 10))
    assert isinstance(w.base, np.memmap) or isinstance(w, np.memmap)  # a view of the mapped file, not a copy
    rows = np.arange(24, dtype=np.int32).reshape(4, 6)
    np.save(tmp_path / "r.npy", rows)
    r = D.training_windows(tmp_path / "r.npy", seqlen=None, default_seqlen=10, tokenizer_dir=tmp_path,
                           cache_dir=tmp_path / "c", vocab_size=50)
    np.testing.assert_array_equal(r, rows)
    with pytest.raises(ValueError, match=r"^--data r.npy: seqlen 5 differs from the row length 6"):
        D.training_windows(tmp_path / "r.npy", seqlen=5, tokenizer_dir=tmp_path, cache_dir=tmp_path / "c",
                           vocab_size=50, name="--data r.npy")
    with pytest.raises(ValueError, match=r"accepted: 0 <= id < 20"):
        D.training_windows(tmp_path / "r.npy", seqlen=None, tokenizer_dir=tmp_path, cache_dir=tmp_path / "c",
                           vocab_size=20)
    assert not (tmp_path / "c").exists()  # nothing cached for ids


def test_training_windows_cache_text_once(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "t.txt").write_text(TEXT)
    kw = dict(seqlen=16, tokenizer_dir=DEMO_MODEL_DIR, cache_dir=tmp_path / "cache", vocab_size=tokenizer.vocab_size)
    w = D.training_windows(tmp_path / "t.txt", **kw)
    np.testing.assert_array_equal(w, windows(TEXT, seqlen=16, tokenizer=tokenizer))
    cache = D.token_cache_path(tmp_path / "t.txt", DEMO_MODEL_DIR, tmp_path / "cache")
    assert cache.is_file() and list((tmp_path / "cache").iterdir()) == [cache]
    monkeypatch.setattr(D, "tokenize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokenized again")))
    np.testing.assert_array_equal(D.training_windows(tmp_path / "t.txt", **kw), w)  # from the cache
    (tmp_path / "t.txt").write_text(TEXT + "more text\n")  # another text: another cache file
    assert D.token_cache_path(tmp_path / "t.txt", DEMO_MODEL_DIR, tmp_path / "cache") != cache
