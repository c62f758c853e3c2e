"""``apiq-jax`` command line: a thin dispatcher over subcommands.

Each subcommand is a ``_register_<name>(subparsers)`` function that adds its parser and
sets ``func`` to the function running it; :data:`_COMMANDS` lists them in one place. A
runner returns the process exit code. Errors a user can fix (bad paths, bad inputs) are
raised as ValueError / FileNotFoundError and reported as one ``apiq-jax <cmd>: error:``
line on stderr with exit code 2.

    apiq-jax eval --model DIR --data FILE [--seqlen N] [--batch-size N]
    apiq-jax quantize --model HF_DIR --method M --bits B --calib FILE --out OUT
    apiq-jax finetune --model QUANT_DIR --data FILE --out OUT [--steps N]
    apiq-jax demo [--fast]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

DEFAULT_SEQLEN = 2048
DATA_SUFFIXES = (".npy", ".txt")


# --- eval ---------------------------------------------------------------------------------
def _register_eval(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity of an HF or saved quantized model on token ids or text",
        description=(
            "Perplexity of a model on token ids (.npy: [n, seqlen] rows scored one by one, or "
            "1-D ids cut into seqlen windows) or raw text (.txt: tokenized once with the "
            "model's tokenizer, cut into seqlen windows, tail dropped). Prints one JSON "
            "object as the last line of stdout."
        ),
    )
    p.add_argument("--model", required=True, help="HF model directory or saved quantized model directory")
    p.add_argument("--data", required=True, help="token ids (.npy) or raw text (.txt)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"window length for 1-D ids and text (default: min({DEFAULT_SEQLEN}, "
                        "max_position_embeddings)); must equal the row length for 2-D ids")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype for HF models (default float32)")
    add_backend_argument(p)
    p.set_defaults(func=_run_eval)


def _load_eval_model(model_dir: Path, dtype: str) -> dict[str, Any]:
    from apiq_jax.models import is_quantized_dir, load_pretrained, load_quantized

    if not model_dir.exists():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: not a directory (expected an HF or quantized model dir)")
    if is_quantized_dir(model_dir):
        frozen, lora, cfg, lora_cfg, _ = load_quantized(model_dir)
        scale = 1.0 if lora_cfg is None else lora_cfg.scale
        return {"params": frozen, "config": cfg, "lora": lora, "lora_scale": scale, "quantized": True}
    model = load_pretrained(model_dir, dtype=dtype)
    return {"params": model.params, "config": model.config, "lora": None, "lora_scale": 1.0,
            "quantized": False}


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """``--backend`` of the commands that run a quantized model."""
    p.add_argument("--backend", default=None, choices=("auto", "pallas", "xla", "interpret"),
                   help="low-bit matmul backend for quantized weights (default: $APIQ_QMATMUL_BACKEND or "
                        "auto = Pallas kernels on GPU/TPU, XLA on CPU)")


@contextlib.contextmanager
def compute_backend(name: str | None) -> Iterator[tuple[str, Callable[[Any], Any]]]:
    """Run the block with qmatmul backend ``name``; yields (resolved name, params preparer).

    The preparer lays quantized weights out for the kernels once when the Pallas kernels
    run (:func:`apiq_jax.qmatmul.prepare_params`) and is the identity otherwise.
    """
    import jax

    from apiq_jax.qmatmul import (
        default_backend,
        prepare_params,
        resolve_backend,
        use_backend,
    )

    with use_backend(name or default_backend()):
        resolved = resolve_backend(None)
        jax.clear_caches()  # the backend is fixed at trace time: no cached trace of another one
        yield resolved, (prepare_params if resolved == "pallas" else (lambda params: params))


def check_data_file(path: Path, flag: str) -> str:
    """The lower-case suffix of an existing ``.npy``/``.txt`` data file; clear errors otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(
            f"{flag} {path}: unsupported file type {suffix or '(none)'!r}; accepted: "
            ".npy (int token ids, [n, seqlen] or 1-D) or .txt (raw text)"
        )
    return suffix


def load_int_npy(path: Path, flag: str) -> Any:
    """An integer ``.npy`` array (token ids); ValueError naming ``flag`` and the file otherwise."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag} {path}: cannot read as a .npy array: {e}") from e
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{flag} {path}: token ids must be integers, got dtype {arr.dtype}")
    return arr


def load_token_data(data: Path, model_dir: Path, seqlen: int | None, max_len: int) -> Any:
    """Token windows ``[n, seqlen]`` from ``.npy`` ids or ``.txt`` text (tokenized with ``model_dir``'s tokenizer)."""
    suffix = check_data_file(data, "--data")
    window = seqlen if seqlen is not None else min(DEFAULT_SEQLEN, max_len)
    if suffix == ".txt":
        from apiq_jax.evaluate import text_to_windows
        from apiq_jax.models import load_tokenizer

        text = data.read_text(encoding="utf-8")
        return text_to_windows(text, load_tokenizer(model_dir), window)
    arr = load_int_npy(data, "--data")
    if arr.ndim == 1:
        from apiq_jax.evaluate import windows

        return windows(arr, window)
    if arr.ndim != 2:
        raise ValueError(f"--data {data}: expected [n, seqlen] or 1-D ids, got shape {arr.shape}")
    if seqlen is not None and seqlen != arr.shape[1]:
        raise ValueError(
            f"--seqlen {seqlen} differs from the row length {arr.shape[1]} of {data}; omit --seqlen "
            "for 2-D ids"
        )
    return arr


def _run_eval(args: argparse.Namespace) -> int:
    from apiq_jax.evaluate import perplexity_ids

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size {args.batch_size} must be positive")
    if args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen {args.seqlen} must be >= 2")
    model_dir = Path(args.model)
    m = _load_eval_model(model_dir, args.dtype)
    ids = load_token_data(Path(args.data), model_dir, args.seqlen, m["config"].max_position_embeddings)
    with compute_backend(args.backend) as (backend, prepare):
        res = perplexity_ids(
            prepare(m["params"]), ids, config=m["config"], lora=m["lora"], lora_scale=m["lora_scale"],
            batch_size=args.batch_size,
        )
    out = {
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
    }
    print(json.dumps(out))
    return 0


# --- quantize / finetune / demo (logic in apiq_jax.commands) --------------------------------
#: subcommand -> one-line help; each has a module apiq_jax.commands.<name> with
#: ``add_arguments(parser)`` and ``run(args) -> int`` and its usage as the module docstring
_MODULE_COMMANDS = {
    "quantize": "calibrate an HF model (apiq-bw, apiq-lw, loftq, qlora, rtn, gptq) and save it",
    "finetune": "train the LoRA factors of a saved quantized model (resumable)",
    "demo": "offline demo: 2-bit quantization of the bundled model with every method",
}


def _register_module_commands(subparsers: Any) -> None:
    import importlib

    for name, help_text in _MODULE_COMMANDS.items():
        module = importlib.import_module(f"apiq_jax.commands.{name}")
        p = subparsers.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


# --- dispatcher ---------------------------------------------------------------------------
_COMMANDS: list[Callable[[Any], None]] = [_register_eval, _register_module_commands]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="apiq-jax", description="ApiQ in JAX: quantize, finetune and evaluate low-bit LLMs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apiq-jax`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"apiq-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
