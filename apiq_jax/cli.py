"""``apiq-jax`` command line: builds the parser from the command modules and dispatches.

Every subcommand lives in its own module of :mod:`apiq_jax.commands` (listed in
:data:`COMMANDS`), which defines ``NAME``, ``HELP`` (one line), ``DESCRIPTION`` (plain
text for ``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can
fix are reported by :func:`apiq_jax.commands.common.run_command` as one
``apiq-jax <cmd>: error: ...`` line on stderr with exit code 2.

    apiq-jax eval --model DIR --data FILE [--seqlen N] [--batch-size N]
    apiq-jax quantize --model HF_DIR --method M --bits B --calib FILE --out OUT
    apiq-jax finetune --model QUANT_DIR --data FILE --out OUT [--steps N]
    apiq-jax demo [--fast]
    apiq-jax generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    apiq-jax export --model QDIR --format {peft,merged,gptq} --out DIR
    apiq-jax import --from {apiq,gptq} SRC --out QDIR
    apiq-jax --version
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from apiq_jax.commands.common import run_command

#: the subcommands, in --help order; each is the module apiq_jax.commands.<name> (the command
#: is its NAME: the module import_ is the command ``import``)
COMMANDS = ("eval", "quantize", "finetune", "plan", "demo", "generate", "export", "import_")


def version() -> str:
    """The installed package version.

    Returns:
        The version from the package metadata of ``apiq-jax``, or ``apiq_jax.__version__``
        when the package is not installed (a source checkout on ``sys.path``).
    """
    from importlib import metadata

    try:
        return metadata.version("apiq-jax")
    except metadata.PackageNotFoundError:
        import apiq_jax

        return apiq_jax.__version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS` registered.

    Returns:
        The parser; parsed arguments carry ``command`` (the name) and ``func`` (its runner).
    """
    parser = argparse.ArgumentParser(
        prog="apiq-jax", description="ApiQ in JAX: quantize, finetune and evaluate low-bit LLMs."
    )
    parser.add_argument("--version", action="version", version=f"apiq-jax {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"apiq_jax.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apiq-jax`` console script.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for usage and user errors.
    """
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
