"""The adapter table against fake torchao installs of every generation's shape and of failure shapes.

Fakes are written to disk as real distributions (see fakes.py) and put ahead of any real
torchao for one test.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

import fakes
from conftest import float64_reference, make_problem, run_with_grads
from mxfp8_compat import GENERATIONS, MXFP8Unavailable, resolve, sqnr_db
from mxfp8_compat.probes import environment

SHAPES = {
    "0.18.0": ("0.18", fakes.GEN_018, "torchao"),
    "0.17.0": ("0.17", fakes.GEN_017, "torchao"),
    "0.16.0": ("0.16", fakes.GEN_016, "torchao"),
    "0.15.0": ("0.15", fakes.GEN_015, "reference"),
    "0.14.1": ("0.14", fakes.GEN_014, "reference"),
    "0.13.0": ("0.13", fakes.GEN_013, "torchao"),
}


def test_table_rows_are_newest_first_and_cover_013_to_018():
    keys = [row.key for row in GENERATIONS]
    assert keys == ["0.18", "0.17", "0.16", "0.15", "0.14", "0.13"]
    for row in GENERATIONS:
        assert row.fingerprint, row.key
        assert row.versions.contains(row.key + ".0"), row.key


@pytest.mark.parametrize("version", list(SHAPES))
def test_each_generation_shape_resolves_to_its_row(fake_torchao, version):
    key, files, emulation = SHAPES[version]
    fake = fake_torchao(version, files)
    res = resolve("emulated", device="cpu")
    assert res.generation is not None and res.generation.key == key
    assert res.torchao_version == version
    assert res.backend == "mxfp8-emulated" and res.emulation == emulation
    problem = make_problem(k=128, n=64)
    out, dA, dB = run_with_grads(res, problem)
    ref_out, ref_dA, ref_dB = float64_reference(problem)
    assert sqnr_db(ref_out, out) >= 27 and sqnr_db(ref_dA, dA) >= 25 and sqnr_db(ref_dB, dB) >= 24
    called = [call.get("generation") for call in fake.impl.CALLS]
    if emulation == "torchao":
        assert called and set(called) == {key}, "torchao's own emulation must have run"
    else:
        assert called == [], "the reference stands in; the sm_100-only entry must not be called"
        assert any(f"torchao {key} has no emulated MXFP8 path" in reason for reason in res.reasons)


@pytest.mark.parametrize("version", list(SHAPES))
def test_auto_on_cpu_falls_back_to_bf16_with_the_reason(fake_torchao, version):
    fake_torchao(version, SHAPES[version][1])
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16"
    assert any("compute capability 10.x" in r or "always emulated" in r for r in res.reasons), res.reasons
    with pytest.raises(MXFP8Unavailable):
        resolve("native", device="cpu")


def test_013_is_never_native_even_on_sm100(fake_torchao, monkeypatch):
    fake_torchao("0.13.0", fakes.GEN_013)
    monkeypatch.setattr(environment, "device_capability", lambda device: (10, 0))
    with pytest.raises(MXFP8Unavailable, match="always emulated"):
        resolve("native", device="cpu")


def _pretend_native_device(monkeypatch, fake):
    """Let the native path through the device probes on this CPU (the kernel itself is faked)."""
    fake.impl.NATIVE_WORKS = True
    real = environment.native_kernel_problem
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None if bound.generation.native else real(bound, device))


@pytest.mark.parametrize("version", ["0.18.0", "0.17.0", "0.16.0", "0.15.0", "0.14.1"])
def test_native_wiring_calls_each_entry_correctly(fake_torchao, monkeypatch, version):
    key, files, _ = SHAPES[version]
    fake = fake_torchao(version, files)
    _pretend_native_device(monkeypatch, fake)
    res = resolve("native", device="cpu")
    assert res.backend == "mxfp8" and res.generation.key == key
    calls = fake.impl.CALLS
    assert calls, "the smoke run must have called the entry"
    if key in ("0.16", "0.17", "0.18"):
        assert all(call["kernel_preference"].name == "AUTO" for call in calls)
        assert all(call["wgrad_with_hp"] is True for call in calls)
    if key == "0.18":
        assert all(call["bias"] is None for call in calls)
    if key in ("0.14", "0.15"):
        assert all(call["scaling_type"].name == "MXFP8" for call in calls)


def test_newer_than_table_is_matched_by_fingerprint_with_a_reason(fake_torchao):
    fake_torchao("0.19.0.dev20260801+cu130", fakes.GEN_018)
    res = resolve("emulated", device="cpu")
    assert res.generation.key == "0.18"
    assert any("newer than the adapter table" in r and "row 0.18" in r for r in res.reasons), res.reasons


def test_nightly_layout_in_fp8_grouped_mm_module_is_found(fake_torchao):
    files = {
        "torchao/prototype/moe_training/__init__.py": "",
        "torchao/prototype/moe_training/fp8_grouped_mm.py": fakes.GEN_018["torchao/prototype/moe_training/mxfp8_grouped_mm.py"],
    }
    fake_torchao("0.19.0.dev20260901", files)
    res = resolve("emulated", device="cpu")
    assert res.generation.key == "0.18" and res.emulation == "torchao"


def test_older_than_table_is_rejected(fake_torchao, native_capable_device):
    fake_torchao("0.12.0", fakes.GEN_012)
    res = resolve("auto", device="cpu")
    assert res.backend == "bf16"
    assert any("older than the oldest supported generation" in r for r in res.reasons)
    emulated = resolve("emulated", device="cpu")
    assert emulated.emulation == "reference" and emulated.generation is None


IMPORT_FAILURES = [
    ("raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')", "ModuleNotFoundError"),
    ("raise ValueError('key contains names that are not kernel arguments: num_elements')", "ValueError"),
    ("raise RuntimeError('operator torchao::mx_fp8_bf16 does not exist')", "RuntimeError"),
    ("raise AttributeError(\"module 'torch' has no attribute 'float4_e2m1fn_x2'\")", "AttributeError"),
]


@pytest.mark.parametrize("statement, kind", IMPORT_FAILURES, ids=[k for _, k in IMPORT_FAILURES])
def test_import_failures_become_reasons(fake_torchao, native_capable_device, caplog, statement, kind):
    fake_torchao("0.16.0", fakes.import_raising(statement))
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        res = resolve("auto", device="cpu")
        resolve("auto", device="cpu", validate=True)
    assert res.backend == "bf16"
    assert any(f"raised {kind}" in r for r in res.reasons), res.reasons
    assert sum("using bf16" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(MXFP8Unavailable, match=kind):
        resolve("native", device="cpu")
    assert resolve("emulated", device="cpu").emulation == "reference"


def test_entry_missing_is_rejected(fake_torchao):
    files = dict(fakes.GEN_018)
    files["torchao/prototype/moe_training/mxfp8_grouped_mm.py"] = "_SM100_KERNELS_AVAILABLE = False\n"
    files["torchao/prototype/moe_training/__init__.py"] = ""
    fake_torchao("0.18.0", files)
    res = resolve("emulated", device="cpu")
    assert res.emulation == "reference" and res.generation is None
    assert any("_to_mxfp8_then_scaled_grouped_mm is missing" in r for r in res.reasons)


def test_renamed_parameter_is_rejected(fake_torchao):
    files = {k: v.replace("kernel_preference", "kernel_choice") for k, v in fakes.GEN_018.items()}
    fake = fake_torchao("0.18.0", files)
    res = resolve("emulated", device="cpu")
    assert res.emulation == "reference"
    assert any("['kernel_preference'] are missing" in r for r in res.reasons), res.reasons
    assert fake.impl.CALLS == []


def test_the_015_apply_alias_fails_in_backward_with_all_its_arguments(fake_torchao):
    """Why the 0.15 row calls `_quantize_then_scaled_grouped_mm`: the `.apply` alias takes 8 inputs but
    its backward returns 6 gradients (the fake models the wheel; test_fakes_match_wheels checks that)."""
    fake = fake_torchao("0.15.0", fakes.GEN_015)
    fake.impl.NATIVE_WORKS = True
    module = importlib.import_module("torchao.prototype.moe_training.scaled_grouped_mm")
    rceil = importlib.import_module("torchao.prototype.mx_formats.config").ScaleCalculationMode.RCEIL
    problem = make_problem(group_rows=(32, 32), k=64, n=64)
    B_t = problem.B.detach().transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_(True)
    out = module._to_mxfp8_then_scaled_grouped_mm(problem.A, B_t, problem.offs, 32, torch.bfloat16, False, False, rceil)
    with pytest.raises(RuntimeError, match=r"incorrect number of gradients \(expected 8, got 6\)"):
        out.sum().backward()


@pytest.mark.parametrize("fake_mode, verdict", [("garbage", "SQNR check"), ("nan", "non-finite")])
def test_smoke_run_rejects_wrong_values(fake_torchao, fake_mode, verdict):
    fake = fake_torchao("0.18.0", fakes.GEN_018)
    fake.impl.FAKE_MODE = fake_mode
    res = resolve("emulated", device="cpu")
    assert res.emulation == "reference"
    assert any("failed its smoke run" in r and verdict in r for r in res.reasons), res.reasons


def test_native_assertion_sm100_unavailable_is_a_reason(fake_torchao, native_capable_device, monkeypatch):
    fake = fake_torchao("0.18.0", fakes.GEN_018)
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    res = resolve("auto", device="cpu")  # fake kernel raises AssertionError('SM100 kernels not available')
    assert res.backend == "bf16"
    assert any("AssertionError: SM100 kernels not available" in r for r in res.reasons), res.reasons
    assert fake.impl.CALLS


def test_first_call_runtime_error_is_a_reason(fake_torchao, native_capable_device, monkeypatch):
    files = {k: v.replace('raise AssertionError(\n                    "SM100 kernels not available. Please use use torchao CUDA 12.8+ build on SM100/100a device(s)."\n                )',
                          'raise RuntimeError("0 active drivers ([]). There should only be one.")') for k, v in fakes._ENUMS.items() if k == "torchao/_fake_impl.py"}
    assert "0 active drivers" in files["torchao/_fake_impl.py"]
    fake_torchao("0.15.0", {**fakes.GEN_015, **files})
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    with pytest.raises(MXFP8Unavailable, match="0 active drivers"):
        resolve("native", device="cpu")


def test_sm120_is_not_admitted(fake_torchao, monkeypatch):
    fake_torchao("0.18.0", fakes.GEN_018)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the faked CUDA query
    monkeypatch.setattr(environment, "device_capability", lambda device: (12, 0))
    with pytest.raises(MXFP8Unavailable, match=r"compute capability 12\.0 \(sm_120\)"):
        resolve("native", device="cuda:0")


def test_torchao_flag_false_on_sm100_is_a_reason(fake_torchao, monkeypatch):
    fake_torchao("0.18.0", fakes.GEN_018)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(environment, "device_capability", lambda device: (10, 0))
    with pytest.raises(MXFP8Unavailable, match="_SM100_KERNELS_AVAILABLE=False"):
        resolve("native", device="cuda:0")
