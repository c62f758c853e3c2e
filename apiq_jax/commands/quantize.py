"""``apiq-jax quantize``: calibrate a Hugging Face model with one method and save it.

    apiq-jax quantize --model HF_DIR --method {apiq-bw,apiq-lw,loftq,cloq,qlora,rtn,gptq}
        --bits {2,3,4} --group-size N --rank R --alpha A --calib FILE
        [--epochs E] [--seed S] [--nsamples N --seqlen L] [--scheme S] [--num-iter T]
        [--lora-init {default,loftq,cloq}]
        --out OUT

See :data:`DESCRIPTION` (the ``--help`` text) for the data and output formats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from apiq_jax.calibration import LORA_INITS, METHODS, ApiQOptions, get_method
from apiq_jax.commands.common import (
    DEFAULT_SEQLEN,
    add_mesh_arguments,
    check_method_options,
    check_seqlen,
    command_mesh,
    field_default,
    print_json,
    return_freed_host_memory,
    trim_host_memory,
    unwise_option_warnings,
    warn,
)
from apiq_jax.models.hf_io import DTYPES
from apiq_jax.models.safetensors_io import parse_size
from apiq_jax.quant.config import SCHEMES

_NAMES = ",".join(METHODS)
_BITS = ",".join(str(b) for b in sorted({b for s in METHODS.values() for b in s.bits}))
NAME = "quantize"
HELP = f"calibrate an HF model ({', '.join(METHODS)}) and save it"
DESCRIPTION = f"""\
Calibrate a Hugging Face model with one method and save it.

  apiq-jax quantize --model HF_DIR --method {{{_NAMES}}}
      --bits {{{_BITS}}} --group-size N --rank R --alpha A --calib FILE
      [--epochs E] [--seed S] [--nsamples N --seqlen L] [--scheme S] [--num-iter T]
      --out OUT

--calib takes token ids (.npy: [n, seqlen] rows used in order, or a 1-D stream
from which windows are drawn) or text (.txt: tokenized once with the model's
tokenizer). Windows of --seqlen tokens are drawn at random positions with --seed.
ApiQ runs checkpoint every finished block under OUT/calibration_work: re-running an
interrupted command with the same arguments continues after the last finished block.
OUT is written with apiq_jax.models.save_quantized (bit-packed frozen weights, LoRA
factors, metadata JSON, tokenizer files) plus the calibration report (report.json,
report.png); apiq-jax eval --model OUT reads it. The last stdout line is one JSON
object with the run's summary. OUT is refused when it is, lies in or holds --model,
already holds a finished model, or is a non-empty directory of something else
(--overwrite allows the last two); it is locked while the command runs and marked
finished only by the run's last write (OUT/.apiq-jax-run.json). Ctrl-C exits with
status 130 and says from which block a re-run resumes.
"""

#: calibration windows drawn from text / 1-D ids when --nsamples is not given
DEFAULT_NSAMPLES = 128
#: per-block checkpoints of an ApiQ run inside --out; removed once the model is saved
WORK_SUBDIR = "calibration_work"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``apiq-jax quantize``.

    Args:
        p: the subcommand's parser.

    Returns:
        None; the arguments are added to ``p``.
    """
    epochs = field_default(ApiQOptions, "epochs")
    loftq = get_method("loftq")
    nf_default = [n for n, spec in METHODS.items() if spec.default_scheme == "nf"]
    p.add_argument("--model", required=True, help="Hugging Face model directory (full precision)")
    p.add_argument("--method", required=True, help=f"calibration method: one of {', '.join(METHODS)}")
    p.add_argument("--bits", required=True, type=int, help=f"weight bits ({_BITS.replace(',', ', ')})")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size along the input (default 64)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the LoRA term is scaled by alpha/r (default 16)")
    p.add_argument("--calib", required=True, help="calibration data: token ids (.npy) or text (.txt)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"ApiQ epochs per block/layer (default {epochs}; {_training()} only)")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling and LoRA init (default 0)")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {DEFAULT_NSAMPLES})")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default min({DEFAULT_SEQLEN}, max_position_embeddings); "
                        "2-D .npy ids: their row length)")
    p.add_argument("--scheme", default=None, choices=SCHEMES,
                   help="quantizer: asym (zero point), sym (absmax) or nf (NormalFloat; with apiq-bw/apiq-lw "
                        "the learned clipping shrinks each group's absmax); default nf for "
                        f"{'/'.join(nf_default)}, asym otherwise")
    p.add_argument("--num-iter", type=int, default=None,
                   help=f"LoftQ alternations (default {loftq.options['num_iter']}, as loftq_init; loftq only; "
                        f"apiq-jax demo runs {loftq.compare_options['num_iter']})")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="storage dtype of the weights while calibrating and of the saved embeddings, norms and "
                        "head (default: the checkpoint's torch_dtype). The model is read one block at a time "
                        "(never whole); each block computes in float32")
    p.add_argument("--cache-dtype", default=None, choices=DTYPES,
                   help="dtype of the [nsamples, seqlen, hidden] activation caches of ApiQ (default: --dtype); "
                        "float32 is exact, 16-bit halves their memory")
    p.add_argument("--offload-activations", action="store_true",
                   help="apiq-bw: keep the [nsamples, seqlen, hidden] activation caches in host memory and stream "
                        "them to the accelerator a batch at a time, for caches larger than its memory (same "
                        "result; slower by the transfers)")
    p.add_argument("--lora-init", default=None, choices=LORA_INITS,
                   help="apiq-bw/apiq-lw: where each block's LoRA starts: default (the reference's QLoRA init), "
                        "loftq or cloq (fitted in closed form to the block's quantization error; cloq weights it "
                        "by the calibration activations) (default: default)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest frozen-weights file of OUT, e.g. 2GB, 500MB (default 2GB; more files and an "
                        "index JSON when the model is bigger, as Hugging Face shards)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished OUT, an interrupted run with other arguments, or write into a non-empty "
                        "directory (refused without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_mesh_arguments(p)


# --- calibration data -------------------------------------------------------------------------
def draw_windows(stream: np.ndarray, nsamples: int, seqlen: int, seed: int, source: str) -> np.ndarray:
    """Deprecated alias of apiq_jax.data.sample_windows (kept for old callers).

    Args:
        stream: 1-D token ids.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seed of the random starts.
        source: how error messages call the ids.

    Returns:
        ``[nsamples, seqlen]`` int32, as ``sample_windows(stream, nsamples, seqlen, seed=seed)``.
    """
    from apiq_jax.data import sample_windows

    return sample_windows(stream, nsamples, seqlen, seed=seed, name=source)


def load_calibration(
    path: Path, model_dir: Path, nsamples: int | None, seqlen: int | None, seed: int, max_len: int,
    vocab_size: int,
) -> np.ndarray:
    """Calibration ids ``[n, seqlen]`` of ``--calib`` (read with apiq_jax.data).

    Text and 1-D ids: ``nsamples`` (default :data:`DEFAULT_NSAMPLES`) windows at random
    starts drawn with ``seed``; 2-D ids: the first ``nsamples`` rows (default all), cut to
    ``seqlen`` tokens.

    Args:
        path: ``.npy`` ids or ``.txt`` text.
        model_dir: model directory whose tokenizer reads text.
        nsamples: number of windows (None: see above).
        seqlen: tokens per window; None: ``min(DEFAULT_SEQLEN, max_len, tokens)`` for a
            stream, the row length for 2-D ids.
        seed: seed of the window starts.
        max_len: the model's ``max_position_embeddings``.
        vocab_size: the model's vocabulary size (every id is checked against it).

    Returns:
        int32 ids ``[n, seqlen]``.
    """
    from apiq_jax import data as D

    name = f"--calib {path}"
    if D.data_suffix(path, name=name) == ".txt":
        D.check_tokenizer_vocab(model_dir, vocab_size)
    ids = D.load_tokens(path, tokenizer=model_dir, name=name)
    try:
        D.check_ids(ids, vocab_size)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if ids.ndim == 2:
        if seqlen is not None and seqlen > ids.shape[1]:
            raise ValueError(
                f"--seqlen {seqlen} exceeds the row length {ids.shape[1]} of {path}; accepted: "
                f"--seqlen <= {ids.shape[1]}"
            )
        check_seqlen(seqlen or ids.shape[1], max_len, "--seqlen" if seqlen else f"the row length of {path}")
        rows = ids.shape[0] if nsamples is None else nsamples
        if rows > ids.shape[0]:
            raise ValueError(
                f"--nsamples {rows} exceeds the {ids.shape[0]} rows of {path}; accepted: <= {ids.shape[0]}"
            )
        return D.windows(ids, seqlen=seqlen or ids.shape[1], nsamples=rows)
    n = DEFAULT_NSAMPLES if nsamples is None else nsamples
    length = seqlen if seqlen is not None else min(DEFAULT_SEQLEN, max_len, ids.size)
    windows = D.sample_windows(ids, n, length, seed=seed, name=name)  # first: a stream shorter than one window
    check_seqlen(length, max_len)
    if n * length > ids.size:
        warn(NAME, f"--nsamples {n} windows of {length} tokens need {n * length} tokens; {name} holds {ids.size}, "
                   f"so the windows overlap (at most {ids.size // length} are disjoint)")
    return windows


# --- running ----------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> str:
    """Validate method/bits/scheme and numeric options.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        The quantizer scheme to use (``--scheme`` or the method's default).

    Raises:
        ValueError: an unsupported combination or value, naming the flag.
    """
    spec = check_method_options(args.method, args.bits,
                                {name: getattr(args, name) for name in ("group_size", "rank", "nsamples", "seqlen")})
    scheme = args.scheme or spec.default_scheme
    if scheme not in spec.schemes:
        raise ValueError(
            f"--scheme {scheme} is not supported by --method {args.method}; accepted: {', '.join(spec.schemes)}"
        )
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha {args.alpha} must be a positive number")
    if args.epochs is not None:
        if not spec.trains:
            raise ValueError(f"--epochs applies to {_training()} only, not --method {args.method}")
        if args.epochs < 0:
            raise ValueError(f"--epochs {args.epochs} must be >= 0")
    if getattr(args, "offload_activations", False) and args.method != "apiq-bw":
        raise ValueError(f"--offload-activations applies to --method apiq-bw only, not {args.method}")
    if getattr(args, "lora_init", None) is not None and not spec.trains:
        raise ValueError(f"--lora-init applies to {_training()} only, not --method {args.method}")
    try:
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise ValueError(f"--max-shard-size: {e}") from None
    if args.num_iter is not None:
        if "num_iter" not in spec.options:
            raise ValueError(f"--num-iter applies to --method loftq only, not {args.method}")
        if args.num_iter < 1:
            raise ValueError(f"--num-iter {args.num_iter} must be >= 1")
    return scheme


def _training() -> str:
    """The methods that train (``--epochs`` applies to them), as "apiq-bw/apiq-lw"."""
    return "/".join(n for n, spec in METHODS.items() if spec.trains)


def method_options(
    method: str, epochs: int | None, num_iter: int | None, progress: bool, work_dir: Path | None = None,
    cache_dtype: str | None = None, lora_init: str | None = None, offload_activations: bool = False,
) -> dict[str, Any]:
    """Keyword options for the calibration function of ``method``.

    ApiQ methods checkpoint every finished block into ``work_dir`` (when given), so an
    interrupted ``apiq-jax quantize`` re-run with the same arguments resumes there.

    Args:
        method: a registry name (:data:`apiq_jax.calibration.METHODS`).
        epochs: ApiQ epochs (None: :class:`~apiq_jax.calibration.ApiQOptions`' default).
        num_iter: LoftQ alternations (None: the registry's default, ``loftq_init``'s).
        progress: show progress bars.
        work_dir: checkpoint directory of ApiQ runs.
        cache_dtype: dtype of ApiQ's activation caches (None: the model's).
        lora_init: ApiQ's LoRA starting point (``--lora-init``; None: the default).
        offload_activations: ApiQ-bw's caches on the host (``--offload-activations``).

    Returns:
        Keyword arguments for ``get_method(method).fn``.
    """
    defaults = get_method(method).options
    opts: dict[str, Any] = {"progress": progress}
    if "work_dir" in defaults and work_dir is not None:
        opts["work_dir"] = work_dir
        opts["lazy_result"] = True  # finished blocks' LoRA and logits are read from work_dir as they are saved
    if "on_block_end" in defaults:  # the next block starts without what this one's programs freed
        opts["on_block_end"] = lambda i, report: trim_host_memory()
    if offload_activations:
        opts["offload_activations"] = True
    if "options" in defaults:
        fields = {"epochs": epochs, "cache_dtype": cache_dtype, "lora_init": lora_init}
        fields = {k: v for k, v in fields.items() if v is not None}
        if fields:
            opts["options"] = ApiQOptions(**fields)
    if "num_iter" in defaults:
        opts["num_iter"] = defaults["num_iter"] if num_iter is None else num_iter
    return opts


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(--model, --out)`` as paths, after checking that they can be read and written."""
    from apiq_jax.commands.outputs import check_paths
    from apiq_jax.models import is_quantized_dir

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: directory not found")
    if is_quantized_dir(model_dir):
        raise ValueError(f"--model {model_dir} is already a quantized model; give the full-precision HF directory")
    out_dir = Path(args.out)
    check_paths(out_dir, model_dir)
    return model_dir, out_dir


def finished_blocks(work_dir: Path) -> int:
    """Blocks an interrupted ApiQ run has finished (read from its work directory, no orbax).

    Args:
        work_dir: ``OUT/calibration_work``.

    Returns:
        The number of finished blocks (0 when there is no work directory).
    """
    streams = work_dir / "streams"
    steps = [int(p.name) for p in streams.iterdir() if p.is_dir() and p.name.isdigit()] if streams.is_dir() else []
    return max(steps) + 1 if steps else 0


def summarize(args: argparse.Namespace, scheme: str, ids: np.ndarray, result: Any) -> dict[str, Any]:
    """The run's summary: its settings and what the calibration measured.

    Args:
        args: parsed arguments of :func:`add_arguments`.
        scheme: the quantizer scheme used.
        ids: the calibration ids ``[n, seqlen]``.
        result: the :class:`~apiq_jax.calibration.CalibrationResult`.

    Returns:
        A JSON-able dict (the metadata of the saved model and the printed JSON line).
    """
    from apiq_jax.compare import quantized_bits_per_param

    report = result.report
    errors = [e for e in report.errors_after if e is not None]
    return {
        "method": args.method, "bits": args.bits, "group_size": args.group_size, "scheme": scheme,
        "rank": args.rank, "alpha": args.alpha, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
        "seed": args.seed, "seconds": round(report.seconds, 3),
        "bits_per_param": quantized_bits_per_param(result.params),
        "mean_activation_error": float(np.mean(errors)) if errors else None, "activation_errors": errors,
        "peak_rss_mb": report.peak_rss_mb,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``apiq-jax quantize``; prints the summary JSON as the last stdout line.

    Args:
        args: parsed arguments of :func:`add_arguments`.

    Returns:
        Exit code 0.
    """
    import jax

    from apiq_jax import sharding
    from apiq_jax.commands.outputs import OutputDir, SecondaryOutput
    from apiq_jax.lora import LoraConfig
    from apiq_jax.models.hf_io import checkpoint_dtype, lazy_params, load_config, load_hf_config
    from apiq_jax.models.quantized_io import save_quantized
    from apiq_jax.quant import QuantConfig

    t0 = time.perf_counter()
    return_freed_host_memory()  # one block at a time: what a finished block freed leaves the RSS
    mesh = command_mesh(args)  # first: jax.distributed starts before any computation
    scheme = check_args(args)
    model_dir, out_dir = _check_paths(args)
    # of a multi-process run (one shared file system), process 0 alone claims and writes --out and
    # the work directory's files; every process computes, and writes its shards of the streams
    primary = sharding.is_primary()
    claim = (OutputDir(out_dir, NAME, args, overwrite=args.overwrite, work_subdirs=(WORK_SUBDIR,)) if primary
             else SecondaryOutput())
    sharding.on_primary(claim.check, f"claim --out {out_dir}")  # before reading anything big
    config = load_config(model_dir)
    params = lazy_params(model_dir, config, args.dtype)  # headers only: each block is read when calibrated
    dtype = args.dtype or checkpoint_dtype(load_hf_config(model_dir)).name
    ids = load_calibration(
        Path(args.calib), model_dir, args.nsamples, args.seqlen, args.seed,
        config.max_position_embeddings, config.vocab_size,
    )
    for msg in unwise_option_warnings(config, rank=args.rank, group_size=args.group_size, bits=args.bits):
        warn(NAME, msg)
    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size, scheme=scheme)
    lcfg = LoraConfig(rank=args.rank, alpha=args.alpha)
    work_dir = out_dir / WORK_SUBDIR
    n_layers = config.num_hidden_layers
    args.resume_hint = lambda: (f"block {finished_blocks(work_dir) + 1}/{n_layers} ({finished_blocks(work_dir)} "
                                "finished)" if finished_blocks(work_dir) else None)
    with claim:
        done = finished_blocks(work_dir)
        if done:
            print(f"apiq-jax {NAME}: resuming from block {done + 1}/{n_layers} ({done} finished in {work_dir})",
                  file=sys.stderr, flush=True)
        claim.start_work()
        opts = method_options(args.method, args.epochs, args.num_iter, primary and not args.quiet, work_dir,
                              args.cache_dtype,
                              getattr(args, "lora_init", None), getattr(args, "offload_activations", False))
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # samples split over the mesh
            result = get_method(args.method).fn(params, config, ids, qcfg, lcfg, key=jax.random.PRNGKey(args.seed),
                                                **opts)
        if jax.process_count() > 1:  # arrays split over processes: gathered (every process takes part)
            frozen = jax.tree.map(lambda x: sharding.to_host(x) if isinstance(x, jax.Array) else x, result.params)
            result = dataclasses.replace(result, params=frozen)
        summary = summarize(args, scheme, ids, result)
        summary["dtype"] = dtype

        def save() -> None:
            save_quantized(
                out_dir, result.params, result.lora, config,
                metadata={**summary, "model": str(model_dir), "calib": str(args.calib),
                          "report": result.report.to_dict()},
                tokenizer_source=model_dir, max_shard_size=args.max_shard_size,
            )
            result.report.save_json(out_dir / "report.json")
            result.report.save_plot(out_dir / "report.png")
            shutil.rmtree(work_dir, ignore_errors=True)

        sharding.on_primary(save, f"write {out_dir}")
        claim.finish()
    summary["total_seconds"] = round(time.perf_counter() - t0, 3)
    summary["out"] = str(out_dir)
    print_json(summary)
    return 0
