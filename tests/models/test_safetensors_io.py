"""The streaming safetensors writer, checked against the real safetensors reader and writer.

Every file written here is read back by ``safetensors.safe_open`` and
``safetensors.numpy.load_file`` and compared bit for bit (as raw bytes) with the input.
"""

from __future__ import annotations

import json
import random
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save, save_file

from apiq_jax.models import safetensors_io
from apiq_jax.models.safetensors_io import (
    StagedFiles,
    TensorInfo,
    parse_size,
    plan_shards,
    read_header,
    safetensors_dtype,
    shard_names,
    write_safetensors,
)


def _bits(a) -> tuple[str, tuple[int, ...], bytes]:
    a = np.ascontiguousarray(np.asarray(a))
    return a.dtype.name, a.shape, a.reshape(-1).view(np.uint8).tobytes()


def _tensors() -> dict:
    rng = np.random.default_rng(0)
    return {
        "codes": rng.integers(0, 2**32, (5, 3), dtype=np.uint32),
        "u64": rng.integers(0, 2**63, (2,), dtype=np.uint64),
        "i64": rng.integers(-(2**62), 2**62, (3,), dtype=np.int64),
        "f64": rng.standard_normal((2, 2)),
        "f32": rng.standard_normal((3, 1, 2)).astype(np.float32),
        "i32": rng.integers(-100, 100, (4,), dtype=np.int32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": jnp.asarray(rng.standard_normal((2, 5)), jnp.bfloat16),  # a JAX array
        "i16": rng.integers(-(2**15), 2**15, (3,), dtype=np.int16),
        "u16": rng.integers(0, 2**16, (3,), dtype=np.uint16),
        "u8": rng.integers(0, 256, (9,), dtype=np.uint8),  # odd size: the next tensor is not 8-aligned
        "i8": rng.integers(-128, 128, (2, 3), dtype=np.int8),
        "bool": rng.integers(0, 2, (3,)).astype(bool),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "f32_jax": jnp.arange(6, dtype=jnp.float32).reshape(3, 2),
        "strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # not contiguous
    }


def test_every_dtype_reads_back_bit_identical_with_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    nbytes = write_safetensors(path, tensors, {"format": "test", "k": "v"})
    assert nbytes == sum(np.asarray(v).nbytes for v in tensors.values())
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == {"format": "test", "k": "v"}
        for k, v in tensors.items():
            assert _bits(f.get_tensor(k)) == _bits(v), k
    loaded = load_file(path)
    assert {k: _bits(v) for k, v in loaded.items()} == {k: _bits(v) for k, v in tensors.items()}
    # read_header agrees with safetensors' own view of the header
    infos, meta = read_header(path)
    assert meta == {"format": "test", "k": "v"}
    with safe_open(str(path), framework="numpy") as f:
        for k in tensors:
            sl = f.get_slice(k)
            assert infos[k].dtype == sl.get_dtype() and list(infos[k].shape) == sl.get_shape()
            assert infos[k].nbytes == np.asarray(tensors[k]).nbytes


def test_tensors_are_aligned_to_their_item_size(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, _tensors())
    infos, _ = read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    for k, info in infos.items():
        itemsize = np.dtype(np.asarray(_tensors()[k]).dtype).itemsize
        assert (8 + n + info.offsets[0]) % itemsize == 0, k


def test_same_bytes_as_the_reference_writer(tmp_path):
    # names in the reference writer's order (widest dtype first, then by name): identical file
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32([1.5, -2.0]),
               "c": np.arange(5, dtype=np.int16), "d": np.arange(3, dtype=np.uint8)}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "x"})
    assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata={"format": "x"})


def test_read_header_of_a_reference_file(tmp_path):
    tensors = {"w": np.ones((3, 4), np.float16), "b": np.zeros((4,), np.int64)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"m": "1"})
    infos, meta = read_header(tmp_path / "ref.safetensors")
    assert meta == {"m": "1"}
    assert infos["w"].dtype == "F16" and infos["w"].shape == (3, 4) and infos["w"].nbytes == 24
    assert infos["b"] == TensorInfo("I64", (4,), infos["b"].offsets) and infos["b"].nbytes == 32


def test_float8_header(tmp_path):
    # safetensors' numpy reader has no float8 types; the header and the raw bytes are checked
    a = np.arange(4, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    path = tmp_path / "f8.safetensors"
    write_safetensors(path, {"a": a})
    infos, _ = read_header(path)
    assert infos["a"] == TensorInfo("F8_E4M3", (4,), (0, 4))
    assert path.read_bytes()[-4:] == a.view(np.uint8).tobytes()


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.ones(3, np.float32)})
    before = path.read_bytes()

    class Boom:
        shape, dtype = (2,), np.dtype(np.float32)

        def __array__(self, *a, **k):
            raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        write_safetensors(path, {"y": np.zeros(1000, np.float32), "z": Boom()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_one_tensor_on_the_host_at_a_time(tmp_path, monkeypatch):
    """Each tensor is converted just before it is written and released before the next."""
    import weakref

    live: list[weakref.ref] = []
    real = safetensors_io.to_host

    class Tracked(np.ndarray):
        pass

    def tracking(x):
        assert all(r() is None for r in live), "a previous host copy is still alive"
        arr = real(x).copy().view(Tracked)
        live.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(safetensors_io, "to_host", tracking)
    tensors = {f"t{i}": jnp.full((100,), i, jnp.float32) for i in range(5)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    assert len(live) == 5
    assert {k: _bits(v) for k, v in load_file(tmp_path / "t.safetensors").items()} == {
        k: _bits(v) for k, v in tensors.items()}


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="complex64.*cannot be stored in safetensors; accepted"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="'__metadata__' is not accepted"):
        write_safetensors(tmp_path / "m.safetensors", {"__metadata__": np.zeros(2)})
    with pytest.raises(ValueError, match="metadata must be"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(2)}, {"k": 1})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="writing .*no_dir.*x.safetensors failed"):
        write_safetensors(tmp_path / "no_dir" / "x.safetensors", {"a": np.zeros(2)}, atomic=False)
    assert safetensors_dtype(jnp.bfloat16) == "BF16"


@pytest.mark.parametrize(
    "content, why",
    [
        (b"abc", "no 8-byte header length"),
        (struct.pack("<Q", 1000) + b"{}", "does not fit"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (struct.pack("<Q", 2) + b"{}" + b"\0" * 4, "data section of 4 bytes"),
    ],
)
def test_read_header_rejects_bad_files(tmp_path, content, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read .*bad.safetensors as safetensors: .*{why}"):
        read_header(path)


def test_read_header_rejects_bad_offsets(tmp_path):
    def file(header: dict, data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    path = tmp_path / "bad.safetensors"
    path.write_bytes(file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="4 bytes for F32"):
        read_header(path)
    path.write_bytes(file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8))
    with pytest.raises(ValueError, match="starts at 4, expected 0"):
        read_header(path)
    path.write_bytes(file({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="bad entry for tensor 'a'"):
        read_header(path)


@pytest.mark.parametrize(
    "value, expected",
    [(4096, 4096), ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("500mb", 500 * 10**6), ("1.5GiB", 3 * 2**29),
     ("100KB", 100_000), ("64 KiB", 65536), ("123", 123), ("7b", 7), (np.int64(10), 10), ("1TB", 10**12)],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, 1.5, None, "", "GB", "2XB", "2 G B", "-1GB", "0MB", "1e3"])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError, match=r"max_shard_size=.* is not a size; accepted: a positive int") as e:
        parse_size(value)
    assert repr(value) in str(e.value) and "\n" not in str(e.value)


def test_shard_names():
    assert shard_names("frozen", 3) == [f"frozen-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_plan_shards_keeps_groups_and_order():
    groups = [[("e", 50)], [("l0.a", 30), ("l0.b", 30)], [("l1.a", 30), ("l1.b", 30)], [("n", 5)]]
    assert plan_shards(groups, 100) == [["e"], ["l0.a", "l0.b"], ["l1.a", "l1.b", "n"]]
    assert plan_shards(groups, 10**9) == [["e", "l0.a", "l0.b", "l1.a", "l1.b", "n"]]
    assert plan_shards([], 10) == [[]]
    # a group over the limit is split tensor by tensor; a tensor over the limit is alone
    assert plan_shards([[("a", 4)], [("b", 8), ("c", 8)], [("d", 30)], [("e", 1)]], 10) == [
        ["a"], ["b"], ["c"], ["d"], ["e"]]


def test_plan_shards_invariants_on_random_groups():
    rng = random.Random(0)
    for _ in range(200):
        groups = [[(f"g{g}.t{t}", rng.randint(0, 40)) for t in range(rng.randint(1, 4))] for g in range(rng.randint(1, 8))]
        limit = rng.randint(1, 120)
        shards = plan_shards(groups, limit)
        sizes = dict(t for g in groups for t in g)
        assert [k for s in shards for k in s] == [k for g in groups for k, _ in g]  # every tensor once, in order
        for s in shards:
            assert len(s) == 1 or sum(sizes[k] for k in s) <= limit
        where = {k: i for i, s in enumerate(shards) for k in s}
        for g in groups:
            if sum(n for _, n in g) <= limit:
                assert len({where[k] for k, _ in g}) == 1  # a group that fits stays in one shard


def test_staged_files(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with StagedFiles(tmp_path) as staged:
            staged.stage("a.txt").write_text("new")
            staged.stage("b.txt").write_text("new")
            raise RuntimeError("failed before commit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
    with StagedFiles(tmp_path) as staged:
        staged.stage("a.txt").write_text("new")
        staged.stage("b.txt").write_text("b")
        assert [p.name for p in staged.commit()] == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new" and (tmp_path / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(ValueError, match="plain file name"):
        StagedFiles(tmp_path).stage("../x")
