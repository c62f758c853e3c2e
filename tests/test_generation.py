"""apiq_jax/generation.py: KV-cached generation against transformers' generate, a full
recompute at every step, the dequantized dense model, and the sampling rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.generation import generate, left_pad, sample_logits
from apiq_jax.lora import LoraConfig
from apiq_jax.models import load_pretrained, quantize_model
from apiq_jax.models.hf_io import load_config, load_params
from apiq_jax.models.llama import forward, stack_layers
from apiq_jax.models.quantized import dequantize_params
from apiq_jax.quant import QuantConfig
from tests.conftest import require_module, require_shared
from tests.interop.helpers import random_lora as _random_lora

#: new tokens per test (one length: the jitted prefill and decode compile once per model form)
N = 32
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park and"]


@pytest.fixture(scope="module")
def stories():
    d = require_shared("models", "stories260K")
    return d, load_pretrained(d)


@pytest.fixture(scope="module")
def prompt_ids(stories):
    from apiq_jax.data import load_tokenizer

    tok = load_tokenizer(stories[0])
    return [list(tok(p)["input_ids"]) for p in PROMPTS]


def random_lora(params, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    """A non-zero LoRA on some of the linears (the others run without)."""
    return _random_lora(params, targets=targets, std=0.05)


def recompute_logits(params, lora, ids, mask, new_tokens, config):
    """Float32 logits of step t (the one that chose new token t) from one full forward pass over the
    prompt and every new token: causal attention makes position ``P - 1 + t`` see exactly what step t saw."""
    n = new_tokens.shape[1]
    seq = np.concatenate([ids, new_tokens[:, : n - 1]], axis=1)
    m = np.concatenate([mask, np.ones((mask.shape[0], n - 1), mask.dtype)], axis=1)
    pos = np.maximum(np.cumsum(m, axis=1) - 1, 0)
    logits = forward(params, lora, jnp.asarray(seq), config, attention_mask=jnp.asarray(m), positions=jnp.asarray(pos))
    return np.asarray(logits[:, ids.shape[1] - 1:], np.float32)


def test_greedy_equals_transformers_generate(stories, prompt_ids):
    torch = require_module("torch")
    transformers = require_module("transformers")
    d, model = stories
    res = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N, eos_token_id=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids, mask = left_pad(prompt_ids)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = out[:, ids.shape[1]:].numpy()
    assert res.tokens.shape == (3, ref.shape[1])
    np.testing.assert_array_equal(res.tokens, ref)  # token for token
    assert len({len(p) for p in prompt_ids}) == 3  # really a padded batch


def test_kv_cache_decode_equals_full_recompute_every_step(stories, prompt_ids):
    _, model = stories
    lora = random_lora(model.params)
    res = generate(model.params, lora, prompt_ids, model.config, max_new_tokens=N, return_logits=True)
    ids, mask = left_pad(prompt_ids)
    ref = recompute_logits(model.params, lora, ids, mask, res.tokens, model.config)
    assert res.logits.shape == ref.shape == (3, N, model.config.vocab_size)
    # float32, different summation order (cache vs full sequence, whose attention runs in causal
    # query blocks): 3e-5 absolute on logits of magnitude ~10 (observed 1.1e-5)
    np.testing.assert_allclose(res.logits, ref, atol=3e-5, rtol=1e-5)
    np.testing.assert_array_equal(res.tokens, ref.argmax(-1))
    # stacked layers and a stacked LoRA give the same tokens
    res2 = generate(stack_layers(model.params), lora.stack_layers(), prompt_ids, model.config, max_new_tokens=N)
    np.testing.assert_array_equal(res2.tokens, res.tokens)


@pytest.mark.parametrize("kind", ["mistral", "llama3"])
def test_cached_decode_matches_recompute_sliding_window_bias_rope_scaling(tmp_path, kind):
    require_module("torch")
    from tests.models.hf_helpers import save_hf_model

    _, d = save_hf_model(kind, tmp_path / kind)
    config, params = load_config(d), load_params(d)
    prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6, 11], [3, 4], [10, 20, 30, 40, 50]]
    res = generate(params, None, prompts, config, max_new_tokens=10, return_logits=True)
    ids, mask = left_pad(prompts)
    ref = recompute_logits(params, None, ids, mask, res.tokens, config)
    np.testing.assert_allclose(res.logits, ref, atol=1e-5, rtol=1e-5)  # mistral: window 8 < 20 tokens


def test_quantized_equals_dense_dequantized(stories, prompt_ids):
    _, model = stories
    frozen, lora = quantize_model(model.params, QuantConfig(bits=2, group_size=32), LoraConfig(rank=4),
                                  key=jax.random.key(0))
    lora = random_lora(frozen, targets=lora.config.targets)
    q = generate(frozen, lora, prompt_ids, model.config, max_new_tokens=N, return_logits=True)
    dense = generate(dequantize_params(frozen), lora, prompt_ids, model.config, max_new_tokens=N,
                     return_logits=True)
    np.testing.assert_array_equal(q.tokens, dense.tokens)
    np.testing.assert_allclose(q.logits, dense.logits, atol=1e-4, rtol=1e-5)  # fused dequant-matmul vs dense dot
    plain = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N)
    assert not np.array_equal(q.tokens, plain.tokens)  # the 2-bit model really differs from the original


def test_sampling_is_seeded_and_top_k_top_p_limits(stories, prompt_ids):
    _, model = stories
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = generate(model.params, None, prompt_ids, model.config, seed=3, **kw)
    b = generate(model.params, None, prompt_ids, model.config, seed=3, **kw)
    c = generate(model.params, None, prompt_ids, model.config, seed=4, **kw)
    greedy = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy.tokens)
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):  # one token left: the greedy choice
        g = generate(model.params, None, prompt_ids, model.config, seed=5, **kw, **extra)
        np.testing.assert_array_equal(g.tokens, greedy.tokens)


def test_sample_logits_distribution_matches_reference():
    """Frequencies of 10000 draws vs the numpy top-k / top-p renormalised softmax (float64)."""
    logits = np.array([[2.0, 1.5, 1.0, 0.2, -1.0, 0.9]], np.float32)
    n = 10000
    keys = jax.random.split(jax.random.key(0), n)
    for top_k, top_p, t in ((0, 1.0, 0.7), (3, 1.0, 1.0), (0, 0.8, 1.0), (4, 0.9, 1.3)):
        draw = jax.jit(jax.vmap(lambda k, t, top_k, top_p: sample_logits(
            jnp.asarray(logits), k, temperature=t, top_k=top_k, top_p=top_p, greedy=False),
            in_axes=(0, None, None, None)))(keys, t, top_k, top_p)[:, 0]
        freq = np.bincount(np.asarray(draw), minlength=6) / n
        z = logits[0].astype(np.float64) / t
        order = np.argsort(-z)
        keep = np.zeros(6, bool)
        keep[order[: (top_k or 6)]] = True
        p = np.where(keep, np.exp(z - z.max()), 0)
        p /= p.sum()
        ps = p[order]
        cut = (np.cumsum(ps) - ps) < top_p
        keep2 = np.zeros(6, bool)
        keep2[order[cut]] = True
        p = np.where(keep2, p, 0)
        p /= p.sum()
        np.testing.assert_allclose(freq, p, atol=0.02)  # 4 standard errors (at most 0.005 each) at n = 10000
        assert (freq[p == 0] == 0).all()


def test_eos_stops_rows_and_pads(stories, prompt_ids):
    _, model = stories
    greedy = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N)
    eos = int(greedy.tokens[0, 2])  # pretend row 0's third token is the end
    res = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N, eos_token_id=eos, pad_token_id=0)
    row = res.tokens[0]
    assert row[2] == eos and (row[3:] == 0).all()
    for r in range(3):  # rows continue unchanged until they emit eos
        first = np.flatnonzero(greedy.tokens[r] == eos)
        n = first[0] + 1 if first.size else res.tokens.shape[1]
        np.testing.assert_array_equal(res.tokens[r, :n], greedy.tokens[r, :n])


def test_streaming_callback_sees_every_step(stories, prompt_ids):
    _, model = stories
    seen = []
    res = generate(model.params, None, prompt_ids, model.config, max_new_tokens=N, callback=seen.append)
    np.testing.assert_array_equal(np.stack(seen, axis=1), res.tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=600), "exceeds the model's max_position_embeddings 512"),
])
def test_bad_settings_are_named(stories, kwargs, match):
    _, model = stories
    with pytest.raises(ValueError, match=match):
        generate(model.params, None, [[1, 2]], model.config, **kwargs)


def test_bad_prompts_are_named(stories):
    _, model = stories
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model.params, None, [[1], []], model.config)
    with pytest.raises(ValueError, match="token id 999 is outside the vocabulary"):
        generate(model.params, None, [[1, 999]], model.config)
    with pytest.raises(ValueError, match="at least one prompt"):
        left_pad([])
