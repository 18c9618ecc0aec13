"""Any token-group sizes on every backend: sync-free padding, static-length buffers, promises.

Native kernels are played by the fakes of every generation, wrapped so that they assert what
the real kernels assert (group ends at multiples of 32; for 0.18+ every group, M, K and N
multiples of 128): the shim's padding must get any group sizes past them.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakes
from conftest import float64_reference, make_problem, run_with_grads, torch_grouped_mm
from mxfp8_compat import resolve, sqnr_db
from mxfp8_compat.probes import environment
from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference
from mxfp8_compat.token_groups import (
    pad_token_groups,
    padded_rows_bound,
    token_group_padding,
    unpad_token_groups,
)

UNALIGNED = (100, 0, 37, 300, 5, 64, 129, 1)


# --- the padding itself ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=6),
    tail=st.integers(0, 9),
    alignment=st.sampled_from([1, 8, 32, 128]),
)
def test_pad_then_unpad_is_exact_forward_and_backward(sizes, tail, alignment):
    """Every token lands in its padded group in order, padding rows are zero, and gradients return exactly."""
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    rows = sum(sizes) + tail  # rows after offs[-1]: a dispatcher's static-length buffer
    x = torch.randn(rows, 3, dtype=torch.float64, requires_grad=True)
    padded, padded_offs, padding = pad_token_groups(x, offs, alignment)
    assert padded.shape[0] == padding.padded_rows == padded_rows_bound(rows, len(sizes), alignment)
    assert padded.shape[0] % alignment == 0
    start = padded_start = 0
    ends = padded_offs.tolist()
    assert not ends or ends[-1] == padding.padded_rows, "the last group runs to the buffer's end"
    for group, (size, padded_end) in enumerate(zip(sizes, ends)):
        assert padded_end % alignment == 0
        if group < len(sizes) - 1:
            assert padded_end - padded_start == -(-size // alignment) * alignment
        assert torch.equal(padded[padded_start : padded_start + size], x[start : start + size])
        assert torch.count_nonzero(padded[padded_start + size : padded_end]) == 0
        start, padded_start = start + size, padded_end
    assert torch.count_nonzero(padded[padded_start:]) == 0
    weight = torch.randn(padded.shape[0], 1, dtype=torch.float64)
    back = unpad_token_groups(padded * weight, padding)
    grad = torch.randn(rows, 3, dtype=torch.float64)
    back.backward(grad)
    kept = sum(sizes)
    assert torch.count_nonzero(back[kept:]) == 0
    expected = torch.zeros_like(grad)
    expected[:kept] = grad[:kept] * weight[padding.padded_positions[:kept]]
    assert torch.equal(x.grad, expected)


def test_padding_reads_offs_only_on_the_device():
    """Building the layout never calls .tolist()/.item() on offs (the host sync the issue forbids)."""

    class NoHostRead(torch.Tensor):
        def tolist(self):  # type: ignore[override]
            raise AssertionError("offs read on the host")

        def item(self):  # type: ignore[override]
            raise AssertionError("offs read on the host")

    offs = torch.tensor([3, 3, 10], dtype=torch.int32).as_subclass(NoHostRead)
    padding = token_group_padding(offs, 12, 8)
    assert padding.padded_rows == padded_rows_bound(12, 3, 8) == 40


def test_malformed_offs_never_index_out_of_bounds():
    """Decreasing or too-large ends cannot be seen without a sync; the maps stay in range instead."""
    x = torch.randn(10, 4)
    for ends in ([12, 4, 30], [-3, 5, 7]):
        padded, _, padding = pad_token_groups(x, torch.tensor(ends, dtype=torch.int32), 8)
        assert int(padding.source_rows.max()) <= 10 and int(padding.padded_positions.max()) <= padding.padded_rows
        assert unpad_token_groups(padded, padding).shape == x.shape


# --- every backend takes any group sizes ----------------------------------------------------

FAKES = {"0.18": ("0.18.0", fakes.GEN_018, 128), "0.17": ("0.17.0", fakes.GEN_017, 32),
         "0.16": ("0.16.0", fakes.GEN_016, 32), "0.14": ("0.14.1", fakes.GEN_014, 32)}


def _kernels_assert_alignment(fake, monkeypatch, multiple: int, calls: list) -> None:
    """Make the fake's kernels assert what the real sm_100 kernels assert, and let 'native' run."""
    impl = fake.impl
    emulate = impl.emulate

    def asserting(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp=False):
        ends = offs.tolist()
        sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
        calls.append(sizes)
        assert all(size % multiple == 0 for size in sizes), f"group sizes {sizes} not multiples of {multiple}"
        assert A.shape[0] % multiple == 0, f"M={A.shape[0]} not a multiple of {multiple}"
        if multiple == 128:
            assert A.shape[1] % 128 == 0 and B_t.shape[2] % 128 == 0, "K and N must be multiples of 128"
        return emulate(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp)

    monkeypatch.setattr(impl, "emulate", asserting)
    monkeypatch.setattr(impl, "NATIVE_WORKS", True)
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)


@pytest.mark.parametrize("row", sorted(FAKES))
def test_native_paths_take_any_group_sizes(fake_torchao, native_capable_device, monkeypatch, caplog, row):
    version, files, multiple = FAKES[row]
    fake = fake_torchao(version, files)
    calls: list = []
    _kernels_assert_alignment(fake, monkeypatch, multiple, calls)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        fn = resolve("auto", device="cpu")
        assert fn.backend == "mxfp8", fn.reasons
        assert fn.group_alignment == multiple
        problem = make_problem(group_rows=UNALIGNED, k=256, n=256)
        out, dA, dB = run_with_grads(fn, problem)
    assert calls and all(size % multiple == 0 for sizes in calls for size in sizes)
    assert not [r for r in caplog.records if "runs in bf16" in r.getMessage() or "unavailable" in r.getMessage()], (
        "auto must not fall back for group sizes"
    )
    scale = fn.generation.scale_mode
    wgrad_hp = fn.generation.wgrad_with_hp
    ref_out, ref_dA, ref_dB = run_with_grads(
        lambda A, B, offs: mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, scale, wgrad_hp), problem
    )
    assert torch.equal(out, ref_out)
    assert sqnr_db(ref_dA, dA) > 60 and sqnr_db(ref_dB, dB) > 60
    exact_out, exact_dA, exact_dB = float64_reference(problem)
    assert sqnr_db(exact_out, out) >= 27 and sqnr_db(exact_dA, dA) >= 25 and sqnr_db(exact_dB, dB) >= 24


@pytest.mark.parametrize("row", ["0.18", "0.16"])
def test_emulated_torchao_rows_take_any_group_sizes(fake_torchao, monkeypatch, row):
    version, files, _ = FAKES[row]
    fake = fake_torchao(version, files)
    calls: list = []
    _kernels_assert_alignment(fake, monkeypatch, 32, calls)  # torchao's emulation quantises M in blocks of 32
    fn = resolve("emulated", device="cpu")
    assert fn.emulation == "torchao" and fn.group_alignment == 32, fn.reasons
    problem = make_problem(group_rows=UNALIGNED, k=64, n=96)
    out, dA, dB = run_with_grads(fn, problem)
    ref = run_with_grads(lambda A, B, offs: mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, "rceil", True), problem)
    assert torch.equal(out, ref[0]) and sqnr_db(ref[1], dA) > 60 and sqnr_db(ref[2], dB) > 60


def test_groups_aligned_promise_skips_padding_and_is_checked(fake_torchao, native_capable_device, monkeypatch):
    fake = fake_torchao("0.18.0", fakes.GEN_018)
    calls: list = []
    _kernels_assert_alignment(fake, monkeypatch, 128, calls)
    fn = resolve("auto", device="cpu")
    aligned = make_problem(group_rows=(128, 0, 256), k=128, n=128)
    out_promised = fn(aligned.A, aligned.B, aligned.offs, groups_aligned=True)
    assert calls[-1] == [128, 0, 256], "a kept promise must reach the kernel unpadded"
    assert torch.equal(out_promised, fn(aligned.A, aligned.B, aligned.offs))
    unaligned = make_problem(group_rows=(100, 156), k=128, n=128)
    with pytest.raises(ValueError, match="offs: groups_aligned=True promises group sizes aligned to 128"):
        fn(unaligned.A, unaligned.B, unaligned.offs, groups_aligned=True)
    short = make_problem(group_rows=(128, 100), k=128, n=128)
    with pytest.raises(ValueError, match=r"A: groups_aligned=True promises rows aligned to 128, but M=228"):
        fn(short.A, short.B, short.offs, groups_aligned=True)


def test_group_alignment_per_backend(no_torchao):
    assert resolve("off", device="cpu").group_alignment == 1
    assert resolve("emulated", device="cpu").group_alignment == 1  # the reference takes any sizes as they are


# --- static-length buffers: offs[-1] < M ----------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_static_length_buffer_rows_after_the_last_group(no_torchao, mode):
    """offs[-1] < M: rows before it are the grouped GEMM; in MXFP8 the tail's input gradient is zero."""
    problem = make_problem(group_rows=(37, 0, 64, 5), k=64, n=64)
    kept = 106
    A = torch.cat([problem.A.detach(), torch.randn(22, 64, dtype=torch.bfloat16)]).requires_grad_(True)
    B = problem.B.detach().clone().requires_grad_(True)
    grad_out = torch.randn(A.shape[0], 64, dtype=torch.bfloat16)
    fn = resolve(mode, device="cpu", validate=True)
    out = fn(A, B, problem.offs)
    out.backward(grad_out)
    # the same groups without the tail give the same rows and weight gradient
    A2 = A.detach()[:kept].clone().requires_grad_(True)
    B2 = B.detach().clone().requires_grad_(True)
    out2 = fn(A2, B2, problem.offs)
    out2.backward(grad_out[:kept])
    assert torch.equal(out[:kept], out2)
    assert torch.equal(A.grad[:kept], A2.grad)
    assert torch.equal(B.grad, B2.grad)
    if mode == "emulated":
        assert torch.count_nonzero(A.grad[kept:]) == 0


def test_emulated_static_buffer_compiles(no_torchao):
    problem = make_problem(group_rows=(40, 24), k=64, n=64)
    A = torch.cat([problem.A.detach(), torch.randn(16, 64, dtype=torch.bfloat16)])
    fn = resolve("emulated", device="cpu")
    eager = fn(A, problem.B.detach(), problem.offs)
    compiled = torch.compile(fn.fn, fullgraph=True, backend="aot_eager")(A, problem.B.detach(), problem.offs)
    assert torch.equal(eager[:64], compiled[:64])


# --- bf16 takes any gradient ----------------------------------------------------------------


def test_bf16_backward_takes_an_expanded_gradient(no_torchao):
    """out.sum().backward() hands torch's backward a stride-0 gradient, which it rejects by itself."""
    problem = make_problem(group_rows=(32, 0, 96), k=64, n=32)
    fn = resolve("off", device="cpu")
    out = fn(problem.A, problem.B, problem.offs)
    out.sum().backward()
    A = problem.A.detach().clone().requires_grad_(True)
    B = problem.B.detach().clone().requires_grad_(True)
    torch_grouped_mm(A, B, problem.offs).backward(torch.ones(128, 32, dtype=torch.bfloat16))
    assert torch.equal(problem.A.grad, A.grad) and torch.equal(problem.B.grad, B.grad)


# --- the Triton kernels compute what the portable version computes ---------------------------

_INTERPRETED_KERNELS = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from mxfp8_compat.kernels import token_groups as kernels
from mxfp8_compat.token_groups import _gather_rows_torch, _token_group_layout_torch, padded_rows_bound

generator = torch.Generator().manual_seed(int(os.environ["SEED"]))
for trial in range(24):
    groups = int(torch.randint(1, 40, (1,), generator=generator))
    sizes = torch.randint(0, 50, (groups,), generator=generator)
    sizes[torch.rand(groups, generator=generator) < 0.3] = 0
    rows = int(sizes.sum()) + int(torch.randint(0, 10, (1,), generator=generator))
    alignment = [1, 8, 32, 128][trial % 4]
    offs = sizes.cumsum(0).int()
    padded_rows = padded_rows_bound(rows, groups, alignment)
    triton_maps = kernels.token_group_layout(offs, rows, padded_rows, alignment)
    torch_maps = _token_group_layout_torch(offs, rows, padded_rows, alignment)
    for got, want in zip(triton_maps, torch_maps):
        assert torch.equal(got.long(), want.long()), (sizes.tolist(), alignment, got, want)
    x = torch.randn(rows, 37)
    assert torch.equal(kernels.gather_rows(x, torch_maps[1]), _gather_rows_torch(x, torch_maps[1]))
    zeroed = x.clone()
    kernels.zero_rows_after(zeroed, offs)
    end = int(offs[-1])
    assert torch.equal(zeroed[:end], x[:end]) and torch.count_nonzero(zeroed[end:]) == 0
print("kernels agree")
'''


def test_triton_kernels_agree_with_the_portable_version():
    """The CUDA kernels, run by Triton's interpreter on the CPU, give bit for bit the torch ops' maps and rows."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    seed = str(torch.randint(0, 2**31, (1,)).item())
    child = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNELS], capture_output=True, text=True,
                           env=dict(os.environ, SEED=seed), timeout=600)
    assert child.returncode == 0 and "kernels agree" in child.stdout, (seed, child.stderr[-2000:])
