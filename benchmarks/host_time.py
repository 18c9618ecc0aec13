"""Where the host time of one MXFP8 call goes: CPU microseconds per call, side by side in one process.

    python benchmarks/host_time.py --device cuda                      # the small MoE shape
    python benchmarks/host_time.py --device cuda --shape 8,4096,2048,1024 --profile

Host time is measured as the wall time of N back-to-back calls issued while the GPU has
nothing queued (a synchronize before, none inside the loop): the GPU work of these shapes
takes less than the host's, so the figure is the CPU cost per call. The rows take turns
round by round (a noisy host moves them alike), and the median round is printed. Rows:

  bf16 raw            torch._grouped_mm forward + backward (its own autograd)
  ..., triton launch  the same row with the direct launch off (every kernel through triton's own
                      JITFunction.run: binder, specialisation, cache key), interleaved in the same rounds
  bf16 raw + hook     the same with the gradient-contiguity tensor hook the shim's bf16 path registers
  off                 resolve("off") forward + backward
  off aligned         the same with groups_aligned=True
  fast raw            fast_mxfp8_grouped_mm forward + backward (no shim around it)
  emulated            resolve("emulated") (the fast emulation through the shim)
  emulated aligned    the same with groups_aligned=True
  grouped_mm forward alone, torch.empty x3, fast forward alone (no autograd)
  launch quantize     one launch of the fused quantiser alone (forward's A and B; backward's grad)
  launch zero_unused  one launch of the backward's zeroing kernel alone
  bare jit launch     the grad quantiser's kernel[grid](...) itself, no Python around it
  fast backward math, main thread   the backward's four steps called directly (no autograd engine)
  identity autograd.Function fwd+bwd   what a Python Function costs through the engine (its CUDA
                      backward runs on the engine's device thread, which must take the GIL)

``--profile`` adds cProfile's top functions of the ``emulated`` row by own time.
Nothing is asserted: pytest never times anything.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import time
from typing import Callable

import torch

from mxfp8_compat import resolve
from mxfp8_compat.backends import fast_emulation as fast
from mxfp8_compat.backends.grouped_mm import with_contiguous_grad
from mxfp8_compat.kernels import launch as _kernel_launch
from mxfp8_compat.layout import weight_relayout


def make_inputs(E: int, M: int, K: int, N: int, device: str):
    rows = M // E
    A = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    B = weight_relayout(torch.randn(E, K, N, device=device, dtype=torch.bfloat16)).requires_grad_(True)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * rows
    grad = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    return A, B, offs, grad


def host_us(
    rows: dict[str, Callable[[], object]], sync: Callable[[], None], calls: int, rounds: int
) -> dict[str, float]:
    """Per row, the median over rounds of the host microseconds per call of ``calls`` back-to-back
    steps; every round runs each row once, in turn."""
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, step in rows.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
            sync()
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def triton_launch(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with every kernel launched through triton's own launch (the direct launch off)."""

    def run() -> object:
        with _kernel_launch.triton_launch():
            return step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="8,4096,2048,1024", help="E,M,K,N")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    E, M, K, N = (int(v) for v in args.shape.split(","))
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    A, B, offs, grad = make_inputs(E, M, K, N, device)
    off, emulated = resolve("off", device=device), resolve("emulated", device=device)

    def fwd_bwd(fn: Callable, **kwargs) -> Callable[[], object]:
        def step() -> object:
            return torch.autograd.grad(fn(A, B, offs, **kwargs), (A, B), grad)

        return step

    def raw_bf16(A, B, offs):
        return torch._grouped_mm(A, B, offs=offs)

    def raw_bf16_hook(A, B, offs):
        return with_contiguous_grad(torch._grouped_mm(A, B, offs=offs))

    def raw_fast(A, B, offs):
        return fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, wgrad_with_hp=True)

    rows: dict[str, Callable[[], object]] = {
        "bf16 raw": fwd_bwd(raw_bf16),
        "bf16 raw + hook": fwd_bwd(raw_bf16_hook),
        "off": fwd_bwd(off),
        "off aligned": fwd_bwd(off, groups_aligned=True),
        "fast raw": fwd_bwd(raw_fast),
        "emulated": fwd_bwd(emulated),
        "emulated aligned": fwd_bwd(emulated, groups_aligned=True),
    }
    for name in ("fast raw", "emulated"):
        rows[f"{name}, triton launch"] = triton_launch(rows[name])
    A_d, B_d, grad_d = A.detach(), B.detach(), grad.detach()
    rows["grouped_mm forward alone"] = lambda: torch._grouped_mm(A_d, B_d, offs=offs)
    rows["torch.empty x3"] = lambda: (torch.empty_like(A_d), torch.empty_like(B_d), torch.empty_like(B_d))
    if emulated.emulation == "fast":
        rows["fast forward alone"] = lambda: raw_fast(A_d, B_d, offs)
        rows["launch quantize (A+B)"] = lambda: fast._quantize(A_d, B_d, "rceil", True, True)
        rows["launch quantize (grad)"] = lambda: fast._quantize(grad_d, None, "rceil", False, True)
        rows["launch quantize (grad), triton launch"] = triton_launch(rows["launch quantize (grad)"])
        gA, gB = torch.empty_like(A_d), torch.empty_like(B_d)
        rows["launch zero_unused"] = lambda: fast._zero_unused(gA, gB, offs)
        y = torch.empty_like(grad_d)
        kernel = fast._launch(A.device).k.quantize_kernel
        n_blocks = grad_d.numel() // 32
        programs = -(-n_blocks // fast.QUANT_BLOCKS)
        jit_args = (grad_d, y, n_blocks, programs, grad_d, y, y, 0, 0, 0, 0, 0, 0)
        jit_meta = dict(RCEIL=True, X_BF16=True, W_BF16=True, DO_K=False, DO_N=False, HW_CVT=True,
                        BLOCKS=fast.QUANT_BLOCKS, BK=fast.WEIGHT_BK, num_warps=fast.QUANT_WARPS)
        rows["bare jit launch (grad quantiser)"] = lambda: kernel[(programs,)](*jit_args, **jit_meta, enable_fp_fusion=False)
        _, B_n = fast._forward_impl(A_d, B_d, offs, torch.bfloat16, "rceil", True)
        rows["fast backward math, main thread"] = lambda: fast._backward_impl(grad_d, A_d, B_d, B_n, offs, "rceil", True, True)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad_x):  # type: ignore[no-untyped-def, override]
            return grad_x

    ones = torch.ones_like(A_d)
    rows["identity autograd.Function fwd+bwd"] = lambda: torch.autograd.grad(Identity.apply(A), (A,), ones)
    for name, step in list(rows.items()):  # warm-up: compile, autotune, allocate
        try:
            for _ in range(3):
                step()
        except Exception as error:  # noqa: BLE001 - an experiment row that cannot run here
            print(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            del rows[name]
    sync()
    info = {"torch": torch.__version__, "python": platform.python_version(), "shape": [E, M, K, N],
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "emulation": emulated.emulation}
    print(json.dumps(info))
    results = host_us(rows, sync, args.calls, args.rounds)
    base = results["bf16 raw"]
    print(f"| host time per fwd+bwd call ({E}, {M}, {K}, {N}) | us | / bf16 raw |")
    print("|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}x |")
    if args.profile:
        profiler = cProfile.Profile()
        sync()
        profiler.enable()
        for _ in range(200):
            rows["emulated"]()
        profiler.disable()
        sync()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())


if __name__ == "__main__":
    main()
