"""Multi-process tests: FSDP2, expert parallelism, DTensor arguments, isolation from several ranks.

Each test starts 2 processes running ``tests/support/distributed_worker.py`` (gloo on the CPU by default;
``MXFP8_COMPAT_DIST_BACKEND=nccl`` runs them on ``cuda:0`` and ``cuda:1``), which rendezvous
through a FileStore in a fresh temporary directory (no port to collide), run their scenarios
and write one JSON report per rank (``tests/support/distributed_launch.py``). A launch that exceeds
``MXFP8_COMPAT_DIST_TIMEOUT`` (420 s) is killed and fails. The worker compares every result with
the same model in one process; its docstrings state what must be bitwise and what tolerance
applies where. Here each comparison becomes an assertion.

* ``fsdp``: a small MoE (router, top-k, permutation, padded groups, gate/up/down grouped GEMMs
  with SiLU) under ``fully_shard`` with bf16 mixed precision, two SGD steps, from an (E, K, N)
  checkpoint converted with ``state_dict_to_expert_layout``: loss, gradients, trained weights
  and the full state dict bitwise equal to the single process (gradient accumulation over the
  ranks' batches); B reaches the GEMM as a plain per-group column-major tensor, never copied.
* ``ep``: half the experts per rank (all-to-all dispatch), expert weights ``Shard(0)`` DTensors:
  output, loss, input and expert gradients bitwise equal to all experts in one process on the
  global batch; the all-reduced router gradient within the float32 reordering bound.
* ``dtensor``: the placement rules of ``mxfp8_compat.distributed`` against unsharded calls,
  no communication inside the GEMM, and the ValueErrors.
* the README's FSDP2 + expert-parallel script, under the ``torchrun`` command the README prints.
* ``isolation``: ``resolve(isolate=True)`` from three threads on each rank, one cache
  directory: one smoke run per process, one intact verdict file.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch

from distributed_launch import MODEL_SCENARIOS, WORLD, failures, isolation_env, launch

BACKEND = os.environ.get("MXFP8_COMPAT_DIST_BACKEND", "gloo")

if sys.platform == "win32" or not torch.distributed.is_available():
    pytestmark = pytest.mark.skip(reason="needs torch.distributed on POSIX")
elif BACKEND == "nccl" and torch.cuda.device_count() < WORLD:
    pytestmark = pytest.mark.skip(reason=f"MXFP8_COMPAT_DIST_BACKEND=nccl needs {WORLD} CUDA devices")


def passed(report: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """Assert that every rank ran ``key`` and passed every check; return rank 0's checks."""
    problems = failures(report, key)
    assert not problems, "\n".join(problems)
    return report[key][0]["checks"]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One launch for the model scenarios (process start-up and ``import torch`` dominate)."""
    return launch(tmp_path_factory.mktemp("dist"), MODEL_SCENARIOS)


def names(checks: list[dict[str, Any]]) -> set[str]:
    return {c["name"] for c in checks}


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_fsdp2_matches_one_process(main_run, mode):
    checks = passed(main_run, f"fsdp:{mode}")
    assert {"step 1: loss", "step 1: grad w_down", "trained w_gate", "full state dict w_up",
            "expert weights were never copied by the shim"} <= names(checks)
    if BACKEND == "gloo":  # bitwise on the CPU, as the worker's docstring argues
        # 2 steps x (loss + 4 gradients), 4 trained weights, 4 state-dict entries
        compared = [c for c in checks if c["name"].startswith(("step", "trained", "full state dict"))]
        assert len(compared) == 18 and all(c["bitwise"] for c in compared)


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_expert_parallel_matches_one_process(main_run, mode):
    checks = passed(main_run, f"ep:{mode}")
    assert {"output", "loss", "input gradient", "grad w_down (local experts)", "router gradient"} <= names(checks)


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_dtensor_arguments_compute_on_local_shards_or_raise(main_run, mode):
    checks = passed(main_run, f"dtensor:{mode}")
    assert sum(1 for c in checks if "message" in c) == 10, "the refusals were not all exercised"
    assert {"bias, EP: Shard(0) bias", "bias, column-parallel: Shard(1) bias"} <= names(checks)
    assert sum(1 for c in checks if c["name"].endswith("no communication")) == 3


def test_readme_torchrun_script_runs_as_pasted(tmp_path):
    """The README's FSDP2 + expert-parallel script, saved under its name and run by the torchrun command it prints."""
    import signal
    import subprocess

    from distributed_launch import TIMEOUT_S
    from readme_blocks import python_blocks

    (script,) = [b for b in python_blocks() if b.torchrun]
    command = script.torchrun
    assert command[0] == "torchrun" and command[-1].endswith(".py"), command
    (tmp_path / command[-1]).write_text(script.code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXFP8_COMPAT_")}
    if BACKEND == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the script then takes the CPU and gloo, as on a machine without GPUs
    # `torchrun` is torch.distributed.run's console script: the same entry point, of this interpreter
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command[1:]], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:  # torchrun's workers go with it, also when this test is interrupted or times out
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    for rank in range(WORLD):
        assert f"rank {rank}: " in output and "FSDP2 loss" in output, output[-3000:]


def test_isolated_probe_and_cache_from_several_ranks(tmp_path):
    report = launch(tmp_path, ["isolation"], isolation_env(tmp_path))
    checks = passed(report, "isolation")
    assert {"one smoke run in this process", "one verdict file, nothing else"} <= names(checks)
    assert len(list((tmp_path / "verdicts").iterdir())) == 1


# SIGINT as a terminal's Ctrl-C delivers it: tox run-parallel starts its envs with SIGINT ignored,
# and an ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt handler).
_LAUNCH_AND_HANG = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[2])
from distributed_launch import launch
launch(Path(sys.argv[1]), ["hang"])
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_no_rank_outlives_an_interrupted_launch(tmp_path, how):
    """Killing the launcher (tox's interrupt ends in SIGKILL) takes its ranks with it, even ones blocked in a collective."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    here = Path(__file__).resolve().parent / "support"
    env = dict(os.environ, MXFP8_COMPAT_HANG_DIR=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCH_AND_HANG, str(tmp_path / "run"), str(here)], env=env)
    pid_files = [tmp_path / f"pid{rank}" for rank in range(WORLD)]
    deadline = time.monotonic() + 240
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert launcher.poll() is None, f"the launcher exited early ({launcher.returncode})"
        assert time.monotonic() < deadline, "the ranks never reached the hang scenario"
        time.sleep(0.5)
    ranks = [int(p.read_text()) for p in pid_files]
    time.sleep(1.0)  # rank 1 is in the barrier now
    launcher.send_signal(getattr(signal, how))
    launcher.wait(timeout=60)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a zombie of the dead launcher's is gone for our purpose
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in ranks if alive(pid)]
    for pid in left:  # never leave them running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived the launcher ({how})"
