"""The direct launch (``mxfp8_compat.kernels.launch``): the same kernels, the same results, without triton's binder.

Tier ``-m cuda`` (run on the GPU machine by ``benchmarks/run_gpu_proofs.sh``). Each test compares a
direct launch with triton's own launch of the same kernel on the same inputs, bit for bit, including
inputs whose alignment makes triton compile another specialisation.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_problem
from mxfp8_compat import resolve
from mxfp8_compat.kernels import launch as _kernel_launch
from mxfp8_compat.token_groups import gather_rows

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on, from an empty cache (so the first launch of every key is triton's)."""
    if _kernel_launch._knobs_runtime() is None:
        pytest.skip("this triton has no direct launch (before 3.4): triton's own launch runs")
    monkeypatch.setattr(_kernel_launch, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_kernel_launch, "_compiled", {})
    monkeypatch.setattr(_kernel_launch, "_by_value", {})
    return _kernel_launch._compiled


def _direct_entries(cache, kernel_name):
    return [entry for key, entry in cache.items() if getattr(key[0], "__name__", "") == kernel_name]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned by 2 bytes"])
def test_direct_launch_gives_triton_launchs_result(direct, offset):
    base = torch.randn(1 + 300 * 136, device="cuda", dtype=torch.bfloat16)
    x = base[offset : offset + 300 * 136].view(300, 136)  # offset 1: a data pointer triton does not call aligned
    index = torch.randint(0, 320, (257,), device="cuda")  # >= 300: padding rows (zeros)
    expected = torch.where((index < 300)[:, None], x[index.clamp(max=299)], torch.zeros((), dtype=x.dtype, device="cuda"))
    first = gather_rows(x, index)  # triton's launch: compiles or finds the kernel, fills the cache
    assert _direct_entries(direct, "_gather_rows_kernel"), "the first launch left no direct entry"
    second = gather_rows(x, index)  # the direct launch
    with _kernel_launch.triton_launch():
        assert _kernel_launch.DIRECT_LAUNCH is False
        third = gather_rows(x, index)  # triton's launch again
    assert _kernel_launch.DIRECT_LAUNCH is True
    for got in (first, second, third):
        assert torch.equal(got, expected)
    assert all(entry is not None for entry in _direct_entries(direct, "_gather_rows_kernel"))


def test_aligned_and_misaligned_inputs_get_separate_entries(direct):
    base = torch.randn(1 + 64 * 64, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(64, device="cuda")
    for offset in (0, 1, 0, 1):
        x = base[offset : offset + 64 * 64].view(64, 64)
        assert torch.equal(gather_rows(x, index), x)
    assert len(_direct_entries(direct, "_gather_rows_kernel")) == 2


def test_fast_emulation_is_the_same_with_and_without_direct_launch(direct, monkeypatch):
    fn = resolve("emulated", device="cuda")
    if fn.emulation != "fast":
        pytest.skip(f"emulated here is {fn.emulation}, not the fast emulation")
    p = make_problem(group_rows=(40, 0, 33, 7, 64), k=128, n=96, device="cuda")

    def step():
        A = p.A.detach().clone().requires_grad_(True)
        B = p.B.detach().clone().requires_grad_(True)
        out = fn(A, B, p.offs)
        out.backward(p.grad_out)
        return out, A.grad, B.grad

    results = [step(), step()]  # the second runs every kernel directly
    assert any(entry is not None for entry in direct.values())
    monkeypatch.setattr(_kernel_launch, "DIRECT_LAUNCH", False)
    results.append(step())
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                               y.view(torch.int16) if y.dtype == torch.bfloat16 else y)


def test_direct_launch_is_captured_by_a_cuda_graph(direct):
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    index = torch.randperm(256, device="cuda")
    gather_rows(x, index)  # compile, fill the cache
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gather_rows(x, index)  # direct, on a side stream (the launch reads the current stream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_rows(x, index)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x[index])


def test_a_launch_hook_gets_every_launch(direct):
    """A profiler's launch hook (proton, triton's knobs) sees every launch: those take triton's own launch."""
    from triton import knobs

    seen = []

    def hook(metadata):  # noqa: ANN001 - triton's LaunchHook
        seen.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # triton 3.5-3.6: a HookChain
        chain.add(hook)
        undo = lambda: chain.remove(hook)  # noqa: E731
    else:
        knobs.runtime.launch_enter_hook = hook
        undo = lambda: setattr(knobs.runtime, "launch_enter_hook", None)  # noqa: E731
    try:
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        index = torch.arange(64, device="cuda")
        for _ in range(3):
            assert torch.equal(gather_rows(x, index), x)
    finally:
        undo()
    assert len(seen) == 3 and not direct
