"""Bit-level agreement between torchao's own MXFP8 emulation and this project's reference.

:mod:`mxfp8_compat.numerics.reference` is the yardstick. For every torchao generation that ships an
emulation of its own (0.13, 0.16, 0.17, 0.18), :func:`reference_agreement` runs that emulation
through the shim's own normalizer (``BoundEntry.bind("emulated", wgrad_with_hp)``) and the
reference with the generation's scale rule (FLOOR for 0.13, RCEIL for 0.16+, which is what the
normalizers request) on the same seeded bf16 problem, and compares output, input gradient and
weight gradient bit for bit.

What was established by reading the wheels and measuring (CPU, torch 2.9 to 2.12.1):

* Quantisation agrees exactly. ``to_mx`` (FLOOR: exponent bits of amax minus 8, divide by the
  scale; RCEIL: ``ceil(log2(amax / 448))``, multiply by the reciprocal) and the reference's
  ``mx_quantize`` are the same operations; every generation blocks the same dims as the
  reference (forward along K, input gradient along N, weight gradient along the tokens of a
  group). 0.16, 0.17 and 0.18 give bit-identical results on identical inputs.
* The forward is bit-identical: torchao's ``_emulated_mxfp8_scaled_grouped_mm_2d_3d`` and the
  reference make the same call, ``torch._grouped_mm(A_q, B_q, offs)`` with bf16 output and
  B_q per-group column-major.
* The gradients may differ in the last bits, from the final GEMM alone: torchao calls
  ``torch._grouped_mm(..., out_dtype=torch.bfloat16)`` on the dequantised bf16 operands
  (input gradient as ``G_q @ W_q`` with ``W_q`` a column-major ``(E, N, K)`` view; weight
  gradient as ``(G_q^T @ A_q)^T``), while the reference computes the input gradient with a
  float32 GEMM (``grouped_mm_highprec(..., float32)``, on the CPU an upcast to float32 since
  torch's CPU kernel cannot emit float32 from bf16) and the weight gradient with a per-group
  float32 ``torch.mm(A_q^T, G_q)``, rounding to bf16 once at the end (on CUDA the reference's
  backward GEMMs are ``torch._grouped_mm`` with bf16 output too, in its own operand order:
  ``G_q @ W_q`` with ``W_q`` contiguous, ``A_q^T @ G_q``). Both accumulate in
  float32, in a different order, so the bf16 results can differ by an ulp, more where an
  output nearly cancels. Whether they differ depends on the CPU kernels' blocking: on the
  default problem here they do not; on larger ones they do.

Each difference is checked two ways rather than only reported: a *torchao-ordered variant*
(the reference's quantisers feeding exactly the GEMM calls torchao makes, same operand
layouts) must reproduce torchao bit for bit, which shows the operands are identical, and the
difference must lie within the classical bound for reordering a float32 sum (see
:func:`_order_bound`), which shows nothing but summation order is at play.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from mxfp8_compat.numerics.highprec import grouped_mm_loop
from mxfp8_compat.numerics.metrics import forward_backward, sqnr_db
from mxfp8_compat.numerics.quantize import ScaleMode, mx_fake_quantize, mx_fake_quantize_grouped_rows
from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference
from mxfp8_compat.probes.environment import installed_torchao_version
from mxfp8_compat.providers.match import match_generation
from mxfp8_compat.providers.schema import Generation

__all__ = ["DEFAULT_PROBLEM", "max_ulp_diff", "reference_agreement"]

#: The comparison's default problem: E=4 experts, token groups of 64/128 rows, K=256, N=128.
DEFAULT_PROBLEM: dict[str, Any] = {"group_rows": (64, 128, 64, 128), "k": 256, "n": 128, "seed": 20261125}

_ORDINAL_VIEWS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}

_TENSORS = ("output", "grad_A", "grad_B")


def _ordinals(x: torch.Tensor) -> torch.Tensor:
    """Map floats onto consecutive integers: adjacent representable values differ by 1.

    The bit pattern is sign-magnitude, so the magnitude bits count up from zero on either side
    and negative values get the negated count; +0 and -0 both map to 0.
    """
    int_dtype, magnitude_mask = _ORDINAL_VIEWS[x.dtype]
    bits = x.detach().contiguous().view(int_dtype).to(torch.int64)
    magnitude = bits & magnitude_mask
    return torch.where(bits < 0, -magnitude, magnitude)


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance between ``a`` and ``b``, elementwise, in units in the last place.

    The distance is the number of representable values of the dtype one must step through to
    get from one element to the other (computed from integer views of the bit patterns, so
    it is exact): 0 for equal values, 1 for neighbours, and +0 / -0 count as equal (a step
    across zero counts the values on both sides). Elements that are NaN in both tensors count
    as equal; a NaN facing a number gives ``inf``. Infinities are the values after the
    largest finite one. Returns an integer-valued number (``int``), or ``math.inf``.

    bfloat16, float16 and float32 are supported; ``a`` and ``b`` need the same dtype and
    shape. Why ulps and not only SQNR: two emulations that agree up to accumulation order
    differ by a few ulps at most (outside near-cancellations), while a quantisation mismatch
    (one changed scale) moves whole 32-element blocks by far more.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in _ORDINAL_VIEWS:
        raise TypeError(f"max_ulp_diff supports bfloat16, float16 and float32, got {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return 0
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    if bool((a_nan != b_nan).any()):
        return math.inf
    distance = (_ordinals(a) - _ordinals(b)).abs()
    distance = torch.where(a_nan & b_nan, 0, distance)
    return int(distance.max())


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 ulp at the magnitude of each element of ``x`` (float64; subnormal floor 2**-133)."""
    magnitude = x.detach().abs().double()
    exponent = torch.floor(torch.log2(torch.clamp(magnitude, min=2.0**-126)))
    return torch.exp2(exponent - 7)


def _order_bound(
    torchao: torch.Tensor, reference: torch.Tensor, abs_products: torch.Tensor, length: int
) -> float:
    """Largest ``|torchao - reference| / bound``; at most 1 when summation order explains it.

    Two float32 accumulations of the same ``length`` products, in different orders, each lie
    within ``length * 2**-24 * sum|a_i b_i|`` of the exact sum (the classical recursive-sum
    bound), so they differ by at most twice that; rounding each to bf16 adds at most one bf16
    ulp at the larger result. ``abs_products`` is ``|lhs| @ |rhs|`` of the GEMM's operands.
    """
    diff = (torchao.detach().double() - reference.detach().double()).abs()
    larger = torch.maximum(torchao.detach().abs(), reference.detach().abs())
    bound = 2.0 * length * 2.0**-24 * abs_products + _bf16_ulp(larger)
    return float((diff / bound).max()) if diff.numel() else 0.0


def _problem(
    device: torch.device, group_rows: Sequence[int], k: int, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 inputs: A (M, K), B (E, K, N) per-group column-major, grad (M, N), offs."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(list(group_rows))
    offs = rows.cumsum(0).to(torch.int32).to(device)
    m, e = int(rows.sum()), len(group_rows)
    A = torch.randn(m, k, generator=generator).to(device=device, dtype=torch.bfloat16)
    B = torch.randn(e, n, k, generator=generator).to(device=device, dtype=torch.bfloat16).transpose(-2, -1)
    grad = torch.randn(m, n, generator=generator).to(device=device, dtype=torch.bfloat16)
    return A, B, grad, offs


def _torchao_ordered(
    row: Generation, A: torch.Tensor, B: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, mode: ScaleMode, wgrad_with_hp: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """The reference's quantisers feeding exactly the GEMM calls torchao's emulation makes.

    Returns, per tensor, ``(result, lhs, rhs, contraction_length)``. Operand layouts are the
    ones torchao passes to ``torch._grouped_mm`` (read from the wheels and checked by tracing
    the calls), since on some kernels the layout changes the summation order:

    * forward: ``A_q (M, K)`` row-major, ``B_q (E, K, N)`` column-major (all generations);
    * input gradient: ``G_q (M, N)`` row-major, ``W_q (E, N, K)`` column-major, i.e. the
      transpose of a contiguous ``(E, K, N)`` (all generations);
    * weight gradient, MXFP8: ``G_q^T (N, M)`` contiguous times ``A_q (M, K)``, contiguous in
      where the row's ``wgrad_rhs`` is "row-major", the transpose of a contiguous ``(K, M)`` where it
      is "column-major"; high precision (rows with ``wgrad_with_hp``):
      ``G^T`` as a transposed view times ``A`` contiguous; the ``(E, N, K)`` result transposed.
    """
    bf16 = torch.bfloat16
    A_q = mx_fake_quantize(A, dim=-1, scale_mode=mode)
    B_q = mx_fake_quantize(B, dim=1, scale_mode=mode)
    out = torch._grouped_mm(A_q, B_q, offs=offs, out_dtype=bf16)
    G_q = mx_fake_quantize(grad, dim=-1, scale_mode=mode)
    W_q = mx_fake_quantize(B, dim=2, scale_mode=mode).contiguous().transpose(-2, -1)
    grad_A = torch._grouped_mm(G_q, W_q, offs=offs, out_dtype=bf16)
    if wgrad_with_hp:
        lhs, rhs = grad.transpose(-2, -1), A.contiguous()
    else:
        lhs = mx_fake_quantize_grouped_rows(grad, offs, mode).t().contiguous()
        A_w = mx_fake_quantize_grouped_rows(A, offs, mode)
        rhs = A_w.contiguous() if row.wgrad_rhs == "row-major" else A_w.t().contiguous().t()
    grad_B = torch._grouped_mm(lhs, rhs, offs=offs, out_dtype=bf16).transpose(-2, -1)
    rows = offs.diff(prepend=offs.new_zeros(1))
    return {
        "output": (out, A_q, B_q, A.shape[-1]),
        "grad_A": (grad_A, G_q, W_q, grad.shape[-1]),
        "grad_B": (grad_B, lhs, rhs, int(rows.max()) if rows.numel() else 0),
    }


def _abs_products(name: str, lhs: torch.Tensor, rhs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``|lhs| @ |rhs|`` per group, in float64 and in the result's layout."""
    if name != "grad_B":
        return grouped_mm_loop(lhs.abs().double(), rhs.abs().double(), offs, torch.float64)
    # 2D x 2D: contraction over each group's token rows, one (N, K) block per group.
    out = []
    start = 0
    for end in offs.tolist():
        out.append(lhs[:, start:end].abs().double() @ rhs[start:end].abs().double())
        start = end
    return torch.stack(out).transpose(-2, -1)


def _explain(name: str, row: Generation, wgrad_with_hp: bool, variant_equal: bool, ratio: float) -> str:
    """Why ``name`` differs between torchao and the reference, or why it is unexplained."""
    if not variant_equal:
        return (
            f"{name}: not explained - feeding the reference's quantised operands to torchao's own GEMM call "
            "does not reproduce torchao, so the quantisation (scales or blocking) differs; compare to_mx in "
            "torchao/prototype/mx_formats/mx_tensor.py with reference.mx_quantize"
        )
    if name == "output":
        how_torchao = "torch._grouped_mm(A_q, B_q, out_dtype=bf16)"
        how_reference = "the same call"
    elif name == "grad_A":
        how_torchao = "torch._grouped_mm(G_q, W_q, out_dtype=bf16) with W_q an (E, N, K) column-major view"
        how_reference = (
            "reference.dgrad_gemm: on CUDA torch._grouped_mm(G_q, W_q.contiguous()) with bf16 output; elsewhere "
            "grouped_mm_highprec(G_q, W_q.contiguous(), float32) (float32 GEMM, on the CPU after an exact upcast) "
            "then .to(bf16)"
        )
    else:
        operands = "G^T, A (bf16, unquantised)" if wgrad_with_hp else "G_q^T, A_q"
        how_torchao = f"torch._grouped_mm({operands}, out_dtype=bf16) -> (E, N, K), transposed"
        how_reference = (
            "reference.wgrad_gemm: on CUDA torch._grouped_mm(A^T, G) -> (E, K, N) with bf16 output; elsewhere "
            "per-group float32 torch.mm(A^T, G) -> (K, N), then .to(bf16)"
        )
    sites = dict(zip(("grad_A", "grad_B"), row.emulated_sites))
    site = sites.get(name, "its emulated GEMM")
    within = "within" if ratio <= 1.0 else "OUTSIDE"
    return (
        f"{name}: identical quantised operands (the reference's quantisers fed to torchao's GEMM call reproduce "
        f"torchao bit for bit); only the float32 summation order differs. torchao {row.key} ({site}) calls "
        f"{how_torchao}; the reference uses {how_reference}. Difference is {within} the reordered-float32-sum "
        f"bound (ratio {ratio:.3g})."
    )


def reference_agreement(
    device: torch.device | str = "cpu",
    *,
    group_rows: Sequence[int] = DEFAULT_PROBLEM["group_rows"],
    k: int = DEFAULT_PROBLEM["k"],
    n: int = DEFAULT_PROBLEM["n"],
    seed: int = DEFAULT_PROBLEM["seed"],
) -> dict[str, Any]:
    """Compare the installed torchao's emulated MXFP8 grouped GEMM with the reference, bit for bit.

    Contract: runs forward and backward (``out.backward(grad)``, contiguous bf16 ``grad``) of
    torchao's emulated path, called through the shim's normalizer, and of
    :func:`~mxfp8_compat.mxfp8_grouped_mm_reference` with the generation's scale rule,
    on the same seeded bf16 inputs (A row-major, B per-group column-major, token groups
    ``group_rows``, which must be multiples of 32, as must ``k`` and ``n``), with
    ``wgrad_with_hp`` False and, where the generation has it (0.16+), True. ``out_dtype`` is
    bf16: torch's CPU grouped GEMM cannot emit float32 from bf16, so torchao's emulation
    cannot run with float32 output on the CPU.

    Returns ``{"applicable": False, "reason": str}`` when there is nothing to compare: no
    torchao, no adapter row fits it, its generation has no emulation of its own (0.14, 0.15:
    the shim uses the reference itself there), or torchao's emulation raises here (0.13 with
    torch 2.8 on the CPU, which has no CPU ``torch._grouped_mm``). Otherwise::

        {"applicable": True, "generation", "scale_mode", "torchao_version", "torch_version",
         "device", "problem", "bitwise_equal" (all tensors of all runs), "max_ulp" (over all),
         "explanation" (joined per-tensor explanations, "" when all are bitwise equal),
         "runs": [{"wgrad_with_hp": bool,
                   "output" | "grad_A" | "grad_B": {
                       "bitwise_equal", "max_ulp" (see max_ulp_diff), "sqnr_db" (torchao against
                       the reference; inf when equal), "torchao_order_bitwise_equal" (the
                       reference's quantisers fed to torchao's exact GEMM call reproduce torchao),
                       "order_bound_ratio" (<= 1: the difference is explained by float32
                       summation order alone), "explanation" ("" when bitwise equal)}}]}

    Why: the reference is the project's definition of MXFP8 numerics and the fallback
    wherever torchao has no usable path; this shows, per installed release, that it computes
    what torchao computes, and pins down every bit where it does not.
    """
    device = torch.device(device)
    version = installed_torchao_version()
    if version is None:
        return {"applicable": False, "reason": "torchao is not installed: there is no torchao emulation to compare"}
    match = match_generation(version)
    if match.bound is None:
        return {"applicable": False, "reason": f"no adapter-table row fits torchao {version}: " + "; ".join(match.reasons)}
    generation = match.bound.generation
    if generation.emulation != "torchao":
        return {
            "applicable": False,
            "reason": f"torchao {version} (generation {generation.key}) has no emulation of its own; "
            "the shim's emulated mode runs the reference itself, so there is nothing to compare",
        }
    mode = generation.scale_mode
    A, B, grad, offs = _problem(device, group_rows, k, n, seed)
    hp_settings = (False, True) if generation.wgrad_with_hp else (False,)
    runs: list[dict[str, Any]] = []
    for wgrad_with_hp in hp_settings:
        call = match.bound.bind("emulated", wgrad_with_hp)
        try:
            torchao = forward_backward(lambda a, b, o: call(a, b, o, torch.bfloat16), A, B, offs, grad)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure means "cannot run here"
            text = " ".join(str(error).split())[:200]
            return {
                "applicable": False,
                "reason": f"torchao {version}'s emulated path (wgrad_with_hp={wgrad_with_hp}) does not run on "
                f"{device} with torch {torch.__version__}: {type(error).__name__}: {text}",
            }
        reference = forward_backward(
            lambda a, b, o: mxfp8_grouped_mm_reference(a, b, o, torch.bfloat16, mode, wgrad_with_hp), A, B, offs, grad
        )
        ordered = _torchao_ordered(generation, A, B, grad, offs, mode, wgrad_with_hp)
        run: dict[str, Any] = {"wgrad_with_hp": wgrad_with_hp}
        for name, ours, theirs in zip(_TENSORS, reference, torchao):
            variant, lhs, rhs, length = ordered[name]
            equal = torch.equal(theirs, ours)
            variant_equal = torch.equal(theirs, variant)
            ratio = 0.0 if equal else _order_bound(theirs, ours, _abs_products(name, lhs, rhs, offs), length)
            run[name] = {
                "bitwise_equal": equal,
                "max_ulp": max_ulp_diff(theirs, ours),
                "sqnr_db": sqnr_db(ours, theirs),
                "torchao_order_bitwise_equal": variant_equal,
                "order_bound_ratio": ratio,
                "explanation": "" if equal else _explain(name, generation, wgrad_with_hp, variant_equal, ratio),
            }
        runs.append(run)
    cells = [run[name] for run in runs for name in _TENSORS]
    explanations = [
        f"wgrad_with_hp={run['wgrad_with_hp']}: {run[name]['explanation']}"
        for run in runs
        for name in _TENSORS
        if run[name]["explanation"]
    ]
    return {
        "applicable": True,
        "generation": generation.key,
        "scale_mode": mode.value,
        "torchao_version": version,
        "torch_version": torch.__version__,
        "device": str(device),
        "problem": {"group_rows": list(group_rows), "k": k, "n": n, "seed": seed},
        "bitwise_equal": all(cell["bitwise_equal"] for cell in cells),
        "max_ulp": max(cell["max_ulp"] for cell in cells),
        "explanation": " | ".join(explanations),
        "runs": runs,
    }
