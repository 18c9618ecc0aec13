"""resolve("auto") where no native kernel can run decides without importing torchao (issue 20).

A CPU, or a CUDA device whose capability is not 10.x, can never run a native MXFP8 kernel of
any torchao release: auto answers bf16 from the device alone, says so, and leaves torchao
unimported; ``emulated``, and a device that could run native, still import and probe it.
Also (issue 22): the smoke probe's own float32 call logs no "cannot emit float32" note.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import fakes
from conftest import make_problem
from mxfp8_compat import resolve
from mxfp8_compat.probes import environment
from mxfp8_compat.numerics.highprec import grouped_mm_support

# A torchao whose import would be seen: it raises, and the reason would name it.
_LOUD_IMPORT = fakes.import_raising("raise RuntimeError('torchao was imported')")


def _torchao_imported() -> bool:
    return any(name == "torchao" or name.startswith("torchao.") for name in sys.modules)


def _faked_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "device_capability", lambda device: capability)


def test_auto_on_cpu_does_not_import_torchao_and_says_why(fake_torchao):
    fake_torchao("0.18.0", _LOUD_IMPORT)
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16" and res.generation is None
    assert res.torchao_version == "0.18.0", "the version is read from metadata, without the import"
    assert not _torchao_imported()
    [reason] = [r for r in res.reasons if "compute capability 10.x" in r]
    assert "device is cpu" in reason and "torchao 0.18.0 is installed but was not imported" in reason
    assert not any("torchao was imported" in r for r in res.reasons)


def test_auto_on_cpu_without_torchao_names_both(no_torchao):
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16"
    assert res.reasons[0] == "torchao is not installed" and "device is cpu" in res.reasons[1]


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (12, 0)])
def test_auto_on_a_cuda_device_that_is_not_sm100_does_not_import_torchao(fake_torchao, monkeypatch, capability):
    fake_torchao("0.18.0", _LOUD_IMPORT)
    _faked_cuda(monkeypatch, capability)
    res = resolve("auto", device="cuda:0")
    assert res.backend == "bf16"
    major, minor = capability
    assert any(f"compute capability {major}.{minor} (sm_{major}{minor})" in r for r in res.reasons), res.reasons
    assert not _torchao_imported()


def test_auto_on_an_sm100_device_imports_and_probes_torchao(fake_torchao, monkeypatch):
    fake_torchao("0.18.0", _LOUD_IMPORT)
    _faked_cuda(monkeypatch, (10, 0))
    res = resolve("auto", device="cuda:0")
    assert res.backend == "bf16"
    assert any("raised RuntimeError: torchao was imported" in r for r in res.reasons), res.reasons


def test_emulated_on_cpu_still_imports_torchao(fake_torchao):
    fake_torchao("0.18.0", fakes.GEN_018)
    res = resolve("emulated", device="cpu")
    assert res.emulation == "torchao" and res.generation is not None and res.generation.key == "0.18"
    assert "torchao.prototype.moe_training" in sys.modules


def test_native_mode_still_lists_every_reason(fake_torchao):
    """native was asked for explicitly: its error keeps what the torchao probes find."""
    fake_torchao("0.18.0", _LOUD_IMPORT)
    with pytest.raises(Exception, match="torchao was imported"):
        resolve("native", device="cpu")


def test_emulated_logs_nothing_about_float32_until_a_caller_asks_for_it(fake_torchao, caplog):
    fake_torchao("0.18.0", fakes.GEN_018)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        res = resolve("emulated", device="cpu")
    assert res.emulation == "torchao"
    assert not [r for r in caplog.records if "float32" in r.getMessage()], [r.getMessage() for r in caplog.records]
    if grouped_mm_support("cpu", torch.bfloat16)[1]:
        pytest.skip(f"torch {torch.__version__}'s CPU grouped GEMM emits float32: there is no upcast to note")
    problem = make_problem(group_rows=(32, 64), k=64, n=32, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        out = res(problem.A, problem.B, problem.offs, out_dtype=torch.float32)
        res(problem.A, problem.B, problem.offs, out_dtype=torch.float32)
    assert out.dtype is torch.float32
    notes = [r.getMessage() for r in caplog.records if "cannot emit float32" in r.getMessage()]
    assert len(notes) == 1, "the caller's own float32 request is still noted, once"
