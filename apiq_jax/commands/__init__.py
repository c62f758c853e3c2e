"""Logic of the larger ``apiq-jax`` subcommands (``quantize``, ``finetune``, ``demo``).

:mod:`apiq_jax.cli` only registers the parsers; each module here holds a
``add_arguments(parser)`` and a ``run(args) -> int``.
"""
