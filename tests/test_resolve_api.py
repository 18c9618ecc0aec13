"""resolve(): modes, environment variable, caching, thread safety, the Resolution record."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import torch

import mxfp8_compat
from mxfp8_compat import MXFP8Unavailable, Resolution, resolve


def test_unknown_mode_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="mode: expected one of auto, native, emulated, off, got 'fast'"):
        resolve("fast")


def test_unknown_mode_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("MXFP8_COMPAT_MODE", "turbo")
    with pytest.raises(ValueError, match="MXFP8_COMPAT_MODE"):
        resolve()


def test_environment_variable_selects_the_mode(monkeypatch, no_torchao):
    monkeypatch.setenv("MXFP8_COMPAT_MODE", "emulated")
    assert resolve().backend == "mxfp8-emulated"
    monkeypatch.setenv("MXFP8_COMPAT_MODE", "off")
    assert resolve().backend == "mxfp8-emulated", "read once per process: a later change needs reset()"
    mxfp8_compat.reset()
    assert resolve().backend == "bf16"


def test_explicit_mode_wins_over_environment(monkeypatch, no_torchao):
    monkeypatch.setenv("MXFP8_COMPAT_MODE", "emulated")
    assert resolve("off").backend == "bf16"


def test_bad_device_is_a_value_error():
    with pytest.raises(ValueError, match="device"):
        resolve("off", device="warp-drive")


def test_cuda_device_without_cuda_is_a_value_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: 'cuda:1' requested but this torch"):
        resolve("off", device="cuda:1")


def test_cached_per_argument_set_and_cleared_by_reset(no_torchao):
    first = resolve("off", device="cpu")
    assert resolve("off", device="cpu") is first
    assert resolve("off", device="cpu", validate=True) is not first
    mxfp8_compat.reset()
    assert resolve("off", device="cpu") is not first


def test_resolution_is_a_frozen_record(no_torchao):
    res = resolve("emulated", device="cpu")
    assert isinstance(res, Resolution)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.backend = "bf16"  # type: ignore[misc]
    assert res.torch_version == torch.__version__
    assert res.device == torch.device("cpu")
    assert res.torchao_version is None
    assert res.generation is None
    assert all(isinstance(reason, str) and reason for reason in res.reasons)


def test_off_takes_the_preferred_path_so_reasons_are_empty(no_torchao):
    from mxfp8_compat.numerics.highprec import grouped_mm_support

    res = resolve("off", device="cpu")
    assert res.backend == "bf16"
    if grouped_mm_support("cpu", torch.bfloat16)[0]:
        assert res.reasons == ()
    else:  # torch 2.8: no CPU kernel, the loop stands in and says so
        assert len(res.reasons) == 1 and "per-group loop" in res.reasons[0]


def test_native_without_torchao_raises_with_every_reason(no_torchao):
    with pytest.raises(MXFP8Unavailable) as info:
        resolve("native", device="cpu")
    assert "torchao is not installed" in str(info.value)
    assert info.value.reasons[0] == "torchao is not installed"
    # then why torch's own MXFP8 grouped GEMM (the other provider) cannot run here either
    assert [r for r in info.value.reasons[1:] if not r.startswith("torch provider: ")] == []


def test_auto_falls_back_to_bf16_and_logs_once(no_torchao, caplog):
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        res = resolve("auto", device="cpu")
        resolve("auto", device="cpu", validate=True)
    assert res.backend == "bf16"
    assert "torchao is not installed" in res.reasons
    fallbacks = [r for r in caplog.records if "using bf16" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in caplog.records]


def test_sixteen_threads_get_one_resolution_and_one_smoke_run(no_torchao, monkeypatch):
    from mxfp8_compat.probes import smoke

    calls = []
    real_smoke = smoke.smoke_run

    def counting_smoke(*args, **kwargs):
        calls.append(1)
        return real_smoke(*args, **kwargs)

    monkeypatch.setattr(smoke, "smoke_run", counting_smoke)
    barrier = threading.Barrier(16)
    results: list[Resolution] = []

    def worker():
        barrier.wait()
        results.append(resolve("emulated", device="cpu"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    assert all(result is results[0] for result in results)
    assert len(calls) == 1


def _count_smoke_runs(monkeypatch) -> list:
    from mxfp8_compat.probes import smoke

    calls: list = []
    real_smoke = smoke.smoke_run

    def counting_smoke(*args, **kwargs):
        calls.append(1)
        return real_smoke(*args, **kwargs)

    monkeypatch.setattr(smoke, "smoke_run", counting_smoke)
    return calls


def test_arguments_that_mean_the_same_share_one_resolution_and_one_smoke_run(no_torchao, monkeypatch):
    calls = _count_smoke_runs(monkeypatch)
    first = resolve("emulated", device="cpu")
    for mode, device in (("EMULATED", "cpu"), (" Emulated ", torch.device("cpu")), ("emulated", torch.device("cpu"))):
        assert resolve(mode, device=device) is first, (mode, device)
    assert resolve("emulated", device="cpu", validate=0, wgrad_with_hp=1) is first
    assert len(calls) == 1
    monkeypatch.setenv("MXFP8_COMPAT_MODE", "Emulated")
    mxfp8_compat.reset()
    again = resolve(device="cpu")
    assert resolve("emulated", device=torch.device("cpu"), isolate=False) is again
    assert len(calls) == 2


@pytest.mark.parametrize("mode", [["emulated"], {"mode": "off"}, 3])
def test_unhashable_or_non_string_mode_is_the_documented_value_error(mode):
    with pytest.raises(ValueError, match="mode: expected one of auto, native, emulated, off"):
        resolve(mode)  # type: ignore[arg-type]


def test_unhashable_device_is_a_value_error():
    with pytest.raises(ValueError, match="device"):
        resolve("off", device=["cpu"])  # type: ignore[arg-type]


def test_a_slow_resolve_does_not_block_another_key(no_torchao, monkeypatch):
    """One key's probes may run for minutes (an isolated child); other keys must not wait."""
    from mxfp8_compat.probes import smoke

    started, release = threading.Event(), threading.Event()
    real_smoke = smoke.smoke_run

    def slow_smoke(*args, **kwargs):
        started.set()
        release.wait(timeout=30)
        return real_smoke(*args, **kwargs)

    monkeypatch.setattr(smoke, "smoke_run", slow_smoke)
    slow = threading.Thread(target=resolve, args=("emulated",), kwargs={"device": "cpu"})
    slow.start()
    try:
        assert started.wait(timeout=30)
        other: list[Resolution] = []
        fast = threading.Thread(target=lambda: other.append(resolve("off", device="cpu")))
        fast.start()
        fast.join(timeout=10)
        assert other and other[0].backend == "bf16", "resolve('off') waited for another key's probes"
    finally:
        release.set()
        slow.join()
    assert resolve("emulated", device="cpu").backend == "mxfp8-emulated"


def test_a_resolve_in_flight_during_reset_does_not_fill_the_new_cache(no_torchao, monkeypatch):
    from mxfp8_compat.probes import smoke

    started, release = threading.Event(), threading.Event()
    real_smoke = smoke.smoke_run

    def slow_smoke(*args, **kwargs):
        started.set()
        release.wait(timeout=30)
        return real_smoke(*args, **kwargs)

    monkeypatch.setattr(smoke, "smoke_run", slow_smoke)
    old: list[Resolution] = []
    slow = threading.Thread(target=lambda: old.append(resolve("emulated", device="cpu")))
    slow.start()
    assert started.wait(timeout=30)
    mxfp8_compat.reset()
    release.set()
    slow.join()
    monkeypatch.setattr(smoke, "smoke_run", real_smoke)
    assert old and resolve("emulated", device="cpu") is not old[0]
