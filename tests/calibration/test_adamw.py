"""The torch-exact AdamW (apiq_jax/calibration/adamw.py): one step against torch.optim.AdamW on the
recorded ApiQ-bw loss, accurate bias corrections, and the epoch loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apiq_jax.calibration.adamw import _one_minus_pow, make_optimizer, run_epochs
from apiq_jax.calibration.apiq_bw_core import bw_block_loss
from apiq_jax.calibration.options import ApiQOptions
from tests.calibration.conftest import golden_start_state
from tests.conftest import require_module


def test_one_adamw_step_matches_torch(golden):
    """Our two-group optax AdamW step equals torch.optim.AdamW's step (float32 rounding)."""
    torch = require_module("torch")
    G = golden
    g, cfg = G["g"], G["cfg"]
    train = golden_start_state(G, 0)
    layer = G["params"]["layers"][0]
    args = (jnp.asarray(g["block0/quant_in"][:1]), jnp.asarray(g["block0/fp_target"][:1]),
            jnp.asarray(g["block0/fp2_target"][:1]), cfg, G["qcfg"])
    opt = make_optimizer(G["opts"])
    state = opt.init(train)
    ours = train
    tparams = jax.tree.map(lambda v: torch.tensor(np.array(v), requires_grad=True), train)
    topt = torch.optim.AdamW([
        {"params": jax.tree.leaves(tparams["clip"]), "lr": G["opts"].clip_lr, "weight_decay": 0.1},
        {"params": jax.tree.leaves(tparams["lora"]), "lr": G["opts"].lora_lr, "weight_decay": 0.1},
    ])
    worst = 0.0
    for _ in range(4):  # same gradient fed to both, so the moments build up identically
        grads = jax.grad(lambda t: bw_block_loss(t, layer, *args)[0])(ours)
        updates, state = opt.update(grads, state, ours)
        new = optax.apply_updates(ours, updates)
        for p, gr in zip(jax.tree.leaves(tparams), jax.tree.leaves(grads)):
            p.grad = torch.tensor(np.asarray(gr))
        topt.step()
        for a, b, p0 in zip(jax.tree.leaves(new), jax.tree.leaves(tparams), jax.tree.leaves(ours)):
            a, b, p0 = np.asarray(a), b.detach().numpy(), np.asarray(p0)
            # rounding of p, of the step, and of the difference itself
            ulp = np.spacing(np.maximum(np.abs(p0), np.abs(b))) + np.spacing(np.abs(b - p0))
            worst = max(worst, float((np.abs(a - b) / ulp).max()))
            b[...] = a  # continue both from the same point
        ours = new
    assert worst <= 8, f"optax vs torch AdamW: {worst} ulp"  # measured: 3.5


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_bias_correction_is_accurate_to_float32(decay):
    steps = jnp.arange(1, 2001)
    ours = np.asarray(_one_minus_pow(decay, steps), np.float64)
    exact = 1.0 - decay ** np.arange(1, 2001, dtype=np.float64)
    np.testing.assert_allclose(ours, exact, rtol=1e-6)  # measured 1.2e-7 (0.9), 3.3e-7 (0.999)
    if decay == 0.999:  # 0.999 is not a float32: the naive power is 2.0e-5 off (measured)
        naive = np.asarray(1.0 - jnp.float32(decay) ** steps.astype(jnp.float32), np.float64)
        assert np.abs(naive / exact - 1).max() > 1e-5


def test_run_epochs_scans_batches_in_order():
    """Plain SGD-like check: the losses come back [epochs, batches], each taken before its step."""
    opts = ApiQOptions(epochs=3, lora_lr=0.1, clip_lr=0.1, lora_weight_decay=0.0, clip_weight_decay=0.0)
    train0 = {"clip": {"w": jnp.ones(2)}, "lora": {"w": jnp.ones(2)}}
    batches = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))

    def loss_fn(train, batch):
        loss = jnp.sum((train["clip"]["w"] - batch) ** 2) + jnp.sum(train["lora"]["w"] ** 2)
        return loss, loss[None]

    train, losses, terms = jax.jit(lambda t, b: run_epochs(loss_fn, t, b, opts))(train0, batches)
    assert losses.shape == (3, 4) and terms.shape == (3, 4, 1)
    np.testing.assert_allclose(float(losses[0, 0]), float(loss_fn(train0, batches[0])[0]), rtol=1e-6)
    assert float(losses[-1].mean()) < float(losses[0].mean())
