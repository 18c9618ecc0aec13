"""The versioned adapter table: one row per torchao MXFP8 grouped-GEMM API generation.

Each row says where a generation keeps its entry point, which parameter names its
normalizer relies on (the signature fingerprint, checked before the row is trusted), how
to call it for the native kernel and for torchao's own emulation, and what numerics it
produces. Facts come from reading each published wheel (see ``shared/torchao-generations.md``).

Adding the next torchao release is one :class:`Generation` row at the top of
:data:`GENERATIONS` (newest first), one normalizer if the call changed, and one tox env.

A normalizer is ``bind(entry, kernel, wgrad_with_hp) -> call`` where ``kernel`` is
``"native"`` or ``"emulated"`` and ``call(A, B_t, offs, out_dtype)`` follows the uniform
contract. Normalizers pass arguments by keyword and never fill a slot whose meaning changed
between releases (the 4th parameter is ``block_size`` up to 0.17, ``bias`` from 0.18). Every
row's entry is one torchao's own code calls; in each release's tox env,
``tests/test_wheel_conformance.py`` runs the row's native call (0.14+) through that wheel's
autograd code, forward and backward, with only the sm_100 kernels replaced.

:data:`TORCH_GENERATIONS` is the same discipline for the provider that is not torchao: torch's own
MXFP8 grouped GEMM (rows per torch generation, newest first), fed by mxfp8_compat's quantisers
(:mod:`mxfp8_compat.torch_native`); ``tests/test_torch_native_conformance.py`` runs its calls through
torch's own code with only the sm_100 kernel stood in.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from packaging.specifiers import SpecifierSet

from .quantize import ScaleMode

__all__ = [
    "Generation",
    "GENERATIONS",
    "Kernel",
    "PerKernel",
    "GroupedMMCall",
    "Binder",
    "entry_signature_params",
    "TorchGeneration",
    "TORCH_GENERATIONS",
    "ScaledGroupedMM",
]

Kernel = Literal["native", "emulated"]
GroupedMMCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
Binder = Callable[[Callable[..., Any], Kernel, bool], GroupedMMCall]

_MOE = "torchao.prototype.moe_training"


def _enum(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _moe_scaling_type_mxfp8() -> Any:
    return _enum(f"{_MOE}.conversion_utils", "MoEScalingType").MXFP8


def _kernel_preference(kernel: Kernel) -> Any:
    preference = _enum("torchao.quantization.quantize_.common", "KernelPreference")
    return preference.EMULATED if kernel == "emulated" else preference.AUTO


def _rceil() -> Any:
    return _enum("torchao.prototype.mx_formats.config", "ScaleCalculationMode").RCEIL


# --- normalizers -------------------------------------------------------------------------


def bind_scaling_type(entry: Callable[..., Any], kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
    """0.13 / 0.14 ``_scaled_grouped_mm``, 0.15 ``_quantize_then_scaled_grouped_mm``:
    ``entry(A, B_t, offs=, out_dtype=, scaling_type=MXFP8)``.

    The kernel is not selectable: 0.13 always emulates, 0.14 and 0.15 always run sm_100 kernels.
    """
    call = functools.partial(entry, scaling_type=_moe_scaling_type_mxfp8())

    def scaled_grouped_mm_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return call(A, B_t, offs=offs, out_dtype=out_dtype)

    return scaled_grouped_mm_mxfp8


def bind_kernel_preference(entry: Callable[..., Any], kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
    """0.16+: ``_to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=, out_dtype=, kernel_preference=, ...)``.

    Keywords only past B_t, so the 4th slot (``block_size`` in 0.16/0.17, ``bias`` in 0.18)
    is never touched.
    """
    call = functools.partial(
        entry,
        kernel_preference=_kernel_preference(kernel),
        wgrad_with_hp=wgrad_with_hp,
        scale_calculation_mode=_rceil(),
    )

    def to_mxfp8_then_scaled_grouped_mm(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return call(A, B_t, offs=offs, out_dtype=out_dtype)

    return to_mxfp8_then_scaled_grouped_mm


# --- signature sources ---------------------------------------------------------------------


def entry_signature_params(entry: Callable[..., Any], through_autograd_function: bool) -> tuple[str, ...]:
    """Parameter names of ``entry`` in order.

    For an ``autograd.Function.apply`` alias (whose own signature is ``*args``), the names
    come from the Function's ``forward`` without ``ctx``.
    """
    if through_autograd_function:
        owner = getattr(entry, "__self__", None)
        if owner is None or not hasattr(owner, "forward"):
            raise TypeError(f"{entry!r} is not an autograd.Function.apply alias")
        names = tuple(inspect.signature(owner.forward).parameters)
        return names[1:]
    return tuple(inspect.signature(entry).parameters)


@dataclass(frozen=True)
class PerKernel:
    """One number per kernel of a row (``native``, ``emulated``), read as ``row.group_multiple["native"]``.

    A frozen dataclass rather than a dict, so that rows (and the Resolutions holding them) are
    immutable and hashable.
    """

    native: int
    emulated: int

    def __getitem__(self, kernel: Kernel) -> int:
        if kernel not in ("native", "emulated"):
            raise KeyError(kernel)
        return self.native if kernel == "native" else self.emulated


@dataclass(frozen=True)
class Generation:
    """One torchao MXFP8 grouped-GEMM API generation (one row of the adapter table).

    Attributes:
        key: short name ("0.18").
        versions: torchao versions this row is written for (prereleases included).
        entry_points: ``(module, attribute)`` candidates, tried in order.
        fingerprint: parameter names the normalizer relies on; all must be present.
        positional_only: the entry takes positional arguments only; then ``fingerprint``
            must equal the leading parameters exactly, in order. (Written for torchao 0.15's
            ``_MXFP8GroupedMM.apply`` alias, which no row calls any more: its ``forward``
            declares 8 parameters but its ``backward`` returns 6 gradients, so a call filling
            all 8 fails in backward. Kept for a future positional-only entry.)
        via_autograd_function: read the fingerprint from the ``forward`` of the
            ``autograd.Function`` whose ``apply`` the entry is (see ``positional_only``).
        bind: the normalizer.
        native: the generation ships a native (sm_100) kernel path.
        emulation: "torchao" when the entry can run MXFP8 numerics without that kernel
            (on CPU too), "reference" when it cannot and mxfp8_compat's reference stands in.
        scale_mode: the scale rule the generation's kernels use.
        wgrad_with_hp: the entry can keep the weight-gradient GEMM in high precision.
        native_flag: module attribute through which torchao reports its sm_100 kernels.
        group_multiple: the multiple every token group's size (and M) must have, per kernel;
            the callables pad to it on the device.
        shape_multiple: the multiple K and N must have, per kernel (MXFP8 needs 32; 0.18+'s
            native quantiser asserts 128).
        notes: what a maintainer should know.
    """

    key: str
    versions: SpecifierSet
    entry_points: tuple[tuple[str, str], ...]
    fingerprint: tuple[str, ...]
    bind: Binder
    native: bool
    emulation: Literal["torchao", "reference"]
    scale_mode: ScaleMode
    wgrad_with_hp: bool
    positional_only: bool = False
    via_autograd_function: bool = False
    native_flag: Optional[str] = None
    group_multiple: PerKernel = PerKernel(native=32, emulated=32)
    shape_multiple: PerKernel = PerKernel(native=32, emulated=32)
    notes: str = ""

    def __repr__(self) -> str:
        return f"Generation({self.key!r}, versions={str(self.versions)!r})"

    def fingerprint_mismatch(self, params: tuple[str, ...]) -> Optional[str]:
        """Why ``params`` (the entry's parameter names) do not fit this row, or None."""
        if self.positional_only:
            head = params[: len(self.fingerprint)]
            if head != self.fingerprint:
                return f"positional parameters {head} differ from the expected {self.fingerprint}"
            return None
        missing = [name for name in self.fingerprint if name not in params]
        if missing:
            return f"parameters {missing} are missing (has {params})"
        return None


_KP_ENTRY = "_to_mxfp8_then_scaled_grouped_mm"
_KP_FINGERPRINT = ("A", "B_t", "offs", "out_dtype", "kernel_preference", "wgrad_with_hp", "scale_calculation_mode")

#: The adapter table, newest generation first.
GENERATIONS: tuple[Generation, ...] = (
    Generation(
        key="0.18",
        versions=SpecifierSet(">=0.18.0.dev0,<0.19.0.dev0", prereleases=True),
        entry_points=(
            (f"{_MOE}.mxfp8_grouped_mm", _KP_ENTRY),
            (f"{_MOE}.fp8_grouped_mm", _KP_ENTRY),
            (_MOE, _KP_ENTRY),
        ),
        fingerprint=_KP_FINGERPRINT + ("bias",),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        group_multiple=PerKernel(native=128, emulated=32),
        shape_multiple=PerKernel(native=128, emulated=32),
        notes=(
            "4th parameter is now `bias`; `block_size` is gone. The native CuTeDSL quantiser asserts "
            "M, K (and N, for the gradient) multiples of 128 and every group a multiple of 128."
        ),
    ),
    Generation(
        key="0.17",
        versions=SpecifierSet(">=0.17.0.dev0,<0.18.0.dev0", prereleases=True),
        entry_points=((f"{_MOE}.mxfp8_grouped_mm", _KP_ENTRY), (_MOE, _KP_ENTRY)),
        fingerprint=_KP_FINGERPRINT + ("block_size", "pad_token_groups_for_grouped_mm"),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        notes="Module renamed to mxfp8_grouped_mm; `block_size` still 4th but ignored.",
    ),
    Generation(
        key="0.16",
        versions=SpecifierSet(">=0.16.0.dev0,<0.17.0.dev0", prereleases=True),
        entry_points=((f"{_MOE}.scaled_grouped_mm", _KP_ENTRY), (_MOE, _KP_ENTRY)),
        fingerprint=_KP_FINGERPRINT + ("block_size",),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        notes="First release with KernelPreference.EMULATED (forward and backward).",
    ),
    Generation(
        key="0.15",
        versions=SpecifierSet(">=0.15.0.dev0,<0.16.0.dev0", prereleases=True),
        # The dispatcher torchao's own ScaledGroupedMMTensor calls. Same parameters as 0.14's
        # `_scaled_grouped_mm`; the rows differ by entry name (each wheel has only its own).
        entry_points=(
            (f"{_MOE}.scaled_grouped_mm", "_quantize_then_scaled_grouped_mm"),
            (_MOE, "_quantize_then_scaled_grouped_mm"),
        ),
        fingerprint=("A", "B_t", "offs", "out_dtype", "scaling_type"),
        bind=bind_scaling_type,
        native=True,
        emulation="reference",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=False,
        notes=(
            "Entry is `_quantize_then_scaled_grouped_mm(..., scaling_type=MXFP8)`, which calls "
            "`_MXFP8GroupedMM.apply` with 5 arguments; RCEIL is that Function's default. Not the "
            "`_to_mxfp8_then_scaled_grouped_mm` alias (`_MXFP8GroupedMM.apply` itself): its forward "
            "declares 8 parameters but backward returns 6 gradients, so filling all 8 fails in backward. "
            "No emulated path: forward always runs sm_100 kernels."
        ),
    ),
    Generation(
        key="0.14",
        versions=SpecifierSet(">=0.14.0.dev0,<0.15.0.dev0", prereleases=True),
        entry_points=(
            (f"{_MOE}.scaled_grouped_mm", "_scaled_grouped_mm"),
            (f"{_MOE}.tensor", "_scaled_grouped_mm"),
            (_MOE, "_scaled_grouped_mm"),
        ),
        fingerprint=("A", "B_t", "offs", "out_dtype", "scaling_type"),
        bind=bind_scaling_type,
        native=True,
        emulation="reference",
        scale_mode=ScaleMode.FLOOR,
        wgrad_with_hp=False,
        notes="Forward ignores `emulated`: always torch._scaled_grouped_mm + triton (sm_100 only).",
    ),
    Generation(
        key="0.13",
        versions=SpecifierSet(">=0.13.0.dev0,<0.14.0.dev0", prereleases=True),
        entry_points=(
            (f"{_MOE}.scaled_grouped_mm", "_scaled_grouped_mm"),
            (_MOE, "_scaled_grouped_mm"),
        ),
        fingerprint=("A", "B_t", "offs", "out_dtype", "scaling_type"),
        bind=bind_scaling_type,
        native=False,
        emulation="torchao",
        scale_mode=ScaleMode.FLOOR,
        wgrad_with_hp=False,
        notes="MXFP8 is always emulated (forward asserts `emulated`): no native path on any GPU.",
    ),
)


# --- torch's own MXFP8 grouped GEMM: the provider that is not torchao ---------------------------
#
# torch ships the sm_100 kernel itself (MSLK's CUTLASS `mx8mx8bf16_grouped`); mxfp8_compat supplies
# the operands (mxfp8_compat.torch_native). A torch row's normalizer binds the entry to
# ``gemm(mat_a, mat_b, scale_a, scale_b, offs) -> bf16`` for MXFP8 operands: e4m3 data, e8m0 scales in
# the 128x4 blocked layout (``shared/torch-scaled-grouped-mm.md``). Facts read from the torch
# 2.10.0, 2.11.0, 2.12.1, 2.13.0, 2.14.1 and 2.15.0 wheels: ``F.scaled_grouped_mm`` with the same
# parameters in all of them; a Python meta kernel for ``_scaled_grouped_mm`` in all, for
# ``_scaled_grouped_mm_v2`` only from 2.14.1; the MXFP8 build flag is ``USE_MSLK`` from 2.11
# (``USE_FBGEMM_GENAI`` in 2.10).

ScaledGroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bind_scaled_grouped_mm(entry: Callable[..., Any]) -> ScaledGroupedMM:
    """``F.scaled_grouped_mm``: ``BlockWise1x32`` (e8m0) scales swizzled ``SWIZZLE_32_4_4`` on both operands."""
    functional = importlib.import_module("torch.nn.functional")
    blockwise, swizzle = functional.ScalingType.BlockWise1x32, functional.SwizzleType.SWIZZLE_32_4_4

    def scaled_grouped_mm_mxfp8(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return entry(
            mat_a, mat_b, scale_a, blockwise, scale_b, blockwise,
            swizzle_a=swizzle, swizzle_b=swizzle, offs=offs, output_dtype=torch.bfloat16,
        )

    return scaled_grouped_mm_mxfp8


def bind_scaled_grouped_mm_v1(entry: Callable[..., Any]) -> ScaledGroupedMM:
    """``torch._scaled_grouped_mm``: MXFP8 because both operands are e4m3 and both scales e8m0 (swizzle implied)."""

    def scaled_grouped_mm_v1_mxfp8(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return entry(mat_a, mat_b, scale_a, scale_b, offs=offs, out_dtype=torch.bfloat16)

    return scaled_grouped_mm_v1_mxfp8


@dataclass(frozen=True)
class TorchGeneration:
    """One generation of torch's own MXFP8 grouped GEMM (a row of :data:`TORCH_GENERATIONS`).

    Attributes:
        key: short name ("torch-2.14").
        versions: torch versions this row is written for.
        entry_points: ``(module, attribute)`` candidates, tried in order.
        fingerprint: parameter names the normalizer relies on; all must be present.
        schema: the ``torch.ops.aten`` op whose schema names the parameters, for an entry that is a
            builtin (no Python signature); None: the entry's own signature.
        bind: the normalizer, ``bind(entry) -> gemm(mat_a, mat_b, scale_a, scale_b, offs)``.
        build_flag: what ``torch.__config__.show()`` says when the MXFP8 kernel is built in.
        notes: what a maintainer should know.
    """

    key: str
    versions: SpecifierSet
    entry_points: tuple[tuple[str, str], ...]
    fingerprint: tuple[str, ...]
    bind: Callable[[Callable[..., Any]], ScaledGroupedMM]
    schema: Optional[str] = None
    build_flag: str = "USE_MSLK"
    notes: str = ""

    def __repr__(self) -> str:
        return f"TorchGeneration({self.key!r}, versions={str(self.versions)!r})"

    def fingerprint_mismatch(self, params: tuple[str, ...]) -> Optional[str]:
        """Why ``params`` (the entry's parameter names) do not fit this row, or None."""
        missing = [name for name in self.fingerprint if name not in params]
        return f"parameters {missing} are missing (has {params})" if missing else None


#: torch's own MXFP8 grouped GEMM, newest generation first. Below 2.11 there is no row: torch 2.9.0
#: fails MXFP8 with "expected scalar type Float but found Float8_e8m0fnu" (pytorch/ao#3287) and
#: nothing here has verified 2.10 (whose build flag is USE_FBGEMM_GENAI).
TORCH_GENERATIONS: tuple[TorchGeneration, ...] = (
    TorchGeneration(
        key="torch-2.14",
        versions=SpecifierSet(">=2.14.0.dev0", prereleases=True),
        entry_points=(("torch.nn.functional", "scaled_grouped_mm"),),
        fingerprint=("mat_a", "mat_b", "scale_a", "scale_recipe_a", "scale_b", "scale_recipe_b", "swizzle_a", "swizzle_b", "offs", "output_dtype"),
        bind=bind_scaled_grouped_mm,
        notes=(
            "Public F.scaled_grouped_mm -> torch._scaled_grouped_mm_v2, whose meta kernel exists from 2.14.1 "
            "(2.15: shape inference in Python, validation in the C++ structured meta). 2.15 adds "
            "SwizzleType.SWIZZLE_32_8 (AMD); MXFP8 on NVIDIA is BlockWise1x32 + SWIZZLE_32_4_4."
        ),
    ),
    TorchGeneration(
        key="torch-2.11",
        versions=SpecifierSet(">=2.11.0.dev0,<2.14.0.dev0", prereleases=True),
        entry_points=(("torch", "_scaled_grouped_mm"),),
        fingerprint=("self", "mat2", "scale_a", "scale_b", "offs", "out_dtype"),
        schema="_scaled_grouped_mm",
        bind=bind_scaled_grouped_mm_v1,
        notes=(
            "v1 torch._scaled_grouped_mm, the call torchao 0.17/0.18's native path makes on torch >= 2.11. "
            "F.scaled_grouped_mm exists here too, but its v2 op has no meta kernel before 2.14, so the "
            "operands could not be checked without the GPU."
        ),
    ),
)
