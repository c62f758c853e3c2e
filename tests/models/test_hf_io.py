"""Hugging Face directory I/O: round trips, sharded checkpoints, tokenizer, error messages."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from apiq_jax.models import (
    hf_name,
    load_config,
    load_params,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from tests.conftest import require_module, require_shared
from tests.models.hf_helpers import random_ids, save_hf_model, torch_logits

torch = require_module("torch")
transformers = require_module("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf, path = save_hf_model("llama", tmp_path_factory.mktemp("llama"))
    return hf, path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_roundtrip_loads_in_transformers(tmp_path, llama_dir):
    hf, path = llama_dir
    model = load_pretrained(path)
    out = save_pretrained(model, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = load_pretrained(out)
    ids = random_ids(128, (2, 10))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(hf, ids))
    assert np.abs(np.asarray(again(ids)) - torch_logits(reloaded, ids)).max() <= 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "mistral"])
def test_save_from_params_with_built_config(tmp_path, kind):
    """Saving a params pytree writes a config built from ModelConfig alone; HF agrees on logits."""
    hf, path = save_hf_model(kind, tmp_path / "src")
    model = load_pretrained(path)
    out = save_pretrained(model.params, tmp_path / "out", model.config)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(reloaded).__name__ == model.config.architecture
    assert load_config(out) == model.config
    ids = random_ids(model.config.vocab_size, (1, 20), seed=4)
    assert np.abs(torch_logits(reloaded, ids) - torch_logits(hf, ids)).max() <= 1e-5


def test_stories260k_roundtrip_with_tokenizer(tmp_path):
    src = require_shared("models", "stories260K")
    model = load_pretrained(src)
    out = save_pretrained(model, tmp_path / "s", tokenizer_source=src)
    assert (out / "tokenizer.json").is_file()
    tok = load_tokenizer(out)
    ids = tok("Once upon a time, there was a little girl named Lily.")["input_ids"]
    assert ids == [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = np.asarray([ids], np.int32)
    assert np.abs(np.asarray(model(x)) - torch_logits(hf, x)).max() <= 1e-4
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: the head is not duplicated


def test_bfloat16_save_is_bfloat16_for_transformers(tmp_path, llama_dir):
    _, path = llama_dir
    model = load_pretrained(path, dtype="bfloat16")
    out = save_pretrained(model, tmp_path / "bf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    back = load_pretrained(out, dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(back.params["embed_tokens"]), np.asarray(model.params["embed_tokens"])
    )


def test_sharded_checkpoint(tmp_path):
    hf, path = save_hf_model("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    model = load_pretrained(path)
    ids = random_ids(128, (1, 9))
    assert np.abs(np.asarray(model(ids)) - torch_logits(hf, ids)).max() <= 1e-4


def test_hf_names():
    assert hf_name("layers.3.q_proj") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("layers.0.k_proj_bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("layers.1.down_proj") == "model.layers.1.mlp.down_proj.weight"
    assert hf_name("layers.1.post_attention_layernorm") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_name("lm_head") == "lm_head.weight"
    with pytest.raises(ValueError, match="not a model parameter"):
        hf_name("blocks.1.q")


# --- errors -------------------------------------------------------------------------------
def test_missing_directory_and_files(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(empty)
    d = _copy(llama_dir[1], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*only safetensors"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(llama_dir[1])


def test_unknown_architecture(tmp_path, llama_dir):
    d = _copy(llama_dir[1], tmp_path / "gpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        load_pretrained(d)


def test_mismatched_missing_and_unexpected_tensors(tmp_path, llama_dir):
    from safetensors.numpy import load_file, save_file

    src = llama_dir[1]
    tensors = load_file(str(src / "model.safetensors"))

    def variant(name, mutate):
        d = _copy(src, tmp_path / name)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    d = variant("shape", lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((96, 63), np.float32)}))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*\(96, 63\), expected \(96, 64\)"):
        load_pretrained(d)
    d = variant("missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        load_pretrained(d)
    d = variant("extra", lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*q_norm"):
        load_pretrained(d)


def test_unreadable_files(tmp_path, llama_dir):
    d = _copy(llama_dir[1], tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors as safetensors"):
        load_pretrained(d)
    d = _copy(llama_dir[1], tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(d)


def test_bad_dtype(llama_dir):
    with pytest.raises(ValueError, match=r"dtype='int8'.*accepted"):
        load_params(llama_dir[1], dtype="int8")
    with pytest.raises(ValueError, match=r"not understood"):
        load_params(llama_dir[1], dtype="floaty")


def test_index_pointing_at_missing_shard(tmp_path):
    _, path = save_hf_model("llama", tmp_path / "shards", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard .*{shard.name}"):
        load_pretrained(path)


# --- lazy reading and the checkpoint's dtype ---------------------------------------------------
def test_lazy_params_read_nothing_until_converted(monkeypatch, llama_dir):
    from apiq_jax.models.hf_io import LazyTensor, lazy_params, materialize

    _, path = llama_dir
    reads = []
    original = LazyTensor.read
    monkeypatch.setattr(LazyTensor, "read", lambda self: reads.append(self.key) or original(self))
    lazy = lazy_params(path)
    q = lazy["layers"][1]["q_proj"]
    assert isinstance(q, LazyTensor) and q.shape == (64, 64) and reads == []  # headers only
    layer = materialize(lazy["layers"][1])
    assert sorted(reads) == sorted(hf_name(f"layers.1.{k}") for k in lazy["layers"][1])  # that layer alone
    eager = load_params(path)
    for k, v in layer.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(eager["layers"][1][k]))


def test_lazy_tensor_casts_when_read(llama_dir):
    from apiq_jax.models.hf_io import lazy_params

    _, path = llama_dir
    t = lazy_params(path, dtype="bfloat16")["layers"][0]["up_proj"]
    arr = np.asarray(t)
    assert arr.dtype.name == "bfloat16" and t.nbytes == arr.nbytes
    want = np.asarray(load_params(path, dtype="float32")["layers"][0]["up_proj"])
    np.testing.assert_array_equal(np.asarray(jax.numpy.asarray(arr, "float32")),
                                  np.asarray(jax.numpy.asarray(want).astype("bfloat16").astype("float32")))


def test_truncated_shard_is_named_when_the_tensor_is_read(tmp_path, llama_dir):
    from apiq_jax.models.hf_io import lazy_params

    _, path = llama_dir
    bad = _copy(path, tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(ValueError, match="model.safetensors"):
        np.asarray(lazy_params(bad)["lm_head"] if "lm_head" in lazy_params(bad) else lazy_params(bad)["norm"])


def test_default_dtype_is_the_checkpoints(tmp_path, llama_dir):
    from apiq_jax.models.hf_io import checkpoint_dtype, load_hf_config

    _, path = llama_dir
    out = save_pretrained(load_pretrained(path, dtype="bfloat16"), tmp_path / "bf")
    assert checkpoint_dtype(load_hf_config(out)).name == "bfloat16"
    assert load_pretrained(out).dtype.name == "bfloat16"                       # default: as stored
    assert load_pretrained(out, dtype="float32").dtype.name == "float32"      # or as asked
    assert checkpoint_dtype(load_hf_config(path)).name == "float32"


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite_checks_every_chunk(monkeypatch, bad):
    """The finiteness check of a read tensor runs in chunks (no array-sized mask) and misses no chunk."""
    import apiq_jax.models.hf_io as hf_io

    monkeypatch.setattr(hf_io, "_FINITE_CHUNK", 7)
    arr = np.arange(6 * 5, dtype=np.float16).reshape(6, 5)
    if bad is not None:
        arr[-1, -1] = bad  # in the last, partial chunk
    assert hf_io.all_finite(arr) is (bad is None)


def test_read_json_names_the_file_and_what_is_wrong(tmp_path):
    from apiq_jax.models.hf_io import read_json

    f = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match=f"{f} not found"):
        read_json(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \("):
        read_json(f)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        read_json(f)
    f.write_text('{"a": 1}')
    assert read_json(f) == {"a": 1}
