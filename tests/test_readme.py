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
echo "$(basename "$0") $* | refresh=${MXFP8_COMPAT_REFRESH_RECORDS:-} | src=${MXFP8_COMPAT_TORCHAO_SRC:-} | cpu records: $(ls compat_matrix/results/ | grep -c -- -cpu.json)" >> "$FAKE_LOG"
if [ "$(basename "$0")" = tox ]; then
    printf '%s\\n' '{"env": "notorchao", "tests": {"passed": 7, "failed": 1, "skipped": 2}}' > compat_matrix/results/notorchao-cpu.json
    if [ -n "${MXFP8_COMPAT_TORCHAO_SRC:-}" ]; then
        printf '%s\\n' '{"env": "main", "tests": null}' > compat_matrix/results/main-cpu.json
    fi
    echo "FAKE RENDERED TABLE" > compat_matrix/README.md
fi
"""


def _run_ci(tmp_path: Path, with_shared: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run .ci/run itself on a copy of the checkout, with pip and tox replaced by recorders.

    The fake tox writes the notorchao record, and a record without test counts for ``main``
    when it was given a torchao source (as a main env that failed before pytest would).
    """
    checkout = tmp_path / "clone"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / "src" / "mxfp8_compat").mkdir(parents=True)
    (checkout / "compat_matrix" / "results").mkdir(parents=True)
    for name in ("README.md", ".ci/run", "tox.ini", "src/mxfp8_compat/matrix_totals.py"):
        (checkout / name).write_text((ROOT / name).read_text())
    (checkout / "compat_matrix" / "results" / "old-cpu.json").write_text("{}")
    (checkout / "compat_matrix" / "results" / "kept-sm90.json").write_text('{"tests": {"passed": 100}}')
    if with_shared:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "torchao-main-36027d8.tar.gz").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pip", "tox"):
        (bin_dir / tool).write_text(_FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
    env.pop("MXFP8_COMPAT_REFRESH_RECORDS", None)
    env.pop("MXFP8_COMPAT_TORCHAO_SRC", None)
    done = subprocess.run(["bash", ".ci/run"], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    return done, log.read_text().splitlines()


def _expected_envs() -> list[str]:
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    return [e.strip() for e in ini["testenv:matrix"]["depends"].split(",")]


def test_ci_in_a_users_clone_runs_the_readme_command_and_names_main_as_left_out(tmp_path):
    """No ../shared: the README's test command runs without a torchao source; the totals name main."""
    test_command = _readme_commands()[1]
    assert "tox" in test_command
    done, calls = _run_ci(tmp_path, with_shared=False)
    assert done.returncode == 0, done.stdout + done.stderr
    tox_calls = [call for call in calls if call.startswith("tox ")]
    assert tox_calls, f".ci/run did not run tox: {calls}"
    expected_tox = test_command.split("&&")[-1].strip()
    assert tox_calls[0].startswith(expected_tox + " |"), (tox_calls, expected_tox)
    assert "refresh=1" in tox_calls[0], "CI must ask the matrix env to refresh compat_matrix/"
    assert "src= |" in tox_calls[0], "no ../shared: no torchao source may be invented"
    assert "cpu records: 0" in tox_calls[0], "old CPU records must be gone before the run"
    output = done.stdout.rstrip().splitlines()
    assert "FAKE RENDERED TABLE" in output
    last = output[-1]
    assert last.startswith("matrix: 7 passed, 1 failed, 2 skipped; not run: "), last
    assert "main (left out: MXFP8_COMPAT_TORCHAO_SRC is not set" in last
    others = [env for env in _expected_envs() if env not in ("notorchao", "main")]
    assert others and all(f"{env} (no record in this run)" in last for env in others), last


def test_ci_passes_the_shared_tarball_and_counts_an_env_without_tests_as_failed(tmp_path):
    """With ../shared beside the clone (CI), main gets its tarball; a record without tests is a failure."""
    done, calls = _run_ci(tmp_path, with_shared=True)
    tox_call = next(call for call in calls if call.startswith("tox "))
    assert f"src={(tmp_path / 'shared' / 'torchao-main-36027d8.tar.gz').resolve()} |" in tox_call, tox_call
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("matrix: 7 passed, 2 failed, 2 skipped; no test results, each counted as 1 failed: main"), last
    assert "main (left out" not in last
    assert done.returncode == 1, "a record without test results must fail the run"
