"""The ``apiq-jax`` subcommands, one module each (``eval``, ``quantize``, ``finetune``, ``demo``).

Each module defines ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``; :mod:`apiq_jax.cli` registers them in a loop and dispatches. What
they share (``--backend``, data loading, the user-error handling, shared defaults) is in
:mod:`apiq_jax.commands.common`.
"""
