"""XLA's compiled memory of one ApiQ-bw block program at a given shape (nothing is run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def train_block_temp(hidden: int, mlp: int, heads: int, rank: int, samples: int, seqlen: int) -> tuple[int, int]:
    """Temporary bytes of ``train_block_bw`` (2 bits, group 64, one epoch, float32) on abstract shapes.

    Args:
      hidden, mlp, heads: the block's shape (head dim ``hidden // heads``).
      rank: the LoRA rank on all seven linears.
      samples, seqlen: the float32 caches ``[samples, seqlen, hidden]``.

    Returns:
      ``(temp bytes, bytes of the block's seven float32 weights)``.
    """
    import apiq_jax.calibration.apiq_bw_core as core
    from apiq_jax.calibration.options import ApiQOptions
    from apiq_jax.lora import LINEARS, LoraConfig, init_lora
    from apiq_jax.models import ModelConfig
    from apiq_jax.models.llama import layer_param_shapes
    from apiq_jax.quant import QuantConfig, init_clip

    cfg = ModelConfig("LlamaForCausalLM", 1000, hidden, mlp, 1, heads, heads, hidden // heads)
    qcfg = QuantConfig(bits=2, group_size=64)
    shapes = layer_param_shapes(cfg)
    layer = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    lora = init_lora({"layers": [{n: jnp.zeros(shapes[n]) for n in LINEARS}]}, LoraConfig(rank=rank),
                     jax.random.key(0))["layers"][0]
    train = {"clip": {n: init_clip(shapes[n], qcfg) for n in LINEARS}, "lora": lora}
    x = jax.ShapeDtypeStruct((samples, seqlen, hidden), jnp.float32)
    core.train_block_bw.clear_cache()
    compiled = core.train_block_bw.lower(layer, train, x, x, x, None, config=cfg, qcfg=qcfg,
                                         opts=ApiQOptions(epochs=1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes, sum(int(np.prod(shapes[n])) for n in LINEARS) * 4
