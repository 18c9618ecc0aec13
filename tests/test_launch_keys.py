"""The direct launch's two caches (``mxfp8_compat.kernels.launch``), on the CPU with a stand-in kernel.

A real kernel needs a GPU (``tests/test_cuda_launch.py`` runs triton's kernels both ways, bit for bit);
what these check is the bookkeeping that decides between triton's launch and the direct one: a new
specialisation always goes through triton's launch (which compiles it), a repeated one never does,
and a new size with a known specialisation reuses its compiled kernel.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from mxfp8_compat.kernels import launch as L


class StandInKernel:
    """Triton's JITFunction as the launcher sees it: ``kernel[grid](*args, **options)``, a signature, params."""

    def __init__(self) -> None:
        def signature(x, n, flag, BLOCK=64):  # noqa: ANN001, N803 - the shape of a kernel's parameters
            pass

        self.signature = inspect.signature(signature)
        self.params = [SimpleNamespace(is_constexpr=name == "BLOCK") for name in self.signature.parameters]
        self.triton_launches: list[tuple] = []
        self.direct_runs: list[tuple] = []
        self.__name__ = "stand_in_kernel"

    def __getitem__(self, grid):  # noqa: ANN001
        def run(*args, **options):  # noqa: ANN002, ANN003
            self.triton_launches.append(args)
            return SimpleNamespace(packed_metadata=object(), function=object(), run=self._direct)

        return run

    def _direct(self, gx, gy, gz, stream, function, metadata, *rest):  # noqa: ANN001
        self.direct_runs.append(rest[3:])  # after the three hook slots: the arguments, then the tail


@pytest.fixture
def kernel(monkeypatch) -> StandInKernel:
    monkeypatch.setattr(L, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(L, "_knobs_runtime", lambda: SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))
    monkeypatch.setattr(L, "_current_stream", lambda device: 0)
    monkeypatch.setattr(L, "_compiled", {})
    monkeypatch.setattr(L, "_by_value", {})
    return StandInKernel()


def call(kernel: StandInKernel, x: torch.Tensor, n, flag) -> None:  # noqa: ANN001
    L._run_cuda(kernel, (4,), 0, (x, n, flag), (0,), {"BLOCK": 64})


def counts(kernel: StandInKernel) -> tuple[int, int]:
    return len(kernel.triton_launches), len(kernel.direct_runs)


def test_a_repeated_launch_is_direct_and_passes_the_arguments_and_constexprs(kernel):
    x = torch.zeros(64)
    call(kernel, x, 4096, True)
    assert counts(kernel) == (1, 0)
    call(kernel, x, 4096, True)
    assert counts(kernel) == (1, 1)
    assert kernel.direct_runs[0] == (x, 4096, True, 64)


def test_a_new_size_with_a_known_specialisation_reuses_its_kernel(kernel):
    x = torch.zeros(64)
    call(kernel, x, 4096, True)
    call(kernel, x, 8192, True)  # divisible by 16, 32-bit, not 1: the same specialisation
    assert counts(kernel) == (1, 1)
    assert len(L._compiled) == 1 and len(L._by_value) == 2


@pytest.mark.parametrize("other", [1, 4100, 2**31, -(2**31) - 1], ids=["one", "not a multiple of 16", "64-bit", "negative 64-bit"])
def test_an_int_triton_specialises_differently_goes_through_triton(kernel, other):
    x = torch.zeros(64)
    call(kernel, x, 4096, True)
    call(kernel, x, other, True)
    assert counts(kernel) == (2, 0)
    call(kernel, x, other, True)
    assert counts(kernel) == (2, 1)


def test_a_misaligned_tensor_goes_through_triton_then_each_alignment_is_direct(kernel):
    base = torch.zeros(80)
    aligned, misaligned = base[:64], base[1:65]  # float32: 4 bytes off
    assert aligned.data_ptr() % 16 == 0 and misaligned.data_ptr() % 16
    call(kernel, aligned, 4096, True)
    call(kernel, misaligned, 4096, True)
    assert counts(kernel) == (2, 0)
    call(kernel, aligned, 4096, True)
    call(kernel, misaligned, 4096, True)
    assert counts(kernel) == (2, 2)


def test_a_bool_and_an_int_of_equal_value_are_different_keys(kernel):
    x = torch.zeros(64)
    call(kernel, x, 4096, 1)
    call(kernel, x, 4096, True)  # True == 1 and hashes alike, but triton types them differently
    assert counts(kernel) == (2, 0)


def test_another_dtype_goes_through_triton(kernel):
    call(kernel, torch.zeros(64), 4096, True)
    call(kernel, torch.zeros(64, dtype=torch.bfloat16), 4096, True)
    assert counts(kernel) == (2, 0)


def test_the_value_cache_is_bounded_and_stays_right_when_cleared(kernel, monkeypatch):
    monkeypatch.setattr(L, "_BY_VALUE_LIMIT", 3)
    x = torch.zeros(64)
    for n in range(16, 16 * 9, 16):  # eight sizes, one specialisation
        call(kernel, x, n, True)
        call(kernel, x, n, True)
    assert counts(kernel) == (1, 15)
    assert len(L._by_value) <= 3
    assert [run[1] for run in kernel.direct_runs] == sorted([n for n in range(16, 16 * 9, 16)] * 2)[1:]


def test_a_launch_hook_sends_every_launch_through_triton(kernel, monkeypatch):
    monkeypatch.setattr(L, "_knobs_runtime", lambda: SimpleNamespace(launch_enter_hook=print, launch_exit_hook=None))
    x = torch.zeros(64)
    for _ in range(3):
        call(kernel, x, 4096, True)
    assert counts(kernel) == (3, 0) and not L._compiled and not L._by_value


def test_an_argument_of_an_unknown_type_always_goes_through_triton(kernel):
    x = torch.zeros(64)
    for _ in range(2):
        call(kernel, x, "a string", True)
    assert counts(kernel) == (2, 0) and not L._by_value
