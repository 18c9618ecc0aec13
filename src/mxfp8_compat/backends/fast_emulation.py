"""Fast MXFP8 emulation on CUDA, bitwise equal to the reference emulation.

The reference (:mod:`mxfp8_compat.numerics.reference`) quantises each operand with a dozen PyTorch
ops per element; here each quantise-dequantise is one fused Triton kernel (one read, one
write), and the GEMMs are the very calls the reference makes (``grouped_mm_highprec`` in
forward, :func:`~mxfp8_compat.numerics.backward.dgrad_gemm` and
:func:`~mxfp8_compat.numerics.backward.wgrad_gemm` in backward) on operands of the same values and
layouts, so results are bitwise the reference's:

* forward: A in blocks along K, B in blocks along K (one kernel reads B once and also writes
  its blocks along N, kept for backward);
* input gradient: grad_out along N, B along N; rows after ``offs[-1]`` get a zero gradient;
* weight gradient: bf16 GEMM of A and grad_out with ``wgrad_with_hp``, else both quantised
  in blocks of 32 tokens restarting at each group boundary (``offs`` read on the device);
  empty groups get a zero gradient.

No call reads ``offs`` on the host, so with bf16 operands and output nothing syncs the
device (float32 output or operands take torch's per-group fallbacks, which do). The forward
and backward are torch custom ops: ``torch.compile`` sees no graph break and runs the same
kernels.

On CPU tensors the same kernels run in triton's interpreter (slow; for tests): that checks
the kernels' arithmetic against the reference without a GPU.

Scope of "bitwise": every element (NaN compared as NaN) for bfloat16 operands, including
NaN, inf, saturating blocks, subnormals and any group sizes. For float32 operands the
scale exponent is exact ``ceil(log2(amax / 448))`` while the reference evaluates it with
float32 division and ``log2``; the two differ only for a block whose amax lies within a few
float32 ulps above ``448 * 2**k`` (never for values representable in bfloat16).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch

from ..kernels.launch import kernel_module, launch as launch_kernel
from ..providers.schema import GroupedMMCall
from ..numerics.highprec import grouped_mm_highprec
from ..numerics.quantize import BLOCK_SIZE, DEFAULT_SCALE_MODE, ScaleMode
from ..numerics.backward import dgrad_gemm, wgrad_gemm

__all__ = [
    "fast_emulation_problem",
    "fast_mxfp8_grouped_mm",
    "fast_call",
    "fast_fake_quantize",
    "fast_fake_quantize_grouped_rows",
]

# Launch parameters (memory-bound kernels; measured on an H100 by benchmarks/emulation_speed.py
# --sweep: every setting within 3% of the best at the large shapes, about 2.9 TB/s).
QUANT_BLOCKS = 64  # 32-element blocks per program of an activation
WEIGHT_BK = 128  # K columns per program of the weight (times 32 rows of N)
QUANT_WARPS = 4
ROWS_BC = 128  # columns per program of the grouped-rows quantiser (32 rows)
ROWS_WARPS = 4
ZERO_BLOCK = 4096  # the zeroing kernel's program covers ZERO_BLOCK * ZERO_ITERS elements
ZERO_ITERS = 16

# Quantise B along N in forward too and keep it for backward (B is read once per step, for
# the price of holding one bf16 copy of B from forward to backward).
KEEP_QUANTIZED_WEIGHT = True

# Use the GPU's fp8/bf16 conversion instructions where the device has them (sm_89+).
# False forces the arithmetic path, which the CPU interpreter always takes.
USE_HW_CVT = True


def fast_emulation_problem(device: torch.device | str) -> Optional[str]:
    """Why the fast emulation cannot run on ``device``, or None where it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the fast MXFP8 emulation needs a CUDA device ({device} is {device.type})"
    if not torch.cuda.is_available():
        return "the fast MXFP8 emulation needs CUDA, and torch.cuda.is_available() is False"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        _kernels(interpret=False)
    except Exception as error:  # noqa: BLE001 - any import failure is the answer
        return f"the fast MXFP8 emulation needs triton, which does not import ({type(error).__name__}: {error})"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{device} has compute capability {major}.{minor}; the fast MXFP8 emulation's bf16 kernels need 8.0+"
    return None


def _kernels(interpret: bool) -> ModuleType:
    """The kernels module: compiled, or a second copy built for triton's interpreter."""
    return kernel_module("fast_quant", interpret)


@functools.lru_cache(maxsize=None)
def _hw_cvt(device_type: str, index: Optional[int]) -> bool:
    return device_type == "cuda" and torch.cuda.get_device_capability(index) >= (8, 9)


_RCEIL = ScaleMode.RCEIL.value


class _Launch:
    """How to launch on ``device``: the kernels, the conversion path, the launch options."""

    def __init__(self, device: torch.device) -> None:
        self.interpret = device.type != "cuda"
        self.k = _kernels(self.interpret)
        self._hw_capable = not self.interpret and _hw_cvt(device.type, device.index)
        # No FMA contraction: every rounding happens where the reference's does.
        self.options = {} if self.interpret else {"enable_fp_fusion": False}

    @property
    def hw(self) -> bool:
        return USE_HW_CVT and self._hw_capable

    def src(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 inputs are read through an int16 view on the arithmetic path."""
        return x.view(torch.int16) if (x.dtype == torch.bfloat16 and not self.hw) else x

    def dst(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.hw else y.view(torch.int16)


_launches: dict[torch.device, _Launch] = {}


def _launch(device: torch.device) -> _Launch:
    launch = _launches.get(device)
    if launch is None:
        launch = _launches[device] = _Launch(device)
    return launch


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"expected bfloat16 or float32, got {x.dtype}")


def _quantize(
    x: Optional[torch.Tensor], w: Optional[torch.Tensor], scale_mode: str, along_k: bool, along_n: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One launch that fake-quantises an activation and/or a weight into bf16.

    ``x``: contiguous, last dimension a multiple of 32, blocks along it; returns ``y`` like x.
    ``w``: a weight (E, K, N); returns ``wk`` and ``wn``, contiguous (E, N, K): w^T quantised
    along K (seen as (E, K, N) it is per-group column-major, the layout of the reference's
    ``mx_fake_quantize(B, dim=1)``) and along N (the reference's
    ``mx_fake_quantize(B, dim=2).transpose(-2, -1).contiguous()``), each only if asked for,
    reading w once. Whatever is not computed is None.
    """
    y = wk = wn = None
    x_programs = w_programs = k_programs = 0
    N = K = stride_e = stride_n = stride_k = 0
    if x is not None:
        _check_dtype(x)
        y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        x_programs = triton_cdiv(x.numel() // BLOCK_SIZE, QUANT_BLOCKS)
    if w is not None and (along_k or along_n):
        _check_dtype(w)
        E, K, N = w.shape
        if along_k:
            wk = torch.empty((E, N, K), dtype=torch.bfloat16, device=w.device)
        if along_n:
            wn = torch.empty((E, N, K), dtype=torch.bfloat16, device=w.device)
        k_programs = triton_cdiv(K, WEIGHT_BK)
        w_programs = E * (N // BLOCK_SIZE) * k_programs
    if x_programs + w_programs == 0:
        return y, wk, wn
    # Arguments a launch does not use point at tensors it does use (never dereferenced).
    some_out = y if y is not None else (wk if wk is not None else wn)
    launch = _launch((x if x is not None else w).device)  # type: ignore[union-attr]
    w_t = launch.src(w.transpose(-2, -1)) if w_programs else launch.src(x)  # type: ignore[union-attr]
    if w_programs:
        stride_e, stride_n, stride_k = w_t.stride()
    launch_kernel(
        launch.k.quantize_kernel,
        (x_programs + w_programs,),
        launch.src(x) if x_programs else w_t,  # type: ignore[arg-type]
        launch.dst(y if y is not None else some_out),
        x.numel() // BLOCK_SIZE if x_programs else 0,  # type: ignore[union-attr]
        x_programs,
        w_t,
        launch.dst(wk if wk is not None else some_out),
        launch.dst(wn if wn is not None else some_out),
        N,
        K,
        stride_e,
        stride_n,
        stride_k,
        k_programs,
        RCEIL=scale_mode == _RCEIL,
        X_BF16=(x if x_programs else w).dtype == torch.bfloat16,  # type: ignore[union-attr]
        W_BF16=(w if w_programs else x).dtype == torch.bfloat16,  # type: ignore[union-attr]
        DO_K=wk is not None,
        DO_N=wn is not None,
        HW_CVT=launch.hw,
        BLOCKS=QUANT_BLOCKS,
        BK=WEIGHT_BK,
        num_warps=QUANT_WARPS,
        **launch.options,
    )
    return y, wk, wn


def _quantize_contiguous(x: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """Fake-quantise a contiguous ``x`` along its last dimension (a multiple of 32) into bf16."""
    return _quantize(x, None, scale_mode, False, False)[0]  # type: ignore[return-value]


def _quantize_weight(B: torch.Tensor, scale_mode: str, along_k: bool, along_n: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantise B (E, K, N) along K and/or along N, reading it once (see :func:`_quantize`);
    an orientation not asked for comes back empty."""
    _, wk, wn = _quantize(None, B, scale_mode, along_k, along_n)
    empty = B.new_empty(0, dtype=torch.bfloat16)
    return (wk if wk is not None else empty), (wn if wn is not None else empty)


def _quantize_grouped_rows(x: torch.Tensor, offs: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """Fake-quantise a contiguous 2D ``x`` in blocks of 32 rows restarting at each group boundary."""
    _check_dtype(x)
    M, C = x.shape
    E = offs.shape[0]
    if not E:  # no groups: every row is after the last one
        return torch.zeros((M, C), dtype=torch.bfloat16, device=x.device)
    y = torch.empty((M, C), dtype=torch.bfloat16, device=x.device)
    if x.numel():
        launch = _launch(x.device)
        row_blocks = triton_cdiv(M, BLOCK_SIZE)
        n_block_programs = row_blocks + E  # at most one short block per group beyond M / 32
        launch_kernel(
            launch.k.quantize_grouped_rows_kernel,
            (n_block_programs + row_blocks, triton_cdiv(C, ROWS_BC)),
            launch.src(x),
            launch.dst(y),
            offs,
            M,
            C,
            E,
            n_block_programs,
            RCEIL=scale_mode == _RCEIL,
            IN_BF16=x.dtype == torch.bfloat16,
            HW_CVT=launch.hw,
            E_PAD=_pow2(E),
            BC=ROWS_BC,
            num_warps=ROWS_WARPS,
            **launch.options,
        )
    return y


def _zero_unused(grad_A: torch.Tensor, grad_B: torch.Tensor, offs: torch.Tensor) -> None:
    """In place: zero grad_A's rows after offs[-1] and grad_B of empty groups (offs read on device)."""
    E, K, N = grad_B.shape
    if not E:  # no groups: every row is after the last one
        grad_A.zero_()
        return
    if not (grad_A.numel() or grad_B.numel()):
        return
    launch = _launch(grad_A.device)
    # The arithmetic path sees bf16 through int16 views (zero is zero either way).
    gA = grad_A.view(torch.int16) if (grad_A.dtype == torch.bfloat16 and launch.interpret) else grad_A
    gB = grad_B.view(torch.int16) if (grad_B.dtype == torch.bfloat16 and launch.interpret) else grad_B
    chunk = ZERO_BLOCK * ZERO_ITERS
    a_programs = triton_cdiv(grad_A.numel(), chunk)
    b_programs = triton_cdiv(K * N, chunk)
    launch_kernel(
        launch.k.zero_unused_kernel,
        (a_programs + E * b_programs,),
        gA,
        gB,
        offs,
        grad_A.shape[0],
        grad_A.shape[1],
        E,
        K * N,
        a_programs,
        b_programs,
        E_PAD=_pow2(E),
        BLOCK=ZERO_BLOCK,
        ITERS=ZERO_ITERS,
        **launch.options,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return max(2, 1 << (max(n, 1) - 1).bit_length())


# --- public quantisers (the reference's, fast) ---------------------------------------------


def fast_fake_quantize(x: torch.Tensor, dim: int, scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE) -> torch.Tensor:
    """:func:`~mxfp8_compat.numerics.quantize.mx_fake_quantize`, one kernel: same values, same layout."""
    mode = ScaleMode(scale_mode).value
    if x.shape[dim] % BLOCK_SIZE:
        raise ValueError(f"x: dimension {dim} of size {x.shape[dim]} is not a multiple of {BLOCK_SIZE}")
    moved = x.movedim(dim, -1).contiguous()
    return _quantize_contiguous(moved, mode).movedim(-1, dim)


def fast_fake_quantize_grouped_rows(
    x: torch.Tensor, offs: torch.Tensor, scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE
) -> torch.Tensor:
    """:func:`~mxfp8_compat.numerics.quantize.mx_fake_quantize_grouped_rows`, one kernel, ``offs`` read on device."""
    return _quantize_grouped_rows(x.contiguous(), offs, ScaleMode(scale_mode).value)


# --- the differentiable GEMM ---------------------------------------------------------------
#
# The math lives in _forward_impl / _backward_impl. Eager calls reach them through a plain
# torch.autograd.Function (a custom op's dispatch costs tens of microseconds a call, which
# small GEMMs notice); under torch.compile the same functions are wrapped as custom ops, which
# the compiler treats as opaque (no graph break, no retracing of the kernels).


def _forward_impl(
    A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, scale_mode: str, keep_weight: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out = q_K(A) @ q_K(B) per group; also B quantised along N (for backward) when ``keep_weight``."""
    A_q, B_k, B_n = _quantize(A.contiguous(), B, scale_mode, along_k=True, along_n=keep_weight)
    return grouped_mm_highprec(A_q, B_k.transpose(-2, -1), offs, out_dtype), B_n  # type: ignore[union-attr]


def _backward_impl(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    B_n: Optional[torch.Tensor],
    offs: torch.Tensor,
    scale_mode: str,
    wgrad_with_hp: bool,
    have_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA = q_N(dY) @ q_N(B)^T; dB = A^T @ dY (``wgrad_with_hp``) or q_M(A)^T @ q_M(dY), per group."""
    grad_q, _, requantized = _quantize(grad_out, None if have_weight else B, scale_mode, False, True)
    grad_A = dgrad_gemm(grad_q, B_n if have_weight else requantized, offs, A.dtype)
    if wgrad_with_hp:
        A_w, grad_w = A, grad_out
    else:
        A_w = _quantize_grouped_rows(A, offs, scale_mode)
        grad_w = _quantize_grouped_rows(grad_out, offs, scale_mode)
    grad_B = wgrad_gemm(A_w, grad_w, offs, B.shape[0], B.dtype)
    _zero_unused(grad_A, grad_B, offs)
    return grad_A, grad_B


class _FastMXFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, offs, out_dtype, scale_mode, wgrad_with_hp, keep_weight):  # type: ignore[override]
        out, B_n = _forward_impl(A, B, offs, out_dtype, scale_mode, keep_weight)
        ctx.save_for_backward(A, B, B_n, offs)
        ctx.scale_mode, ctx.wgrad_with_hp, ctx.keep_weight = scale_mode, wgrad_with_hp, keep_weight
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        A, B, B_n, offs = ctx.saved_tensors
        grad_A, grad_B = _backward_impl(
            grad_out.contiguous(), A, B, B_n, offs, ctx.scale_mode, ctx.wgrad_with_hp, ctx.keep_weight
        )
        return grad_A, grad_B, None, None, None, None, None


@torch.library.custom_op("mxfp8_compat::fast_mxfp8_forward", mutates_args=())
def _fast_forward(
    A: torch.Tensor,
    B: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
    scale_mode: str,
    wgrad_with_hp: bool,
    keep_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, B_n = _forward_impl(A, B, offs, out_dtype, scale_mode, keep_weight)
    return out, (B_n if B_n is not None else B.new_empty(0, dtype=torch.bfloat16))


@_fast_forward.register_fake
def _(A, B, offs, out_dtype, scale_mode, wgrad_with_hp, keep_weight):  # type: ignore[no-untyped-def]
    E, K, N = B.shape
    B_n = B.new_empty((E, N, K) if keep_weight else (0,), dtype=torch.bfloat16)
    return A.new_empty((A.shape[0], N), dtype=out_dtype), B_n


@torch.library.custom_op("mxfp8_compat::fast_mxfp8_backward", mutates_args=())
def _fast_backward(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    B_n: torch.Tensor,
    offs: torch.Tensor,
    scale_mode: str,
    wgrad_with_hp: bool,
    have_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, A, B, B_n, offs, scale_mode, wgrad_with_hp, have_weight)


@_fast_backward.register_fake
def _(grad_out, A, B, B_n, offs, scale_mode, wgrad_with_hp, have_weight):  # type: ignore[no-untyped-def]
    return torch.empty_like(A, memory_format=torch.contiguous_format), B.new_empty(B.shape)


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    A, B, offs, _, scale_mode, wgrad_with_hp, keep_weight = inputs
    _, B_n = output
    ctx.save_for_backward(A, B, B_n, offs)
    ctx.mark_non_differentiable(B_n)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for B_n (a full bf16 copy of B)
    ctx.scale_mode, ctx.wgrad_with_hp, ctx.keep_weight = scale_mode, wgrad_with_hp, keep_weight


def _backward(ctx, grad_out, _grad_B_n):  # type: ignore[no-untyped-def]
    A, B, B_n, offs = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None
    grad_A, grad_B = _fast_backward(
        grad_out.contiguous(), A, B, B_n, offs, ctx.scale_mode, ctx.wgrad_with_hp, ctx.keep_weight
    )
    return grad_A, grad_B, None, None, None, None, None


_fast_forward.register_autograd(_backward, setup_context=_setup)


def _apply(A, B, offs, out_dtype, mode, wgrad_with_hp, keep):  # type: ignore[no-untyped-def]
    if torch.compiler.is_compiling():
        return _fast_forward(A, B, offs, out_dtype, mode, wgrad_with_hp, keep)[0]
    return _FastMXFP8.apply(A, B, offs, out_dtype, mode, wgrad_with_hp, keep)


def fast_mxfp8_grouped_mm(
    A: torch.Tensor,
    B: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    scale_mode: ScaleMode | str = DEFAULT_SCALE_MODE,
    wgrad_with_hp: bool = False,
    keep_quantized_weight: Optional[bool] = None,
) -> torch.Tensor:
    """Differentiable MXFP8 grouped GEMM, bitwise :func:`~mxfp8_compat.mxfp8_grouped_mm_reference`.

    Same contract and arguments: A (M, K), B (E, K, N) (fastest per-group column-major,
    as :func:`~mxfp8_compat.layout.weight_relayout` gives), ``offs`` int32 (E,) cumulative
    end rows, K and N multiples of 32, any group sizes (rows after ``offs[-1]``: output
    unspecified, input gradient zero). ``keep_quantized_weight`` (default
    :data:`KEEP_QUANTIZED_WEIGHT`) quantises B for backward in the forward kernel and holds
    it until backward. No input validation: callers validate.
    """
    keep = KEEP_QUANTIZED_WEIGHT if keep_quantized_weight is None else keep_quantized_weight
    return _apply(A, B, offs, out_dtype, ScaleMode(scale_mode).value, wgrad_with_hp, keep)


def fast_call(scale_mode: ScaleMode, wgrad_with_hp: bool) -> GroupedMMCall:
    """The fast emulation as a ``call(A, B_t, offs, out_dtype)`` for ``backends.make_mxfp8``."""
    mode = ScaleMode(scale_mode).value

    def fast_mxfp8(A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _apply(A, B_t, offs, out_dtype, mode, wgrad_with_hp, KEEP_QUANTIZED_WEIGHT)

    return fast_mxfp8
