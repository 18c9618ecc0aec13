"""The columns of the adapter tables: what a row of :mod:`.table` may say about a provider release.

Every fact about a release that code acts on is a column here, so that the code reading the
rows (:mod:`.match`, :mod:`mxfp8_compat.resolution`, :mod:`mxfp8_compat.backends.torchao_paths`) is
the same for every row and never tests a version string or a row key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Literal, Optional, TypeVar

import torch
from packaging.specifiers import SpecifierSet

from ..numerics.quantize import ScaleMode

__all__ = [
    "Generation",
    "Kernel",
    "PerKernel",
    "GroupedMMCall",
    "Binder",
    "ParamsReader",
    "FingerprintRule",
    "Float32Out",
    "signature_params",
    "names_present",
    "TorchGeneration",
    "ScaledGroupedMM",
]

Kernel = Literal["native", "emulated"]
GroupedMMCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
Binder = Callable[[Callable[..., Any], Kernel, bool], GroupedMMCall]
#: ``params(entry) -> parameter names in order`` (the entry's own signature by default).
ParamsReader = Callable[[Callable[..., Any]], tuple[str, ...]]
#: ``rule(fingerprint, params) -> why params do not fit, or None``.
FingerprintRule = Callable[[tuple[str, ...], tuple[str, ...]], Optional[str]]
#: How a callee answers ``out_dtype=torch.float32``: ``"upcast"``, it emits bf16 only (float32 is
#: the bf16 result upcast); ``"grouped_mm"``, it emits float32 where ``torch._grouped_mm`` emits
#: float32 from bf16 on the device (torchao's emulation calls it), else the bf16 result upcast.
Float32Out = Literal["upcast", "grouped_mm"]

T = TypeVar("T")


def signature_params(entry: Callable[..., Any]) -> tuple[str, ...]:
    """Parameter names of ``entry`` in order (the default :data:`ParamsReader`)."""
    return tuple(inspect.signature(entry).parameters)


def names_present(fingerprint: tuple[str, ...], params: tuple[str, ...]) -> Optional[str]:
    """The default :data:`FingerprintRule`: every fingerprint name is a parameter (by keyword, any order)."""
    missing = [name for name in fingerprint if name not in params]
    if missing:
        return f"parameters {missing} are missing (has {params})"
    return None


@dataclass(frozen=True)
class PerKernel(Generic[T]):
    """One value per kernel of a row (``native``, ``emulated``), read as ``row.group_multiple["native"]``.

    A frozen dataclass rather than a dict, so that rows (and the Resolutions holding them) are
    immutable and hashable.
    """

    native: T
    emulated: T

    def __getitem__(self, kernel: Kernel) -> T:
        if kernel not in ("native", "emulated"):
            raise KeyError(kernel)
        return self.native if kernel == "native" else self.emulated


@dataclass(frozen=True)
class Generation:
    """One torchao MXFP8 grouped-GEMM API generation (one row of the adapter table).

    Attributes:
        key: short name, for messages and records only (no code branches on it).
        versions: torchao versions this row is written for (prereleases included).
        entry_points: ``(module, attribute)`` candidates, tried in order.
        fingerprint: parameter names the normalizer relies on.
        bind: the normalizer, ``bind(entry, kernel, wgrad_with_hp) -> call(A, B_t, offs, out_dtype)``.
        native: the generation ships a native (sm_100) kernel path.
        emulation: "torchao" when the entry can run MXFP8 numerics without that kernel
            (on CPU too), "reference" when it cannot and mxfp8_compat's reference stands in.
        scale_mode: the scale rule the generation's kernels use.
        wgrad_with_hp: the entry can keep the weight-gradient GEMM in high precision.
        native_flag: module attribute through which torchao reports its sm_100 kernels.
        group_multiple: the multiple every token group's size (and M) must have, per kernel;
            the callables pad to it on the device.
        shape_multiple: the multiple K and N must have, per kernel.
        bf16_operands: the entry needs bf16 A and B (float32 ones are rounded to bf16 first).
        contiguous_grad: the entry's backward needs a contiguous incoming gradient.
        float32_out: how the entry answers ``out_dtype=torch.float32``, per kernel (:data:`Float32Out`).
        wgrad_rhs: the layout of the quantised ``A`` that the entry's emulated MXFP8 weight-gradient
            GEMM passes to ``torch._grouped_mm``: ``"row-major"`` (contiguous ``(M, K)``) or
            ``"column-major"`` (the transpose of a contiguous ``(K, M)``). The agreement check
            (``tools/mxfp8_compat_dev/agreement.py``) replays that call; layouts change summation order.
        emulated_sites: where the emulated input- and weight-gradient GEMMs are in the wheel, for
            the agreement check's explanations; empty when there is no emulation.
        params: reads the entry's parameter names (:data:`ParamsReader`).
        fingerprint_rule: decides whether those names fit ``fingerprint`` (:data:`FingerprintRule`).
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
    native_flag: Optional[str] = None
    group_multiple: PerKernel[int] = PerKernel(native=32, emulated=32)
    shape_multiple: PerKernel[int] = PerKernel(native=32, emulated=32)
    bf16_operands: bool = True
    contiguous_grad: bool = True
    float32_out: PerKernel[Float32Out] = PerKernel(native="upcast", emulated="grouped_mm")
    wgrad_rhs: Literal["row-major", "column-major"] = "column-major"
    emulated_sites: tuple[str, ...] = ()
    params: ParamsReader = signature_params
    fingerprint_rule: FingerprintRule = names_present
    notes: str = ""

    def __repr__(self) -> str:
        return f"Generation({self.key!r}, versions={str(self.versions)!r})"

    def fingerprint_mismatch(self, params: tuple[str, ...]) -> Optional[str]:
        """Why ``params`` (the entry's parameter names) do not fit this row, or None."""
        return self.fingerprint_rule(self.fingerprint, params)


# --- torch's own MXFP8 grouped GEMM: the provider that is not torchao ---------------------------

ScaledGroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TorchGeneration:
    """One generation of torch's own MXFP8 grouped GEMM (a row of :data:`.table.TORCH_GENERATIONS`).

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
        return names_present(self.fingerprint, params)
