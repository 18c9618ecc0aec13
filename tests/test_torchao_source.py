"""tools/install_torchao_source.py: the tox `main` env's torchao source is an input (a checkout or a .tar.gz)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import install_torchao_source as source  # noqa: E402


def _tree(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "setup.py").write_text("raise SystemExit('not built in this test')\n")
    (where / "version.txt").write_text("0.19.0\n")
    (where / "torchao").mkdir()
    return where


def test_a_tarball_is_extracted_and_its_commit_read_from_its_name(tmp_path):
    tree = _tree(tmp_path / "torchao-main")
    tarball = tmp_path / "torchao-main-36027d8.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tree, arcname="torchao-main")
    built, commit = source.unpack(tarball, tmp_path / "scratch")
    assert commit == "36027d8"
    assert (built / "setup.py").is_file() and built.parent == tmp_path / "scratch"


def test_a_checkout_is_copied_without_its_build_outputs_and_keeps_its_commit(tmp_path):
    tree = _tree(tmp_path / "ao")
    (tree / "build").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tree, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    built, commit = source.unpack(tree, tmp_path / "scratch")
    assert commit == head
    assert (built / "version.txt").is_file() and not (built / "build").exists() and not (built / ".git").exists()


@pytest.mark.parametrize("make", ["missing", "file", "not ao"])
def test_a_bad_source_is_refused_naming_the_variable(tmp_path, make):
    bad = tmp_path / "src"
    if make == "file":
        bad.write_text("x")
    elif make == "not ao":
        bad.mkdir()
    with pytest.raises(source.SourceError, match="MXFP8_COMPAT_TORCHAO_SRC="):
        source.unpack(bad, tmp_path / "scratch")


def test_no_source_is_a_usage_error_that_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv(source.SOURCE_ENV_VAR, raising=False)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "install_torchao_source.py"), "--scratch", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "set MXFP8_COMPAT_TORCHAO_SRC to a pytorch/ao checkout" in done.stderr
