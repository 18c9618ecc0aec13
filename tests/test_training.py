"""Training with the grouped GEMM: parameters, optimisers, a tiny MoE, and the weight gradient.

* An expert weight stored contiguous ``(E, N, K)`` (``expert_weight_from_kn``) and passed as
  ``as_grouped_mm_weight(w)`` gets gradients through every mode and keeps its layout (so the
  view stays per-group column-major) across optimiser steps (SGD with momentum, Adam).
* A tiny MoE expert layer (up-projection, SiLU, down-projection) trains for 20 Adam steps in
  "emulated" and in "off" mode from the same init: the loss falls in both and the MXFP8 loss
  tracks the bf16 loss.
* ``wgrad_with_hp``: the high-precision weight gradient is far closer to float64 than the MXFP8
  one where the generation supports it; where it does not, ``reasons`` says so.
"""

from __future__ import annotations

import pytest
import torch

from conftest import float64_reference, make_problem, run_with_grads
from fakes import GEN_013
from mxfp8_compat import as_grouped_mm_weight, expert_weight_from_kn, resolve, sqnr_db
from mxfp8_compat.layout import is_per_group_column_major

HP_REASON = "cannot keep the weight-gradient GEMM in high precision"


# --- (a) expert-weight parameters under an optimiser -------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["emulated", "off"])
def test_expert_weight_gets_gradients_and_keeps_its_layout(mode, optimizer):
    fn = resolve(mode, device="cpu")
    problem = make_problem(group_rows=(64, 32, 0, 96), k=128, n=64, requires_grad=False)
    weight = torch.nn.Parameter(expert_weight_from_kn(problem.B))  # (E, N, K), contiguous
    assert weight.is_contiguous() and is_per_group_column_major(as_grouped_mm_weight(weight))
    opt = OPTIMIZERS[optimizer]([weight])
    _, _, ref_dB = float64_reference(make_problem_like(problem, as_grouped_mm_weight(weight)))
    ref_dB = ref_dB.transpose(-2, -1)  # the gradient of the (E, N, K) storage
    for step in range(3):  # the second and third steps use the optimiser's state
        before = weight.detach().clone()
        storage = weight.data_ptr()
        opt.zero_grad(set_to_none=True)
        out = fn(problem.A, as_grouped_mm_weight(weight), problem.offs)
        out.backward(problem.grad_out)
        assert weight.grad is not None and weight.grad.shape == weight.shape
        assert torch.isfinite(weight.grad).all()
        if step == 0:  # gradient of the untouched init: compare with float64
            floor = 24 if mode == "emulated" else 40
            assert sqnr_db(ref_dB, weight.grad) >= floor, f"{mode}: weight gradient {sqnr_db(ref_dB, weight.grad):.1f} dB"
        assert torch.count_nonzero(weight.grad[2]) == 0, "expert 2 has no tokens"
        opt.step()
        assert weight.is_contiguous(), f"{optimizer} step {step} changed the layout: strides {weight.stride()}"
        assert weight.data_ptr() == storage, "the optimiser updated the parameter in place"
        assert not torch.equal(weight.detach(), before), "the step changed the weight"


def make_problem_like(problem, weight):
    """``problem`` with B replaced by ``weight``'s values (float64 reference of the first step)."""
    return type(problem)(problem.A, weight.detach(), problem.offs, problem.grad_out)


# --- (b) a tiny MoE trained for a few steps ------------------------------------------------------

E, D, H, STEPS = 4, 64, 128, 20
GROUP_ROWS = (96, 32, 64, 64)  # 256 tokens, group ends at multiples of 32

# Tolerance for the MXFP8 loss against the bf16 loss, at every step. Each MXFP8 GEMM costs about
# 28 dB SQNR, i.e. a relative RMS error of 10**(-28/20) ~= 4%; two GEMMs in series give ~6% on the
# prediction y. That error is uncorrelated with the residual r = y - target, so the loss moves by
# mean(delta**2) ~= 0.0036 * mean(y**2) (the cross term averages out over 256 x 64 outputs): under 1%
# of the loss while the loss is comparable to mean(y**2), as in these 20 steps. The gradients (25-28 dB)
# also make the two trajectories drift apart slowly. A relative difference of 10% at every step leaves
# room for that drift while still failing an emulation that skips a quantisation, scales wrongly
# (a wrong power of two is a 2x error) or breaks a gradient. Measured on torchao 0.18's emulation: 0.2-0.5%
# in the first steps, growing to 1.6% by step 20 (the drift).
LOSS_RTOL = 0.10


def _moe_losses(mode: str, seed: int = 0) -> list[float]:
    fn = resolve(mode, device="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(GROUP_ROWS), D, generator=g).bfloat16()
    offs = torch.tensor(GROUP_ROWS).cumsum(0).to(torch.int32)
    # Fixed regression target: a random teacher of the same shape (float64, so it is exactly reachable
    # only in principle), plus fixed noise.
    t1 = torch.randn(E, D, H, generator=g, dtype=torch.float64) / D**0.5
    t2 = torch.randn(E, H, D, generator=g, dtype=torch.float64) / H**0.5
    from mxfp8_compat.numerics.highprec import grouped_mm_float64

    target = grouped_mm_float64(torch.nn.functional.silu(grouped_mm_float64(x.double(), t1, offs)), t2, offs).float()
    # Same init in both modes: float32 master weights, bf16 compute (the usual mixed precision).
    w1 = torch.nn.Parameter(expert_weight_from_kn(torch.randn(E, D, H, generator=g) / D**0.5))
    w2 = torch.nn.Parameter(expert_weight_from_kn(torch.randn(E, H, D, generator=g) / H**0.5))
    opt = torch.optim.Adam([w1, w2], lr=3e-3)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        h = torch.nn.functional.silu(fn(x, as_grouped_mm_weight(w1.bfloat16()), offs))
        y = fn(h, as_grouped_mm_weight(w2.bfloat16()), offs, out_dtype=torch.float32)
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert w1.is_contiguous() and w2.is_contiguous()
    return losses


def test_tiny_moe_trains_and_mxfp8_tracks_bf16():
    emulated = _moe_losses("emulated")
    bf16 = _moe_losses("off")
    print("step  bf16      mxfp8-emulated  rel.diff")
    for step, (b, e) in enumerate(zip(bf16, emulated)):
        print(f"{step:4d}  {b:.5f}  {e:.5f}         {abs(e - b) / b:.4f}")
    for name, losses in (("bf16", bf16), ("emulated", emulated)):
        assert all(torch.isfinite(torch.tensor(losses))), name
        assert losses[-1] < 0.5 * losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} did not halve"
    worst = max(abs(e - b) / b for b, e in zip(bf16, emulated))
    assert worst < LOSS_RTOL, f"MXFP8 loss strays {worst:.1%} from the bf16 loss (tolerance {LOSS_RTOL:.0%})"
    # And it is not the bf16 path in disguise: MXFP8 rounding must show in the loss.
    assert emulated != bf16


# --- (c) wgrad_with_hp ---------------------------------------------------------------------------


def _weight_grad_db(res) -> float:
    problem = make_problem(group_rows=(128, 64, 96, 32), k=256, n=128, generator=torch.Generator().manual_seed(1))
    _, _, dB = run_with_grads(res, problem)
    _, _, ref_dB = float64_reference(problem)
    return sqnr_db(ref_dB, dB)


def test_wgrad_with_hp_where_the_generation_supports_it():
    hp = resolve("emulated", device="cpu", wgrad_with_hp=True)
    mx = resolve("emulated", device="cpu", wgrad_with_hp=False)
    assert hp.emulation == mx.emulation and hp.generation == mx.generation
    db_hp, db_mx = _weight_grad_db(hp), _weight_grad_db(mx)
    print(f"{hp.emulation} emulation, generation {hp.generation}: wgrad {db_hp:.1f} dB with hp, {db_mx:.1f} dB without")
    assert not any(HP_REASON in r for r in mx.reasons), "wgrad_with_hp=False asks for nothing to report"
    assert 24 <= db_mx < 35, "without hp the weight gradient is MXFP8 (~28 dB)"
    supported = hp.emulation == "reference" or (hp.generation is not None and hp.generation.wgrad_with_hp)
    if supported:
        assert not any(HP_REASON in r for r in hp.reasons), hp.reasons
        assert db_hp > 40, "the high-precision weight gradient is a bf16 GEMM (~55 dB)"
        assert db_hp - db_mx > 10
    else:  # torchao 0.13's own emulation (GPU envs): the weight gradient stays MXFP8, and reasons says so
        assert any(HP_REASON in r for r in hp.reasons), hp.reasons
        assert db_hp < 35


def test_wgrad_with_hp_on_torchao_013_shape_is_reported_not_faked(fake_torchao):
    """0.13's entry has no wgrad_with_hp: the request is reported in reasons, and the weight
    gradient really is MXFP8 (a reason that lied, or a silent bf16 fallback, would fail here)."""
    fake_torchao("0.13.0", GEN_013)
    hp = resolve("emulated", device="cpu", wgrad_with_hp=True)
    assert hp.emulation == "torchao" and hp.generation is not None and hp.generation.key == "0.13", hp.reasons
    assert any(HP_REASON in r for r in hp.reasons), hp.reasons
    assert 24 <= _weight_grad_db(hp) < 35
    mx = resolve("emulated", device="cpu", wgrad_with_hp=False)
    assert not any(HP_REASON in r for r in mx.reasons), mx.reasons
