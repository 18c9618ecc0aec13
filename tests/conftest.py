"""Shared fixtures: a clean resolver per test, fake torchao installs, random problems."""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

import mxfp8_compat
from mxfp8_compat.probes import environment

# The tests' support modules (tests/support) and the dev-only tooling (tools/mxfp8_compat_dev), neither shipped.
sys.path.insert(0, str(Path(__file__).parent / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fakes  # noqa: E402


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """tox stops a run with SIGINT, then SIGTERM: both unwind, so tests' cleanups stop their subprocesses."""
    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``torchao`` exercise the installed torchao: skipped where there is none."""
    if environment.installed_torchao_version() is not None:
        return
    skip = pytest.mark.skip(reason="needs a real torchao install; none in this environment")
    for item in items:
        if item.get_closest_marker("torchao") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with an empty resolve() cache, no mode override and no logged warnings."""
    monkeypatch.delenv("MXFP8_COMPAT_MODE", raising=False)
    monkeypatch.delenv("MXFP8_COMPAT_ISOLATE", raising=False)
    mxfp8_compat.reset()
    yield
    mxfp8_compat.reset()


@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as if torchao were not installed (the probe reads its metadata first)."""
    monkeypatch.setattr(environment, "installed_torchao_version", lambda: None)


@pytest.fixture
def native_capable_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``resolve("auto")`` probe torchao on this CPU, as on a device that could run native MXFP8.

    On a CPU it otherwise decides from the device alone, without importing torchao: tests of
    what the torchao probes find (faults, rows) need them to run.
    """
    monkeypatch.setattr(environment, "native_device_problem", lambda device: None)


@dataclass
class FakeTorchao:
    version: str
    root: Path

    @property
    def impl(self):  # the fake's shared module: CALLS, FAKE_MODE, NATIVE_WORKS
        return importlib.import_module("torchao._fake_impl")


@pytest.fixture
def fake_torchao(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeTorchao]]:
    """Install a fake torchao (version, files) ahead of any real one for this test."""
    saved = fakes.purge_torchao_modules()
    created: list[FakeTorchao] = []

    def install(version: str, files: dict[str, str]) -> FakeTorchao:
        root = fakes.write_fake_torchao(tmp_path / f"site-{len(created)}", version, files)
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        fake = FakeTorchao(version, root)
        created.append(fake)
        return fake

    yield install
    fakes.purge_torchao_modules()
    sys.modules.update(saved)


@dataclass
class Problem:
    A: torch.Tensor
    B: torch.Tensor
    offs: torch.Tensor
    grad_out: torch.Tensor


def make_problem(
    group_rows: tuple[int, ...] = (64, 96, 32, 128),
    k: int = 128,
    n: int = 96,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    requires_grad: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Problem:
    """Fresh random-normal inputs (never zeros) for a grouped GEMM with the given group sizes."""
    m = sum(group_rows)
    A = torch.randn(m, k, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    B = torch.randn(len(group_rows), k, n, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    offs = torch.tensor(group_rows, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    grad_out = torch.randn(m, n, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    A.requires_grad_(requires_grad)
    B.requires_grad_(requires_grad)
    return Problem(A, B, offs, grad_out)


def float64_reference(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output and gradients of the grouped GEMM in float64."""
    from mxfp8_compat.numerics.metrics import float64_forward_backward

    return float64_forward_backward(problem.A, problem.B, problem.offs, problem.grad_out)


def run_with_grads(fn, problem: Problem, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``fn(A, B, offs)`` forward and backward on fresh leaves; return out, dA, dB."""
    from mxfp8_compat.numerics.metrics import forward_backward

    return forward_backward(fn, problem.A, problem.B, problem.offs, problem.grad_out, **kwargs)


def torch_grouped_mm(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(A, B, offs=offs) where this torch has it for the device; else skip the test.

    torch 2.8 has no CPU kernel (its emulation tests run on the reference there).
    """
    from mxfp8_compat.numerics.highprec import grouped_mm_support

    if not grouped_mm_support(A.device.type, A.dtype)[0]:
        pytest.skip(f"torch {torch.__version__} has no {A.device.type} kernel for torch._grouped_mm ({A.dtype})")
    return torch._grouped_mm(A, B, offs=offs)


needs_grouped_mm_on_cpu = pytest.mark.skipif(
    not __import__("mxfp8_compat.numerics.highprec", fromlist=["grouped_mm_support"]).grouped_mm_support("cpu", torch.bfloat16)[0],
    reason=f"torch {torch.__version__} has no CPU kernel for torch._grouped_mm",
)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Every device-to-host sync inside is an error (``torch.cuda.set_sync_debug_mode("error")``)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
