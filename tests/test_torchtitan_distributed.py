"""The torchtitan converter under torchtitan's own FSDP2 and expert parallelism, 2 ranks (gloo, CPU).

One launch of ``tests/support/torchtitan_worker.py`` on 2 processes through tests/support/distributed_launch.py's
``launch`` (FileStore rendezvous in a fresh temporary directory; killed and failed after
``MXFP8_COMPAT_DIST_TIMEOUT``, 420 s). Each rank builds a tiny qwen3 MoE decoder from
torchtitan 0.3.0's config tree, converts it with ``MXFP8CompatConverter``, parallelizes it with
torchtitan's ``parallelize_qwen3`` for EP=2 over FSDP=2 (``model.parallelize`` then
``apply_fsdp_to_decoder``), trains 2 SGD steps on its half of the batch and compares with the same
model in one process. The worker's docstring lists the four CPU/gloo stand-ins (device type,
gloo's missing PREMUL_SUM, SDPA for the compiled flex attention, no trainer import) and argues why the results are
bitwise. Here:

* ``off`` and ``emulated``: logits of the global batch, each rank's loss, every parameter's
  gradient (experts: EP-sharded; the rest: FSDP reduce-scattered) and every trained weight are
  bitwise equal to the single process.
* ``emulated``: MXFP8 numerics (a finite SQNR to bf16's logits), losses within 1% of bf16's.
* the converter's dispatcher pads after EP's all-to-all: each grouped GEMM gets, per local
  expert, the all-to-all's token count rounded up to ``group_alignment`` (32 emulated, 1 bf16),
  with ``groups_aligned=True``, and the all-to-all delivered all T * K routed tokens.

Runs in the tox env ``torchtitan``; skipped where torchtitan is not installed.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchtitan")
if sys.platform == "win32" or not torch.distributed.is_available():
    pytest.skip("needs torch.distributed on POSIX", allow_module_level=True)

import distributed_launch  # noqa: E402

WORKER = Path(__file__).resolve().parent / "support" / "torchtitan_worker.py"
MODES = ["off", "emulated"]
SCENARIOS = [f"titan:{mode}" for mode in MODES]


def launch_worker(tmp: Path) -> dict[str, Any]:
    """distributed_launch.launch, with this file's worker (the launcher starts distributed_worker.py)."""
    if "worker" in inspect.signature(distributed_launch.launch).parameters:
        return distributed_launch.launch(tmp, SCENARIOS, worker=WORKER)  # type: ignore[call-arg]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed_launch, "WORKER", WORKER)
        return distributed_launch.launch(tmp, SCENARIOS)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One launch for both modes (process start-up and imports dominate)."""
    return launch_worker(tmp_path_factory.mktemp("titan"))


def passed(report: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """Assert every rank ran ``key`` and passed every check; rank 0's checks by name."""
    problems = distributed_launch.failures(report, key)
    assert not problems, "\n".join(problems)
    return {c["name"]: c for c in report[key][0]["checks"]}


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_and_ep_are_bitwise_the_single_process(run, mode):
    checks = passed(run, f"titan:{mode}")
    compared = {name: c for name, c in checks.items() if "bitwise" in c}
    grads = [n for n in compared if n.startswith("step 0: grad ")]
    experts = [n for n in grads if ".inner_experts." in n]
    # 2 MoE layers x 3 expert weights, EP-sharded; the rest (embedding, attention, router, norms, head) FSDP only
    assert len(experts) == 6 and len(grads) > len(experts) + 10, sorted(grads)
    assert {"step 0: logits (global batch)", "step 1: logits (global batch)", "step 1: loss",
            "trained lm_head.weight", "trained layers.1.moe.routed_experts.inner_experts.w2_EDF"} <= compared.keys()
    assert all(c["bitwise"] and c["nonzero"] for c in compared.values())
    assert checks["expert weights are DTensors sharded over ep (and efsdp)"]["local_shape"][0] == 2


@pytest.mark.parametrize("mode", MODES)
def test_the_dispatcher_pads_after_the_all_to_all(run, mode):
    checks = passed(run, f"titan:{mode}")
    padded = [c for name, c in checks.items() if "groups padded" in name]
    assert padded, "no grouped GEMM was checked"
    want_alignment = 32 if mode == "emulated" else 1
    assert all(c["alignment"] == want_alignment for c in padded)
    dispatches = checks["the converter's dispatcher ran the stock EP dispatch (all-to-all)"]["dispatches"]
    assert all(d["ep_mesh"] and d["class"] == "MXFP8CompatTokenDispatcher" for d in dispatches)
    assert "the all-to-all delivered every routed token" in checks
    if mode == "emulated":  # padding was needed: some all-to-all count was not a multiple of 32
        assert any(c % 32 for p in padded for c in p["all_to_all_counts"])


def test_emulated_is_mxfp8_and_trains_like_bf16(run):
    checks = passed(run, "titan:emulated")
    assert 5 <= checks["step 0: logits are MXFP8's, not bf16's (a finite SQNR to the bf16 model's)"]["sqnr_db"] < 60
    close = checks["emulated losses stay close to bf16's"]
    assert close["losses"] != close["bf16_losses"]
