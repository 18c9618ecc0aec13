"""Exactly torch._grouped_mm's contract in every mode: what torch takes, the shim takes; what it rejects, the shim names."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_problem, needs_grouped_mm_on_cpu, torch_grouped_mm
from mxfp8_compat import resolve

MODES = ["off", "emulated", "auto"]


@pytest.mark.parametrize("mode", MODES)
def test_offs_on_another_device_raises_without_validate(no_torchao, mode):
    p = make_problem(group_rows=(64, 64), k=96, n=96, requires_grad=False)
    with pytest.raises(ValueError, match="expected one device.*offs on meta"):
        resolve(mode, device="cpu")(p.A, p.B, p.offs.to("meta"))


@pytest.mark.parametrize("mode", MODES)
def test_3d_A_raises_even_without_offs(no_torchao, mode):
    p = make_problem(group_rows=(64, 64), k=32, n=32, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match="A: expected a 2D|offs: expected a torch.Tensor"):
        resolve(mode, device="cpu")(p.A.reshape(2, 64, 32), p.B, None)


@pytest.mark.parametrize("mode", MODES)
def test_out_dtype_defaults_to_the_input_dtype_as_in_torch(no_torchao, mode):
    fn = resolve(mode, device="cpu")
    for dtype in (torch.bfloat16, torch.float32):
        p = make_problem(group_rows=(32, 32), k=64, n=64, dtype=dtype, requires_grad=False)
        assert fn(p.A, p.B, p.offs).dtype == dtype == torch_grouped_mm(p.A, p.B, p.offs).dtype
        assert fn(p.A, p.B, p.offs, out_dtype=None, bias=None).dtype == dtype


def test_float32_bf16_path_is_torch_itself(no_torchao):
    p = make_problem(group_rows=(32, 0, 32), k=64, n=64, dtype=torch.float32, requires_grad=False)
    assert torch.equal(resolve("off", device="cpu")(p.A, p.B, p.offs), torch_grouped_mm(p.A, p.B, p.offs))


@pytest.mark.parametrize("mode", MODES)
def test_a_bias_is_rejected_naming_it(no_torchao, mode):
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)
    with pytest.raises(ValueError, match="bias: expected None"):
        resolve(mode, device="cpu")(p.A, p.B, p.offs, bias=torch.zeros(2, 64, dtype=torch.bfloat16))


@needs_grouped_mm_on_cpu
@pytest.mark.parametrize("mode", ["off", "auto"])
def test_B_strided_along_N_runs_as_emulated_does(no_torchao, mode, caplog):
    """torch._grouped_mm rejects such strides with an unnamed RuntimeError; the shim runs a contiguous copy and says so once."""
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)
    B_big = torch.randn(2, 64, 128, dtype=torch.bfloat16)
    B = B_big[..., ::2]
    with pytest.raises(RuntimeError):
        torch._grouped_mm(p.A, B, offs=p.offs)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        out = resolve(mode, device="cpu")(p.A, B, p.offs)
        resolve(mode, device="cpu")(p.A, B, p.offs)
    assert torch.equal(out, torch._grouped_mm(p.A, B.contiguous(), offs=p.offs))
    assert len([r for r in caplog.records if "rejects the layout of B" in r.getMessage()]) == 1


def test_validate_inside_fullgraph_compile_steps_aside(no_torchao):
    """validate=True reads offs: under torch.compile that is a data-dependent guard, so the checks step aside there."""
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)
    fn = resolve("off", device="cpu", validate=True)
    compiled = torch.compile(lambda A, B, offs: fn(A, B, offs), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(p.A, p.B, p.offs), fn(p.A, p.B, p.offs))
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(p.A, p.B, torch.tensor([64, 32], dtype=torch.int32))  # eager still checks
