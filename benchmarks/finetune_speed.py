"""Finetuning step, forward pass and ApiQ-bw step time beside peft + transformers, same CPU, one run.

Models (the same weights in both frameworks: the random ones are written with
``save_pretrained`` and read by transformers):

- stories260K (skipped when ``--stories`` is absent): 5 layers x 64 wide, head_dim 8;
- "6x256": 6 layers, hidden 256, 8 heads / 4 KV heads, mlp 768, vocab 512 (random);
- "4x512": 4 layers, hidden 512, 8 heads, mlp 1376, vocab 32000 (random).

Finetuning step: LoRA rank 16 (alpha 16) on all seven linears, AdamW, clipping at 1.0, float32,
batch ``--batch`` x ``--seqlen`` tokens. apiq-jax runs its jitted step (``make_train_step``)
on the dense base and on a 2-bit packed base (group 64, the xla backend); the peer is peft
on transformers' ``LlamaForCausalLM`` (dense fp32 base, SDPA attention, ``torch`` with as
many threads as cores). The frameworks alternate ``--reps`` times after a warm-up; the
table shows medians. Forward: tokens/s of the jitted ``forward`` vs transformers under
``inference_mode``. ApiQ-bw: seconds per block step (a steady second run of ``apiq_bw`` on
the 6x256 shape, 2 bits, rank 16, batch 1, divided by layers x epochs x steps per epoch;
the block's training program alone and the whole run with its gradient-free passes), beside a
PyTorch peer timed in the same run (``torch_apiq_block.py``: the same block step written from the
design brief on a transformers decoder layer, median per step) and the official PyTorch code's
32.7 ms per step recorded on an earlier, slower VM (128 x 256 tokens). Each runs in a fresh
process (no other framework's threads beside it).

    python benchmarks/finetune_speed.py [--stories DIR] [--batch 8] [--seqlen 256] [--reps 5]
        [--calib-samples 32] [--skip-calibration]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax import training as T
from apiq_jax.lora import LINEARS, LoraConfig, init_lora
from apiq_jax.models import ModelConfig, forward, init_params, load_pretrained, quantize_model, save_pretrained
from apiq_jax.quant import QuantConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import add_model_arguments, interleaved_medians  # noqa: E402

#: the official ApiQ (PyTorch) block step on the 6x256 shape, 128 x 256 tokens, batch 1, rank 16, measured on
#: the VM of 2026-11 (slower than later ones: compare with the same-run PyTorch peer first)
OFFICIAL_MS_PER_STEP = 32.7
RANK = 16
forward_jit = jax.jit(forward, static_argnames="config")


def random_configs(vocab: int) -> dict[str, ModelConfig]:
    """The two random shapes of the table."""
    common = dict(rms_norm_eps=1e-5, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    return {
        "6x256": ModelConfig("LlamaForCausalLM", 512, 256, 768, 6, 8, 4, 32, **common),
        "4x512": ModelConfig("LlamaForCausalLM", vocab, 512, 1376, 4, 8, 8, 64, **common),
    }


def jax_steps(path: Path, ids: np.ndarray, batch: int) -> dict[str, Callable[[], Any]]:
    """Warmed-up apiq-jax finetuning steps (dense and 2-bit base) and the forward pass."""
    model = load_pretrained(path, dtype="float32")
    params, cfg = model.params, model.config
    fc = T.FinetuneConfig(batch_size=batch, max_grad_norm=1.0)
    opt = T.make_optimizer(fc)
    x = jnp.asarray(ids)
    lora_cfg = LoraConfig(rank=RANK, alpha=float(RANK))
    bases = {"dense": (params, init_lora(params, lora_cfg, jax.random.key(1)))}
    bases["2-bit"] = quantize_model(params, QuantConfig(bits=2, group_size=64), lora_cfg, key=jax.random.key(1))
    runs: dict[str, Callable[[], Any]] = {}
    for name, (frozen, lora) in bases.items():
        step = T.make_train_step(cfg, opt, backend="xla", finetune_config=fc)
        state = opt.init(lora)

        def run(step=step, frozen=frozen, lora=lora, state=state) -> Any:
            return jax.block_until_ready(step(frozen, lora, state, x))

        run()
        runs[f"step {name}"] = run

    def fwd() -> Any:
        return forward_jit(params, None, x, cfg).block_until_ready()

    fwd()
    runs["forward"] = fwd
    return runs


def torch_steps(path: Path, ids: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Warmed-up peft + transformers finetuning step (dense fp32 base) and forward pass."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    tx = torch.tensor(ids, dtype=torch.long)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def fwd() -> Any:
        with torch.inference_mode():
            return plain(tx).logits

    base = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                                      target_modules=list(LINEARS)))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)

    def step() -> Any:
        loss = model(input_ids=tx, labels=tx).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()
    fwd()
    return {"step dense": step, "forward": fwd}


_CALIBRATION_CHILD = r"""
import json, sys, time
import jax, numpy as np
import apiq_jax.calibration.apiq_bw_core as core
from apiq_jax.calibration import ApiQOptions, apiq_bw
from apiq_jax.lora import LoraConfig
from apiq_jax.models import ModelConfig, init_params
from apiq_jax.quant import QuantConfig
n, seqlen, epochs, rank = (int(a) for a in sys.argv[1:5])
cfg = ModelConfig("LlamaForCausalLM", 512, 256, 768, 6, 8, 4, 32, rms_norm_eps=1e-5, max_position_embeddings=2048)
params = init_params(cfg, jax.random.key(0))
ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (n, seqlen)).astype(np.int32)
train_seconds = []
inner = core.train_block_bw

def timed(*args, **kwargs):  # the block's training program alone, waited for
    t = time.perf_counter()
    out = jax.block_until_ready(inner(*args, **kwargs))
    train_seconds.append(time.perf_counter() - t)
    return out

sys.modules["apiq_jax.calibration.apiq_bw"].train_block_bw = timed
for _ in range(2):  # the first run compiles
    train_seconds.clear()
    t = time.perf_counter()
    apiq_bw(params, cfg, ids, QuantConfig(bits=2, group_size=64), LoraConfig(rank=rank, alpha=float(rank)),
            key=jax.random.key(0), options=ApiQOptions(epochs=epochs))
    total = time.perf_counter() - t
steps = cfg.num_hidden_layers * epochs * n
print(json.dumps({"train_ms": 1e3 * sum(train_seconds) / steps, "total_ms": 1e3 * total / steps}))
"""


def calibration_ms_per_step(nsamples: int, seqlen: int, epochs: int) -> dict[str, float]:
    """ms per ApiQ-bw block step on the 6x256 shape (2 bits, rank 16, batch 1), in a fresh process.

    Returns:
      ``{"train_ms": the compiled block-training program per step, "total_ms": the whole steady
      run (targets, errors, propagation and freezing included) per step}``.
    """
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CALIBRATION_CHILD, str(nsamples), str(seqlen), str(epochs),
                          str(RANK)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_peer_ms_per_step(nsamples: int, seqlen: int, epochs: int) -> dict[str, float]:
    """ms per ApiQ-bw block step of the PyTorch peer (``torch_apiq_block.py``), in a fresh process.

    Returns:
      ``{"train_ms": the median training step, "total_ms": the whole block (targets, steps, freezing,
      propagation) per step}``.
    """
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(HERE / "torch_apiq_block.py"), "--samples", str(nsamples),
                          "--seqlen", str(seqlen), "--epochs", str(epochs), "--rank", str(RANK)],
                         check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"train_ms": res["median_ms"], "total_ms": res["total_ms_per_step"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, reps=5, reps_help="timed rounds after the warm-up (medians)",
                        stories_help="stories260K HF directory (rows skipped when absent)",
                        vocab_help="vocab of the 4x512 model")
    parser.add_argument("--calib-samples", type=int, default=32, help="ApiQ-bw samples of 256 tokens")
    parser.add_argument("--calib-epochs", type=int, default=2)
    parser.add_argument("--skip-calibration", action="store_true")
    args = parser.parse_args(argv)

    import torch

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        if (args.stories / "config.json").is_file():
            models.append(("stories260K", args.stories))
        else:
            print(f"# stories260K not found at {args.stories}: rows skipped")
        for name, cfg in random_configs(args.vocab).items():
            models.append((name, save_pretrained(init_params(cfg, jax.random.key(0)), Path(tmp) / name, cfg)))
        for name, path in models:
            vocab = load_pretrained(path, dtype="float32").config.vocab_size
            ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seqlen)).astype(np.int32)
            print(f"# {name}: compiling and warming up", flush=True)
            jax_runs, torch_runs = jax_steps(path, ids, args.batch), torch_steps(path, ids)
            runs = {f"jax {k}": v for k, v in jax_runs.items()} | {f"torch {k}": v for k, v in torch_runs.items()}
            med = interleaved_medians(runs, args.reps)  # the two frameworks alternating
            table.append((name, med))
            print(f"# {name}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in med.items()), flush=True)

    calib = peer_ms = None
    if not args.skip_calibration:
        calib = calibration_ms_per_step(args.calib_samples, 256, args.calib_epochs)
        peer_ms = torch_peer_ms_per_step(args.calib_samples, 256, args.calib_epochs)

    print()
    print(f"CPU: {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {args.batch} x {args.seqlen} tokens, LoRA r={RANK} on "
          f"all seven linears, AdamW, float32; medians of {args.reps} alternating rounds")
    print()
    print("| model | apiq-jax step, dense base ms | apiq-jax step, 2-bit base ms | peft + transformers step ms "
          "| dense / peft | 2-bit / peft | apiq-jax forward tok/s | transformers forward tok/s | forward ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    tokens = args.batch * args.seqlen
    for name, m in table:
        peer = m["torch step dense"]
        print(f"| {name} | {1e3 * m['jax step dense']:.0f} | {1e3 * m['jax step 2-bit']:.0f} | {1e3 * peer:.0f} "
              f"| {m['jax step dense'] / peer:.2f}x | {m['jax step 2-bit'] / peer:.2f}x "
              f"| {tokens / m['jax forward']:.0f} | {tokens / m['torch forward']:.0f} "
              f"| {m['torch forward'] / m['jax forward']:.2f}x |")
    if calib is not None:
        print()
        print(f"ApiQ-bw on 6x256 ({args.calib_samples} x 256 tokens, batch 1, rank {RANK}, {args.calib_epochs} "
              f"epoch(s), fresh processes), per block step; the PyTorch peer (torch_apiq_block.py) in the same "
              f"run; the official PyTorch code's {OFFICIAL_MS_PER_STEP} ms recorded on an earlier VM:")
        print()
        print("| what | apiq-jax ms per step | PyTorch peer ms per step | vs peer | vs official (earlier VM) |")
        print("|---|---|---|---|---|")
        for key, what in (("train_ms", "training step (block program / median step)"),
                          ("total_ms", "whole block (targets, steps, freezing, propagation)")):
            print(f"| {what} | {calib[key]:.1f} | {peer_ms[key]:.1f} | {calib[key] / peer_ms[key]:.2f}x | "
                  f"{calib[key] / OFFICIAL_MS_PER_STEP:.2f}x |")


if __name__ == "__main__":
    main()
