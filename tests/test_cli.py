"""apiq_jax/cli.py: parser built from the command modules, dispatch, --version, plain-text help,
the user-error line and exit codes of ``python -m apiq_jax.cli``."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import apiq_jax
from apiq_jax import cli
from apiq_jax.cli import COMMANDS, build_parser, main
from tests.conftest import REPO_ROOT

COMMANDS_DIR = Path(cli.__file__).parent / "commands"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_parser_registers_subcommands_in_one_place():
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([])
    assert e.value.code != 0
    args = parser.parse_args(["eval", "--model", "m", "--data", "d.npy"])
    assert args.command == "eval" and args.batch_size == 8 and args.seqlen is None and callable(args.func)
    names = ["eval", "quantize", "finetune", "plan", "demo", "generate", "export", "import"]
    assert list(_subparsers(parser)) == [n.rstrip("_") for n in COMMANDS] == names  # module import_ is `import`
    for name in COMMANDS:
        module = importlib.import_module(f"apiq_jax.commands.{name}")
        assert module.NAME == name.rstrip("_")
        assert parser.parse_args(_minimal_argv(name)).func is module.run


def _minimal_argv(name: str) -> list[str]:
    return {
        "eval": ["eval", "--model", "m", "--data", "d.npy"],
        "quantize": ["quantize", "--model", "m", "--method", "rtn", "--bits", "2", "--calib", "c", "--out", "o"],
        "finetune": ["finetune", "--model", "m", "--data", "d", "--out", "o"],
        "plan": ["plan", "--model", "m", "--method", "rtn", "--bits", "2"],
        "demo": ["demo"],
        "generate": ["generate", "--model", "m", "--prompt", "p"],
        "export": ["export", "--model", "m", "--format", "peft", "--out", "o"],
        "import_": ["import", "--from", "gptq", "s", "--out", "o"],
    }[name]


def test_dispatch_runs_the_command_and_returns_its_code(monkeypatch):
    from apiq_jax.commands import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda args: seen.append(args.command) or 3)
    assert main(["demo", "--fast"]) == 3 and seen == ["demo"]
    monkeypatch.setattr(demo, "run", lambda args: None)
    assert main(["demo"]) == 0


@pytest.mark.parametrize("exc", [ValueError("bad value"), FileNotFoundError("no such file")])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc):
    from apiq_jax.commands import demo

    def fail(args):
        raise exc

    monkeypatch.setattr(demo, "run", fail)
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"apiq-jax demo: error: {exc}\n" and captured.out == ""


def test_other_errors_are_not_swallowed(monkeypatch):
    from apiq_jax.commands import demo

    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "run", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["demo"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    try:
        expected = metadata.version("apiq-jax")
    except metadata.PackageNotFoundError:
        expected = apiq_jax.__version__
    assert capsys.readouterr().out == f"apiq-jax {expected}\n"
    assert cli.version() == expected


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == apiq_jax.__version__


_MARKUP = re.compile(r"``|:(func|mod|class|data|meth|attr|ref|exc|obj):`")


@pytest.mark.parametrize("name", [None, *(n.rstrip("_") for n in COMMANDS)])
def test_help_is_plain_text(name, capsys):
    argv = ["--help"] if name is None else [name, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: apiq-jax")
    assert not _MARKUP.search(text), _MARKUP.search(text)


def test_commands_do_not_import_from_cli():
    """Command modules share helpers through apiq_jax.commands.common, never apiq_jax.cli."""
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "apiq_jax.cli", path.name
                assert not (node.module == "apiq_jax" and any(a.name == "cli" for a in node.names)), path.name
            elif isinstance(node, ast.Import):
                assert all(a.name != "apiq_jax.cli" for a in node.names), path.name


def test_cli_only_builds_the_parser_and_dispatches():
    public = {n for n, v in vars(cli).items() if callable(v) and getattr(v, "__module__", "") == cli.__name__}
    assert public == {"build_parser", "main", "version"}


def test_module_entry_point_exit_codes(tmp_path):
    """``python -m apiq_jax.cli``: JSON as the last stdout line; exit 2 and one error line on bad input."""
    import numpy as np

    from apiq_jax.demo_data import DEMO_MODEL_DIR

    data = tmp_path / "ids.npy"
    np.save(data, np.arange(64, dtype=np.int32).reshape(2, 32))
    ok = subprocess.run([sys.executable, "-m", "apiq_jax.cli", "eval", "--model", str(DEMO_MODEL_DIR),
                         "--data", str(data)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "perplexity" in json.loads(ok.stdout.strip().splitlines()[-1])
    bad = subprocess.run([sys.executable, "-m", "apiq_jax.cli", "eval", "--model", str(tmp_path / "x"),
                          "--data", str(data)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("apiq-jax eval: error: --model ")
