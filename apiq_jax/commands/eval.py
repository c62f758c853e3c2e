"""``apiq-jax eval``: perplexity of an HF or saved quantized model on token ids or text.

    apiq-jax eval --model DIR --data FILE [--seqlen N] [--batch-size N] [--dtype D]
        [--backend B] [--quiet]

Data is read by apiq_jax.data: ``.npy`` ``[n, seqlen]`` rows are scored one by one, 1-D
ids and ``.txt`` text (tokenized once with the model's tokenizer) are cut into
``--seqlen`` windows with the tail dropped. A progress bar over batches goes to stderr
(only on a terminal); the last stdout line is one JSON object with the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apiq_jax.commands.common import (
    DEFAULT_SEQLEN,
    add_backend_argument,
    add_mesh_arguments,
    command_mesh,
    compute_backend,
    load_token_data,
    print_json,
)
from apiq_jax.models.hf_io import DTYPES

NAME = "eval"
HELP = "perplexity of an HF or saved quantized model on token ids or text"
DESCRIPTION = """\
Perplexity of a model on token ids or raw text.

  apiq-jax eval --model DIR --data FILE [--seqlen N] [--batch-size N] [--dtype D]
      [--backend B] [--quiet]

--data takes token ids (.npy: [n, seqlen] rows scored one by one, or 1-D ids cut
into --seqlen windows) or raw text (.txt: tokenized once with the model's tokenizer,
cut into --seqlen windows, tail dropped). Prints one JSON object as the last line of
stdout; a progress bar over batches goes to stderr when it is a terminal.
"""
#: rows per forward pass when --batch-size is not given
DEFAULT_BATCH_SIZE = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax eval``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    p.add_argument("--model", required=True, help="HF model directory or saved quantized model directory")
    p.add_argument("--data", required=True, help="token ids (.npy) or raw text (.txt)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"window length for 1-D ids and text (default: min({DEFAULT_SEQLEN}, "
                        "max_position_embeddings)); must equal the row length for 2-D ids")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"rows per forward pass (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute (and storage) dtype: of the weights read from an HF model (default: its "
                        "torch_dtype), of the dequantized weights, embeddings and activations of a quantized "
                        "model (default: the dtype it was saved in); the loss is always float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_argument(p)
    add_mesh_arguments(p)


def load_eval_model(model_dir: Path, dtype: str | None) -> dict[str, Any]:
    """Load an HF or saved quantized model directory for scoring.

    Args:
        model_dir: HF model directory, or one written by ``save_quantized``.
        dtype: compute dtype (one of :data:`~apiq_jax.models.hf_io.DTYPES`), or None for the
            model's own.

    Returns:
        ``{"params", "config", "lora", "quantized"}``.

    Raises:
        FileNotFoundError: ``model_dir`` is missing or not a directory.
    """
    from apiq_jax.commands.outputs import check_finished
    from apiq_jax.models import is_quantized_dir, load_pretrained, load_quantized
    from apiq_jax.models.llama import cast_params

    if not model_dir.exists():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: not a directory (expected an HF or quantized model dir)")
    check_finished(model_dir)
    if is_quantized_dir(model_dir):
        frozen, lora, cfg, _ = load_quantized(model_dir)
        frozen = frozen if dtype is None else cast_params(frozen, dtype)
        return {"params": frozen, "config": cfg, "lora": lora, "quantized": True}
    model = load_pretrained(model_dir, dtype=dtype)
    return {"params": model.params, "config": model.config, "lora": None,
            "quantized": False}


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax eval``; prints the result JSON as the last stdout line.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.

    Raises:
        ValueError: a non-positive ``--batch-size``, a ``--seqlen`` below 2, and the
            model and data errors of :func:`load_eval_model` and
            :func:`~apiq_jax.commands.common.load_token_data`.
        FileNotFoundError: a missing model directory or data file.
    """
    from apiq_jax.evaluate import perplexity_ids

    mesh = command_mesh(args)  # first: jax.distributed starts before any computation
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size {args.batch_size} must be positive")
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen {args.seqlen} must be >= 2")
    model_dir = Path(args.model)
    m = load_eval_model(model_dir, args.dtype)
    ids = load_token_data(Path(args.data), "--data", model_dir=model_dir, seqlen=args.seqlen,
                          max_len=m["config"].max_position_embeddings, vocab_size=m["config"].vocab_size)
    backend, prepare = compute_backend(args.backend)
    res = perplexity_ids(
        prepare(m["params"]), ids, config=m["config"], lora=m["lora"], batch_size=args.batch_size,
        backend=backend, progress=not args.quiet, mesh=mesh,
    )
    print_json({
        "perplexity": res.perplexity,
        "mean_nll": res.mean_nll,
        "tokens": res.tokens,
        "windows": res.windows,
        "seqlen": res.seqlen,
        "seconds": round(res.seconds, 4),
        "model": str(model_dir),
        "data": str(args.data),
        "quantized": m["quantized"],
        "backend": backend,
    })
    return 0
