"""A PyTorch ApiQ-bw block step, written from the algorithm in the design brief: the same-CPU peer.

The official ApiQ code is not vendored, so ``finetune_speed.py`` times this instead beside
apiq-jax's block program: one transformers ``LlamaDecoderLayer`` (SDPA attention) whose seven
linears compute ``x @ Q(W; gamma, beta)^T + (alpha / r) (x @ a) @ b`` with ApiQ's asymmetric
group quantizer (learnable clipping logits initialised to 4, round with a straight-through
gradient, the zero point without one), the loss ``mean((t1 - y)^2) + mean((t2 - y)^2)``
(``aug_loss``), and AdamW in two groups (LoRA lr 5e-4, logits lr 5e-3, weight decay 0.1), batch
1: what one ApiQ-bw step does in the reference PyTorch code; around the steps, the block's targets
(``F(x_fp; W)``, ``F(x_q; W)``), freezing ``Q(W)`` and propagating ``x_q``, as a whole block of
ApiQ-bw does. Run as a script it prints the median step time and the whole block's time per step
as JSON (a fresh process, so no other framework's threads run beside it):

    python benchmarks/torch_apiq_block.py [--samples 32] [--seqlen 256] [--epochs 2] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

#: the 6x256 shape of finetune_speed.py
HIDDEN, MLP, HEADS, KV_HEADS = 256, 768, 8, 4


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def fake_quantize(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """ApiQ's asymmetric group quantize-dequantize of ``w [out, in]`` with clipping logits ``[out, in // group]``.

    Args:
      w: the weight (``in`` a multiple of ``group``).
      gamma, beta: upper and lower clipping logits per group.
      bits: code bits.
      group: group size along ``in``.

    Returns:
      ``Q(w)`` with ``w``'s shape; gradients reach ``gamma`` and ``beta`` (and ``w`` straight through).
    """
    out, k = w.shape
    g = w.reshape(out, k // group, group)
    xmax = torch.sigmoid(gamma)[..., None] * g.amax(-1, keepdim=True)
    xmin = torch.sigmoid(beta)[..., None] * g.amin(-1, keepdim=True)
    s = ((xmax - xmin) / (2**bits - 1)).clamp(1e-5, 1e4)
    z = torch.round((-xmin / s).clamp(-1e4, 1e4)).detach()
    q = (round_ste(g / s) + z).clamp(0, 2**bits - 1)
    return ((q - z) * s).reshape(out, k)


class FakeQuantLoraLinear(torch.nn.Module):
    """A frozen weight, fake-quantized with learnable clipping, plus a LoRA term.

    ``mode`` (an attribute) picks what :meth:`forward` computes: "train" (``Q(W)`` recomputed, LoRA on),
    "dense" (``W`` alone: the targets) or "frozen" (the ``Q(W)`` stored by :meth:`freeze`, LoRA on).
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, bits: int = 2, group: int = 64):
        super().__init__()
        out, k = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.gamma = torch.nn.Parameter(torch.full((out, k // group), 4.0))
        self.beta = torch.nn.Parameter(torch.full((out, k // group), 4.0))
        bound = 1.0 / math.sqrt(k)
        self.a = torch.nn.Parameter(torch.empty(k, rank).uniform_(-bound, bound))
        self.b = torch.nn.Parameter(torch.zeros(rank, out))
        self.scale, self.bits, self.group = alpha / rank, bits, group
        self.mode, self.frozen = "train", None

    def freeze(self) -> None:
        """Store ``Q(W)`` once (the block is done) and compute with it from now on."""
        with torch.no_grad():
            self.frozen = fake_quantize(self.weight, self.gamma, self.beta, self.bits, self.group)
        self.mode = "frozen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return x @ self.weight.T
        wq = self.frozen if self.mode == "frozen" else fake_quantize(self.weight, self.gamma, self.beta, self.bits,
                                                                      self.group)
        return x @ wq.T + self.scale * (x @ self.a) @ self.b


def make_block(rank: int, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A random 6x256-shaped decoder layer with its seven linears fake-quantized, and its rotary embedding."""
    import transformers
    from transformers.models.llama import modeling_llama as ml

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, num_hidden_layers=1, vocab_size=512,
                                   max_position_embeddings=2048, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    layer = ml.LlamaDecoderLayer(cfg, layer_idx=0)
    for mod, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                       (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            setattr(mod, name, FakeQuantLoraLinear(getattr(mod, name).weight, rank, float(rank)))
    return layer, ml.LlamaRotaryEmbedding(cfg)


def calibrate_block(samples: int, seqlen: int, epochs: int, rank: int, warmup: int = 4) -> dict[str, Any]:
    """One ApiQ-bw block on random inputs, timed: targets, training steps, freezing and propagation.

    Args:
      samples: calibration samples (batch 1, fixed order).
      seqlen: tokens per sample.
      epochs: passes over the samples.
      rank: LoRA rank (alpha = rank).
      warmup: untimed training steps first (on a copy of the optimizer state's start: they train too).

    Returns:
      ``{"step_seconds": one duration per timed step (forward, both loss terms, backward, AdamW),
      "total_seconds": the whole block (targets F(x_fp; W) and F(x_q; W), the steps, freezing, propagating
      x_q), "steps": epochs x samples}``.
    """
    layer, rope = make_block(rank)
    linears = [m for m in layer.modules() if isinstance(m, FakeQuantLoraLinear)]
    x_fp, x_q = torch.randn(samples, 1, seqlen, HIDDEN), torch.randn(samples, 1, seqlen, HIDDEN)
    pos = torch.arange(seqlen)[None]
    cos_sin = rope(x_fp[0], pos)
    lora = [p for n, p in layer.named_parameters() if n.endswith((".a", ".b"))]
    clip = [p for n, p in layer.named_parameters() if n.endswith((".gamma", ".beta"))]
    opt = torch.optim.AdamW([{"params": lora, "lr": 5e-4}, {"params": clip, "lr": 5e-3}], weight_decay=0.1)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        return y[0] if isinstance(y, tuple) else y

    def set_mode(mode: str) -> None:
        for m in linears:
            m.mode = mode

    def step(i: int) -> None:
        y = run(x_q[i])
        loss = torch.mean((t1[i] - y) ** 2) + torch.mean((t2[i] - y) ** 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t1 = t2 = x_q  # placeholders for the warm-up steps
    for i in range(warmup):
        step(i % samples)
    start = time.perf_counter()
    set_mode("dense")
    with torch.no_grad():
        t1 = torch.stack([run(x) for x in x_fp])
        t2 = torch.stack([run(x) for x in x_q])
    set_mode("train")
    times = []
    for _ in range(epochs):
        for i in range(samples):
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
    for m in linears:
        m.freeze()
    with torch.no_grad():
        x_q = torch.stack([run(x) for x in x_q])
    return {"step_seconds": times, "total_seconds": time.perf_counter() - start, "steps": epochs * samples}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    res = calibrate_block(args.samples, args.seqlen, args.epochs, args.rank)
    times = sorted(res["step_seconds"])
    print(json.dumps({"median_ms": 1e3 * times[len(times) // 2], "mean_ms": 1e3 * sum(times) / len(times),
                      "total_ms_per_step": 1e3 * res["total_seconds"] / res["steps"],
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
