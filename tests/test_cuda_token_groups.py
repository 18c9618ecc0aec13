"""On a GPU: the MXFP8 paths take any group sizes without a host sync, and still compile cleanly.

``torch.cuda.set_sync_debug_mode("error")`` turns every device-to-host sync into an error.
The native kernel needs sm_100; here a stand-in with the same call (torch._grouped_mm on the
padded buffer, asserting the alignment on the device side only) proves the shim's wiring.
"""

from __future__ import annotations


import pytest
import torch

from conftest import make_problem, no_host_sync, run_with_grads
from mxfp8_compat import resolve, sqnr_db
from mxfp8_compat.backends.grouped_mm import make_mxfp8
from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

UNALIGNED = (100, 0, 37, 300, 5, 64, 129, 1)


def _standin_native(A, B_t, offs, out_dtype):
    assert A.shape[0] % 128 == 0, "stand-in: M must be a multiple of 128"
    return torch._grouped_mm(A, B_t, offs=offs, out_dtype=out_dtype)


def _leaves(problem):
    return problem.A.detach().clone().requires_grad_(True), problem.B.detach().clone().requires_grad_(True)


def test_padding_wiring_is_sync_free_and_exact():
    fn = make_mxfp8(_standin_native, validate=False, contiguous_grad=True, group_alignment=128,
                    shape_fallback=None, label="stand-in native")
    problem = make_problem(group_rows=UNALIGNED, k=256, n=256, device="cuda")
    A, B = _leaves(problem)
    with no_host_sync():
        out = fn(A, B, problem.offs)
        out.backward(problem.grad_out)
    A2, B2 = _leaves(problem)
    expected = torch._grouped_mm(A2, B2, offs=problem.offs)
    expected.backward(problem.grad_out)
    assert sqnr_db(expected, out) > 60 and sqnr_db(A2.grad, A.grad) > 60 and sqnr_db(B2.grad, B.grad) > 60


def test_promised_alignment_with_a_static_buffer_is_sync_free():
    fn = make_mxfp8(_standin_native, validate=False, contiguous_grad=True, group_alignment=128,
                    shape_fallback=None, label="stand-in native")
    problem = make_problem(group_rows=(128, 0, 256, 384), k=128, n=128, device="cuda")
    offs = problem.offs.clone()
    offs[-1] = offs[-2]  # the last group is empty: its 384 rows are a static buffer's tail
    A, B = _leaves(problem)
    with no_host_sync():
        out = fn(A, B, offs, groups_aligned=True)
        out.backward(problem.grad_out)
    assert torch.count_nonzero(A.grad[384:]) == 0, "rows after offs[-1] get a zero input gradient"


@pytest.fixture(params=["chosen", "torchao"])
def emulated(request, monkeypatch):
    """resolve("emulated") as chosen here (the fast emulation), and with the fast one ruled out."""
    if request.param == "torchao":
        from mxfp8_compat import resolution

        monkeypatch.setattr(resolution, "fast_emulation_problem", lambda device: "ruled out by the test")
    res = resolve("emulated", device="cuda")
    if request.param == "torchao" and res.emulation != "torchao":
        pytest.skip(f"no torchao emulation here: {res.reasons}")
    return res


def test_emulated_takes_unaligned_groups_like_the_reference(emulated):
    res = emulated
    problem = make_problem(group_rows=UNALIGNED, k=256, n=256, device="cuda")
    out, dA, dB = run_with_grads(res, problem)
    wgrad_hp = res.generation is None or res.generation.wgrad_with_hp or res.emulation != "torchao"
    ref = run_with_grads(
        lambda A, B, offs: mxfp8_grouped_mm_reference(
            A, B, offs, torch.bfloat16, res.generation.scale_mode if res.generation else "rceil", wgrad_hp
        ),
        problem,
    )
    assert torch.equal(out, ref[0]), (res.emulation, sqnr_db(ref[0], out))
    assert sqnr_db(ref[1], dA) > 60 and sqnr_db(ref[2], dB) > 60


def test_emulation_with_padding_is_sync_free(emulated):
    res = emulated
    if res.emulation == "torchao" and res.generation.key < "0.16":
        pytest.skip("torchao 0.13's emulation reads offs on the host")
    problem = make_problem(group_rows=UNALIGNED, k=256, n=256, device="cuda")
    A, B = _leaves(problem)
    with no_host_sync():
        out = res(A, B, problem.offs)
        out.backward(problem.grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(A.grad).all()


def test_padded_path_compiles_without_a_graph_break_from_the_shim():
    fn = make_mxfp8(_standin_native, validate=False, contiguous_grad=True, group_alignment=128,
                    shape_fallback=None, label="stand-in native")
    problem = make_problem(group_rows=UNALIGNED, k=256, n=256, device="cuda", requires_grad=False)
    explanation = torch._dynamo.explain(fn)(problem.A, problem.B, problem.offs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True)
    assert sqnr_db(fn(problem.A, problem.B, problem.offs), compiled(problem.A, problem.B, problem.offs)) > 60


def test_cuda_layout_and_gathers_equal_the_portable_version():
    from mxfp8_compat.token_groups import _gather_rows, _gather_rows_torch, _token_group_layout, _token_group_layout_torch
    from mxfp8_compat.token_groups import padded_rows_bound

    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for trial in range(24):  # few distinct group counts: each power of two compiles one kernel variant
        groups = [1, 7, 64, 300][trial % 4]
        sizes = torch.randint(0, 400, (groups,), generator=generator)
        sizes[torch.rand(groups, generator=generator) < 0.3] = 0
        rows = int(sizes.sum()) + int(torch.randint(0, 300, (1,), generator=generator))
        alignment = [1, 8, 32, 128][trial % 4]
        offs = sizes.cumsum(0).int()
        padded_rows = padded_rows_bound(rows, groups, alignment)
        got = _token_group_layout(offs.cuda(), rows, padded_rows, alignment)
        want = _token_group_layout_torch(offs, rows, padded_rows, alignment)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu().long(), w.long()), (trial, sizes.tolist(), alignment)
        x = torch.randn(rows, 160, dtype=torch.bfloat16)
        assert torch.equal(_gather_rows(x.cuda(), got[1]).cpu(), _gather_rows_torch(x, want[1]))
