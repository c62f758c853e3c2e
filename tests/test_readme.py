"""README.md: every ```python block runs, in order, in one namespace (fresh process, temp cwd).

The harness reads ``$APIQ_README`` when set (to try new README text before it lands),
README.md of the checkout otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# runs the blocks given as a JSON list in one namespace; names the block that fails
_RUNNER = """\
import json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__readme__"}
for i, source in enumerate(blocks, 1):
    try:
        exec(compile(source, f"<README.md python block {i}>", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README.md python block {i} of {len(blocks)} failed", file=sys.stderr)
        sys.exit(1)
print(f"ran {len(blocks)} README.md python blocks")
"""


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``markdown``, in order.

    Args:
        markdown: the Markdown text.

    Returns:
        One string per block (without the fences).
    """
    return [m.group(1) for m in _FENCE.finditer(markdown)]


def run_blocks(blocks: list[str], cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Execute ``blocks`` in order in one namespace in a fresh Python with ``cwd`` as working dir.

    Args:
        blocks: Python sources.
        cwd: working directory (relative paths the blocks write land there).
        timeout: seconds before the run is killed.

    Returns:
        The finished process (stdout, stderr as text).
    """
    spec = cwd / "readme_blocks.json"
    spec.write_text(json.dumps(blocks), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", _RUNNER, str(spec)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_python_blocks_extracts_only_python_fences():
    md = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\nprint(b)\n```\n```\nplain\n```\n"
    assert python_blocks(md) == ["a = 1\n", "b = a + 1\nprint(b)\n"]


def test_run_blocks_shares_one_namespace_and_names_the_failing_block(tmp_path):
    ok = run_blocks(["import pathlib\nx = 2\n", "pathlib.Path('out.txt').write_text(str(x * 3))\n"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out.txt").read_text() == "6"
    bad = run_blocks(["y = 1\n", "y + undefined_name\n"], tmp_path)
    assert bad.returncode == 1
    assert "NameError" in bad.stderr and "README.md python block 2 of 2 failed" in bad.stderr


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    readme = Path(os.environ.get("APIQ_README", README))
    blocks = python_blocks(readme.read_text(encoding="utf-8"))
    assert blocks, f"no ```python blocks in {readme}"
    proc = run_blocks(blocks, tmp_path)
    assert proc.returncode == 0, f"{readme}:\n{proc.stderr[-4000:]}"
