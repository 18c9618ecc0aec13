"""Fake torchao distributions written to disk, one per API shape.

Real releases are tested wherever a tox env installs them; these fakes cover the shapes of
every generation on any torch (so the adapter logic is exercised in every env) and the
failure shapes no release produces on demand. Each fake is a real package with a
``.dist-info`` so that ``importlib.metadata`` reports its version exactly as for a wheel.
Fake kernels compute with mxfp8_compat's reference (``FAKE_MODE`` switches to garbage).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

_ENUMS = {
    "torchao/__init__.py": "__version__ = {version!r}\n",
    "torchao/prototype/__init__.py": "",
    "torchao/prototype/mx_formats/__init__.py": "",
    "torchao/prototype/mx_formats/config.py": """
        import enum
        class ScaleCalculationMode(enum.Enum):
            FLOOR = "floor"
            RCEIL = "rceil"
    """,
    "torchao/quantization/__init__.py": "",
    "torchao/quantization/quantize_/__init__.py": "",
    "torchao/quantization/quantize_/common.py": """
        import enum
        class KernelPreference(enum.Enum):
            AUTO = "auto"
            EMULATED = "emulated"
    """,
    "torchao/prototype/moe_training/conversion_utils.py": """
        import enum
        class MoEScalingType(enum.Enum):
            FP8_ROWWISE = "fp8_rowwise"
            MXFP8 = "mxfp8"
    """,
    # Shared behaviour of every fake kernel. CALLS records what the shim passed.
    "torchao/_fake_impl.py": """
        import torch
        from mxfp8_compat.reference import mxfp8_grouped_mm_reference
        CALLS = []
        FAKE_MODE = "ok"          # "ok" | "garbage" | "nan"
        NATIVE_WORKS = False      # pretend an sm_100 kernel is present

        def record(**kwargs):
            CALLS.append(kwargs)

        def emulate(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp=False):
            assert A.is_contiguous(), "fake torchao: A must be contiguous"
            assert B_t.transpose(-2, -1).is_contiguous(), "fake torchao: B_t must be per-group column-major"
            out = mxfp8_grouped_mm_reference(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp)
            if FAKE_MODE == "garbage":
                return torch.rand_like(out) + out * 0  # wrong values, graph kept
            if FAKE_MODE == "nan":
                return out * float("nan")
            return out

        def native(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp=False):
            if not NATIVE_WORKS:
                raise AssertionError(
                    "SM100 kernels not available. Please use use torchao CUDA 12.8+ build on SM100/100a device(s)."
                )
            return emulate(A, B_t, offs, out_dtype, scale_mode, wgrad_with_hp)
    """,
}

_KERNEL_PREFERENCE_HEADER = """
    import torch
    from torchao._fake_impl import record, emulate, native
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    _SM100_KERNELS_AVAILABLE = False

    def _run(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode):
        kernel = emulate if kernel_preference == KernelPreference.EMULATED else native
        return kernel(A, B_t, offs, out_dtype, scale_calculation_mode.value, wgrad_with_hp)
"""

GEN_018 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/mxfp8_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, bias=None, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False):
        record(generation="0.18", bias=bias, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        assert bias is None, "fake torchao 0.18: the shim must never fill the bias slot"
        return _run(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode)
    """,
}

GEN_017 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/mxfp8_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False):
        record(generation="0.17", block_size=block_size, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        assert block_size == 32
        return _run(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode)
    """,
}

GEN_016 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL):
        record(generation="0.16", block_size=block_size, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        assert block_size == 32
        return _run(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode)
    """,
}

_APPLY_015 = """
    import torch
    from torchao._fake_impl import record, native
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    class _MXFP8GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, {params}):
            record(generation="0.15", positional=({names}))
            # 0.15's forward ignores `emulated`: always the sm_100 path.
            with torch.enable_grad():
                ctx.A, ctx.B_t = A.detach().requires_grad_(), B_t.detach().requires_grad_()
                ctx.out = native(ctx.A, ctx.B_t, offs, out_dtype, scale_calculation_mode.value)
            return ctx.out.detach()

        @staticmethod
        def backward(ctx, grad):
            gA, gB = torch.autograd.grad(ctx.out, (ctx.A, ctx.B_t), grad)
            return (gA, gB) + (None,) * {n_rest}

    _to_mxfp8_then_scaled_grouped_mm = _MXFP8GroupedMM.apply
"""

_015_PARAMS = ("A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, emulated=False, "
               "use_triton_for_dim0_cast=False, scale_calculation_mode=ScaleCalculationMode.RCEIL")
_015_NAMES = "A.shape, B_t.shape, offs.shape, block_size, out_dtype, emulated, use_triton_for_dim0_cast, scale_calculation_mode"

GEN_015 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _APPLY_015.format(params=_015_PARAMS, names=_015_NAMES, n_rest=6),
}

# Failure shape: the 4th positional slot reused (bias where block_size was), as 0.18 did to
# the keyword entry; a positional normalizer would silently pass 32 as a bias.
GEN_015_SLOT_REUSED = {
    "torchao/prototype/moe_training/__init__.py": GEN_015["torchao/prototype/moe_training/__init__.py"],
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _APPLY_015.format(
        params=_015_PARAMS.replace("block_size=32", "bias=None"),
        names=_015_NAMES.replace("block_size", "bias"),
        n_rest=6,
    ),
}

_SCALED_GROUPED_MM = """
    import torch
    from torchao._fake_impl import record, emulate, native
    from torchao.prototype.moe_training.conversion_utils import MoEScalingType

    def _scaled_grouped_mm(A, B_t, offs=None, out_dtype=torch.bfloat16, scaling_type=MoEScalingType.FP8_ROWWISE):
        record(generation={generation!r}, scaling_type=scaling_type)
        assert scaling_type == MoEScalingType.MXFP8, "fake: only the MXFP8 recipe is modelled"
        return {kernel}(A, B_t, offs, out_dtype, "floor")
"""

GEN_014 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _SCALED_GROUPED_MM.format(generation="0.14", kernel="native"),
}

GEN_013 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _SCALED_GROUPED_MM.format(generation="0.13", kernel="emulate"),
}

GEN_012 = {
    "torchao/prototype/moe_training/__init__.py": """
        import torch
        def _scaled_grouped_mm(A, B_t, offs=None, out_dtype=torch.bfloat16):
            raise NotImplementedError("fp8 row-wise only")
    """,
}


def import_raising(statement: str) -> dict[str, str]:
    """A torchao whose MoE package raises at import (``statement`` is the raise)."""
    return {"torchao/prototype/moe_training/__init__.py": statement + "\n"}


def write_fake_torchao(root: Path, version: str, files: dict[str, str]) -> Path:
    """Write a fake torchao ``version`` with ``files`` under ``root`` and return ``root``."""
    layout = {**_ENUMS, **files}
    for relative, source in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source.format(version=version) if relative == "torchao/__init__.py" else source))
    dist_info = root / f"torchao-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchao\nVersion: {version}\n")
    (dist_info / "RECORD").write_text("")
    return root


def purge_torchao_modules() -> dict[str, object]:
    """Remove every torchao module from ``sys.modules`` and return them for restoring."""
    removed = {name: module for name, module in sys.modules.items() if name == "torchao" or name.startswith("torchao.")}
    for name in removed:
        del sys.modules[name]
    return removed
