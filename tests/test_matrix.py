"""compat_matrix records and rendering: no machine paths, a commit per record, a computed footer,
and a developer's tox run that leaves the checkout as it was."""

from __future__ import annotations

import configparser
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxfp8_compat_dev import matrix

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written_record(tmp_path_factory) -> dict:
    """A record written here and now by the same code tox runs (whatever torchao this env has)."""
    path = matrix.write_record("unit", None, tmp_path_factory.mktemp("records"), "pytest", "cpu")
    return json.loads(path.read_text())


@pytest.fixture
def base_record(written_record) -> dict:
    return copy.deepcopy(written_record)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_a_record_holds_no_machine_paths_and_names_its_commit(written_record):
    record = written_record
    assert "torchao_location" not in record
    for text in _strings(record):
        assert not text.startswith("/"), text
        assert str(Path.home()) not in text and str(ROOT) not in text, text
    assert record["commit"] == "unknown" or len(record["commit"]) == 40
    assert set(record) >= {"env", "runner", "date", "commit", "src_modified", "modes", "tests"}


def test_commit_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv(matrix.COMMIT_ENV_VAR, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert matrix.project_commit(tmp_path) == {"commit": "unknown", "src_modified": None}
    monkeypatch.setenv(matrix.COMMIT_ENV_VAR, "abc123")
    assert matrix.project_commit(tmp_path)["commit"] == "abc123"


def test_footer_is_computed_from_the_records(base_record):
    cpu = copy.deepcopy(base_record)
    text = matrix.render_records([cpu])
    assert "native resolves in none of 1 records" in text
    assert "No record here comes from a compute capability 10.x device" in text

    blackwell = copy.deepcopy(base_record)
    blackwell.update(device_name="NVIDIA B200", capability=[10, 0], env="torchao018")
    blackwell["modes"]["native"]["ok"] = True
    blackwell["modes"]["auto"]["backend"] = "mxfp8"
    text = matrix.render_records([cpu, blackwell])
    assert "NVIDIA B200 (sm_100): native resolves in 1 of 1 records (torchao018); auto picks it in 1" in text
    assert "No record here comes from" not in text

    hopper = copy.deepcopy(blackwell)
    hopper.update(device_name="NVIDIA H100", capability=[9, 0])
    assert "UNEXPECTED" in matrix.render_records([hopper])


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_records_older_than_the_last_change_to_src_are_marked_stale(base_record, tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "src" / "a.py").write_text("1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "src" / "a.py").write_text("2\n")
    _git(repo, "commit", "-qam", "src changed")
    second = _git(repo, "rev-parse", "HEAD")
    (repo / "README.md").write_text("docs\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "docs only")
    third = _git(repo, "rev-parse", "HEAD")

    records = []
    for env, commit in (("old", first), ("current", second), ("docs", third), ("anonymous", "unknown")):
        record = copy.deepcopy(base_record)
        record.update(env=env, commit=commit, src_modified=False)
        records.append(record)
    rows = {line.split(" | ")[0].strip("| "): line for line in matrix.render_records(records, repo).splitlines() if line.startswith("| ")}
    assert f"{first[:10]} (stale)" in rows["old"]
    assert "(stale)" not in rows["current"] and "(stale)" not in rows["docs"]
    assert "commit unknown" in rows["anonymous"]


def test_finish_prints_the_run_and_totals_and_leaves_compat_matrix_alone(base_record, tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(matrix.REFRESH_ENV_VAR, raising=False)
    run_dir, matrix_dir = tmp_path / "run", tmp_path / "compat_matrix"
    run_dir.mkdir()
    (matrix_dir / "results").mkdir(parents=True)
    (matrix_dir / "README.md").write_text("committed\n")
    for env, tests in (("a", {"passed": 5, "failed": 1, "skipped": 2}), ("b", {"passed": 7, "failed": 0, "skipped": 3})):
        record = dict(copy.deepcopy(base_record), env=env, tests=tests)
        (run_dir / f"{env}-cpu.json").write_text(json.dumps(record))

    out = io.StringIO()
    assert matrix.finish(run_dir, matrix_dir, matrix._refresh_requested(False), out) == 0
    text = out.getvalue()
    assert "| a |" in text and "| b |" in text
    assert text.rstrip().endswith("matrix: 12 passed, 1 failed, 5 skipped")
    assert (matrix_dir / "README.md").read_text() == "committed\n"
    assert list((matrix_dir / "results").iterdir()) == []

    for variable, value in (("CI", "true"), (matrix.REFRESH_ENV_VAR, "1")):
        monkeypatch.setenv(variable, value)
        assert matrix._refresh_requested(False)
        monkeypatch.delenv(variable)
    out = io.StringIO()
    matrix.finish(run_dir, matrix_dir, True, out)
    assert sorted(p.name for p in (matrix_dir / "results").iterdir()) == ["a-cpu.json", "b-cpu.json"]
    assert (matrix_dir / "README.md").read_text().startswith("# Compatibility matrix")
    assert out.getvalue().rstrip().endswith("matrix: 12 passed, 1 failed, 5 skipped")


def test_tox_records_outside_the_checkout_and_refreshes_only_on_request():
    """A developer's `tox` writes records under .tox (git-ignored); only `finish` may write compat_matrix/."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    for section in ini.sections():
        for option in ("commands", "commands_pre", "commands_post"):
            text = ini.get(section, option, fallback="")
            for line in text.splitlines():
                if "mxfp8_compat_dev.matrix record" in line:
                    assert "--dir {work_dir}/" in line, (section, line)
                if "compat_matrix" in line:
                    assert "mxfp8_compat_dev.matrix finish" in line and "--refresh" not in line, (section, line)
    matrix_env = ini["testenv:matrix"]
    assert "mxfp8_compat_dev.matrix finish" in matrix_env["commands"]
    assert matrix_env.get("parallel_show_output", "").strip() == "true"
    assert matrix.REFRESH_ENV_VAR in matrix_env.get("pass_env", "")
    assert ".tox/" in (ROOT / ".gitignore").read_text().split()


def test_an_env_without_test_results_counts_as_failed_and_missing_envs_are_named(base_record, tmp_path, monkeypatch):
    """The record of an env whose pytest never ran (commands_pre failed) must not read as '0 failed'."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(matrix.REFRESH_ENV_VAR, raising=False)
    monkeypatch.delenv(matrix.matrix_totals.SOURCE_ENV_VAR, raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ran = dict(copy.deepcopy(base_record), env="notorchao", tests={"passed": 5, "failed": 0, "skipped": 1})
    broken = dict(copy.deepcopy(base_record), env="torchao016", tests=None)
    for record in (ran, broken):
        (run_dir / f"{record['env']}-cpu.json").write_text(json.dumps(record))
    out = io.StringIO()
    status = matrix.finish(run_dir, tmp_path / "cm", False, out, expected=["notorchao", "torchao016", "main", "latest"])
    text = out.getvalue()
    assert status == 1
    assert "| torchao016 |" in text and "no test results (counted as 1 failed)" in text
    assert text.rstrip().splitlines()[-1] == (
        "matrix: 5 passed, 1 failed, 1 skipped; no test results, each counted as 1 failed: torchao016; not run: "
        "main (left out: MXFP8_COMPAT_TORCHAO_SRC is not set (a pytorch/ao checkout or .tar.gz; see docs/testing.md)), "
        "latest (no record in this run)"
    )
    monkeypatch.setenv(matrix.matrix_totals.SOURCE_ENV_VAR, "/somewhere/ao")
    summary = matrix.matrix_totals.summarize([ran], ["notorchao", "main"])
    assert summary["not_run"] == {"main": "no record in this run"}, "given a source, a missing main is not 'left out'"


def test_the_matrix_env_names_what_it_waited_for_and_tox_leaves_main_out_with_the_same_variable():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    assert "--tox-ini {tox_root}/tox.ini" in ini["testenv:matrix"]["commands"]
    expected = matrix.matrix_totals.expected_envs(ROOT / "tox.ini")
    assert "main" in expected and "notorchao" in expected and "matrix" not in expected
    variable = matrix.matrix_totals.SOURCE_ENV_VAR
    assert matrix.matrix_totals.GATED_ENVS == {"main": variable}
    assert variable in ini["testenv:main"]["pass_env"] and variable in ini["testenv:matrix"]["pass_env"]
    for section in ini.sections():  # the source is an input: no setting reaches outside the repository for it
        assert not any("../shared" in value for value in ini[section].values()), section
    toxfile = (ROOT / "toxfile.py").read_text()
    assert f'SOURCE_ENV_VAR = "{variable}"' in toxfile and 'GATED_ENV = "main"' in toxfile


def test_tox_leaves_main_out_of_the_default_run_visibly_without_a_source():
    import shutil

    tox = shutil.which("tox") or (str(Path(sys.executable).with_name("tox")) if Path(sys.executable).with_name("tox").exists() else None)
    if tox is None:
        pytest.skip("tox is not installed in this environment (it runs the matrix; inside a tox env it is not)")
    env = {k: v for k, v in os.environ.items() if k != matrix.matrix_totals.SOURCE_ENV_VAR}
    def default_envs(done: subprocess.CompletedProcess) -> list[str]:
        assert done.returncode == 0, done.stderr
        section = done.stdout.split("additional environments:")[0]
        return [line.split()[0] for line in section.splitlines()[1:] if line.strip()]

    done = subprocess.run([tox, "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    default = default_envs(done)
    assert "notorchao" in default and "main" not in default
    assert "'main' left out of the default run: MXFP8_COMPAT_TORCHAO_SRC is not set" in done.stderr
    env[matrix.matrix_totals.SOURCE_ENV_VAR] = "/somewhere/ao"
    done = subprocess.run([tox, "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "main" in default_envs(done) and "left out" not in done.stderr
