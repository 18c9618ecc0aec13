"""Fake torchao distributions written to disk, one per API shape.

Real releases are tested wherever a tox env installs them; these fakes cover the shapes of
every generation on any torch (so the adapter logic is exercised in every env) and the
failure shapes no release produces on demand. Each fake is a real package with a
``.dist-info`` so that ``importlib.metadata`` reports its version exactly as for a wheel.
Fake kernels compute with mxfp8_compat's reference (``FAKE_MODE`` switches to garbage).

A fake of a real generation has that wheel's call and autograd shape (entry parameters, arguments
passed to ``_MXFP8GroupedMM.apply``, forward inputs, backward gradients): in each tox env,
``test_fakes_match_wheels.py`` compares the fake of the installed release with the wheel, and
``test_wheel_conformance.py`` runs the wheel's own native code, so no wiring rests on a fake alone.
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
        from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference
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

# Each generation's fake has the real wheel's autograd shape: an entry with the real parameters that
# calls `_MXFP8GroupedMM.apply` with as many arguments as the real entry passes, whose `forward` takes as
# many inputs as the real one and whose `backward` returns as many gradients as the real one
# (tests/test_fakes_match_wheels.py compares both with the installed wheel). The kernel inside is the
# shared fake: mxfp8_compat's reference, or an SM100 assertion for the native path.
_FUNCTION = """
    class _MXFP8GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, {forward_params}):
            with torch.enable_grad():
                ctx.A, ctx.B_t = A.detach().requires_grad_(), B_t.detach().requires_grad_()
                ctx.out = {kernel_call}
            return ctx.out.detach()

        @staticmethod
        def backward(ctx, grad):
            gA, gB = torch.autograd.grad(ctx.out, (ctx.A, ctx.B_t), grad)
            return {gradients}
"""


def _function(forward_params: str, kernel_call: str, n_gradients: int) -> str:
    gradients = ", ".join(["gA", "gB"] + ["None"] * (n_gradients - 2))
    return _FUNCTION.format(forward_params=forward_params, kernel_call=kernel_call, gradients=gradients)


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
_KP_KERNEL = "_run(ctx.A, ctx.B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode)"

# 0.18: apply(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp, scale_calculation_mode,
# pad_token_groups_for_grouped_mm): 8 inputs, 8 gradients; `bias` is added outside the Function.
GEN_018 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/mxfp8_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, bias=None, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False):
        record(generation="0.18", bias=bias, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        assert bias is None, "fake torchao 0.18: the shim must never fill the bias slot"
        return _MXFP8GroupedMM.apply(A, B_t, offs, out_dtype, kernel_preference, wgrad_with_hp,
            scale_calculation_mode, pad_token_groups_for_grouped_mm)
    """ + _function(
        "A, B_t, offs=None, out_dtype=torch.bfloat16, kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False, "
        "scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False",
        _KP_KERNEL,
        8,
    ),
}

# 0.17: 9 inputs (block_size 4th, ignored), 9 gradients.
GEN_017 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/mxfp8_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, block_size=None, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False):
        record(generation="0.17", block_size=block_size, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        block_size = 32
        return _MXFP8GroupedMM.apply(A, B_t, offs, block_size, out_dtype, kernel_preference, wgrad_with_hp,
            scale_calculation_mode, pad_token_groups_for_grouped_mm)
    """ + _function(
        "A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, kernel_preference=KernelPreference.AUTO, "
        "wgrad_with_hp=False, scale_calculation_mode=ScaleCalculationMode.RCEIL, pad_token_groups_for_grouped_mm=False",
        _KP_KERNEL,
        9,
    ),
}

# 0.16: 8 inputs, 8 gradients.
GEN_016 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _to_mxfp8_then_scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _KERNEL_PREFERENCE_HEADER + """
    def _to_mxfp8_then_scaled_grouped_mm(A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO, wgrad_with_hp=False,
            scale_calculation_mode=ScaleCalculationMode.RCEIL):
        record(generation="0.16", block_size=block_size, kernel_preference=kernel_preference, wgrad_with_hp=wgrad_with_hp)
        assert block_size == 32
        return _MXFP8GroupedMM.apply(A, B_t, offs, block_size, out_dtype, kernel_preference, wgrad_with_hp,
            scale_calculation_mode)
    """ + _function(
        "A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, kernel_preference=KernelPreference.AUTO, "
        "wgrad_with_hp=False, scale_calculation_mode=ScaleCalculationMode.RCEIL",
        _KP_KERNEL,
        8,
    ),
}

# 0.13-0.15: `scaling_type` dispatchers that pass 5 arguments (A, B_t, offs, block_size, out_dtype) to
# `_MXFP8GroupedMM.apply`. Their Functions differ: 0.13/0.14 forward takes 6 inputs (`emulated`
# last) and backward returns 5 gradients; 0.15's forward takes 8 and backward returns 6, so 0.15's
# `_to_mxfp8_then_scaled_grouped_mm = _MXFP8GroupedMM.apply` alias fails in backward when all 8 are given.
_SCALING_TYPE_DISPATCH = """
    import torch
    from torchao._fake_impl import record, emulate, native
    from torchao.prototype.moe_training.conversion_utils import MoEScalingType
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    def {entry}(A, B_t, offs=None, out_dtype=torch.bfloat16, scaling_type=MoEScalingType.FP8_ROWWISE):
        record(generation={generation!r}, scaling_type=scaling_type)
        assert scaling_type == MoEScalingType.MXFP8, "fake: only the MXFP8 recipe is modelled"
        block_size = 32
        return _MXFP8GroupedMM.apply(A, B_t, offs, block_size, out_dtype)
"""

GEN_015 = {
    "torchao/prototype/moe_training/__init__.py": (
        "from torchao.prototype.moe_training.scaled_grouped_mm import (\n"
        "    _quantize_then_scaled_grouped_mm, _to_mxfp8_then_scaled_grouped_mm)\n"
    ),
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _SCALING_TYPE_DISPATCH.format(entry="_quantize_then_scaled_grouped_mm", generation="0.15")
    + _function(
        "A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, emulated=False, use_triton_for_dim0_cast=False, "
        "scale_calculation_mode=ScaleCalculationMode.RCEIL",
        "native(ctx.A, ctx.B_t, offs, out_dtype, scale_calculation_mode.value)",  # forward ignores `emulated`
        6,
    )
    + """
    _to_mxfp8_then_scaled_grouped_mm = _MXFP8GroupedMM.apply
    """,
}

GEN_014 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _SCALING_TYPE_DISPATCH.format(entry="_scaled_grouped_mm", generation="0.14")
    + _function(
        "A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, emulated=False",
        'native(ctx.A, ctx.B_t, offs, out_dtype, "floor")',  # forward ignores `emulated`
        5,
    ),
}

GEN_013 = {
    "torchao/prototype/moe_training/__init__.py": "from torchao.prototype.moe_training.scaled_grouped_mm import _scaled_grouped_mm\n",
    "torchao/prototype/moe_training/scaled_grouped_mm.py": _SCALING_TYPE_DISPATCH.format(entry="_scaled_grouped_mm", generation="0.13")
    + _function(
        "A, B_t, offs=None, block_size=32, out_dtype=torch.bfloat16, emulated=True",
        'emulate(ctx.A, ctx.B_t, offs, out_dtype, "floor")',  # forward asserts `emulated`: always emulated
        5,
    ),
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
