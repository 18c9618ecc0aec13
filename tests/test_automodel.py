"""mxfp8_compat.integrations.automodel against NeMo Automodel 0.7.0's real MoE modules.

Run by the tox env ``automodel`` (nemo-automodel 0.7.0 installed with --no-deps, plus the
packages its MoE modules import: transformers 5.18.0, pyyaml), skipped elsewhere. Nothing is
stubbed: the MoE modules import their CUDA-only packages (transformer_engine, DeepEP) lazily
or through ``safe_import``, so on a CPU those imports are never made.

* ``install()`` with the drop-in, and ``install(mode="off")``: Automodel's MoE layer is
  bitwise the layer as shipped (outputs, input and every parameter gradient, 20 steps' losses).
* ``install(mode="emulated")``: the loss falls over 20 AdamW steps and stays close to bf16's.
* Equivalents of Automodel's CPU unit tests (tests/unit_tests/moe/test_mxfp8.py's
  select_grouped_mm dispatch, test_experts.py's zero-active-experts cases) with the library in.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("nemo_automodel")

from nemo_automodel.components.models.common import BackendConfig  # noqa: E402
from nemo_automodel.components.moe import experts as automodel_experts  # noqa: E402
from nemo_automodel.components.moe import mxfp8 as automodel_mxfp8  # noqa: E402
from nemo_automodel.components.moe.config import MoEConfig  # noqa: E402
from nemo_automodel.components.moe.experts import GroupedExperts  # noqa: E402
from nemo_automodel.components.moe.layers import MoE  # noqa: E402

import mxfp8_compat  # noqa: E402
from mxfp8_compat.integrations import automodel  # noqa: E402
from mxfp8_compat.numerics.metrics import sqnr_db  # noqa: E402

SHIPPED = automodel_experts.select_grouped_mm


@pytest.fixture(autouse=True)
def restore_automodel():
    yield
    automodel.uninstall()
    assert automodel_experts.select_grouped_mm is SHIPPED


def moe_config(dtype=torch.bfloat16, expert_bias=False, experts=8) -> MoEConfig:
    return MoEConfig(
        n_routed_experts=experts, n_shared_experts=0, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
        train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0,
        dim=64, inter_dim=128, moe_inter_dim=96, norm_topk_prob=False, expert_bias=expert_bias, dtype=dtype,
    )


def backend() -> BackendConfig:
    return BackendConfig(linear="torch", rms_norm="torch", attn="sdpa", experts="torch_mm_mxfp8", dispatcher="torch",
                         enable_hf_state_dict_adapter=False)


def build_moe(seed: int = 0, dtype=torch.bfloat16) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(moe_config(dtype), backend())
    with torch.no_grad():
        moe.init_weights(torch.device("cpu"), init_std=0.05)
    return moe


def forward_backward(moe, x, grad):
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = moe(x)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in moe.named_parameters()}


def train(moe, steps: int = 20) -> list[float]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 64, generator=generator).bfloat16()
    teacher = torch.tanh(x.float() @ (torch.randn(64, 64, generator=generator) / 8)).bfloat16()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(moe(x).float(), teacher.float())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# --- install -----------------------------------------------------------------------------------


def test_install_switches_both_modules_and_uninstall_restores():
    chosen = automodel.install()
    assert chosen is mxfp8_compat.select_grouped_mm
    assert automodel_experts.select_grouped_mm is chosen and automodel_mxfp8.select_grouped_mm is chosen
    emulated = automodel.install(mode="EMULATED")
    assert automodel_experts.select_grouped_mm is emulated and automodel.selector("emulated") is emulated
    automodel.uninstall()
    assert automodel_experts.select_grouped_mm is SHIPPED


def test_an_unknown_mode_names_the_argument():
    with pytest.raises(ValueError, match="mode: expected one of"):
        automodel.install(mode="fast")
    assert automodel_experts.select_grouped_mm is SHIPPED


# --- bitwise the stack as shipped --------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "off"], ids=["drop-in", "off"])
def test_bf16_is_bitwise_the_layer_as_shipped(mode):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 64, generator=generator).bfloat16()
    grad = torch.randn(2, 37, 64, generator=generator).bfloat16()
    shipped = quiet(forward_backward, build_moe(), x, grad)
    automodel.install(mode)
    ours = quiet(forward_backward, build_moe(), x, grad)
    assert torch.equal(shipped[0], ours[0]) and torch.equal(shipped[1], ours[1])
    assert shipped[2].keys() == ours[2].keys()
    for name in shipped[2]:
        assert (shipped[2][name] is None) == (ours[2][name] is None), name
        if shipped[2][name] is not None:
            assert torch.equal(shipped[2][name], ours[2][name]), name


def test_bf16_training_losses_are_bitwise_the_layer_as_shipped():
    shipped = quiet(train, build_moe())
    automodel.install()
    assert quiet(train, build_moe()) == shipped


def test_emulated_trains_close_to_bf16():
    bf16 = quiet(train, build_moe())
    automodel.install(mode="emulated")
    emulated = train(build_moe())
    assert emulated[-1] < 0.5 * emulated[0], emulated
    assert abs(emulated[-1] - bf16[-1]) <= 0.1 * bf16[0], (emulated, bf16)
    assert emulated != bf16


# --- Automodel's own CPU unit tests, with the library in ---------------------------------------


def test_select_grouped_mm_false_is_the_plain_grouped_mm():
    """test_mxfp8.py::TestSelectGroupedMM::test_use_mxfp8_false_returns_default."""
    automodel.install()
    fn = automodel_experts.select_grouped_mm(use_mxfp8=False)
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(48, 64, generator=generator).bfloat16()
    B = torch.randn(3, 64, 32, generator=generator).bfloat16()
    offs = torch.tensor([16, 16, 48], dtype=torch.int32)
    assert torch.equal(fn(A, B, offs), automodel_mxfp8._default_grouped_mm(A, B, offs))


def test_select_grouped_mm_true_on_a_cpu_falls_back_with_the_seeds_warning():
    """test_mxfp8.py::TestSelectGroupedMM::test_use_mxfp8_true_non_sm100_falls_back."""
    automodel.install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = automodel_experts.select_grouped_mm(use_mxfp8=True)
    assert fn is torch._grouped_mm
    [message] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert message.startswith("experts='torch_mm_mxfp8' requested but MXFP8 grouped GEMM is unavailable")
    assert "Reasons:" in message


@pytest.mark.parametrize("expert_bias", [False, True], ids=["no bias", "bias"])
def test_zero_active_experts_forward_and_backward(expert_bias):
    """test_experts.py::TestGroupedExpertsZeroActiveExperts, on the torch_mm_mxfp8 backend in emulated MXFP8."""
    automodel.install(mode="emulated")
    config = moe_config(torch.float32, expert_bias=expert_bias)
    experts = GroupedExperts(config, backend=backend())
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(8, config.dim, requires_grad=True)
    token_mask = torch.ones(8, dtype=torch.bool)
    weights = torch.rand(8, config.n_activated_experts)
    indices = torch.full((8, config.n_activated_experts), config.n_routed_experts + 100, dtype=torch.long)
    output = experts(x, token_mask, weights, indices)
    assert output.shape == x.shape and not torch.isnan(output).any()
    (output + x.mean(dim=-1, keepdim=True).expand_as(x)).sum().backward()
    assert x.grad is not None


def test_mixed_active_and_inactive_experts_are_mxfp8_of_the_shipped_experts():
    """test_experts.py's mixed case: some experts get tokens, some none; emulated against as shipped."""
    config = moe_config(torch.bfloat16, experts=8)
    torch.manual_seed(0)
    experts = GroupedExperts(config, backend=backend())
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, config.dim, generator=generator).bfloat16()
    token_mask = torch.ones(40, dtype=torch.bool)
    weights = torch.rand(40, 2, generator=generator).bfloat16()
    indices = torch.randint(0, 3, (40, 2), generator=generator)  # experts 3..7 get nothing
    shipped = quiet(experts, x, token_mask, weights, indices)
    automodel.install(mode="emulated")
    emulated = experts(x, token_mask, weights, indices)
    assert 18 <= sqnr_db(shipped.float(), emulated.float()) < 60, "MXFP8: close to bf16, not equal"
