"""The fault catalogue: every failure class seen in the wild, in one table.

For each: resolve("auto") returns bf16 with the reason, resolve("native") raises
MXFP8Unavailable naming it, and the fallback warning is logged exactly once.
"""

from __future__ import annotations

import logging
from typing import Callable

import pytest
import torch

import fakes
from mxfp8_compat import MXFP8Unavailable, resolve
from mxfp8_compat.probes import environment

_SM100_ASSERT = 'raise AssertionError(\n                    "SM100 kernels not available. Please use use torchao CUDA 12.8+ build on SM100/100a device(s)."\n                )'


def _with_impl(replacement: str) -> dict[str, str]:
    source = fakes._ENUMS["torchao/_fake_impl.py"]
    assert _SM100_ASSERT in source
    return {"torchao/_fake_impl.py": source.replace(_SM100_ASSERT, replacement)}


def _native_probes_pass(monkeypatch):
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)


def _faked_cuda(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "device_capability", lambda device: capability)


# name -> (torchao version or None, files, extra setup, device, the reason's tell-tale text)
CATALOGUE: dict[str, tuple] = {
    "torchao missing": (None, {}, None, "cpu", "torchao is not installed"),
    "triton missing": ("0.15.0", fakes.import_raising("raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')"), None, "cpu", "ModuleNotFoundError: No module named 'triton'"),
    "triton autotune drift": ("0.14.1", fakes.import_raising("raise ValueError('key contains names that are not kernel arguments: num_elements')"), None, "cpu", "ValueError: key contains names"),
    "runtime error at import": ("0.16.0", fakes.import_raising("raise RuntimeError('torchao C++ ops failed to load')"), None, "cpu", "RuntimeError: torchao C++ ops"),
    "attribute error at import": ("0.16.0", fakes.import_raising("raise AttributeError('float8_e8m0fnu')"), None, "cpu", "AttributeError: float8_e8m0fnu"),
    "older than any row": ("0.12.0", fakes.GEN_012, None, "cpu", "older than the oldest supported generation"),
    "entry missing": ("0.18.0", {"torchao/prototype/moe_training/__init__.py": "", "torchao/prototype/moe_training/mxfp8_grouped_mm.py": "x = 1\n"}, None, "cpu", "_to_mxfp8_then_scaled_grouped_mm is missing"),
    "parameter renamed": ("0.17.0", {k: v.replace("kernel_preference", "kernel_pref") for k, v in fakes.GEN_017.items()}, _native_probes_pass, "cpu", "['kernel_preference'] are missing"),
    "dispatcher parameter renamed": ("0.15.0", {k: v.replace("scaling_type", "recipe") for k, v in fakes.GEN_015.items()}, _native_probes_pass, "cpu", "['scaling_type'] are missing"),
    "SM100 kernels not available": ("0.18.0", fakes.GEN_018, _native_probes_pass, "cpu", "AssertionError: SM100 kernels not available"),
    "0 active drivers at first call": ("0.15.0", {**fakes.GEN_015, **_with_impl('raise RuntimeError("0 active drivers ([]). There should only be one.")')}, _native_probes_pass, "cpu", "0 active drivers"),
    "smoke run returns NaN": ("0.18.0", {**fakes.GEN_018, **_with_impl("return emulate(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp) * float('nan')")}, _native_probes_pass, "cpu", "non-finite"),
    "smoke run returns wrong values": ("0.16.0", {**fakes.GEN_016, **_with_impl("out = emulate(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp); return torch.rand_like(out) + 0 * out")}, _native_probes_pass, "cpu", "SQNR check"),
    "sm_120 device": ("0.18.0", fakes.GEN_018, lambda mp: _faked_cuda(mp, (12, 0)), "cuda:0", "compute capability 12.0 (sm_120)"),
    "sm_90 device": ("0.18.0", fakes.GEN_018, lambda mp: _faked_cuda(mp, (9, 0)), "cuda:0", "compute capability 9.0 (sm_90)"),
}


@pytest.mark.parametrize("fault", list(CATALOGUE))
def test_fault_falls_back_names_itself_and_logs_once(fault, fake_torchao, no_torchao_if_none, monkeypatch, caplog):
    version, files, setup, device, telltale = CATALOGUE[fault]
    if device == "cpu":  # auto would rule native out from the CPU alone: let it probe torchao as on an sm_100
        monkeypatch.setattr(environment, "native_device_problem", lambda device: None)
    if version is None:
        no_torchao_if_none()
    else:
        fake_torchao(version, files)
    if setup is not None:
        setup(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        res = resolve("auto", device=device)
        again = resolve("auto", device=device, validate=True)  # a second resolution: no second warning
    assert res.backend == "bf16" and again.backend == "bf16"
    assert any(telltale in reason for reason in res.reasons), res.reasons
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "using bf16" in r.getMessage()]
    assert len(warnings) == 1 and telltale in warnings[0]
    with pytest.raises(MXFP8Unavailable) as info:
        resolve("native", device=device)
    assert telltale in str(info.value)


@pytest.fixture
def no_torchao_if_none(monkeypatch) -> Callable[[], None]:
    return lambda: monkeypatch.setattr(environment, "installed_torchao_version", lambda: None)
