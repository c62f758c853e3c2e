"""Interoperability: export to peft / merged / GPTQ Hugging Face checkpoints, import official
ApiQ and GPTQ checkpoints (:mod:`~apiq_jax.interop.export`, :mod:`~apiq_jax.interop.importer`,
the tensor layouts in :mod:`~apiq_jax.interop.gptq_format` and :mod:`~apiq_jax.interop.peft_io`)."""

from apiq_jax.interop.export import ADAPTER_SUBDIR, FORMATS, export_model, write_gptq
from apiq_jax.interop.gptq_format import CHECKPOINT_FORMATS, from_gptq, pack_rows, to_gptq, unpack_rows
from apiq_jax.interop.importer import SOURCES, import_apiq, import_gptq, recover_quantized
from apiq_jax.interop.peft_io import load_adapter, save_adapter

__all__ = [
    "ADAPTER_SUBDIR", "CHECKPOINT_FORMATS", "FORMATS", "SOURCES", "export_model", "from_gptq", "import_apiq",
    "import_gptq", "load_adapter", "pack_rows", "recover_quantized", "save_adapter", "to_gptq", "unpack_rows",
    "write_gptq",
]
