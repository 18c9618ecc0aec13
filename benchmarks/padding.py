"""What the shim's token-group padding costs next to the grouped GEMM it protects.

    python benchmarks/padding.py --device cuda          # the five MoE shapes
    python benchmarks/padding.py                        # CPU: small shapes, for a smoke check

Side by side in one process, interleaved round by round, with Dirichlet-random unaligned group
sizes (a few empty), forward+backward:

  gemm       torch._grouped_mm(A, B, offs) on the unaligned groups (bf16, what the kernel costs)
  padded     unpad(torch._grouped_mm(pad(A), B, padded_offs)): the GEMM behind the shim's
             padding, as the MXFP8 callables run it (alignment 32, and 128 for 0.18+ native)
  pad only   the padding alone: index maps, pad A, unpad the output, and both backward gathers
  promised   the same callable with groups_aligned=True on aligned groups (nothing padded)

and prints medians, padding/gemm ratios and the padding's achieved bandwidth against the bytes
it must move (read and write A, the output and both gradients once). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxfp8_compat.backends.grouped_mm import make_mxfp8
from mxfp8_compat.token_groups import pad_with, token_group_padding, unpad_token_groups

MOE = [
    (8, 4096, 2048, 1024),
    (8, 16384, 7168, 2048),
    (8, 16384, 2048, 7168),
    (16, 32768, 4096, 1536),
    (64, 65536, 2048, 768),
]
SMALL = [(4, 512, 128, 128), (8, 2048, 256, 256)]


def group_sizes(E: int, M: int, generator: torch.Generator) -> list[int]:
    """Dirichlet-random sizes summing to M, the first two experts starved (0 and 1 tokens)."""
    weights = torch.distributions.Dirichlet(torch.ones(E)).sample()
    sizes = (weights * (M - 1)).floor().long()
    sizes[0], sizes[1] = 0, 1
    sizes[-1] += M - int(sizes.sum())
    return sizes.tolist()


def timer(device: str):
    if device == "cuda":
        def run(fn, calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
    else:
        def run(fn, calls):
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - begin) / calls
    return run


def bench_shape(E, M, K, N, device, rounds, alignment):
    generator = torch.Generator().manual_seed(E * M + K)
    torch.manual_seed(E * M + K)
    sizes = group_sizes(E, M, generator)
    offs = torch.tensor(sizes).cumsum(0).to(device=device, dtype=torch.int32)
    A = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(E, N, K, device=device, dtype=torch.bfloat16).transpose(-2, -1).requires_grad_(True)
    grad = torch.randn(M, N, device=device, dtype=torch.bfloat16)

    def kernel(A_, B_t, offs_, out_dtype):
        return torch._grouped_mm(A_, B_t, offs=offs_)

    shim = make_mxfp8(kernel, validate=False, contiguous_grad=True, group_alignment=alignment,
                      shape_fallback=None, label="bench")
    aligned_sizes = [-(-s // alignment) * alignment for s in sizes]
    aligned_M = sum(aligned_sizes)
    A_aligned = torch.randn(aligned_M, K, device=device, dtype=torch.bfloat16, requires_grad=True)
    offs_aligned = torch.tensor(aligned_sizes).cumsum(0).to(device=device, dtype=torch.int32)
    grad_aligned = torch.randn(aligned_M, N, device=device, dtype=torch.bfloat16)
    padding0 = token_group_padding(offs, M, alignment)
    out_padded = torch.randn(padding0.padded_rows, N, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_padded_A = torch.randn(padding0.padded_rows, K, device=device, dtype=torch.bfloat16)

    # torch.autograd.grad: no gradient accumulation kernels in any variant's time
    def gemm():
        torch.autograd.grad(torch._grouped_mm(A, B, offs=offs), (A, B), grad)

    def padded():
        torch.autograd.grad(shim(A, B, offs), (A, B), grad)

    def pad_only():
        padding = token_group_padding(offs, M, alignment)
        outputs = [pad_with(A, padding), unpad_token_groups(out_padded, padding)]
        torch.autograd.grad(outputs, (A, out_padded), [grad_padded_A, grad])

    def gemm_aligned():
        torch.autograd.grad(torch._grouped_mm(A_aligned, B, offs=offs_aligned), (A_aligned, B), grad_aligned)

    def promised():
        torch.autograd.grad(shim(A_aligned, B, offs_aligned, groups_aligned=True), (A_aligned, B), grad_aligned)

    variants = {"gemm": gemm, "padded": padded, "pad only": pad_only, "gemm aligned": gemm_aligned, "promised": promised}
    run = timer(device)
    calls = 3 if device == "cpu" else 10
    for fn in variants.values():  # warm-up: kernels compiled, allocator primed
        run(fn, 2)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(run(fn, calls))
    med = {name: statistics.median(values) for name, values in times.items()}
    moved = 2 * 2 * (M * K + padding0.padded_rows * K + M * N + padding0.padded_rows * N)  # bf16, read + write, fwd + bwd
    return sizes, med, moved


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--alignments", default="32,128")
    args = parser.parse_args()
    shapes = MOE if args.device == "cuda" else SMALL
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, "
          f"median of {args.rounds} rounds, forward+backward")
    header = "| E, M, K, N | align | gemm | padded | pad only | pad only / gemm | (padded - gemm) / gemm | pad bandwidth | promised / gemm aligned |"
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    for alignment in [int(a) for a in args.alignments.split(",")]:
        for E, M, K, N in shapes:
            sizes, med, moved = bench_shape(E, M, K, N, args.device, args.rounds, alignment)
            print(
                f"| {E}, {M}, {K}, {N} | {alignment} | {fmt(med['gemm'])} | {fmt(med['padded'])} | {fmt(med['pad only'])} "
                f"| {med['pad only'] / med['gemm']:.3f} | {(med['padded'] - med['gemm']) / med['gemm']:+.3f} "
                f"| {moved / med['pad only'] / 1e12:.2f} TB/s | {med['promised'] / med['gemm aligned']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
