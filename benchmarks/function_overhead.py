"""How much of the fast emulation's host time is the math, and how much the autograd Function around it.

    python benchmarks/function_overhead.py                      # CUDA, the small MoE shape
    python benchmarks/function_overhead.py --shape 8,8192,1024,512

Host microseconds per call (back-to-back calls, the GPU idle before each batch), every row once
per round, median of the rounds; each row beside ``bf16`` (torch._grouped_mm forward+backward):

  bf16            torch._grouped_mm forward + backward, torch's own autograd
  fast            fast_mxfp8_grouped_mm forward + backward (its autograd.Function)
  lean Function   the same math in a Function of three arguments (no configuration arguments)
  identity 3 / 7  an identity Function of 3 and of 7 arguments (ctx used as the fast one does)
  forward math, backward math, both   the fast emulation's math called from the main thread, no autograd
  mul + grad      one elementwise op and torch.autograd.grad: what the engine costs at all

It also checks that the lean Function is bitwise the library's. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse

import torch

from host_time import host_us, make_inputs  # this folder: the inputs and the interleaved timing
from mxfp8_compat.backends import fast_emulation as fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,4096,2048,1024", help="E,M,K,N")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    E, M, K, N = (int(v) for v in args.shape.split(","))
    A, B, offs, grad = make_inputs(E, M, K, N, "cuda")
    ones = torch.ones_like(A)

    class Identity3(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b, o):  # type: ignore[no-untyped-def, override]
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            return g, None, None

    class Identity7(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b, o, d, s, w, k):  # type: ignore[no-untyped-def, override]
            ctx.save_for_backward(x, b, o)
            ctx.s, ctx.w, ctx.k = s, w, k
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            ctx.saved_tensors
            return g, None, None, None, None, None, None

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, A, B, offs):  # type: ignore[no-untyped-def, override]
            out, B_n = fast._forward_impl(A, B, offs, torch.bfloat16, "rceil", True)
            ctx.save_for_backward(A, B, B_n, offs)
            return out

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            A, B, B_n, offs = ctx.saved_tensors
            return (*fast._backward_impl(g.contiguous(), A, B, B_n, offs, "rceil", True, True), None)

    A_d, B_d, g_d = A.detach(), B.detach(), grad.detach()
    _, B_n = fast._forward_impl(A_d, B_d, offs, torch.bfloat16, "rceil", True)

    def forward_math():
        return fast._forward_impl(A_d, B_d, offs, torch.bfloat16, "rceil", True)

    def backward_math():
        return fast._backward_impl(g_d, A_d, B_d, B_n, offs, "rceil", True, True)

    rows = {
        "bf16": lambda: torch.autograd.grad(torch._grouped_mm(A, B, offs=offs), (A, B), grad),
        "fast": lambda: torch.autograd.grad(
            fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, wgrad_with_hp=True), (A, B), grad
        ),
        "lean Function": lambda: torch.autograd.grad(Lean.apply(A, B, offs), (A, B), grad),
        "identity 3": lambda: torch.autograd.grad(Identity3.apply(A, B, offs), (A,), ones),
        "identity 7": lambda: torch.autograd.grad(Identity7.apply(A, B, offs, torch.bfloat16, "rceil", True, True), (A,), ones),
        "forward math": forward_math,
        "backward math": backward_math,
        "both, main thread": lambda: (forward_math(), backward_math()),
        "mul + grad": lambda: torch.autograd.grad(A * 1, (A,), ones),
    }
    for step in rows.values():  # warm-up: compile, allocate
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    median = host_us(rows, torch.cuda.synchronize, args.calls, args.rounds)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {E},{M},{K},{N}, median of {args.rounds} rounds")
    print("| row | host us per call | / bf16 |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.1f} | {value / median['bf16']:.2f}x |")
    lean = torch.autograd.grad(Lean.apply(A, B, offs), (A, B), grad)
    library = rows["fast"]()
    print("lean Function bitwise the library's:", all(torch.equal(x, y) for x, y in zip(lean, library)))


if __name__ == "__main__":
    main()
