"""Expected peak memory of ``quantize`` and ``finetune`` from the shapes alone (``apiq-jax plan``).

Nothing is allocated: array sizes come from ``jax.eval_shape`` of the library's own
functions (the packed form of every linear, the clipping logits) and the temporary memory
of the compiled programs from XLA itself (``jit(...).lower(abstract shapes).compile()
.memory_analysis()``, on this machine's backend), so the plan follows the code.

``quantize`` (ApiQ and the baselines walk the blocks in order, one block read at a time):
its peak is the larger of *calibrating the last block* and *saving*. Both hold the runtime
(this process's resident memory once it has imported what ``quantize`` imports: Python,
JAX, transformers with torch, the calibration modules) and the compiled block programs
(what compiling them on the block's shapes adds to this process's resident memory: XLA's
executables and the compiler's heap the C library keeps, as the quantize process keeps its
own). Calibrating adds the block in float32 (ApiQ reads each tensor straight to float32;
the baselines read the block in its storage dtype and quantize it one linear at a time),
the block program's temporaries, the activation caches and the packed model so far (a
finished block's LoRA and clipping logits wait in the work directory); saving adds the
packed model, embeddings and head (ApiQ's LoRA is copied from the work directory one tensor
at a time) and, while the head is read, that table's file pages mapped by safetensors and
its host copy beside its device copy.
``finetune``: the compiled step's temp + argument + output bytes.

Example:
  >>> from apiq_jax.memory_plan import QuantizePlanInputs, packed_layer_bytes
  >>> from apiq_jax.models import ModelConfig
  >>> from apiq_jax.quant import QuantConfig
  >>> cfg = ModelConfig("LlamaForCausalLM", 32000, 4096, 11008, 32, 32, 32, 128)
  >>> round(packed_layer_bytes(cfg, QuantConfig(bits=2, group_size=64)) / 2**20, 1)   # MiB per layer
  60.3
"""

from __future__ import annotations

import dataclasses
import os
import resource
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apiq_jax.lora import LINEARS, Lora, LoraConfig
from apiq_jax.models.config import ModelConfig
from apiq_jax.models.llama import layer_param_shapes, linear_shapes, param_shapes, stack_layers, unflatten_params
from apiq_jax.quant import QuantConfig, init_clip, quantize

__all__ = ["MemoryPlan", "QuantizePlanInputs", "abstract_quantized_model", "clip_layer_bytes", "finetune_step_memory",
           "import_quantize_runtime", "lora_layer_bytes", "packed_layer_bytes", "plan_finetune", "plan_quantize",
           "resident_bytes", "runtime_bytes"]

GiB = 2**30


def _nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def packed_layer_bytes(config: ModelConfig, quant_config: QuantConfig) -> int:
    """Bytes of one layer's seven linears in their packed form (codes, scales, zero points).

    Args:
      config: the model config.
      quant_config: the quantizer.

    Returns:
      The bytes of the QuantizedTensor leaves :func:`apiq_jax.quant.quantize` produces.
    """
    total = 0
    for out_f, in_f in linear_shapes(config).values():
        total += _nbytes(jax.eval_shape(lambda w: quantize(w, quant_config),
                                        jax.ShapeDtypeStruct((out_f, in_f), jnp.float32)))
    return total


def lora_layer_bytes(config: ModelConfig, lora_config: LoraConfig) -> int:
    """Bytes of one layer's float32 LoRA factors.

    Args:
      config: the model config.
      lora_config: rank and targets.

    Returns:
      ``4 * rank * (in + out)`` summed over the targeted linears.
    """
    shapes = linear_shapes(config)
    return int(sum(4 * lora_config.rank * sum(shapes[n]) for n in lora_config.targets))


def clip_layer_bytes(config: ModelConfig, quant_config: QuantConfig) -> int:
    """Bytes of one layer's learned clipping logits (ApiQ keeps them for the report and resume).

    Args:
      config: the model config.
      quant_config: the quantizer.

    Returns:
      The bytes of the seven :class:`~apiq_jax.quant.ClipLogits`.
    """
    shapes = linear_shapes(config)
    return sum(_nbytes(jax.eval_shape(lambda s=s: init_clip(s, quant_config))) for s in shapes.values())


def runtime_bytes() -> int:
    """Peak resident memory of this process so far: the runtime (Python, JAX, transformers) a job also pays.

    Returns:
      Bytes (``ru_maxrss``).
    """
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def resident_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``; :func:`runtime_bytes` where there is none).

    Returns:
      Bytes.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return runtime_bytes()


def import_quantize_runtime(method: str) -> None:
    """Import what ``apiq-jax quantize`` imports before its first block (so this process holds that runtime).

    ``quantize`` reads the model's config with transformers (which imports torch), runs the
    method's calibration module and, for ApiQ, checkpoints into a work directory. (The
    command modules themselves are imported by the CLI that ``apiq-jax plan`` runs in.)

    Args:
      method: the calibration method (its module is imported through the registry).

    Returns:
      None.
    """
    import transformers

    from apiq_jax.calibration import workdir  # noqa: F401  (ApiQ's work directory)
    from apiq_jax.calibration.registry import get_method

    transformers.AutoConfig  # noqa: B018  (the lazy module imports its config machinery on first use)
    get_method(method)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizePlanInputs:
    """The settings of an ``apiq-jax quantize`` run that decide its memory.

    Attributes:
      method: the calibration method (ApiQ methods train each block; the others do not).
      quant_config: the quantizer.
      lora_config: the LoRA.
      nsamples: calibration windows.
      seqlen: tokens per window.
      dtype: storage dtype of the weights ("float32", "bfloat16", "float16").
      cache_dtype: dtype of the activation caches (None: ``dtype``).
      batch_size: ApiQ samples per step.
      aug_loss: ApiQ-bw's second target (a third cache).
      offload_activations: ApiQ-bw's caches in host memory, one batch on the device per
        step (``quantize --offload-activations``).
    """

    method: str
    quant_config: QuantConfig
    lora_config: LoraConfig
    nsamples: int
    seqlen: int
    dtype: str = "float16"
    cache_dtype: str | None = None
    batch_size: int = 1
    aug_loss: bool = True
    offload_activations: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """An expected peak and what it is made of.

    Attributes:
      job: "quantize" or "finetune".
      peak_bytes: the expected peak.
      parts: ``{component: bytes}`` of the phase that peaks.
      phase: which phase peaks.
    """

    job: str
    peak_bytes: int
    parts: dict[str, int]
    phase: str

    @property
    def host_only_bytes(self) -> int:
        """Bytes of the parts that stay in host memory (named ``"... (host)"``): not on an accelerator."""
        return sum(v for k, v in self.parts.items() if k.endswith(HOST_SUFFIX))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form.

        Returns:
          ``{"job", "phase", "peak_gib", "device_gib", "parts_gib"}`` (``device_gib``: the peak
          without the host-only parts).
        """
        return {"job": self.job, "phase": self.phase, "peak_gib": round(self.peak_bytes / GiB, 3),
                "device_gib": round((self.peak_bytes - self.host_only_bytes) / GiB, 3),
                "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()}}


#: the suffix of a plan part that is held in host memory only (never on an accelerator)
HOST_SUFFIX = " (host)"


def _abstract_block(config: ModelConfig) -> dict[str, Any]:
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in layer_param_shapes(config).items()}


def _block_train_program(config: ModelConfig, p: QuantizePlanInputs) -> Any:
    """ApiQ-bw's training of one block on these shapes, compiled (abstract shapes).

    With offloaded caches: the one-batch step the host loop calls
    (:func:`~apiq_jax.calibration.apiq_bw_core.bw_batch_step`).
    """
    from apiq_jax.calibration.adamw import make_optimizer
    from apiq_jax.calibration.apiq_bw_core import bw_batch_step, train_block_bw
    from apiq_jax.calibration.options import ApiQOptions

    sds = jax.ShapeDtypeStruct
    shapes = linear_shapes(config)
    r = p.lora_config.rank
    lora = Lora({n: {"a": sds((shapes[n][1], r), jnp.float32), "b": sds((r, shapes[n][0]), jnp.float32)}
                 for n in p.lora_config.targets}, p.lora_config)
    clip = {n: jax.eval_shape(lambda s=shapes[n]: init_clip(s, p.quant_config)) for n in LINEARS}
    x = sds((p.nsamples, p.seqlen, config.hidden_size), jnp.dtype(p.cache_dtype or p.dtype))
    opts = ApiQOptions(epochs=1, batch_size=p.batch_size, aug_loss=p.aug_loss)
    if p.offload_activations:
        train = {"clip": clip, "lora": lora}
        b = sds((p.batch_size, *x.shape[1:]), x.dtype)
        return bw_batch_step.lower(train, jax.eval_shape(make_optimizer(opts).init, train),
                                   (b, b, b if p.aug_loss else None), _abstract_block(config), config=config,
                                   qcfg=p.quant_config, opts=opts, layer_idx=None).compile()
    lowered = train_block_bw.lower(_abstract_block(config), {"clip": clip, "lora": lora}, x, x,
                                   x if p.aug_loss else None, None, config=config, qcfg=p.quant_config, opts=opts)
    return lowered.compile()


def _quantizer_programs(config: ModelConfig, qcfg: QuantConfig) -> list[Any]:
    """The quantizer compiled once per linear shape (as ``freeze_layer`` compiles it), largest first."""
    from apiq_jax.models.quantized import _quantize_jit

    shapes = sorted(set(linear_shapes(config).values()), key=lambda s: -s[0] * s[1])
    return [_quantize_jit.lower(jax.ShapeDtypeStruct(s, jnp.float32), qcfg).compile() for s in shapes]


def _forward_program(config: ModelConfig, p: QuantizePlanInputs) -> Any:
    """The block's forward on the activation cache (the streams' propagation), compiled."""
    from apiq_jax.calibration.blocks import _run_block_jit, layer_idx_arg

    x = jax.ShapeDtypeStruct((p.nsamples, p.seqlen, config.hidden_size), jnp.dtype(p.cache_dtype or p.dtype))
    return _run_block_jit.lower(_abstract_block(config), x, config,
                                layer_idx=layer_idx_arg(config, config.num_hidden_layers - 1)).compile()


def compile_block_programs(config: ModelConfig, p: QuantizePlanInputs) -> tuple[int, int]:
    """Compile what ``quantize`` compiles for a block; the programs' temporaries and what compiling kept.

    The programs: ApiQ's training of the block (the trained methods), the block's forward on
    the activation cache and the quantizer of each linear shape. They stay alive until this
    process's resident memory is read again, as they stay in the jit caches of ``quantize``.

    Args:
      config: the model config.
      p: the run's settings.

    Returns:
      ``(temp, kept)``: XLA's temporary bytes of the block's largest program (training for
      ApiQ, the quantizer of the largest linear otherwise: ``compile().memory_analysis()``)
      and the bytes compiling added to this process's resident memory (0 when the programs
      were compiled before in this process: they are in its runtime then).
    """
    from apiq_jax.calibration.registry import get_method

    before = resident_bytes()
    quantizers = _quantizer_programs(config, p.quant_config)
    programs = [*quantizers, _forward_program(config, p)]
    if get_method(p.method).trains:
        programs.append(_block_train_program(config, p))
        temp = int(programs[-1].memory_analysis().temp_size_in_bytes)
    else:
        temp = int(quantizers[0].memory_analysis().temp_size_in_bytes)
    kept = max(resident_bytes() - before, 0)
    del programs, quantizers
    return temp, kept


def plan_quantize(config: ModelConfig, p: QuantizePlanInputs, *, runtime: int | None = None,
                  compiled: int | None = None) -> MemoryPlan:
    """Expected peak memory of ``apiq-jax quantize`` (host RSS on CPU; device + host on an accelerator).

    Args:
      config: the model config.
      p: the run's settings.
      runtime: bytes of the process before any model data and program (default: this
        process's resident memory after :func:`import_quantize_runtime`).
      compiled: bytes the compiled block programs keep (default: measured by
        :func:`compile_block_programs` in this process).

    Returns:
      The :class:`MemoryPlan` of the phase that peaks; its parts name the runtime, the
      compiled block programs, the block in float32 (and, for the methods that do not
      train, in its storage dtype), the program's temporaries, the activation caches and
      the packed layers (calibrating), or the packed model, embeddings and head (saving).
    """
    from apiq_jax.calibration.registry import get_method

    trains = get_method(p.method).trains
    if runtime is None:
        import_quantize_runtime(p.method)
        runtime = resident_bytes()
    if compiled is None:
        temp, compiled = compile_block_programs(config, p)
    else:  # only the program whose temporaries count
        program = _block_train_program(config, p) if trains else _quantizer_programs(config, p.quant_config)[0]
        temp = int(program.memory_analysis().temp_size_in_bytes)
    storage = jnp.dtype(p.dtype).itemsize
    cache = jnp.dtype(p.cache_dtype or p.dtype).itemsize
    block = sum(int(np.prod(s)) for s in layer_param_shapes(config).values())
    largest_linear = max(int(np.prod(s)) for s in linear_shapes(config).values())
    layers = config.num_hidden_layers
    packed = packed_layer_bytes(config, p.quant_config)
    per_layer = packed + lora_layer_bytes(config, p.lora_config)  # the baselines hold their LoRA
    stream = p.nsamples * p.seqlen * config.hidden_size * cache
    n_caches = (3 if p.aug_loss and p.method == "apiq-bw" else 2) if trains else 2
    embed = config.vocab_size * config.hidden_size * storage
    head = 0 if config.tie_word_embeddings else embed
    base = {"runtime": runtime, "compiled block programs": compiled}
    if trains:  # begin() reads each lazily read tensor straight to float32: no storage-dtype copy of the block
        block_parts = {"block (float32)": block * 4}
    else:  # the block is read in its storage dtype; each linear is quantized in float32, one at a time
        block_parts = {"block (storage dtype)": block * storage, "largest linear (float32)": largest_linear * 4}
    calibrating = {
        **base,
        **block_parts,
        "block program temporaries": temp,
        **({"one batch of the caches": n_caches * stream // p.nsamples * p.batch_size,
            "activation caches" + HOST_SUFFIX: n_caches * stream} if p.offload_activations
           else {"activation caches": n_caches * stream}),
        # ApiQ (`quantize` always has a work directory): LoRA and logits of finished blocks are on disk
        **({"packed layers so far": (layers - 1) * packed} if trains
           else {"packed layers, LoRA so far": (layers - 1) * per_layer}),
    }
    if trains:  # the LoRA and logits are read from the work directory one tensor at a time as they are written
        saving = {**base, "packed layers": layers * packed, "embeddings and head": embed + head,
                  "reading a table (mapped file pages, host copy)": 2 * embed}
    else:
        saving = {**base, "packed layers, LoRA": layers * per_layer, "embeddings and head": embed + head,
                  "reading a table (mapped file pages, host copy)": 2 * embed}
    a, b = sum(calibrating.values()), sum(saving.values())
    if a >= b:
        return MemoryPlan("quantize", a, calibrating, "calibrating the last block")
    return MemoryPlan("quantize", b, saving, "saving")


# --- finetune -----------------------------------------------------------------------------------
def abstract_quantized_model(config: ModelConfig, quant_config: QuantConfig, lora_config: LoraConfig,
                             dtype: str = "float32") -> tuple[Any, Lora]:
    """``(frozen, lora)`` of a quantized model as shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves).

    Args:
      config: the model config.
      quant_config: the quantizer of every targeted linear (all seven are quantized).
      lora_config: the LoRA (float32 factors).
      dtype: dtype of the embeddings, norms and dequantized weights.

    Returns:
      The abstract frozen params (packed linears from ``jax.eval_shape`` of
      :func:`apiq_jax.quant.quantize`) and :class:`~apiq_jax.lora.Lora`.
    """
    flat: dict[str, Any] = {}
    for name, shape in param_shapes(config).items():
        sds = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        is_linear = name.split(".")[-1] in LINEARS
        flat[name] = jax.eval_shape(lambda w: quantize(w, quant_config), sds) if is_linear else sds
    frozen = unflatten_params(flat)
    shapes = linear_shapes(config)
    r = lora_config.rank
    factors = [{n: {"a": jax.ShapeDtypeStruct((shapes[n][1], r), jnp.float32),
                    "b": jax.ShapeDtypeStruct((r, shapes[n][0]), jnp.float32)} for n in lora_config.targets}
               for _ in range(config.num_hidden_layers)]
    return frozen, Lora({"layers": factors}, lora_config)


def finetune_step_memory(config: ModelConfig, frozen: Any, lora: Lora, batch: int, seqlen: int,
                         finetune_config: Any, *, baseline: bool = False, backend: str = "xla",
                         mesh: Any = None) -> dict[str, int]:
    """Compiled memory of one finetuning step (forward, backward, AdamW), as ``finetune`` runs it.

    Args:
      config: the model config.
      frozen: frozen params (arrays or ``jax.ShapeDtypeStruct``; list of layers).
      lora: the :class:`~apiq_jax.lora.Lora` (arrays or abstract).
      batch: token rows per step (``grad_accum`` micro-batches of ``batch / grad_accum``).
      seqlen: tokens per row.
      finetune_config: the :class:`~apiq_jax.training.FinetuneConfig` (dtype, remat, grad_accum).
      baseline: the step before the memory work (unrolled, no remat, float32, whole
        ``[B, H, S, S]`` attention and ``[B, S, V]`` logits at once).
      backend: qmatmul backend of the quantized linears.
      mesh: compile the sharded step for this :func:`apiq_jax.sharding.make_mesh` mesh (the
        sizes are then per device); None: one device.

    Returns:
      ``{"temp", "argument", "output", "total"}`` bytes from ``compile().memory_analysis()``.
    """
    from apiq_jax.models.llama import cast_params
    from apiq_jax.training import causal_lm_loss, make_optimizer, make_train_step

    fc = finetune_config
    opt = make_optimizer(fc)
    if baseline:
        def loss(f: Any, lo: Any, ids: Any) -> Any:
            return causal_lm_loss(f, lo, ids, config, backend=backend, attention_impl="plain",
                                    chunk_tokens=batch * seqlen)

        step = make_train_step(config, opt, loss, finetune_config=fc)
    else:
        step = make_train_step(config, opt, backend=backend, finetune_config=fc, mesh=mesh)
        frozen = jax.eval_shape(lambda f: cast_params(f, fc.dtype), frozen)
        if fc.scans:  # what finetune() does: the layers stacked once, outside the step
            frozen = jax.eval_shape(stack_layers, frozen)
            lora = jax.eval_shape(lambda lo: lo.stack_layers(), lora)
    state = jax.eval_shape(opt.init, lora)
    ids = jax.ShapeDtypeStruct((batch, seqlen), jnp.int32)
    m = step.lower(frozen, lora, state, ids).compile().memory_analysis()
    out = {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
           "output": int(m.output_size_in_bytes)}
    out["total"] = sum(out.values())
    return out


def plan_finetune(config: ModelConfig, quant_config: QuantConfig, lora_config: LoraConfig, batch: int, seqlen: int,
                  finetune_config: Any) -> MemoryPlan:
    """Expected device memory of ``apiq-jax finetune``: its step compiled on abstract shapes.

    Args:
      config: the model config.
      quant_config: the quantizer of the saved model.
      lora_config: its LoRA.
      batch: rows per step.
      seqlen: tokens per row.
      finetune_config: the :class:`~apiq_jax.training.FinetuneConfig`.

    Returns:
      The :class:`MemoryPlan` (parts: the step's temp, argument and output bytes).
    """
    frozen, lora = abstract_quantized_model(config, quant_config, lora_config, "float32")
    mem = finetune_step_memory(config, frozen, lora, batch, seqlen, finetune_config)
    parts = {"step temporaries": mem["temp"], "frozen model, LoRA, optimizer state, batch": mem["argument"],
             "outputs": mem["output"]}
    return MemoryPlan("finetune", mem["total"], parts, "one step")
