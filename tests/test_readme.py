"""The README's runnable example runs, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(no_torchao):
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md example", "exec"), namespace)  # noqa: S102 - our own README
    out, A, W = namespace["out"], namespace["A"], namespace["W"]
    assert out.shape == (A.shape[0], W.shape[2])
    assert A.grad is not None and W.grad is not None and W.grad.shape == W.shape


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts the second command of the README's first bash block and runs it."""
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert block[0].split("#")[0].strip() == "pip install -e . && python -m mxfp8_compat"
    expected = block[1].split("#")[0].strip()
    extracted = subprocess.run(
        ["bash", "-c", "awk '/^```bash/{inside=1; next} /^```/{if (inside) exit} inside' README.md | sed -n 2p | sed 's/ *#.*$//'"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == expected and "tox" in expected
    assert "test_command=$(awk '/^```bash/" in (ROOT / ".ci" / "run").read_text()
