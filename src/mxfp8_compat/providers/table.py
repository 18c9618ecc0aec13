"""The versioned adapter tables: one row per provider API generation, newest first, as frozen data.

Each torchao row says where a generation keeps its entry point, which parameter names its
normalizer relies on (the signature fingerprint, checked before the row is trusted), how
to call it for the native kernel and for torchao's own emulation, what numerics it
produces, and every quirk the callables must work around (the columns: :mod:`.schema`).
Facts come from reading each published wheel (see ``shared/torchao-generations.md``).

Adding the next torchao release is one :class:`~.schema.Generation` row at the top of
:data:`GENERATIONS` (newest first), one normalizer if the call changed (in the module of its
release family: :mod:`.torchao` for 0.16+), and one tox env. Dropping releases is deleting their
module and its one line here (0.13-0.15: :mod:`.torchao_013_015`).

A normalizer is ``bind(entry, kernel, wgrad_with_hp) -> call`` where ``kernel`` is
``"native"`` or ``"emulated"`` and ``call(A, B_t, offs, out_dtype)`` follows the uniform
contract. Normalizers pass arguments by keyword and never fill a slot whose meaning changed
between releases (the 4th parameter is ``block_size`` up to 0.17, ``bias`` from 0.18). Every
row's entry is one torchao's own code calls; in each release's tox env,
``tests/test_wheel_conformance.py`` runs the row's native call (0.14+) through that wheel's
autograd code, forward and backward, with only the sm_100 kernels replaced.

:data:`TORCH_GENERATIONS` is the same discipline for the provider that is not torchao: torch's own
MXFP8 grouped GEMM (rows per torch generation, newest first), fed by mxfp8_compat's quantisers
(:mod:`mxfp8_compat.backends.torch_native`); ``tests/test_torch_native_conformance.py`` runs its
calls through torch's own code with only the sm_100 kernel stood in.
"""

from __future__ import annotations

from typing import Optional

from packaging.specifiers import SpecifierSet

from ..numerics.quantize import ScaleMode
from . import torchao_013_015  # torchao 0.13-0.15: delete with that module and its tox envs
from .schema import Generation, PerKernel, TorchGeneration
from .torch_mm import bind_scaled_grouped_mm, bind_scaled_grouped_mm_v1
from .torchao import ENTRY, FINGERPRINT, MOE, bind_kernel_preference

__all__ = ["GENERATIONS", "TORCH_GENERATIONS", "Generation", "TorchGeneration", "PerKernel", "by_key"]

_SITES_016 = (
    "prototype/moe_training/scaled_grouped_mm.py: _compute_dgrad -> _emulated_mxfp8_scaled_grouped_mm_2d_3d",
    "prototype/moe_training/scaled_grouped_mm.py: _compute_wgrad",
)
_SITES_017 = (
    "prototype/moe_training/mxfp8_grouped_mm.py: _compute_dgrad -> _emulated_mxfp8_scaled_grouped_mm_2d_3d",
    "prototype/moe_training/mxfp8_grouped_mm.py: _compute_wgrad",
)
_SITES_018 = (
    "prototype/moe_training/mxfp8_grouped_mm.py: _compute_dgrad_emulated",
    "prototype/moe_training/mxfp8_grouped_mm.py: _compute_wgrad_emulated",
)

#: The adapter table, newest generation first.
GENERATIONS: tuple[Generation, ...] = (
    Generation(
        key="0.18",
        versions=SpecifierSet(">=0.18.0.dev0,<0.19.0.dev0", prereleases=True),
        entry_points=(
            (f"{MOE}.mxfp8_grouped_mm", ENTRY),
            (f"{MOE}.fp8_grouped_mm", ENTRY),
            (MOE, ENTRY),
        ),
        fingerprint=FINGERPRINT + ("bias",),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        group_multiple=PerKernel(native=128, emulated=32),
        shape_multiple=PerKernel(native=128, emulated=32),
        bf16_operands=True,
        contiguous_grad=True,
        float32_out=PerKernel(native="upcast", emulated="grouped_mm"),
        wgrad_rhs="column-major",
        emulated_sites=_SITES_018,
        notes=(
            "4th parameter is now `bias`; `block_size` is gone. The native CuTeDSL quantiser asserts "
            "M, K (and N, for the gradient) multiples of 128 and every group a multiple of 128."
        ),
    ),
    Generation(
        key="0.17",
        versions=SpecifierSet(">=0.17.0.dev0,<0.18.0.dev0", prereleases=True),
        entry_points=((f"{MOE}.mxfp8_grouped_mm", ENTRY), (MOE, ENTRY)),
        fingerprint=FINGERPRINT + ("block_size", "pad_token_groups_for_grouped_mm"),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        bf16_operands=True,
        contiguous_grad=True,
        float32_out=PerKernel(native="upcast", emulated="grouped_mm"),
        wgrad_rhs="column-major",
        emulated_sites=_SITES_017,
        notes="Module renamed to mxfp8_grouped_mm; `block_size` still 4th but ignored.",
    ),
    Generation(
        key="0.16",
        versions=SpecifierSet(">=0.16.0.dev0,<0.17.0.dev0", prereleases=True),
        entry_points=((f"{MOE}.scaled_grouped_mm", ENTRY), (MOE, ENTRY)),
        fingerprint=FINGERPRINT + ("block_size",),
        bind=bind_kernel_preference,
        native=True,
        emulation="torchao",
        scale_mode=ScaleMode.RCEIL,
        wgrad_with_hp=True,
        native_flag="_SM100_KERNELS_AVAILABLE",
        bf16_operands=True,
        contiguous_grad=True,
        float32_out=PerKernel(native="upcast", emulated="grouped_mm"),
        wgrad_rhs="row-major",
        emulated_sites=_SITES_016,
        notes="First release with KernelPreference.EMULATED (forward and backward).",
    ),
    *torchao_013_015.ROWS,  # torchao 0.13-0.15
)


# torch's own MXFP8 grouped GEMM. Facts read from the torch 2.10.0, 2.11.0, 2.12.1, 2.13.0, 2.14.1
# and 2.15.0 wheels: ``F.scaled_grouped_mm`` with the same parameters in all of them; a Python meta
# kernel for ``_scaled_grouped_mm`` in all, for ``_scaled_grouped_mm_v2`` only from 2.14.1; the MXFP8
# build flag is ``USE_MSLK`` from 2.11 (``USE_FBGEMM_GENAI`` in 2.10).

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


def by_key(key: object) -> Optional[Generation]:
    """The torchao row named ``key`` (a record's ``generation``), or None: how code outside the table
    asks about a row it knows only by name."""
    return next((row for row in GENERATIONS if row.key == key), None)
