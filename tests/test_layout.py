"""weight_relayout / prepare_weight: the column-major weight torchao needs, copied at most once."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_problem
from mxfp8_compat import prepare_weight, resolve, weight_relayout
from mxfp8_compat.layout import is_per_group_column_major


def test_relayout_gives_the_strides_torchao_needs():
    B = torch.randn(4, 64, 96)
    out = weight_relayout(B)
    assert out.stride() == (96 * 64, 1, 64)
    assert torch.equal(out, B)


def test_relayout_is_a_no_op_on_a_column_major_weight():
    B = torch.randn(4, 96, 64).transpose(-2, -1)
    assert weight_relayout(B) is B


def test_prepare_weight_keeps_values_and_grad_flag():
    weight = torch.nn.Parameter(torch.randn(3, 64, 32))
    prepared = prepare_weight(weight)
    assert isinstance(prepared, torch.nn.Parameter) and prepared.requires_grad
    assert torch.equal(prepared, weight)
    assert is_per_group_column_major(prepared)
    assert weight_relayout(prepared) is prepared


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="B: expected a 3D"):
        weight_relayout(torch.randn(4, 4))
    with pytest.raises(TypeError, match="param: expected a torch.Tensor"):
        prepare_weight([1, 2, 3])


_COPYING_OPS = ("aten.clone", "aten._to_copy", "aten.copy_", "aten.contiguous")


class _WeightOps(TorchDispatchMode):
    """Records every op (below autograd: forward and backward) that reads the weight's storage."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == self.storage:
                self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["emulated", "off"])
def test_prepared_weight_is_not_copied_and_gets_its_gradient(no_torchao, monkeypatch, mode):
    """No op copies a prepared weight (forward or backward); the gradient reaches it."""
    from mxfp8_compat import backends

    relayouts = []
    real = backends.weight_relayout
    monkeypatch.setattr(backends, "weight_relayout", lambda B: (relayouts.append(B), real(B))[1])
    problem = make_problem(k=64, n=64)
    weight = prepare_weight(torch.nn.Parameter(problem.B.detach()))
    before = weight.detach().clone()
    storage = weight.untyped_storage().data_ptr()
    fn = resolve(mode, device="cpu")
    with _WeightOps(weight) as seen:
        out = fn(problem.A, weight, problem.offs)
        out.backward(problem.grad_out)
    assert seen.ops, "the weight was never read: the spy sees nothing"
    copies = [op for op in seen.ops if op.startswith(_COPYING_OPS)]
    assert copies == [], f"{mode}: the prepared weight was copied by {copies}"
    if mode == "emulated":
        assert relayouts and all(real(B) is B for B in relayouts), "the MXFP8 path must relay out only by no-op"
    assert weight.untyped_storage().data_ptr() == storage and torch.equal(weight.detach(), before)
    assert weight.grad is not None and weight.grad.shape == weight.shape
    assert torch.isfinite(weight.grad).all()
