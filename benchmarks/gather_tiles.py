"""What the output unpad (one row gather) can cost: gather_rows' launch tiles against a plain copy, on a GPU.

    python benchmarks/gather_tiles.py             # the E=64 MoE shape of issue 18 (M=65536, K=2048, N=768)
    python benchmarks/gather_tiles.py --shape 8,16384,7168,2048

The torch provider's forward and input gradient each end with one gather of the GEMM's padded
(P, C) result into (M, C); their sum is all the padding a forward+backward still pays (issue 18).
Side by side in one process, interleaved round by round, CUDA events, medians: ``gather_rows`` with
its launch tiles (BLOCK_R x BLOCK_C elements per program, warps), torch's ``index_select`` of the same
rows, and a contiguous ``copy_`` of the same bytes (what the memory system gives a pure stream: the
floor of any gather). Bandwidth counts one read and one write of M x C bf16. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from mxfp8_compat.kernels.launch import launch
from mxfp8_compat.kernels.token_groups import _gather_rows_kernel
from mxfp8_compat.token_groups import gather_rows, token_group_padding

TILES = [(16, 256, 4), (32, 256, 8), (8, 512, 4), (16, 512, 8), (8, 1024, 4), (16, 1024, 8), (32, 1024, 8)]


def tiled_gather(x: torch.Tensor, index: torch.Tensor, block_r: int, block_c: int, warps: int) -> torch.Tensor:
    out = x.new_empty((index.shape[0], x.shape[1]))
    grid = (triton.cdiv(index.shape[0], block_r), triton.cdiv(x.shape[1], block_c))
    launch(_gather_rows_kernel, grid, x, index, out, x.shape[0], index.shape[0], x.shape[1], x.stride(0), x.stride(1),
           BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,65536,2048,768", help="E,M,K,N")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    E, M, K, N = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    sizes = torch.distributions.Dirichlet(torch.ones(E)).sample() * M
    ends = sizes.cumsum(0).round().clamp(max=M).to(torch.int32)
    ends[-1] = M
    offs = ends.cuda()
    padding = token_group_padding(offs, M, 32)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"E={E} M={M} padded rows {padding.padded_rows}")
    print("| C | variant | ms | TB/s | / copy |")
    print("|---|---|---|---|---|")
    for C in (N, K):
        padded = torch.randn(padding.padded_rows, C, device="cuda", dtype=torch.bfloat16, generator=None)
        index = padding.padded_positions
        dense = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
        sink = torch.empty_like(dense)
        expected = gather_rows(padded, index)
        cases = {"copy_ (floor)": lambda: sink.copy_(dense), "gather_rows (as shipped)": lambda: gather_rows(padded, index),
                 "index_select": lambda: padded.index_select(0, index)}
        for r, c, w in TILES:
            cases[f"tile {r}x{c}, {w} warps"] = (lambda r=r, c=c, w=w: tiled_gather(padded, index, r, c, w))
        for name, fn in cases.items():
            if name.startswith("tile"):
                assert torch.equal(fn(), expected), name
        times: dict[str, list[float]] = {name: [] for name in cases}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(args.rounds):
            for name, fn in cases.items():
                fn()
                start.record()
                for _ in range(args.iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / args.iters)
        floor = statistics.median(times["copy_ (floor)"])
        for name, values in times.items():
            ms = statistics.median(values)
            print(f"| {C} | {name} | {ms:.4f} | {2 * M * C * 2 / ms / 1e9:.2f} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()
