"""resolve(isolate=True): a torchao whose import aborts the interpreter cannot take the process down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import fakes
from mxfp8_compat import MXFP8Unavailable, resolve, reset
from mxfp8_compat.probes import isolated as isolation

# What the isolated probe finds is about torchao: let auto probe it on this CPU too.
pytestmark = pytest.mark.usefixtures("native_capable_device")


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


def _count_children(monkeypatch) -> list:
    calls: list = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    return calls


def test_child_imports_what_the_parent_would_not_what_the_working_directory_holds(
    fake_torchao, verdict_cache, tmp_path, monkeypatch
):
    """A healthy torchao in the working directory must not hide the aborting one this process would import."""
    healthy = fakes.write_fake_torchao(tmp_path / "cwd", "0.18.0", fakes.GEN_018)
    fake_torchao("0.18.0", fakes.import_raising("import os; os.abort()"))
    monkeypatch.chdir(healthy)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    problem = isolation.isolated_problem("0.18.0", torch.device("cpu"))
    assert problem is not None and "SIGABRT" in problem, problem


def test_child_gets_the_parents_sys_path_without_pythonpath(fake_torchao, verdict_cache, monkeypatch):
    """The fake is on sys.path only (not PYTHONPATH): the child still finds it, as the parent does."""
    fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    assert "SIGABRT" in isolation.isolated_problem("0.16.0", torch.device("cpu"))


@pytest.mark.parametrize(
    "outcome",
    ["timeout", "cannot start", "killed from outside", "error status", "no verdict printed"],
)
def test_transient_failures_are_reported_but_never_cached(fake_torchao, verdict_cache, monkeypatch, outcome):
    fake_torchao("0.18.0", fakes.GEN_018)
    calls = []

    def failing_run(command, **kwargs):
        calls.append(command)
        if outcome == "timeout":
            raise subprocess.TimeoutExpired(command, 600)
        if outcome == "cannot start":
            raise OSError(11, "Resource temporarily unavailable")
        returncode, stdout = {"killed from outside": (-9, ""), "error status": (1, ""), "no verdict printed": (0, "")}[outcome]
        return subprocess.CompletedProcess(command, returncode, stdout, "MemoryError")

    monkeypatch.setattr(subprocess, "run", failing_run)
    res = resolve("auto", device="cpu", isolate=True)
    assert any("isolated torchao probe" in r for r in res.reasons), res.reasons
    assert not list(verdict_cache.glob("*")), "a transient failure was cached"
    reset()
    resolve("auto", device="cpu", isolate=True)
    assert len(calls) == 2, "the next resolver must try again"


@pytest.mark.parametrize("content", ["null", "{", '{"problem": 5}', "[]", '{"problem": null}'])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(fake_torchao, verdict_cache, monkeypatch, content):
    fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    assert "SIGABRT" in isolation.isolated_problem("0.16.0", torch.device("cpu"))
    [path] = verdict_cache.glob("verdict-*.json")
    path.write_text(content)  # '{"problem": null}': an old-format file without this key
    calls = _count_children(monkeypatch)
    assert "SIGABRT" in isolation.isolated_problem("0.16.0", torch.device("cpu"))
    assert len(calls) == 1
    assert json.loads(path.read_text())["problem"].startswith("importing torchao killed")


def test_verdicts_are_written_atomically(fake_torchao, verdict_cache, monkeypatch):
    fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    isolation.isolated_problem("0.16.0", torch.device("cpu"))
    [path] = verdict_cache.glob("verdict-*.json")
    before = path.read_text()
    path.write_text("null")  # force a rewrite, which then fails at the rename

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(isolation.os, "replace", failing_replace)
        assert "SIGABRT" in isolation.isolated_problem("0.16.0", torch.device("cpu"))
    assert path.read_text() == "null", "the verdict file was written in place"
    assert [p.name for p in verdict_cache.iterdir()] == [path.name], "a temporary file was left behind"
    isolation.isolated_problem("0.16.0", torch.device("cpu"))
    assert path.read_text() == before


def test_verdict_follows_the_installation_not_only_its_version(fake_torchao, verdict_cache, monkeypatch):
    """Reinstalling the same version (here: fixing the aborting build) is probed again."""
    fake = fake_torchao("0.16.0", fakes.import_raising("import os; os.abort()"))
    assert "SIGABRT" in isolation.isolated_problem("0.16.0", torch.device("cpu"))
    fakes.write_fake_torchao(fake.root, "0.16.0", fakes.GEN_016)
    (fake.root / "torchao-0.16.0.dist-info" / "RECORD").write_text("torchao/__init__.py,sha256=new,1\n")
    assert isolation.isolated_problem("0.16.0", torch.device("cpu")) is None
    assert len(list(verdict_cache.glob("verdict-*.json"))) == 2


def test_verdict_follows_mxfp8_compats_version(fake_torchao, verdict_cache, monkeypatch):
    import mxfp8_compat

    fake_torchao("0.16.0", fakes.GEN_016)
    key = isolation._verdict_key("0.16.0", torch.device("cpu"))
    monkeypatch.setattr(mxfp8_compat, "__version__", "9.9.9")
    assert isolation._verdict_key("0.16.0", torch.device("cpu")) != key


def test_concurrent_isolated_resolves_start_one_child(fake_torchao, verdict_cache, monkeypatch):
    fake_torchao("0.18.0", fakes.GEN_018)
    calls = _count_children(monkeypatch)
    barrier = threading.Barrier(2)
    results = []

    def worker(mode):
        barrier.wait()
        results.append(resolve(mode, device="cpu", isolate=True))

    threads = [threading.Thread(target=worker, args=(mode,)) for mode in ("auto", "emulated")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and len(calls) == 1


# --- issue 23 and issue 17: spellings, one wait, content, channel, steps, GPU identity ------------


@pytest.mark.parametrize(
    "spelling, isolates",
    [("true", True), ("YES", True), ("on", True), (" On ", True), ("1", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_every_usual_spelling_of_the_environment_variable(fake_torchao, verdict_cache, monkeypatch, spelling, isolates):
    fake_torchao("0.16.0", fakes.import_raising("raise ImportError('broken on purpose')"))
    monkeypatch.setenv("MXFP8_COMPAT_ISOLATE", spelling)
    calls = _count_children(monkeypatch)
    assert any("broken on purpose" in r for r in resolve("auto", device="cpu").reasons)
    assert len(calls) == (1 if isolates else 0), f"{spelling!r}: {len(calls)} isolated children"


def test_an_unknown_spelling_is_a_clear_error(fake_torchao, monkeypatch):
    fake_torchao("0.16.0", fakes.GEN_016)
    monkeypatch.setenv("MXFP8_COMPAT_ISOLATE", "maybe")
    with pytest.raises(ValueError, match="MXFP8_COMPAT_ISOLATE.*'maybe'"):
        resolve("auto", device="cpu")


def test_a_hanging_import_is_waited_for_once_per_process(fake_torchao, verdict_cache, monkeypatch):
    fake_torchao("0.18.0", fakes.GEN_018)
    calls = []

    def hanging_run(command, **kwargs):
        calls.append(command)
        raise subprocess.TimeoutExpired(command, 600)

    monkeypatch.setattr(subprocess, "run", hanging_run)
    assert any("did not finish within" in r for r in resolve("auto", device="cpu", isolate=True).reasons)
    with pytest.raises(MXFP8Unavailable, match="did not finish within"):
        resolve("native", device="cpu", isolate=True)
    emulated = resolve("emulated", device="cpu", isolate=True)
    assert emulated.emulation == "reference" and any("did not finish within" in r for r in emulated.reasons)
    assert len(calls) == 1, f"{len(calls)} waits for one hanging import"


def test_an_edited_submodule_is_probed_again(fake_torchao, verdict_cache):
    """Same version, same RECORD, same modification time: only the content changed."""
    fake = fake_torchao("0.18.0", fakes.GEN_018)
    assert isolation.isolated_problem("0.18.0", torch.device("cpu")) is None
    module = fake.root / "torchao" / "prototype" / "moe_training" / "mxfp8_grouped_mm.py"
    stat = module.stat()
    module.write_text("import os; os.abort()\n" + module.read_text())
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    problem = isolation.isolated_problem("0.18.0", torch.device("cpu"))
    assert problem is not None and "SIGABRT" in problem, problem


def test_imported_code_cannot_forge_the_childs_verdict(fake_torchao, verdict_cache):
    """A torchao whose import prints the old survival line on stdout and then ends the process."""
    fake_torchao("0.18.0", fakes.import_raising('print(\'{"survived": true}\', flush=True); import os; os._exit(0)'))
    problem = isolation.isolated_problem("0.18.0", torch.device("cpu"))
    assert problem is not None and "without reporting a verdict" in problem, problem


def _aborting_in_emulation() -> dict[str, str]:
    """torchao 0.18 that imports cleanly and aborts the process in its emulated kernel."""
    files = dict(fakes.GEN_018)
    name = "torchao/prototype/moe_training/mxfp8_grouped_mm.py"
    marker = '        record(generation="0.18"'
    assert marker in files[name]
    files[name] = files[name].replace(
        marker, "        if kernel_preference == KernelPreference.EMULATED: __import__('os').abort()\n" + marker
    )
    return files


def test_a_crash_in_one_modes_smoke_run_is_that_modes_verdict_not_an_import_verdict(fake_torchao, verdict_cache):
    fake_torchao("0.18.0", _aborting_in_emulation())
    emulated = resolve("emulated", device="cpu", isolate=True)
    assert emulated.emulation == "reference", emulated
    [reason] = [r for r in emulated.reasons if "SIGABRT" in r]
    assert "resolving mode 'emulated'" in reason and "importing torchao" not in reason, reason
    auto = resolve("auto", device="cpu", isolate=True)  # torchao imports and its native probe runs here
    assert auto.backend == "bf16" and auto.generation is None
    assert not any("killed" in r for r in auto.reasons), auto.reasons
    assert not any("unusable" in r for r in auto.reasons), auto.reasons
    assert "torchao.prototype.moe_training" in sys.modules, "auto's resolution survived the child: torchao is imported here"
    [path] = verdict_cache.glob("verdict-*.json")
    cached = json.loads(path.read_text())
    assert cached["problem"] is None and "SIGABRT" in cached["modes"]["emulated"] and cached["modes"]["auto"] is None
    # A later process reads all of it from the cache.
    reset()
    again = resolve("emulated", device="cpu", isolate=True)
    assert again.emulation == "reference" and any("resolving mode 'emulated'" in r for r in again.reasons)


def test_verdicts_are_keyed_on_the_gpus_name_and_capability(fake_torchao, monkeypatch):
    fake_torchao("0.18.0", fakes.GEN_018)
    keys = set()
    for name, capability in [("NVIDIA H100", (9, 0)), ("NVIDIA B200", (10, 0)), ("NVIDIA H200", (9, 0))]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        keys.add(isolation._verdict_key("0.18.0", torch.device("cuda", 0)))
    assert len(keys) == 3
