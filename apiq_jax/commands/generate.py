"""``apiq-jax generate``: text from an HF or saved quantized model, KV-cached, streamed.

    apiq-jax generate --model DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--dtype D] [--backend B]
        [--mesh data=D,fsdp=F] [--coordinator HOST:PORT --num-processes N --process-id I]

One prompt: its new text is printed to stdout as the tokens come. Several prompts run as
one left-padded batch and each completion is printed when the batch is done, after a
``[i]`` line. The last stdout line is one JSON object (completions, token counts, decode
tokens/s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from apiq_jax.commands.common import (
    add_backend_argument,
    add_mesh_arguments,
    command_mesh,
    compute_backend,
    print_json,
)
from apiq_jax.commands.eval import load_eval_model
from apiq_jax.models.hf_io import DTYPES

NAME = "generate"
HELP = "generate text from an HF or quantized model (KV cache, greedy or sampled, streamed)"
DESCRIPTION = """\
Generate text after one or more prompts with a KV cache (one compiled prefill, one
compiled decode step; quantized weights go through the low-bit matmul).

  apiq-jax generate --model DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
      [--temperature T] [--top-k K] [--top-p P] [--seed S] [--dtype D] [--backend B]
      [--mesh data=D,fsdp=F]

--model is an HF model directory or one written by `apiq-jax quantize`/`finetune` (its
LoRA is applied). --temperature 0 (the default) is greedy decoding. One prompt streams
its text to stdout as it is generated; several run as one left-padded batch and are
printed when done. The last stdout line is a JSON summary. With several devices the
prompts are split over the mesh's data axis (docs/scaling.md).
"""
#: new tokens per prompt when --max-new-tokens is not given
DEFAULT_MAX_NEW_TOKENS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax generate``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    p.add_argument("--model", required=True, help="HF model directory or saved quantized model directory")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text (repeat for a batch of prompts)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most new tokens per prompt (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling keys (default 0)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute dtype (default: the model's own)")
    add_backend_argument(p)
    add_mesh_arguments(p)


class _Streamer:
    """Prints the new text of one row as tokens arrive (decoding the whole row each time)."""

    def __init__(self, tokenizer, eos: set[int]) -> None:
        self.tokenizer, self.eos, self.ids, self.printed, self.ended = tokenizer, eos, [], "", False

    def __call__(self, tokens) -> None:
        if self.ended:
            return
        tok = int(tokens[0])
        if tok in self.eos:
            self.ended = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):  # wait for whole characters
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax generate``.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        ValueError: bad sampling settings (named), an empty prompt, a model without a
            tokenizer that transformers reads, prompt + new tokens beyond the model's length.
        FileNotFoundError: a missing model directory or tokenizer files.
    """
    from apiq_jax.data import load_tokenizer
    from apiq_jax.generation import generate

    mesh = command_mesh(args)  # first: jax.distributed starts before any computation
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 0 (0 keeps every token)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1]")
    model_dir = Path(args.model)
    m = load_eval_model(model_dir, args.dtype)
    tokenizer = load_tokenizer(model_dir)
    prompts = [list(tokenizer(text)["input_ids"]) for text in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise ValueError(f"--prompt {text!r} has no tokens")
    eos_cfg = m["config"].eos_token_id
    eos = {int(e) for e in ((eos_cfg,) if isinstance(eos_cfg, int) else (eos_cfg or ()))}
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    backend, prepare = compute_backend(args.backend)
    stream = _Streamer(tokenizer, eos) if len(prompts) == 1 else None
    if stream is not None:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    res = generate(prepare(m["params"]), m["lora"], prompts, m["config"], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=sorted(eos) or None, pad_token_id=pad, backend=backend, callback=stream,
                   mesh=mesh)
    seconds = time.perf_counter() - t0
    completions, counts = [], []
    for row in res.tokens:
        ids = [int(t) for t in row]
        ends = [j for j, t in enumerate(ids) if t in eos]
        ids = ids[: ends[0]] if ends else ids
        counts.append(len(ids))
        completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    if stream is not None:
        sys.stdout.write("\n")
    else:
        for i, (text, done) in enumerate(zip(args.prompt, completions)):
            print(f"[{i}]\n{text}{done}")
    steps = res.tokens.shape[1]
    print_json({
        "completions": completions,
        "new_tokens": counts,
        "seconds": round(seconds, 4),
        "decode_tokens_per_second": round(len(prompts) * (steps - 1) / res.decode_seconds, 2)
        if res.decode_seconds > 0 else None,
        "model": str(model_dir),
        "quantized": m["quantized"],
        "backend": backend,
        "devices": 1 if mesh is None else mesh.size,
    })
    return 0
