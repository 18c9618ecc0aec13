"""The README's runnable example runs, and CI runs the README's test command."""

from __future__ import annotations

import os
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
    assert out.shape == (A.shape[0], W.shape[1])  # W is stored (E, N, K)
    assert A.grad is not None and W.grad is not None and W.grad.shape == W.shape


INSTALL_LINE = 'pip install -e ".[torchao]" && python -m mxfp8_compat'


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    return [line.split("#")[0].strip() for line in block if line.strip()]


def test_readme_starts_with_the_install_line_that_works():
    """The torchao extra brings numpy (torchao imports it and declares none)."""
    assert _readme_commands()[0] == INSTALL_LINE
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^torchao = \[(.*?)\]", pyproject, re.M).group(1)
    assert '"numpy"' in extra and '"torchao' in extra


_FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $* | refresh=${MXFP8_COMPAT_REFRESH_RECORDS:-} | cpu records: $(ls compat_matrix/results/ | grep -c -- -cpu.json)" >> "$FAKE_LOG"
if [ "$(basename "$0")" = tox ]; then
    printf '%s\\n' '{"env": "fake", "tests": {"passed": 7, "failed": 1, "skipped": 2}}' > compat_matrix/results/fake-cpu.json
    echo "FAKE RENDERED TABLE" > compat_matrix/README.md
fi
"""


def test_ci_runs_the_readme_test_command_and_prints_the_matrix_and_totals(tmp_path):
    """Run .ci/run itself on a copy of the checkout, with pip and tox replaced by recorders.

    It must run the README's test command (not its install line), refresh the CPU records,
    then print the rendered matrix and the totals of the records last.
    """
    test_command = _readme_commands()[1]
    assert "tox" in test_command
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / "compat_matrix" / "results").mkdir(parents=True)
    for name in ("README.md", ".ci/run"):
        (checkout / name).write_text((ROOT / name).read_text())
    (checkout / "compat_matrix" / "results" / "old-cpu.json").write_text("{}")
    (checkout / "compat_matrix" / "results" / "kept-sm90.json").write_text('{"tests": {"passed": 100}}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pip", "tox"):
        (bin_dir / tool).write_text(_FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
    env.pop("MXFP8_COMPAT_REFRESH_RECORDS", None)
    done = subprocess.run(["bash", ".ci/run"], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    tox_calls = [call for call in calls if call.startswith("tox ")]
    assert tox_calls, f".ci/run did not run tox: {calls}"
    expected_tox = test_command.split("&&")[-1].strip()
    assert tox_calls[0].startswith(expected_tox + " |"), (tox_calls, expected_tox)
    assert "refresh=1" in tox_calls[0], "CI must ask the matrix env to refresh compat_matrix/"
    assert "cpu records: 0" in tox_calls[0], "old CPU records must be gone before the run"
    output = done.stdout.rstrip().splitlines()
    assert "FAKE RENDERED TABLE" in output
    assert output[-1] == "matrix: 7 passed, 1 failed, 2 skipped", output[-3:]
