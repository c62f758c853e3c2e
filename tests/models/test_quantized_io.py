"""Saved quantized-model directories: exact round trip, packed codes on disk, shards, lazy loading, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.lora import LoraConfig
from apiq_jax.models import (
    ModelConfig,
    apply,
    init_params,
    load_config,
    load_quantized,
    quantize_model,
    save_quantized,
)
from apiq_jax.models.quantized_io import (
    FROZEN_FILE,
    FROZEN_INDEX_FILE,
    LORA_FILE,
    META_FILE,
    QuantizedCheckpoint,
    is_quantized_dir,
)
from apiq_jax.quant import QuantConfig, QuantizedTensor

CFG = ModelConfig("Qwen2ForCausalLM", 80, 64, 100, 2, 4, 2, 16, qkv_bias=True, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
LCFG = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))


def _build(qcfg: QuantConfig, seed: int = 0):
    params = init_params(CFG, jax.random.key(seed), std=0.1)
    frozen, lora = quantize_model(params, qcfg, LCFG, key=jax.random.key(seed + 1))
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # non-trivial b
    return frozen, lora


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "qcfg",
    [
        QuantConfig(bits=2, group_size=64),
        QuantConfig(bits=3, group_size=32, scheme="sym", scale_dtype="float32"),
        QuantConfig(bits=4, group_size=64, scheme="nf", double_quant=True),
        QuantConfig(bits=4, group_size=64, scheme="asym", double_quant=True),
    ],
    ids=["asym2", "sym3", "nf4-dq", "asym4-dq"],
)
def test_roundtrip_is_exact(tmp_path, qcfg):
    frozen, lora = _build(qcfg)
    meta = {"method": "rtn", "calib": {"samples": 0}}
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, meta)
    assert is_quantized_dir(out)
    f2, l2, cfg2, meta2 = load_quantized(out)
    assert cfg2 == CFG and l2.config == LCFG and meta2 == meta
    _leaves_equal(frozen, f2)
    _leaves_equal(lora, l2)
    qt = f2["layers"][1]["down_proj"]
    assert isinstance(qt, QuantizedTensor) and qt.config == qcfg and qt.shape == (64, 100)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 80, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(apply(frozen, lora, ids, CFG)),
        np.asarray(apply(f2, l2, ids, cfg2)),
    )


def test_files_and_packed_codes_on_disk(tmp_path):
    from safetensors import safe_open

    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {"note": "x"})
    assert {p.name for p in out.iterdir()} == {"config.json", FROZEN_FILE, LORA_FILE, META_FILE}
    with safe_open(str(out / FROZEN_FILE), framework="numpy") as f:
        keys = set(f.keys())
        codes = f.get_slice("layers.0.down_proj.codes")
        assert codes.get_dtype() == "U32"
        # 100 inputs -> 2 groups of 64 = 128 codes of 2 bits = 8 words per row (packed)
        assert codes.get_shape() == [64, 8]
        assert f.get_slice("layers.0.q_proj.zeros").get_dtype() == "I16"
    assert {"embed_tokens", "norm", "layers.0.input_layernorm", "layers.0.q_proj_bias",
            "layers.1.v_proj.scales"} <= keys
    assert "lm_head" not in keys  # tied
    with safe_open(str(out / LORA_FILE), framework="numpy") as f:
        assert set(f.keys()) == {f"layers.{i}.{n}.{ab}" for i in range(2) for n in LCFG.targets for ab in "ab"}
    meta = json.loads((out / META_FILE).read_text())
    assert meta["quantized"]["layers.0.down_proj"]["shape"] == [64, 100]
    assert meta["quantized"]["layers.0.down_proj"]["config"]["bits"] == 2
    assert meta["lora_config"] == {"rank": 4, "alpha": 8.0, "targets": list(LCFG.targets)}
    # config.json is a normal HF config
    assert load_config(out) == CFG


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {}, tokenizer_source=src)
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "tokenizer_config.json").is_file()


def test_without_lora(tmp_path):
    frozen, _ = _build(QuantConfig(bits=2, group_size=64))
    out = save_quantized(tmp_path / "q", frozen, None, CFG, {})
    f2, l2, _, _ = load_quantized(out)
    assert l2 is None
    _leaves_equal(frozen, f2)


def test_errors(tmp_path):
    frozen, lora = _build(QuantConfig(bits=2, group_size=64))
    with pytest.raises(ValueError, match="lora must be an apiq_jax.lora.Lora or None, got dict"):
        save_quantized(tmp_path / "a", frozen, dict(lora.factors), CFG, {})
    with pytest.raises(ValueError, match="JSON"):
        save_quantized(tmp_path / "b", frozen, lora, CFG, {"x": object()})
    other = ModelConfig("Qwen2ForCausalLM", 80, 64, 100, 3, 4, 2, 16, qkv_bias=True, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="missing"):
        save_quantized(tmp_path / "c", frozen, lora, other, {})

    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="apiq_meta.json not found"):
        load_quantized(tmp_path / "plain")

    out = save_quantized(tmp_path / "q", frozen, lora, CFG, {})
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version=99"):
        load_quantized(out)
    (out / META_FILE).write_text(json.dumps(meta))
    (out / LORA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lora.safetensors not found"):
        load_quantized(out)
    (out / FROZEN_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*frozen.safetensors"):
        load_quantized(out)


# --- sharded saving, lazy loading, atomic writes ---------------------------------------------------

CFG4 = ModelConfig("LlamaForCausalLM", 80, 64, 100, 4, 4, 2, 16, tie_word_embeddings=False)
LCFG4 = LoraConfig(rank=4, alpha=8, targets=("q", "v", "down"))


@pytest.fixture(scope="module")
def model4():
    params = init_params(CFG4, jax.random.key(3), std=0.1)
    frozen, lora = quantize_model(params, QuantConfig(bits=2, group_size=32), LCFG4, key=jax.random.key(4))
    return frozen, jax.tree.map(lambda x: x + 0.01, lora)


def _stored(path):
    """{key: (file name, raw bytes, dtype, shape)} of every frozen tensor, read by safetensors itself."""
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(path.glob("frozen*.safetensors")):
        for k, v in load_file(f).items():
            assert k not in out, f"{k} stored twice"
            out[k] = (f.name, v.tobytes(), v.dtype.name, v.shape)
    return out


def _layer_bytes(path, i):
    from safetensors import safe_open

    n = 0
    for f in path.glob("frozen*.safetensors"):
        with safe_open(str(f), framework="numpy") as st:
            n += sum(st.get_tensor(k).nbytes for k in st.keys() if k.startswith(f"layers.{i}."))
    return n


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_sharded_roundtrip_is_exact(tmp_path, model4):
    from safetensors import safe_open

    frozen, lora = model4
    single = save_quantized(tmp_path / "one", frozen, lora, CFG4, {"m": 1})
    layer = _layer_bytes(single, 1)
    out = save_quantized(tmp_path / "sh", frozen, lora, CFG4, {"m": 1}, max_shard_size=int(layer * 1.5))
    names = {p.name for p in out.iterdir()}
    shards = sorted(n for n in names if n.startswith("frozen-"))
    n = len(shards)
    assert n >= 5 and shards == [f"frozen-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert names == {*shards, FROZEN_INDEX_FILE, "config.json", LORA_FILE, META_FILE}  # no frozen.safetensors

    # every shard is read by safetensors; the index lists exactly what the shards hold
    index = json.loads((out / FROZEN_INDEX_FILE).read_text())
    assert set(index) == {"metadata", "weight_map"}
    stored = _stored(out)
    assert index["weight_map"] == {k: v[0] for k, v in stored.items()}
    assert index["metadata"]["total_size"] == sum(len(v[1]) for v in stored.values())
    # the same tensors, bit for bit, as the single-file save
    assert {k: v[1:] for k, v in stored.items()} == {k: v[1:] for k, v in _stored(single).items()}
    for shard in shards:
        with safe_open(str(out / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "apiq-jax-quantized"}
            keys = list(f.keys())
            size = sum(f.get_tensor(k).nbytes for k in keys)
        assert len(keys) == 1 or size <= layer * 1.5  # a single tensor may exceed the limit
    # a decoder layer (smaller than the limit) is in one shard
    for i in range(CFG4.num_hidden_layers):
        assert len({f for k, f in index["weight_map"].items() if k.startswith(f"layers.{i}.")}) == 1

    f2, l2, cfg2, meta2 = load_quantized(out)
    assert cfg2 == CFG4 and meta2 == {"m": 1} and l2.config == LCFG4
    _leaves_equal(frozen, f2)
    _leaves_equal(lora, l2)


def test_single_shard_layout_is_unchanged_and_old_directories_load(tmp_path, model4):
    from safetensors.numpy import load_file, save_file

    frozen, lora = model4
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {}, max_shard_size="1GB")
    assert {p.name for p in out.iterdir()} == {"config.json", FROZEN_FILE, LORA_FILE, META_FILE}
    # a directory written by the previous save (safetensors.numpy.save_file) still loads, identically
    for name in (FROZEN_FILE, LORA_FILE):
        save_file(load_file(out / name), out / name, metadata={"format": "apiq-jax-quantized"})
    f2, l2, _, _ = load_quantized(out)
    _leaves_equal(frozen, f2)
    _leaves_equal(lora, l2)


def test_loading_one_layer_reads_only_its_tensors(tmp_path, model4, monkeypatch):
    import safetensors

    frozen, lora = model4
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {}, max_shard_size=int(_layer_bytes(
        save_quantized(tmp_path / "one", frozen, lora, CFG4, {}), 3) * 1.5))
    keys3 = {k for k in _stored(out) if k.startswith("layers.3.")}
    bytes3 = _layer_bytes(out, 3)
    read: list[tuple[str, str]] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, file, **kw):
            self.file, self.inner = file, real_open(file, **kw)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            read.append((self.file, key))
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    ckpt = QuantizedCheckpoint(out)
    assert read == [] and ckpt.tensors_read == 0 and ckpt.bytes_read == 0  # opening reads headers only

    layer3 = ckpt.layer_params(3)
    assert {k for _, k in read} == keys3 and len(read) == len(keys3)
    assert ckpt.tensors_read == len(keys3) and ckpt.bytes_read == bytes3
    _leaves_equal(frozen["layers"][3], layer3)

    # the other shards are not needed at all: delete them and layer 3 still loads
    index = json.loads((out / FROZEN_INDEX_FILE).read_text())["weight_map"]
    (shard3,) = {index[k] for k in keys3}
    for p in out.glob("frozen-*.safetensors"):
        if p.name != shard3:
            p.unlink()
    ckpt.reset_counts()
    _leaves_equal(frozen["layers"][3], ckpt.layer_params(3))
    assert ckpt.tensors_read == len(keys3)
    with pytest.raises(ValueError, match="cannot read"):
        ckpt.non_layer_params()

    ckpt.reset_counts()
    _leaves_equal(lora["layers"][3], ckpt.lora_layer(3))
    assert ckpt.tensors_read == 2 * len(LCFG4.targets)


def test_checkpoint_reads_pieces_and_whole(tmp_path, model4):
    frozen, lora = model4
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {"k": "v"}, max_shard_size="4KB")
    ckpt = QuantizedCheckpoint(out)
    assert ckpt.num_layers == 4 and ckpt.model_config == CFG4 and ckpt.metadata == {"k": "v"}
    assert len(ckpt.files) > 1 and ckpt.lora_config == LCFG4
    _leaves_equal({k: frozen[k] for k in ("embed_tokens", "norm", "lm_head")}, ckpt.non_layer_params())
    np.testing.assert_array_equal(ckpt.tensor("layers.2.q_proj.codes"), np.asarray(frozen["layers"][2]["q_proj"].codes))
    info = ckpt.tensor_info("layers.2.q_proj.codes")
    assert info.dtype == "U32" and info.shape == frozen["layers"][2]["q_proj"].codes.shape
    assert ckpt.tensors_read == 3 + 1  # embed_tokens, norm, lm_head; one tensor
    ckpt.reset_counts()
    f2, l2, cfg2, meta2 = ckpt.load()
    _leaves_equal(frozen, f2)
    _leaves_equal(lora, l2)
    assert ckpt.tensors_read == len(ckpt.keys()) + 2 * len(LCFG4.targets) * 4  # every tensor once
    with pytest.raises(ValueError, match=r"layer index 4 is out of range; accepted: 0 <= i < 4"):
        ckpt.layer_params(4)
    with pytest.raises(KeyError, match="no frozen tensor 'nope'"):
        ckpt.tensor("nope")


def test_overwriting_switches_layouts_and_removes_stale_files(tmp_path, model4):
    frozen, lora = model4
    out = tmp_path / "q"
    save_quantized(out, frozen, lora, CFG4, {"v": 1}, max_shard_size="3KB")
    n_small = len(list(out.glob("frozen-*")))
    save_quantized(out, frozen, lora, CFG4, {"v": 2}, max_shard_size="12KB")  # fewer shards: old names go
    names = {p.name for p in out.iterdir()}
    n = len(list(out.glob("frozen-*")))
    assert 1 < n < n_small and FROZEN_FILE not in names
    assert set(json.loads((out / FROZEN_INDEX_FILE).read_text())["weight_map"].values()) == {
        p.name for p in out.glob("frozen-*")}
    save_quantized(out, frozen, lora, CFG4, {"v": 3})  # single file: index and shards go
    assert {p.name for p in out.iterdir()} == {"config.json", FROZEN_FILE, LORA_FILE, META_FILE}
    f2, _, _, meta = load_quantized(out)
    assert meta == {"v": 3}
    _leaves_equal(frozen, f2)
    save_quantized(out, frozen, lora, CFG4, {"v": 4}, max_shard_size="12KB")
    assert FROZEN_FILE not in {p.name for p in out.iterdir()}
    _leaves_equal(frozen, load_quantized(out)[0])


@pytest.mark.parametrize("fail_at", [1, 12, 40])
def test_failed_save_leaves_previous_output_intact(tmp_path, model4, monkeypatch, fail_at):
    from apiq_jax.models import safetensors_io

    frozen, lora = model4
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {"v": "old"}, max_shard_size="4KB")
    before = _snapshot(out)
    real, calls = safetensors_io.to_host, []

    def failing(x):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real(x)

    monkeypatch.setattr(safetensors_io, "to_host", failing)
    other = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, frozen)
    for shard_size in ("4KB", "1GB"):  # over the same layout, and over the other one
        calls.clear()
        with pytest.raises(OSError, match=r"writing \S*/q/frozen[-.]\S*safetensors failed: No space left on device"):
            save_quantized(out, other, lora, CFG4, {"v": "new"}, max_shard_size=shard_size)
        assert _snapshot(out) == before  # same names, same bytes, no temporary file
    monkeypatch.undo()
    _leaves_equal(frozen, load_quantized(out)[0])


def test_failed_metadata_write_leaves_previous_output_intact(tmp_path, model4):
    frozen, lora = model4
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {})
    before = _snapshot(out)

    class BadConfig:
        def to_json_file(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="writing .*config.json failed: No space left on device"):
        save_quantized(out, frozen, lora, CFG4, {}, hf_config=BadConfig(), max_shard_size="4KB")
    assert _snapshot(out) == before


_FSIZE_SCRIPT = """
import resource, signal, sys
from apiq_jax.models import load_quantized, save_quantized
frozen, lora, cfg, meta = load_quantized(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    save_quantized(sys.argv[2], frozen, lora, cfg, {"v": "new"}, max_shard_size=sys.argv[4])
except OSError as e:
    print("ERROR:", e)
    sys.exit(3)
"""


def test_file_size_limit_mid_save_leaves_previous_output_intact(tmp_path, model4):
    """A real write failure (EFBIG past RLIMIT_FSIZE) in a subprocess, over a sharded directory."""
    import os
    import subprocess
    import sys

    frozen, lora = model4
    src = save_quantized(tmp_path / "src", jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, frozen),
                         lora, CFG4, {})
    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {"v": "old"}, max_shard_size="4KB")
    before = _snapshot(out)
    limit = max(len(b) for n, b in before.items() if n.startswith("frozen")) // 2
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(src), str(out), str(limit), "4KB"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "File too large" in r.stdout and f"writing {out}" in r.stdout and "frozen" in r.stdout
    assert _snapshot(out) == before
    f2, _, _, meta = load_quantized(out)
    assert meta == {"v": "old"}
    _leaves_equal(frozen, f2)


def test_new_errors(tmp_path, model4):
    from safetensors.numpy import load_file, save_file

    frozen, lora = model4
    with pytest.raises(ValueError, match=r"max_shard_size='2 gigs' is not a size; accepted"):
        save_quantized(tmp_path / "x", frozen, lora, CFG4, {}, max_shard_size="2 gigs")
    with pytest.raises(ValueError, match=r"max_shard_size=0 is not a size"):
        save_quantized(tmp_path / "x", frozen, lora, CFG4, {}, max_shard_size=0)
    assert not (tmp_path / "x").exists()

    out = save_quantized(tmp_path / "q", frozen, lora, CFG4, {})
    # LoRA factor shapes are checked against their weights: down_proj is [64, 100], rank 4
    factors = load_file(out / LORA_FILE)
    good = factors["layers.2.down_proj.a"]
    factors["layers.2.down_proj.a"] = np.zeros((64, 4), good.dtype)
    save_file(factors, out / LORA_FILE)
    with pytest.raises(ValueError, match=r"lora.safetensors: layer 2 down_proj: LoRA factor a has shape "
                                         r"\[64, 4\], expected \[100, 4\]"):
        load_quantized(out)
    factors["layers.2.down_proj.a"] = good
    factors["layers.0.q_proj.b"] = np.zeros((3, 64), good.dtype)
    save_file(factors, out / LORA_FILE)
    with pytest.raises(ValueError, match=r"layer 0 q_proj: LoRA factor b has shape \[3, 64\], expected \[4, 64\]"):
        load_quantized(out)
    factors["layers.0.q_proj.b"] = np.zeros((4, 64), good.dtype)
    del factors["layers.1.v_proj.b"]
    save_file(factors, out / LORA_FILE)
    with pytest.raises(ValueError, match=r"layer 1 v_proj: LoRA entries \['a'\], expected \['a', 'b'\]"):
        load_quantized(out)

    # a missing "quantized" entry names the file (was a KeyError)
    out = save_quantized(tmp_path / "q2", frozen, lora, CFG4, {})
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "quantized"}))
    with pytest.raises(ValueError, match=r"apiq_meta.json: no 'quantized' entry"):
        load_quantized(out)
    (out / META_FILE).write_text(json.dumps(meta))
    del meta["quantized"]["layers.1.down_proj"]["shape"]
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"cannot rebuild 'layers.1.down_proj'"):
        load_quantized(out)

    # sharded: a missing shard, a key the shard does not hold
    out = save_quantized(tmp_path / "q3", frozen, lora, CFG4, {}, max_shard_size="4KB")
    index = json.loads((out / FROZEN_INDEX_FILE).read_text())
    shard = index["weight_map"]["layers.1.q_proj.codes"]
    data = (out / shard).read_bytes()
    (out / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} not found \\(listed in {FROZEN_INDEX_FILE}\\)"):
        load_quantized(out)
    (out / shard).write_bytes(data)
    index["weight_map"]["layers.1.extra"] = shard
    (out / FROZEN_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no tensors \['layers.1.extra'\]"):
        load_quantized(out)
    index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items() if k != "layers.1.extra"}
    (out / FROZEN_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="weight_map' must map tensor names to file names"):
        load_quantized(out)
    (out / FROZEN_INDEX_FILE).write_text("{}")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        load_quantized(out)


def test_bfloat16_leaves_roundtrip(tmp_path, model4):
    """Embeddings and norms kept in bfloat16 are stored as BF16 and come back bit-identical."""
    frozen, lora = model4
    bf = {**frozen, "embed_tokens": frozen["embed_tokens"].astype(jnp.bfloat16),
          "lm_head": frozen["lm_head"].astype(jnp.bfloat16)}
    out = save_quantized(tmp_path / "q", bf, lora, CFG4, {}, max_shard_size="8KB")
    ckpt = QuantizedCheckpoint(out)
    assert ckpt.tensor_info("embed_tokens").dtype == "BF16"
    f2 = ckpt.frozen()
    assert f2["embed_tokens"].dtype == jnp.bfloat16
    _leaves_equal(bf, f2)
