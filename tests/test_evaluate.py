"""Perplexity protocols, per-block activation error and the KL divergence to the full-precision model."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apiq_jax.data import split_windows, tokenize
from apiq_jax.evaluate import (
    PerplexityResult,
    activation_errors,
    block_outputs,
    kl_divergence,
    perplexity,
    perplexity_ids,
    relative_error,
)
from apiq_jax.lora import LoraConfig
from apiq_jax.models import final_logits, forward, load_pretrained, load_tokenizer, quantize_model
from apiq_jax.quant import QuantConfig
from tests.conftest import require_module, require_shared


@pytest.fixture(scope="module")
def stories():
    path = require_shared("models", "stories260K")
    return path, load_pretrained(path)


def test_stories260k_eval_ppl_reproduces_reference(stories):
    _, model = stories
    data = require_shared("data", "tinystories260K")
    ref = json.loads((data / "ppl.json").read_text())["eval.npy"]
    res = perplexity_ids(model, np.load(data / "eval.npy"), batch_size=25)
    assert isinstance(res, PerplexityResult)
    assert (res.windows, res.tokens, res.seqlen) == (125, ref["predicted_tokens"], 256)
    assert round(res.perplexity, 4) == 3.8281
    assert abs(res.perplexity / ref["ppl"] - 1) < 1e-5
    assert abs(res.mean_nll - ref["mean_nll"]) < 1e-5
    assert float(res) == res.perplexity and res.seconds > 0


def test_batch_padding_does_not_change_the_result(stories):
    _, model = stories
    ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:10, :64]
    a = perplexity_ids(model, ids, batch_size=10)
    b = perplexity_ids(model, ids, batch_size=4)  # 4 + 4 + 2 (padded with zero-weight rows)
    assert abs(a.mean_nll - b.mean_nll) < 1e-6 and a.tokens == b.tokens == 10 * 63


def test_text_protocol_matches_torch(stories):
    torch = require_module("torch")
    import transformers

    path, model = stories
    tok = load_tokenizer(path)
    text = (require_shared("data", "tinystories260K", "stories.txt")).read_text()[:6000]
    n_tokens = len(tok(text)["input_ids"])
    res = perplexity(model, text, tok, seqlen=128, batch_size=4)
    assert res.windows == n_tokens // 128 and res.tokens == res.windows * 127
    win = split_windows(tokenize(text, tok), 128)
    assert win[0, 0] == 1  # tokenized once: one BOS at the very start
    assert (win[1:, 0] == 1).sum() < win.shape[0] - 1  # later windows start wherever the cut falls
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor(win, dtype=torch.long)
        logits = hf(x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert abs(res.perplexity / math.exp(float(nll)) - 1) < 1e-4


def test_input_errors(stories):
    _, model = stories
    flat = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:3].ravel()
    one_d = perplexity_ids(model, flat, seqlen=256)
    assert one_d.windows == 3
    with pytest.raises(ValueError, match="need seqlen"):
        perplexity_ids(model, flat)
    with pytest.raises(ValueError, match=r"token id 512 at position \(1, 1\).*0 <= id < 512"):
        perplexity_ids(model, np.array([[1, 2, 3], [4, 512, 5]]))
    with pytest.raises(ValueError, match="integers"):
        perplexity_ids(model, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="config= is required"):
        perplexity_ids(model.params, np.ones((1, 4), np.int32))


def test_block_outputs_and_activation_error(stories):
    _, model = stories
    cfg, params = model.config, model.params
    ids = jnp.asarray(np.load(require_shared("data", "tinystories260K", "eval.npy"))[:2, :64])
    outs = block_outputs(params, ids, config=cfg)
    assert len(outs) == cfg.num_hidden_layers and outs[0].shape == (2, 64, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(final_logits(params, outs[-1], cfg)),
                               np.asarray(jax.jit(forward, static_argnames="config")(params, None, ids, cfg)), atol=1e-5)
    assert activation_errors(model, model, ids) == [0.0] * cfg.num_hidden_layers
    lcfg = LoraConfig(rank=4, alpha=8)
    errs = {}
    for bits in (2, 4):
        frozen, lora = quantize_model(params, QuantConfig(bits=bits, group_size=64), lcfg, key=jax.random.key(0))
        errs[bits] = activation_errors(model, frozen, ids, lora=lora, batch_size=1)
    assert all(0 < e4 < e2 for e4, e2 in zip(errs[4], errs[2]))
    x = outs[2]
    q_outs = block_outputs(frozen, ids, config=cfg, lora=lora)
    assert abs(relative_error(x, q_outs[2]) - errs[4][2]) < 1e-4 * errs[4][2] + 1e-9


def test_kl_divergence_against_float64_from_torch_logits(stories):
    """KL(p_fp || p_q) against float64 numpy on transformers' PyTorch logits (the reference) and the
    quantized model's logits; zero for the model itself; larger at 2 bits than at 4; batch-invariant."""
    torch = require_module("torch")
    import transformers

    path, model = stories
    cfg, params = model.config, model.params
    ids = np.load(require_shared("data", "tinystories260K", "eval.npy"))[:3, :48]
    assert kl_divergence(model, model, ids) == 0.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = hf(torch.tensor(ids, dtype=torch.long)).logits[:, :-1].double().numpy()
    lcfg = LoraConfig(rank=4, alpha=8)
    kls = {}
    for bits in (2, 4):
        frozen, lora = quantize_model(params, QuantConfig(bits=bits, group_size=64), lcfg, key=jax.random.key(0))
        kls[bits] = kl_divergence(model, frozen, ids, lora=lora, batch_size=2)  # batches of 2 + 1
        q_logits = np.asarray(forward(frozen, lora, jnp.asarray(ids), cfg), np.float64)[:, :-1]

        def log_softmax(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
        ref = float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
        assert abs(kls[bits] - ref) < 1e-3 * ref + 1e-6
        assert abs(kl_divergence(model, frozen, ids, lora=lora, batch_size=3) - kls[bits]) < 1e-6 * kls[bits]
    assert 0 < kls[4] < kls[2]
    with pytest.raises(ValueError, match="batch_size=0"):
        kl_divergence(model, model, ids, batch_size=0)
