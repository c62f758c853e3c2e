"""Subprocess body of the interrupt-and-resume test: a small ApiQ run with a work directory.

``python -m tests.calibration.resume_worker WORK_DIR [--pause-after-block I]`` runs
:func:`tiny_setup` through ApiQ-bw; with ``--pause-after-block`` it sleeps after that
block's checkpoint is written, so the parent can SIGKILL it mid-run.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from apiq_jax.lora import LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import init_params
from apiq_jax.quant import QuantConfig

CFG = ModelConfig("LlamaForCausalLM", 64, 64, 96, 3, 4, 2, 16, tie_word_embeddings=False)
QCFG = QuantConfig(2, 32)
LCFG = LoraConfig(rank=4, alpha=8)
EPOCHS = 2


def tiny_setup() -> tuple[dict, np.ndarray]:
    """Params of a random 3-layer Llama (MLP width 96: padded last group at group 64) and ids [4, 16]."""
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.05)
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, size=(4, 16)).astype(np.int32)
    return params, ids


def run(work_dir, pause_after_block: int | None = None, lazy_result: bool = False, **options):
    """ApiQ-bw on :func:`tiny_setup` (``EPOCHS`` epochs; ``options`` override other ApiQOptions fields)."""
    from apiq_jax.calibration import ApiQOptions, apiq_bw

    params, ids = tiny_setup()

    def hook(i, report):
        if pause_after_block is not None and i == pause_after_block:
            print(f"block {i} checkpointed", flush=True)
            time.sleep(600)

    return apiq_bw(params, CFG, ids, QCFG, LCFG, key=jax.random.PRNGKey(1),
                   options=ApiQOptions(epochs=EPOCHS, **options), work_dir=work_dir, on_block_end=hook,
                   lazy_result=lazy_result)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("work_dir")
    ap.add_argument("--pause-after-block", type=int, default=None)
    a = ap.parse_args()
    run(a.work_dir, a.pause_after_block)
    print("finished", flush=True)
