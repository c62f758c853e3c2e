"""Train the small Llama bundled with apiq-jax for the offline demo.

The model learns to write Python: its training text is the Python standard library's own
source (top-level ``*.py`` modules of ``sysconfig.get_paths()["stdlib"]``), which every
machine with a Python install has. A few modules are held out (see
:data:`apiq_jax.demo_data.CALIB_MODULES` and :data:`apiq_jax.demo_data.EVAL_MODULES`);
the demo calibrates and evaluates on them.

Recipe (the defaults of this script):

* tokenizer: byte-level BPE trained with the ``tokenizers`` library on the training
  modules, vocabulary 1024 (specials ``<unk>``, ``<s>``, ``</s>``), saved as
  ``tokenizer.json`` + ``tokenizer_config.json`` (loadable with ``AutoTokenizer``);
* model: Llama, hidden 128, 4 layers, 4 heads (head_dim 32) / 2 key-value heads,
  SwiGLU width 344 (not a multiple of 64, so the quantizer's padded last group is
  exercised), untied output head, RoPE theta 10000, float32;
* data: stream = for each training module in sorted order, ``[<s>] + encode(text)``;
  each step samples ``batch`` random windows of ``seqlen + 1`` tokens;
* optimizer: optax AdamW (b2 0.95, weight decay 0.1), linear warm-up then cosine decay
  to 10 % of the peak, global-norm clipping at 1.0.

Usage::

    python scripts/train_demo_model.py --out apiq_jax/assets/demo_model [--steps N]

Writes ``config.json``, ``model.safetensors``, the tokenizer files and
``training_log.json`` (losses and held-out perplexity) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from apiq_jax.data import split_windows  # noqa: E402
from apiq_jax.demo_data import (  # noqa: E402
    CALIB_MODULES,
    EVAL_MODULES,
    read_modules,
    training_modules,
)
from apiq_jax.models.config import ModelConfig  # noqa: E402
from apiq_jax.models.hf_io import save_pretrained  # noqa: E402
from apiq_jax.models.llama import forward, init_params  # noqa: E402

SPECIALS = ("<unk>", "<s>", "</s>")


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Args:
        texts: training texts.
        vocab_size: vocabulary size, the specials included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=1_000_000,
    )


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """``[<s>] + encode(text)`` for each text, concatenated.

    Args:
        tokenizer: the tokenizer of :func:`build_tokenizer`.
        texts: texts to encode.

    Returns:
        1-D int32 ids.
    """
    bos = tokenizer.convert_tokens_to_ids("<s>")
    parts = []
    for t in texts:
        parts.append(np.asarray([bos] + tokenizer.encode(t, add_special_tokens=False), np.int32))
    return np.concatenate(parts)


def make_config(vocab_size: int, args: argparse.Namespace) -> ModelConfig:
    """The demo model's :class:`ModelConfig`.

    Args:
        vocab_size: the tokenizer's vocabulary size.
        args: parsed arguments (hidden, intermediate, layers, heads, kv_heads).

    Returns:
        The config.
    """
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def nll(params, ids: jnp.ndarray, config: ModelConfig) -> jnp.ndarray:
    """Mean next-token negative log-likelihood of windows ``ids [b, s+1]``.

    Args:
        params: model parameters.
        ids: token windows ``[b, s+1]``.
        config: the model config.

    Returns:
        A scalar.
    """
    logits = forward(params, None, ids[:, :-1], config)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(tgt)


def eval_ppl(params, stream: np.ndarray, config: ModelConfig, seqlen: int, batch: int = 16) -> float:
    """Perplexity over non-overlapping windows of ``seqlen`` tokens (tail dropped).

    Args:
        params: model parameters.
        stream: 1-D token ids.
        config: the model config.
        seqlen: window length.
        batch: windows per forward pass.

    Returns:
        The perplexity (NaN when the stream is shorter than one window).
    """
    if len(stream) < seqlen:
        return float("nan")
    windows = split_windows(stream, seqlen)
    n = windows.shape[0]
    f = jax.jit(lambda p, x: nll(p, x, config))
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = jnp.asarray(windows[i : i + batch])
        predicted = x.shape[0] * (seqlen - 1)
        total += float(f(params, x)) * predicted
        count += predicted
    return float(math.exp(total / count)) if count else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Train the model and write it (see the module docstring).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit code 0.
    """
    plain = re.sub(r":\w+:`~?([^`]*)`", r"\1", __doc__).replace("``", "").replace("::\n", ":\n")  # plain --help
    ap = argparse.ArgumentParser(description=plain, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "apiq_jax" / "assets" / "demo_model"))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=344)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=550)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    t0 = time.time()
    train_names = training_modules()
    train_texts = read_modules(train_names)
    print(f"training modules: {len(train_names)} ({sum(map(len, train_texts))} chars)", flush=True)
    tokenizer = build_tokenizer(train_texts, args.vocab)
    train = encode_stream(tokenizer, train_texts)
    heldout = {
        "calib": encode_stream(tokenizer, read_modules(CALIB_MODULES)),
        "eval": encode_stream(tokenizer, read_modules(EVAL_MODULES)),
    }
    print(f"train tokens {len(train)}, calib {len(heldout['calib'])}, eval {len(heldout['eval'])}; "
          f"{time.time() - t0:.1f}s", flush=True)

    config = make_config(len(tokenizer), args)
    params = init_params(config, jax.random.PRNGKey(args.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.1
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(nll)(params, batch, config)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    hi = len(train) - args.seqlen - 1
    log = []
    t_train = time.time()
    running = None
    for it in range(1, args.steps + 1):
        starts = rng.integers(0, hi, size=args.batch)
        batch = np.stack([train[s : s + args.seqlen + 1] for s in starts])
        params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
        loss = float(loss)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if it % args.log_every == 0 or it == args.steps:
            el = time.time() - t_train
            print(f"step {it}/{args.steps} loss {loss:.4f} (ema {running:.4f}) {el:.0f}s", flush=True)
            log.append({"step": it, "loss": loss, "ema_loss": running, "seconds": round(el, 1)})
    train_seconds = time.time() - t_train

    ppl = {k: eval_ppl(params, v, config, args.seqlen) for k, v in heldout.items()}
    print(f"held-out perplexity: {ppl}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(params, out, config, dtype="float32")
    tokenizer.save_pretrained(str(out))
    for f in out.iterdir():  # package data: world-readable
        f.chmod(0o644)
    recorded_args = dict(vars(args))
    try:  # never record an absolute machine path
        recorded_args["out"] = str(out.resolve().relative_to(REPO))
    except ValueError:
        recorded_args["out"] = out.name
    summary = {
        "args": recorded_args,
        "n_params": n_params,
        "train_modules": len(train_names),
        "train_tokens": int(len(train)),
        "heldout_tokens": {k: int(len(v)) for k, v in heldout.items()},
        "train_seconds": round(train_seconds, 1),
        "final_ema_loss": running,
        "heldout_ppl": ppl,
        "python": sys.version.split()[0],
        "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
