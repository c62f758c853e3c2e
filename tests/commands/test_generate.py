"""``apiq-jax generate`` (apiq_jax/commands/generate.py): streamed text of one prompt, a batch,
a quantized directory with its LoRA, sampling flags, errors."""

from __future__ import annotations

import numpy as np
import pytest

from apiq_jax.data import load_tokenizer
from apiq_jax.generation import generate
from apiq_jax.models import load_pretrained, load_quantized
from tests.commands.conftest import last_json, run_cli


def test_one_prompt_streams_the_greedy_completion(capsys, stories):
    code, out, err = run_cli(capsys, "generate", "--model", str(stories), "--prompt", "Once upon a time",
                             "--max-new-tokens", "24")
    assert code == 0, err
    res = last_json(out)
    model, tok = load_pretrained(stories), load_tokenizer(stories)
    ref = generate(model.params, None, [tok("Once upon a time")["input_ids"]], model.config, max_new_tokens=24,
                   eos_token_id=tok.eos_token_id)
    ids = [int(t) for t in ref.tokens[0]]
    ids = ids[: ids.index(2)] if 2 in ids else ids
    expected = tok.decode(ids, skip_special_tokens=True)
    assert res["completions"] == [expected] and res["new_tokens"] == [len(ids)] and not res["quantized"]
    text = out.strip().splitlines()[:-1]
    assert "\n".join(text) == "Once upon a time" + expected  # the streamed text is the whole completion
    assert res["decode_tokens_per_second"] > 0


def test_batch_of_prompts_and_sampling_flags(capsys, stories):
    argv = ["generate", "--model", str(stories), "--prompt", "The dog", "--prompt", "Lily and Tom went to the",
            "--max-new-tokens", "16", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "7"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    first = last_json(out)
    assert len(first["completions"]) == 2 and "[0]\nThe dog" in out and "[1]\nLily and Tom went to the" in out
    code, out, _ = run_cli(capsys, *argv)
    assert last_json(out)["completions"] == first["completions"]  # same seed, same text
    code, out, _ = run_cli(capsys, *argv[:-1], "8")
    assert last_json(out)["completions"] != first["completions"]


def test_quantized_directory_uses_its_lora(capsys, rtn_quantized):
    code, out, err = run_cli(capsys, "generate", "--model", str(rtn_quantized), "--prompt", "def f(x):",
                             "--max-new-tokens", "8")
    assert code == 0, err
    res = last_json(out)
    frozen, lora, cfg, _ = load_quantized(rtn_quantized)
    tok = load_tokenizer(rtn_quantized)
    ref = generate(frozen, lora, [tok("def f(x):")["input_ids"]], cfg, max_new_tokens=8)
    assert res["quantized"] is True
    eos = tok.eos_token_id
    ids = [int(t) for t in ref.tokens[0]]
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert res["completions"] == [tok.decode(ids, skip_special_tokens=True)]
    assert np.asarray(ref.tokens).shape == (1, 8)


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--top-k", "-3"], "--top-k -3 must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--max-new-tokens", "5000"], "exceeds the model's max_position_embeddings 512"),
])
def test_bad_flags_are_one_line_errors(capsys, stories, flags, message):
    code, out, err = run_cli(capsys, "generate", "--model", str(stories), "--prompt", "Hi", *flags)
    assert code == 2 and err.startswith("apiq-jax generate: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi")
    assert code == 2 and "directory not found" in err
