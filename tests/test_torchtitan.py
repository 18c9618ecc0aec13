"""The torchtitan converter (mxfp8_compat.integrations.torchtitan) against torchtitan's real MoE modules.

Run by the tox env ``torchtitan`` (torchtitan 0.3.0 from the registry), skipped elsewhere. No
import is stubbed: torchtitan's MoE modules import only torch, spmd_types and torchtitan itself.

* ``off`` (and ``auto`` on a CPU) is the stack as shipped, bitwise: outputs, the input gradient,
  every parameter gradient, 20 training steps' losses.
* ``emulated`` trains: the loss falls over 20 AdamW steps and stays close to bf16's; the
  dispatcher's padding (to ``group_alignment``) is bitwise the grouped GEMM padding by itself.
* The equivalents of torchtitan's own CPU-runnable MoE unit tests (tests/unit_tests/test_moe.py,
  test_quantization.py::test_quantized_grouped_experts, test_compile_moe.py, whose grouped-GEMM
  test is CUDA-only upstream and runs here on the CPU), with the converter applied.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("torchtitan")

from torchtitan.components.lora import LoRAConverter  # noqa: E402
from torchtitan.components.quantization import QuantizationConverter  # noqa: E402
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.moe import GroupedExperts  # noqa: E402
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher  # noqa: E402
from torchtitan.models.utils import validate_converter_order  # noqa: E402

import mxfp8_compat  # noqa: E402
from mxfp8_compat.integrations.torchtitan import (  # noqa: E402
    MXFP8CompatConverter,
    MXFP8CompatTokenDispatcher,
    mxfp8_experts_class,
)
from mxfp8_compat.numerics.metrics import sqnr_db  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K = 64, 96, 4, 2


def moe_config(num_experts: int = EXPERTS, top_k: int = TOP_K, dim: int = DIM, hidden: int = HIDDEN):
    return make_moe_config(
        num_experts=num_experts,
        router=make_router_config(dim=dim, num_experts=num_experts, gate_param_init={}, top_k=top_k, score_func="softmax"),
        routed_experts=make_routed_experts_config(
            dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k, param_init={}, comm_backend="standard"
        ),
        load_balance_coeff=None,
    )


def build_pair(mode: str, seed: int = 0, **shape):
    """The stock MoE and the converted one, with the same random parameters."""
    stock = moe_config(**shape).build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stock.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1 / math.sqrt(p.shape[-1])))
    converted = MXFP8CompatConverter.Config(mode=mode).build().convert(moe_config(**shape)).build()
    converted.load_state_dict(stock.state_dict())
    return stock, converted


def inputs(seed: int = 1, batch: int = 2, seq: int = 37, dim: int = DIM):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, dim, generator=generator)
    return x, torch.randn(batch, seq, dim, generator=generator)


def forward_backward(moe, x, grad):
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = moe(x)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in moe.named_parameters()}


def train(moe, steps: int = 20, seed: int = 3) -> list[float]:
    """AdamW on a fixed regression target (a frozen random MoE's output): the losses."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, DIM, generator=generator)
    teacher = torch.tanh(x @ (torch.randn(DIM, DIM, generator=generator) / math.sqrt(DIM)))
    optimizer = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(moe(x), teacher)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --- registered as torchtitan registers its own converters ------------------------------------


def test_the_converter_is_a_torchtitan_quantization_converter():
    config = MXFP8CompatConverter.Config(mode="emulated")
    assert isinstance(config, QuantizationConverter.Config)
    converter = config.build()
    assert isinstance(converter, MXFP8CompatConverter) and isinstance(converter, QuantizationConverter)
    validate_converter_order([config, LoRAConverter.Config()])
    with pytest.raises(ValueError, match="before LoRAConverter"):
        validate_converter_order([LoRAConverter.Config(), config])


def test_model_registry_converts_every_moe_layer():
    from torchtitan.models.qwen3 import model_registry

    spec = model_registry("debugmodel_moe", converters=[MXFP8CompatConverter.Config(mode="off")])
    experts = list(spec.model.traverse(GroupedExperts.Config))
    assert experts, "the debug MoE model has MoE layers"
    for fqn, config, parent, _ in experts:
        assert type(config).__name__ == "Config" and type(config)._owner.__name__ == "MXFP8CompatGroupedExperts", fqn
        assert config.mode == "off" and config.groups_aligned
        assert isinstance(parent.token_dispatcher, MXFP8CompatTokenDispatcher.Config)


def test_bad_mode_names_the_argument():
    with pytest.raises(ValueError, match="MXFP8CompatConverter.Config.mode"):
        MXFP8CompatConverter.Config(mode="fast").build()


def test_a_dense_model_is_refused():
    from torchtitan.models.common.linear import Linear

    with pytest.raises(ValueError, match="model_config: no GroupedExperts"):
        MXFP8CompatConverter.Config(mode="off").build().convert(Linear.Config(in_features=8, out_features=8))


def test_converting_twice_is_converting_once():
    converter = MXFP8CompatConverter.Config(mode="emulated").build()
    once = converter.convert(moe_config())
    twice = converter.convert(copy.deepcopy(once))
    assert type(twice.routed_experts.inner_experts) is type(once.routed_experts.inner_experts)
    assert type(twice.routed_experts.inner_experts)._owner.__mro__[1] is GroupedExperts


# --- off / auto on a CPU: the stack as shipped, bitwise ---------------------------------------


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_bf16_is_bitwise_the_stack_as_shipped(mode):
    stock, converted = build_pair(mode)
    x, grad = inputs()
    for model in (stock, converted):
        model.to(torch.bfloat16)
    x, grad = x.bfloat16(), grad.bfloat16()
    out0, dx0, grads0 = forward_backward(stock, x, grad)
    out1, dx1, grads1 = forward_backward(converted, x, grad)
    assert mxfp8_compat.resolve(mode, device="cpu").backend == "bf16"
    assert torch.equal(out0, out1) and torch.equal(dx0, dx1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_bf16_training_losses_are_bitwise_the_stack_as_shipped():
    stock, converted = build_pair("off")
    assert train(stock) == train(converted)


# --- emulated: MXFP8 numerics on the CPU -------------------------------------------------------


def test_emulated_trains_close_to_bf16():
    stock, converted = build_pair("emulated")
    bf16 = train(stock)
    emulated = train(converted)
    assert emulated[-1] < 0.5 * emulated[0], emulated
    assert abs(emulated[-1] - bf16[-1]) <= 0.1 * bf16[0], (emulated, bf16)
    assert emulated != bf16, "MXFP8 numerics differ from bf16's"


def test_emulated_forward_is_mxfp8_of_the_stock_layer():
    stock, converted = build_pair("emulated")
    x, grad = inputs()
    out0, dx0, _ = forward_backward(stock, x, grad)
    out1, dx1, _ = forward_backward(converted, x, grad)
    assert 20 <= sqnr_db(out0, out1) < 60, "MXFP8 rounding: close to bf16, not equal"
    assert sqnr_db(dx0, dx1) >= 18


def test_the_dispatcher_pads_to_the_resolved_alignment_and_pads_nothing_twice(monkeypatch):
    """Padding in the dispatcher (groups_aligned=True) is bitwise the grouped GEMM padding by itself."""
    resolution = mxfp8_compat.resolve("emulated", device="cpu")
    stock, converted = build_pair("emulated")
    seen = []
    real = type(resolution).__call__

    def spy(self, A, B, offs, **kwargs):
        seen.append((A.shape[0], offs.clone(), kwargs.get("groups_aligned")))
        return real(self, A, B, offs, **kwargs)

    monkeypatch.setattr(type(resolution), "__call__", spy)
    x, grad = inputs(seq=45)
    out1, dx1, grads1 = forward_backward(converted, x, grad)
    alignment = resolution.group_alignment
    assert len(seen) == 3 and all(aligned for _, _, aligned in seen)
    for rows, offs, _ in seen:
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        assert rows % alignment == 0 and bool((sizes % alignment == 0).all()), (rows, sizes, alignment)
    monkeypatch.setattr(type(resolution), "__call__", real)

    # The stock layer with its seam calling the same resolution on unpadded groups.
    monkeypatch.setattr(GroupedExperts, "_grouped_mm", lambda self, *, A, B_t, offs: resolution(A, B_t, offs))
    out0, dx0, grads0 = forward_backward(stock, x, grad)
    assert torch.equal(out0, out1) and torch.equal(dx0, dx1)
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


# --- torchtitan's own MoE unit tests that run on a CPU, with the converter applied --------------


def test_eval_forward_does_not_accumulate_tokens_per_expert():
    """tests/unit_tests/test_moe.py, on the converted layer (its dims 4 and 8 made 32: MXFP8 blocks are 32 wide)."""
    config = make_moe_config(
        num_experts=2,
        router=make_router_config(dim=32, num_experts=2, gate_param_init={}, top_k=1),
        routed_experts=make_routed_experts_config(
            dim=32, hidden_dim=32, num_experts=2, top_k=1, param_init={}, comm_backend="standard"
        ),
    )
    moe = MXFP8CompatConverter.Config(mode="emulated").build().convert(config).build()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    moe.tokens_per_expert_E.zero_()
    x_BLD = torch.randn(2, 3, 32)
    moe.train()
    moe(x_BLD)
    assert moe.tokens_per_expert_E.sum().item() == 2 * 3 * 1
    training_counts = moe.tokens_per_expert_E.clone()
    moe.eval()
    with torch.no_grad():
        moe(x_BLD)
    torch.testing.assert_close(moe.tokens_per_expert_E, training_counts)


def test_quantized_grouped_experts_classes():
    """tests/unit_tests/test_quantization.py::test_quantized_grouped_experts, for this converter's classes."""
    from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts

    base = mxfp8_experts_class(GroupedExperts)
    assert base.Config._owner is base and mxfp8_experts_class(GroupedExperts) is base
    gpt_oss = mxfp8_experts_class(GptOssGroupedExperts)
    assert gpt_oss.Config._owner is gpt_oss
    assert issubclass(gpt_oss, GptOssGroupedExperts) and hasattr(gpt_oss.Config, "swiglu_limit")
    with pytest.raises(TypeError, match="parent"):
        mxfp8_experts_class(torch.nn.Linear)


def test_permute_with_the_padding_dispatcher_is_the_stock_permute():
    """tests/unit_tests/test_expert_parallel.py's rank-major -> expert-major case: unchanged by the subclass."""
    from unittest import mock

    counts = torch.tensor([2, 3, 1, 4])
    results = []
    for cls in (AllToAllTokenDispatcher, MXFP8CompatTokenDispatcher):
        dispatcher = cls(cls.Config(num_experts=1, top_k=1))
        dispatcher.ep_mesh = mock.MagicMock()
        dispatcher.ep_mesh.size.return_value = 2
        _, _, permuted, per_expert = dispatcher._permute(torch.zeros(int(counts.sum()), 1), counts)
        results.append((permuted, per_expert))
    torch.testing.assert_close(results[0][0], torch.tensor([0, 1, 5, 2, 3, 4, 6, 7, 8, 9]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("mode", ["emulated", "off"])
def test_grouped_experts_compile_and_run(mode):
    """tests/unit_tests/test_compile_moe.py::test_grouped_mm_compiles_and_runs (CUDA-only there) on the CPU.

    Compiled, inductor fuses silu(h1) * h3 (no bf16 rounding in between), so MXFP8 then
    quantises slightly different values: compiled and eager are each as far from bf16 as MXFP8 is.
    """
    cls = mxfp8_experts_class(GroupedExperts)
    experts = cls(cls.Config(dim=128, hidden_dim=256, num_experts=8, mode=mode))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.05)
    stock = GroupedExperts(GroupedExperts.Config(dim=128, hidden_dim=256, num_experts=8))
    stock.load_state_dict(experts.state_dict())
    counts = torch.tensor([10, 8, 12, 9, 11, 7, 10, 13], dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 128)
    bf16 = stock(x, counts)
    eager = experts(x, counts)
    compiled = torch.compile(experts)(x, counts)
    assert compiled.shape == x.shape
    if mode == "off":
        assert torch.equal(eager, bf16) and sqnr_db(eager, compiled) >= 40
    else:
        assert 18 <= sqnr_db(bf16, eager) <= 35, "eager is MXFP8"
        assert abs(sqnr_db(bf16, compiled) - sqnr_db(bf16, eager)) <= 2, "compiled is MXFP8 too"
        assert sqnr_db(eager, compiled) >= 20


def test_converted_moe_layer_trains_under_torch_compile():
    stock, converted = build_pair("emulated")
    eager = copy.deepcopy(converted)
    x, grad = inputs()
    out_bf16, dx_bf16, _ = forward_backward(stock, x, grad)
    out0, dx0, _ = forward_backward(eager, x, grad)
    out1, dx1, grads1 = forward_backward(torch.compile(converted), x, grad)
    assert abs(sqnr_db(out_bf16, out1) - sqnr_db(out_bf16, out0)) <= 2
    assert abs(sqnr_db(dx_bf16, dx1) - sqnr_db(dx_bf16, dx0)) <= 2
    assert sqnr_db(out0, out1) >= 20 and sqnr_db(dx0, dx1) >= 18
    assert all(g is not None and torch.isfinite(g).all() for g in grads1.values())
