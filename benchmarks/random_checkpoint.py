"""Write a random Llama checkpoint of any shape in Hugging Face layout (for memory benchmarks).

Shapes matter for memory, values do not: every weight is N(0, 0.02) in the chosen dtype,
norms are ones. The weights go into per-layer-group shards with a
``model.safetensors.index.json``, written one shard at a time (the writer never holds the
model), so checkpoints larger than this machine's memory can be made.

    python benchmarks/random_checkpoint.py --out DIR --hidden 2048 --layers 40 --mlp 5632 \
        --vocab 32000 [--heads 16] [--kv-heads 16] [--dtype float16] [--shard-layers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def llama_config(hidden: int, layers: int, mlp: int, vocab: int, heads: int, kv_heads: int, dtype: str,
                 max_positions: int = 4096) -> dict:
    """A Hugging Face ``LlamaForCausalLM`` config.json of these sizes.

    Args:
      hidden: hidden size.
      layers: number of decoder layers.
      mlp: intermediate (MLP) size.
      vocab: vocabulary size.
      heads: attention heads.
      kv_heads: key/value heads.
      dtype: the declared ``torch_dtype``.
      max_positions: ``max_position_embeddings``.

    Returns:
      The config as a dict.
    """
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


def layer_tensors(i: int, hidden: int, mlp: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every tensor of decoder layer ``i``.

    Args:
      i: the layer index.
      hidden: hidden size.
      mlp: intermediate size.
      heads: attention heads.
      kv_heads: key/value heads.

    Returns:
      ``{key: shape}``.
    """
    hd = hidden // heads
    pre = f"model.layers.{i}"
    return {
        f"{pre}.input_layernorm.weight": (hidden,), f"{pre}.post_attention_layernorm.weight": (hidden,),
        f"{pre}.self_attn.q_proj.weight": (heads * hd, hidden), f"{pre}.self_attn.k_proj.weight": (kv_heads * hd, hidden),
        f"{pre}.self_attn.v_proj.weight": (kv_heads * hd, hidden), f"{pre}.self_attn.o_proj.weight": (hidden, heads * hd),
        f"{pre}.mlp.gate_proj.weight": (mlp, hidden), f"{pre}.mlp.up_proj.weight": (mlp, hidden),
        f"{pre}.mlp.down_proj.weight": (hidden, mlp),
    }


def write_checkpoint(out: Path, *, hidden: int, layers: int, mlp: int, vocab: int, heads: int, kv_heads: int,
                     dtype: str = "float16", shard_layers: int = 4, seed: int = 0) -> int:
    """Write the random checkpoint into ``out`` (created; must not hold a model already).

    Args:
      out: the target directory.
      hidden, layers, mlp, vocab, heads, kv_heads: the sizes.
      dtype: "float16", "bfloat16" or "float32".
      shard_layers: decoder layers per shard.
      seed: the random seed.

    Returns:
      The number of parameters written.

    Raises:
      ValueError: ``out`` already holds a config.json, or a bad size.
    """
    from safetensors.numpy import save_file

    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a model (config.json); choose an empty directory")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must be a multiple of heads {heads}, heads of kv_heads {kv_heads}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np_dtype = _NP_DTYPES[dtype]

    def tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key.endswith("norm.weight"):
            return np.ones(shape, np_dtype)
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(np_dtype)

    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for start in range(0, layers, shard_layers):
        group: dict[str, tuple[int, ...]] = {}
        for i in range(start, min(start + shard_layers, layers)):
            group.update(layer_tensors(i, hidden, mlp, heads, kv_heads))
        groups.append(group)
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weight_map, total, n_params = {}, 0, 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: tensor(key, shape) for key, shape in group.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, arr in tensors.items():
            weight_map[key] = name
            total += arr.nbytes
            n_params += arr.size
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = llama_config(hidden, layers, mlp, vocab, heads, kv_heads, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return n_params


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
      argv: arguments (default ``sys.argv[1:]``).

    Returns:
      The exit code.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--mlp", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dtype", default="float16", choices=sorted(_NP_DTYPES))
    p.add_argument("--shard-layers", type=int, default=4)
    args = p.parse_args(argv)
    try:
        n = write_checkpoint(args.out, hidden=args.hidden, layers=args.layers, mlp=args.mlp, vocab=args.vocab,
                             heads=args.heads, kv_heads=args.kv_heads or args.heads, dtype=args.dtype,
                             shard_layers=args.shard_layers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "params": n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
