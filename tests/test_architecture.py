"""The layering of docs/architecture.md, checked on the source: what each package may import.

quant, cpu_kernels <- pallas_kernels <- qmatmul <- lora/data <- models <- evaluate <- calibration <- training
<- PEFT methods (adapters, prompt tuning, QAT) <- compare <- commands <- cli. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"apiq_jax.quant"}
QMATMUL = BASE | {"apiq_jax.qmatmul"}  # the one module that knows the kernels
LEAVES = {"apiq_jax.lora", "apiq_jax.data", "apiq_jax.checkpoint", "apiq_jax.plotting", "apiq_jax.sharding",
          "apiq_jax.interrupts"}
MODELS = QMATMUL | LEAVES | {"apiq_jax.cpu_kernels", "apiq_jax.models"}
EVALUATE = MODELS | {"apiq_jax.evaluate"}
CALIBRATION = EVALUATE | {"apiq_jax.calibration"}
TRAINING = CALIBRATION | {"apiq_jax.training"}
PEFT = TRAINING | {"apiq_jax.adapters", "apiq_jax.prompt_tuning", "apiq_jax.qat"}
GENERATION = MODELS | {"apiq_jax.generation"}  # KV-cached decoding on the model's functions
INTEROP = MODELS | {"apiq_jax.interop"}  # export/import of peft, merged and GPTQ checkpoints
HARNESS = PEFT | {"apiq_jax.compare", "apiq_jax.demo_data", "apiq_jax.memory_plan", "apiq_jax.generation",
                  "apiq_jax.interop"}

#: package or module -> what its code may import (besides itself and the standard/third-party world)
ALLOWED: dict[str, set[str]] = {
    "pallas_kernels": {"pallas_kernels"},
    "apiq_jax.quant": BASE,
    "apiq_jax.cpu_kernels": {"apiq_jax.cpu_kernels"},  # C++ custom calls on raw arrays (fused CPU attention)
    "apiq_jax.qmatmul": BASE | {"pallas_kernels"},
    "apiq_jax.lora": BASE | {"apiq_jax.lora"},
    "apiq_jax.data": {"apiq_jax.data"},
    "apiq_jax.checkpoint": {"apiq_jax.checkpoint"},
    "apiq_jax.sharding": BASE | {"apiq_jax.lora", "apiq_jax.sharding"},  # mesh + placement rules of the trees
    "apiq_jax.plotting": {"apiq_jax.plotting"},
    "apiq_jax.interrupts": {"apiq_jax.interrupts"},
    "apiq_jax.models": MODELS,
    "apiq_jax.evaluate": EVALUATE,
    "apiq_jax.calibration": CALIBRATION,
    "apiq_jax.training": TRAINING,
    "apiq_jax.adapters": PEFT,
    "apiq_jax.prompt_tuning": PEFT,
    "apiq_jax.qat": PEFT,
    "apiq_jax.demo_data": {"apiq_jax.demo_data"},
    "apiq_jax.compare": HARNESS,
    "apiq_jax.memory_plan": HARNESS,
    "apiq_jax.generation": GENERATION,
    "apiq_jax.interop": INTEROP,
    "apiq_jax.commands": HARNESS | {"apiq_jax.commands", "apiq_jax"},
    "apiq_jax.cli": {"apiq_jax.commands", "apiq_jax"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from apiq_jax import qmatmul`
    return {n for n in names if n.split(".")[0] in ("apiq_jax", "pallas_kernels")}


def _owner(module: str) -> str | None:
    matches = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return max(matches, key=len) if matches else None


def _allowed(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


SOURCES = sorted(p for d in ("apiq_jax", "pallas_kernels") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    module = _module_name(path)
    if module == "apiq_jax":  # the package root re-exports the public API
        return
    owner = _owner(module)
    assert owner is not None, f"{module} has no layer in ALLOWED (add it, and to docs/architecture.md)"
    allowed = ALLOWED[owner] | {owner}
    bad = sorted(n for n in _imports(path) if not _allowed(n, allowed))
    assert not bad, f"{module} (layer {owner}) imports {bad}; allowed: {sorted(allowed)}"


def test_the_rule_can_fail():
    """A model module importing the calibration layer is caught."""
    allowed = ALLOWED["apiq_jax.models"]
    assert not _allowed("apiq_jax.calibration", allowed) and not _allowed("pallas_kernels", allowed)
    assert _allowed("apiq_jax.quant.tensor", allowed)
