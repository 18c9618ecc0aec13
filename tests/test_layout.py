"""Weight layout: contiguous (E, N, K) storage used through its transpose, conversions, and prepare_weight."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_problem
from mxfp8_compat import (
    as_grouped_mm_weight,
    expert_weight,
    expert_weight_from_kn,
    expert_weight_to_kn,
    prepare_weight,
    resolve,
    state_dict_from_expert_layout,
    state_dict_to_expert_layout,
    weight_relayout,
)
from mxfp8_compat import layout
from mxfp8_compat.layout import is_per_group_column_major


def test_relayout_gives_the_strides_torchao_needs():
    B = torch.randn(4, 64, 96)
    out = weight_relayout(B)
    assert out.stride() == (96 * 64, 1, 64)
    assert torch.equal(out, B)


def test_relayout_is_a_no_op_on_a_column_major_weight():
    B = torch.randn(4, 96, 64).transpose(-2, -1)
    assert weight_relayout(B) is B


# --- the recommended storage ---------------------------------------------------------------------


def test_expert_weight_is_a_contiguous_enk_parameter():
    w = expert_weight(3, 64, 32, dtype=torch.bfloat16)
    assert isinstance(w, torch.nn.Parameter) and w.requires_grad
    assert w.shape == (3, 32, 64) and w.is_contiguous() and w.dtype is torch.bfloat16
    assert not expert_weight(3, 64, 32, requires_grad=False).requires_grad
    with pytest.raises(ValueError, match="k: expected a non-negative int"):
        expert_weight(3, -1, 32)


def test_as_grouped_mm_weight_is_a_column_major_view_never_a_copy():
    w = torch.nn.Parameter(torch.randn(4, 96, 64))  # (E, N, K)
    B = as_grouped_mm_weight(w)
    assert B.shape == (4, 64, 96) and B.stride() == (96 * 64, 1, 64)
    assert is_per_group_column_major(B) and weight_relayout(B) is B
    assert B.data_ptr() == w.data_ptr() and B._base is w  # a view of the parameter itself
    assert B.requires_grad


def test_as_grouped_mm_weight_rejects_what_is_not_enk_storage():
    with pytest.raises(ValueError, match=r"weight: expected a contiguous \(E, N, K\).*expert_weight_from_kn"):
        as_grouped_mm_weight(torch.randn(4, 96, 64).transpose(-2, -1))  # e.g. a prepare_weight parameter
    with pytest.raises(ValueError, match="weight: expected a 3D"):
        as_grouped_mm_weight(torch.randn(4, 4))
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        as_grouped_mm_weight([1, 2])


def test_kn_conversions_round_trip():
    W = torch.randn(4, 64, 96)  # an existing (E, K, N) row-major weight
    storage = expert_weight_from_kn(W)
    assert storage.shape == (4, 96, 64) and storage.is_contiguous() and not storage.requires_grad
    assert torch.equal(as_grouped_mm_weight(storage), W)
    back = expert_weight_to_kn(storage)
    assert back.is_contiguous() and torch.equal(back, W)
    with pytest.raises(ValueError, match="weight: expected a 3D"):
        expert_weight_from_kn(torch.randn(4, 4))


def test_state_dict_conversion():
    sd = {"layers.0.w1": torch.randn(4, 32, 64), "layers.0.w2": torch.randn(4, 64, 32), "norm.weight": torch.randn(32)}
    by_name = state_dict_to_expert_layout(sd, ["layers.0.w1", "layers.0.w2"])
    by_predicate = state_dict_to_expert_layout(sd, lambda name: name.endswith(("w1", "w2")))
    for converted in (by_name, by_predicate):
        assert converted["layers.0.w1"].shape == (4, 64, 32) and converted["layers.0.w1"].is_contiguous()
        assert torch.equal(as_grouped_mm_weight(converted["layers.0.w2"]), sd["layers.0.w2"])
        assert converted["norm.weight"] is sd["norm.weight"]
    assert sd["layers.0.w1"].shape == (4, 32, 64), "the input state dict is left alone"
    exported = state_dict_from_expert_layout(by_name, ["layers.0.w1", "layers.0.w2"])
    assert all(torch.equal(exported[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="layers.1.w1"):
        state_dict_to_expert_layout(sd, ["layers.1.w1"])
    with pytest.raises(ValueError, match=r"state_dict\['norm.weight'\]: expected a 3D"):
        state_dict_to_expert_layout(sd, ["norm.weight"])
    with pytest.raises(TypeError, match="single str"):
        state_dict_to_expert_layout(sd, "layers.0.w1")


def test_expert_weight_loads_into_a_module_from_a_kn_checkpoint():
    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = expert_weight(2, 32, 64)

    checkpoint = {"w": torch.randn(2, 32, 64)}  # (E, K, N)
    module = Experts()
    module.load_state_dict(state_dict_to_expert_layout(checkpoint, ["w"]))
    assert torch.equal(as_grouped_mm_weight(module.w), checkpoint["w"]) and module.w.is_contiguous()


# --- prepare_weight: kept, warns ------------------------------------------------------------------


@pytest.fixture
def prepare_weight_not_yet_warned(monkeypatch):
    monkeypatch.setattr(layout, "_prepare_weight_warned", False)


def test_prepare_weight_warns_once_naming_the_way_out(prepare_weight_not_yet_warned):
    with pytest.warns(FutureWarning, match=r"fully_shard.*expert_weight\(E, K, N\).*as_grouped_mm_weight") as record:
        prepare_weight(torch.nn.Parameter(torch.randn(3, 64, 32)))
    assert record[0].filename == __file__, "the warning points at the caller"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_weight(torch.nn.Parameter(torch.randn(3, 64, 32)))  # once per process


@pytest.mark.filterwarnings("ignore::FutureWarning")
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
    """Records every op (below autograd: forward and backward) that reads the weight's storage.

    While ``inside_math`` the backend's own arithmetic runs (the reference quantiser reads B into
    float32, the per-group loop upcasts each expert): those reads are the computation, not a
    copy of the stored weight, and are recorded apart (``math_ops``).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.ops: list[str] = []
        self.math_ops: list[str] = []
        self.inside_math = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == self.storage:
                (self.math_ops if self.inside_math else self.ops).append(str(func))
        return func(*args, **kwargs)


def _mark_backend_math(monkeypatch, seen: _WeightOps) -> None:
    """Route the reference's and the per-group loop's math through ``seen.inside_math``."""
    from mxfp8_compat.numerics import highprec, reference

    def marked(fn):
        def inside(*args, **kwargs):
            seen.inside_math += 1
            try:
                return fn(*args, **kwargs)
            finally:
                seen.inside_math -= 1

        return inside

    for module, name in ((reference, "_forward_impl"), (reference, "_backward_impl"),
                         (highprec, "grouped_mm_highprec"), (highprec, "_fallback_backward_impl")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, marked(getattr(module, name)))


def _enk_storage(B: torch.Tensor) -> tuple[torch.nn.Parameter, torch.Tensor]:
    w = torch.nn.Parameter(expert_weight_from_kn(B))
    return w, as_grouped_mm_weight(w)


def _prepared(B: torch.Tensor) -> tuple[torch.nn.Parameter, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        w = prepare_weight(torch.nn.Parameter(B))
    return w, w


@pytest.mark.parametrize("storage", [_enk_storage, _prepared], ids=["expert_weight", "prepare_weight"])
@pytest.mark.parametrize("mode", ["emulated", "off"])
def test_stored_weight_is_not_copied_and_gets_its_gradient(no_torchao, monkeypatch, mode, storage):
    """No op copies either weight storage (forward or backward); the gradient reaches the parameter."""
    from mxfp8_compat.backends import grouped_mm as backends

    relayouts = []
    real = backends.weight_relayout
    monkeypatch.setattr(backends, "weight_relayout", lambda B: (relayouts.append(B), real(B))[1])
    problem = make_problem(k=64, n=64)
    weight, B = storage(problem.B.detach())
    before = weight.detach().clone()
    storage_ptr = weight.untyped_storage().data_ptr()
    fn = resolve(mode, device="cpu")
    seen = _WeightOps(weight)
    _mark_backend_math(monkeypatch, seen)
    with seen:
        out = fn(problem.A, B, problem.offs)
        out.backward(problem.grad_out)
    assert seen.ops or seen.math_ops, "the weight was never read: the spy sees nothing"
    copies = [op for op in seen.ops if op.startswith(_COPYING_OPS)]
    assert copies == [], f"{mode}: the stored weight was copied by {copies}"
    if mode == "emulated":
        assert relayouts and all(real(b) is b for b in relayouts), "the MXFP8 path must relay out only by no-op"
    assert weight.untyped_storage().data_ptr() == storage_ptr and torch.equal(weight.detach(), before)
    assert weight.grad is not None and weight.grad.shape == weight.shape
    assert torch.isfinite(weight.grad).all()
