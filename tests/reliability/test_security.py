"""No pickle, no remote code, no path followed outside a model directory: checked on the package's source.

The paths case itself (a safetensors index naming ``../x``) is a CLI case in
``test_model_inputs.py``; the refusal of a pickled ``.npy`` is in ``test_data_inputs.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("apiq_jax", "pallas_kernels") for p in (ROOT / d).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def findings(source: str) -> list[str]:
    """What the rules below find in ``source``: unsafe imports, ``np.load`` without
    ``allow_pickle=False``, ``torch.load``, ``trust_remote_code`` other than False, and
    ``from_pretrained`` without ``local_files_only=True``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            out.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
            if name in ("np.load", "numpy.load") and const.get("allow_pickle", None) is not False:
                out.append(f"{name} without allow_pickle=False (line {node.lineno})")
            if name == "torch.load":
                out.append(f"torch.load (line {node.lineno})")
            if "trust_remote_code" in kw and const.get("trust_remote_code") is not False:
                out.append(f"trust_remote_code not False (line {node.lineno})")
            if name.endswith("from_pretrained") and const.get("local_files_only") is not True:
                out.append(f"{name} without local_files_only=True (line {node.lineno})")
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_no_remote_code(path):
    assert findings(path.read_text()) == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "from joblib import load", "import numpy as np\nnp.load('x.npy')",
    "np.load('x.npy', allow_pickle=True)", "torch.load('m.bin')",
    "AutoModel.from_pretrained('d', trust_remote_code=True, local_files_only=True)",
    "AutoTokenizer.from_pretrained('d')",
])
def test_the_rules_can_fail(snippet):
    assert findings(snippet)
