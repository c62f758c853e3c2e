"""Bad options: one line naming the flag, the value and what is accepted; exit status 2; nothing written.

Unwise but legal options run, with a warning line that says what they cost.
"""

from __future__ import annotations

import pytest

from tests.reliability.conftest import assert_user_error, finetune_args, quantize_args, run_cli


@pytest.mark.parametrize("extra,fragment", [
    (("--bits", "5"), "--bits 5 is not supported by --method rtn; accepted: 2, 3, 4"),
    (("--bits", "1"), "--bits 1 is not supported by --method rtn; accepted: 2, 3, 4"),
    (("--group-size", "0"), "--group-size 0 must be a positive integer"),
    (("--group-size", "-32"), "--group-size -32 must be a positive integer"),
    (("--rank", "0"), "--rank 0 must be a positive integer"),
    (("--alpha", "-1"), "--alpha -1.0 must be a positive number"),
    (("--method", "awq"), "--method 'awq' is not supported; accepted:"),
    (("--nsamples", "0"), "--nsamples 0 must be a positive integer"),
    (("--offload-activations",), "--offload-activations applies to --method apiq-bw only, not rtn"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_quantize_options(capsys, tiny_hf, files, tmp_path, extra, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "rtn", *extra))
    assert_user_error(code, err, fragment, "quantize")
    assert not out.exists()


def test_quantize_epochs_negative(capsys, tiny_hf, files, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, out, files["calib"], "apiq-bw", "--epochs", "-1"))
    assert_user_error(code, err, "--epochs -1 must be >= 0", "quantize")
    assert not out.exists()


@pytest.mark.parametrize("extra,fragment", [
    (("--steps", "0"), "steps=0 must be a positive int"),
    (("--lr", "-0.001"), "--lr -0.001 is not accepted; accepted: a finite number > 0"),
    (("--lr", "nan"), "--lr nan is not accepted"),
    (("--weight-decay", "-1"), "--weight-decay -1.0 is not accepted; accepted: a finite number >= 0"),
    (("--grad-accum", "3"), "grad_accum=3 must divide batch_size=2"),
    (("--batch-size", "0"), "batch_size=0 must be a positive int"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_finetune_options(capsys, tiny_q, files, tmp_path, extra, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, out, files["calib"], *extra))
    assert_user_error(code, err, fragment, "finetune")
    assert not out.exists()


def test_eval_batch_size_zero(capsys, tiny_q, files):
    code, _, err = run_cli(capsys, "eval", "--model", tiny_q, "--data", files["calib"], "--batch-size", "0")
    assert_user_error(code, err, "--batch-size 0 must be positive", "eval")


@pytest.mark.parametrize("extra,fragment", [
    (("--bits", "5"), "--bits 5 is not supported by --method apiq-bw"),
    (("--group-size", "0"), "--group-size 0 must be a positive integer"),
    (("--grad-accum", "0"), "--grad-accum 0 must be a positive integer"),
])
def test_plan_shares_the_quantize_checks(capsys, tiny_hf, extra, fragment):
    code, _, err = run_cli(capsys, "plan", "--model", tiny_hf, "--method", "apiq-bw", "--bits", "2", *extra)
    assert_user_error(code, err, fragment, "plan")


def test_plan_offload_is_apiq_bw_only(capsys, tiny_hf):
    code, _, err = run_cli(capsys, "plan", "--model", tiny_hf, "--method", "rtn", "--bits", "2",
                           "--offload-activations")
    assert_user_error(code, err, "--offload-activations applies to --method apiq-bw only, not rtn", "plan")


# --- unwise but legal: a warning -----------------------------------------------------------------------
def test_rank_at_least_min_in_out_warns(capsys, tiny_hf, files, tmp_path):
    """k/v project 64 -> 32: rank 32 makes their factors as big as a full-rank update."""
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, tmp_path / "o", files["calib"], "rtn", "--rank", "32"))
    assert code == 0, err
    assert "apiq-jax quantize: warning: --rank 32 >= min(in, out) of k_proj, v_proj:" in err
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, tmp_path / "o2", files["calib"], "rtn", "--rank", "31"))
    assert code == 0 and "warning" not in err  # one below: silent


def test_group_size_that_pads_every_row_warns_with_effective_bits(capsys, tiny_hf, files, tmp_path):
    """down_proj's input is 96 wide: groups of 64 pad each row to 128, 2 * 128 / 96 = 2.67 code bits."""
    code, _, err = run_cli(capsys, *quantize_args(tiny_hf, tmp_path / "o", files["calib"], "rtn",
                                                  "--group-size", "64"))
    assert code == 0, err
    assert "warning: --group-size 64 does not divide the input width of down_proj (96)" in err
    assert "2.67 code bits per weight instead of 2" in err


def test_batch_size_not_dividing_the_windows_warns(capsys, tiny_q, files, tmp_path):
    """4 windows, batches of 3: one window is left out of every epoch."""
    code, _, err = run_cli(capsys, *finetune_args(tiny_q, tmp_path / "o", files["calib"], "--batch-size", "3"))
    assert code == 0, err
    assert "warning: --batch-size 3 does not divide the 4 training windows: 1 of them" in err
