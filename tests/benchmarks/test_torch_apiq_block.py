"""The PyTorch ApiQ-bw peer of finetune_speed.py computes ApiQ's quantizer (against apiq_jax's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from apiq_jax.quant import ClipLogits, QuantConfig, fake_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("torch_apiq_block", ROOT / "benchmarks" / "torch_apiq_block.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_apiq_block"] = module
    spec.loader.exec_module(module)
    return module


def test_fake_quantize_and_its_gradients_match_apiq_jax(peer):
    r = np.random.default_rng(0)
    w = r.standard_normal((24, 128)).astype(np.float32)
    gamma, beta = (r.normal(2.0, 1.5, (24, 2)).astype(np.float32) for _ in range(2))
    ct = r.standard_normal(w.shape).astype(np.float32)
    cfg = QuantConfig(bits=2, group_size=64, scale_dtype="float32")  # the peer keeps float32 scales

    def jax_loss(g, b):
        return jnp.sum(fake_quantize(jnp.asarray(w), cfg, clip=ClipLogits(g, b)) * ct)

    ours = np.asarray(fake_quantize(jnp.asarray(w), cfg, clip=ClipLogits(jnp.asarray(gamma), jnp.asarray(beta))))
    jg, jb = jax.grad(jax_loss, (0, 1))(jnp.asarray(gamma), jnp.asarray(beta))
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    theirs = peer.fake_quantize(torch.tensor(w), tg, tb, bits=2, group=64)
    (theirs * torch.tensor(ct)).sum().backward()
    assert len(np.unique(ours)) > 8  # 4 levels per group, several groups
    np.testing.assert_allclose(theirs.detach().numpy(), ours, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tg.grad.numpy(), np.asarray(jg), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(tb.grad.numpy(), np.asarray(jb), atol=1e-4, rtol=1e-4)


def test_block_has_seven_fake_quantized_linears_and_steps(peer):
    layer, _ = peer.make_block(rank=4)
    linears = [m for m in layer.modules() if isinstance(m, peer.FakeQuantLoraLinear)]
    assert len(linears) == 7 and {tuple(m.a.shape) for m in linears} >= {(256, 4), (768, 4)}
    res = peer.calibrate_block(samples=2, seqlen=16, epochs=2, rank=4, warmup=1)
    assert res["steps"] == 4 and len(res["step_seconds"]) == 4
    assert res["total_seconds"] > sum(res["step_seconds"]) > 0  # the targets and the propagation around the steps


def test_modes_dense_train_frozen(peer):
    """"dense" is W alone; "frozen" stores exactly the Q(W) that "train" recomputes."""
    torch.manual_seed(0)
    m = peer.FakeQuantLoraLinear(torch.randn(32, 64), rank=4, alpha=4.0)
    torch.nn.init.normal_(m.b)
    x = torch.randn(3, 64)
    m.mode = "dense"
    torch.testing.assert_close(m(x), x @ m.weight.T)
    m.mode = "train"
    trained = m(x)
    m.freeze()
    torch.testing.assert_close(m(x), trained)
    assert m.mode == "frozen" and not torch.allclose(trained, x @ m.weight.T, atol=1e-3)
