"""Every README code block runs as pasted, and CI runs the README's test command.

Python blocks run one by one, each in a fresh interpreter from a file holding exactly the block
(tests/support/readme_blocks.py says which run how); the torchrun script runs under its own command in the
2-process suite (tests/test_distributed.py). The first bash block's two commands are the set-up:
.ci/run runs the second one, checked here with pip and tox replaced by recorders.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from readme_blocks import README, ROOT, python_blocks

README_TEXT = README.read_text()
SINGLE = [b for b in python_blocks() if b.torchrun is None and not b.shown_only]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_the_readme_blocks_are_accounted_for():
    """Every python block is run here, under torchrun, or says why not; at most the real-checkpoint one is shown only."""
    blocks = python_blocks()
    shown = [b for b in blocks if b.shown_only]
    assert len(shown) <= 1 and all("from_pretrained(" in b.code for b in shown), [b.line for b in shown]
    scripts = [b for b in blocks if b.torchrun]
    assert len(scripts) == 1 and scripts[0].torchrun[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    script = scripts[0].torchrun[-1]
    assert f"`{script}`" in README_TEXT, "the README must tell the reader what to save the script as"
    assert len(SINGLE) >= 4


@pytest.mark.parametrize("block", SINGLE, ids=[f"README.md:{b.line}" for b in SINGLE])
def test_readme_python_block_runs_as_pasted(block, tmp_path):
    if "transformers" in block.code and not _has("transformers"):
        pytest.skip("transformers is not installed here (tox -e transformers runs this block)")
    script = tmp_path / "example.py"
    script.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXFP8_COMPAT_")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md line {block.line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README_TEXT):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), (doc.name, target)


def test_readme_opens_with_the_one_line_and_cites_nothing_a_reader_cannot_look_up():
    head = README_TEXT[:1500]
    assert "grouped_mm = resolve()" in head and "```bash" in head
    assert head.index("grouped_mm = resolve()") < head.index("```bash")
    for text in [README_TEXT] + [p.read_text() for p in (ROOT / "docs").glob("*.md")]:
        assert not re.search(r"\bissues? \d+\b", text), re.search(r".{40}\bissues? \d+\b.{20}", text)
    assert len(README_TEXT) < 16000, "long reference material belongs in docs/"


def test_readme_documents_every_cli_option():
    from mxfp8_compat.cli import build_parser

    for action in build_parser("x")._actions:
        for option in action.option_strings:
            assert f"`{option}" in README_TEXT or f"{option}`" in README_TEXT, option
    assert "mxfp8-compat" in README_TEXT


INSTALL_LINE = 'pip install -e ".[torchao]" && python -m mxfp8_compat'


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README_TEXT, re.S).group(1).splitlines()
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
    (checkout / "tools" / "mxfp8_compat_dev").mkdir(parents=True)
    (checkout / "compat_matrix" / "results").mkdir(parents=True)
    for name in ("README.md", ".ci/run", "tox.ini", "tools/mxfp8_compat_dev/matrix_totals.py"):
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
