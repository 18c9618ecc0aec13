"""resolve(isolate=True): a torchao whose import aborts the interpreter cannot take the process down."""

from __future__ import annotations

import subprocess

import pytest

import fakes
from mxfp8_compat import MXFP8Unavailable, isolation, resolve, reset


@pytest.fixture
def verdict_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MXFP8_COMPAT_CACHE_DIR", str(tmp_path / "verdicts"))
    return tmp_path / "verdicts"


def test_aborting_import_is_caught_in_a_child_and_cached(fake_torchao, verdict_cache, monkeypatch):
    fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    res = resolve("auto", device="cpu", isolate=True)
    assert res.backend == "bf16"
    assert any("killed the isolated probe process (SIGABRT)" in r for r in res.reasons), res.reasons
    with pytest.raises(MXFP8Unavailable, match="SIGABRT"):
        resolve("native", device="cpu", isolate=True)
    assert len(list(verdict_cache.glob("verdict-*.json"))) == 1

    # A later process (here: a reset resolver) reads the cached verdict and starts no child.
    reset()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the cached verdict must be reused"))
    again = resolve("auto", device="cpu", isolate=True)
    assert any("SIGABRT" in r for r in again.reasons)


def test_environment_variable_turns_isolation_on(fake_torchao, verdict_cache, monkeypatch):
    fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    monkeypatch.setenv("MXFP8_COMPAT_ISOLATE", "1")
    assert any("SIGABRT" in r for r in resolve("auto", device="cpu").reasons)


def test_healthy_torchao_passes_isolation_and_is_used(fake_torchao, verdict_cache):
    fake_torchao("0.18.0", fakes.GEN_018)
    res = resolve("emulated", device="cpu", isolate=True)
    assert res.emulation == "torchao" and res.generation.key == "0.18"
    [verdict] = list(verdict_cache.glob("verdict-*.json"))
    assert '"problem": null' in verdict.read_text()


def test_child_exit_status_is_a_reason(fake_torchao, verdict_cache):
    fake_torchao("0.16.0", fakes.import_raising("import os; os._exit(3)"))
    res = resolve("auto", device="cpu", isolate=True)
    assert any("exited with status 3" in r for r in res.reasons), res.reasons
