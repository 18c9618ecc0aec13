"""What mxfp8_compat's quantisers for torch's MXFP8 grouped GEMM cost, and what fusing the padding saves.

    python benchmarks/torch_native_quant.py --device cuda      # the five MoE shapes (an H100/H200 is enough:
                                                               # the quantisers need no sm_100)
    python benchmarks/torch_native_quant.py                    # CPU interpreter, tiny shapes: a smoke check only

Side by side in one process, interleaved round by round, with Dirichlet-random unaligned group sizes
(two experts starved: 0 and 1 tokens), per shape (E, M, K, N):

  unpadded    quantize_rows(A) on groups already aligned to 32 (the same M): quantising alone
  fused       quantize_rows(A) on the unaligned groups: padding fused into the quantiser
  pad+quant   pad_with(A) (one row gather) then quantize_rows of the padded A: the unfused way
  weight      quantize_weight(B), both orientations from one read
  columns     quantize_grouped_columns(A) (weight-gradient operand, along M, transposed, fused padding)
  unpad       the output's unpad (one row gather of the (P, N) result), forward + the input
              gradient's: all the padding that remains
  bf16 f+b    torch._grouped_mm forward + both backward GEMMs in bf16 on the unaligned groups

and prints medians, fused/unpadded and pad+quant/fused ratios, each quantiser's bandwidth against the
bytes it must move (read bf16 once, write e4m3 and e8m0 once), and unpad / bf16 f+b. Goals (issue 18):
fused <= 1.05 x unpadded; unpad <= 10% of bf16 f+b at E=64. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxfp8_compat.backends import torch_native as tn
from mxfp8_compat.token_groups import gather_rows, pad_with, token_group_padding

MOE = [
    (8, 4096, 2048, 1024),
    (8, 16384, 7168, 2048),
    (8, 16384, 2048, 7168),
    (16, 32768, 4096, 1536),
    (64, 65536, 2048, 768),
]
SMALL = [(4, 256, 128, 128)]


def group_sizes(E: int, M: int, generator: torch.Generator, align: int = 1) -> list[int]:
    """Dirichlet-random sizes summing to M (multiples of ``align``), the first two experts starved."""
    weights = torch.distributions.Dirichlet(torch.ones(E)).sample()
    sizes = ((weights * (M // align - 1)).floor().long() * align) if align > 1 else (weights * (M - 1)).floor().long()
    sizes[0], sizes[1] = 0, (0 if align > 1 else 1)
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


def bench_shape(E, M, K, N, device, rounds, calls):
    torch.manual_seed(E * M + K)
    generator = torch.Generator().manual_seed(E * M + K)
    offs = torch.tensor(group_sizes(E, M, generator)).cumsum(0).to(device=device, dtype=torch.int32)
    offs_aligned = torch.tensor(group_sizes(E, M, generator, align=32)).cumsum(0).to(device=device, dtype=torch.int32)
    A = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    B = torch.randn(E, N, K, device=device, dtype=torch.bfloat16).transpose(-2, -1)
    grad = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    padding = token_group_padding(offs, M, tn.ALIGNMENT)
    aligned = token_group_padding(offs_aligned, M, tn.ALIGNMENT)
    P = padding.padded_rows
    padded_layout = token_group_padding(padding.padded_offs, P, tn.ALIGNMENT)  # identity on an aligned buffer
    out_p = torch.randn(P, N, device=device, dtype=torch.bfloat16)  # the GEMM's padded output
    grad_A_p = torch.randn(P, K, device=device, dtype=torch.bfloat16)  # the input gradient's

    def pad_then_quantise():
        return tn.quantize_rows(pad_with(A, padding), padded_layout)

    def unpad():
        gather_rows(out_p, padding.padded_positions)
        return gather_rows(grad_A_p, padding.padded_positions)

    A_g = A.clone().requires_grad_(True)
    B_g = B.detach().clone().requires_grad_(True)

    def bf16_fwd_bwd():
        out = torch._grouped_mm(A_g, B_g, offs=offs)
        out.backward(grad)

    cases = {
        "unpadded": lambda: tn.quantize_rows(A, aligned),
        "fused": lambda: tn.quantize_rows(A, padding),
        "pad+quant": pad_then_quantise,
        "weight": lambda: tn.quantize_weight(B),
        "columns": lambda: tn.quantize_grouped_columns(A, padding),
        "unpad": unpad,
    }
    if device == "cuda":
        cases["bf16 f+b"] = bf16_fwd_bwd
    run = timer(device)
    for fn in cases.values():  # compile and warm up
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            times[name].append(run(fn, calls))
    median = {name: statistics.median(values) for name, values in times.items()}
    row_bytes = M * K * 2 + P * K + P * K // 32
    moved = {
        "unpadded": row_bytes,
        "fused": row_bytes,
        "pad+quant": row_bytes + 2 * P * K * 2,
        "weight": E * K * N * 2 + 2 * E * K * N + 2 * E * K * N // 32,
        "columns": row_bytes,
    }
    return median, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--hw-cvt", choices=["on", "off"], default="on", help="e4m3 by the cvt instruction (on) or arithmetic (off)")
    args = parser.parse_args()
    tn.USE_HW_CVT = args.hw_cvt == "on"
    cuda = args.device == "cuda"
    shapes, rounds, calls = (MOE, args.rounds or 15, 20) if cuda else (SMALL, args.rounds or 2, 1)
    if cuda:
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, hw cvt {args.hw_cvt}")
    names = ["unpadded", "fused", "pad+quant", "weight", "columns", "unpad"] + (["bf16 f+b"] if cuda else [])
    print(f"{'E, M, K, N':<22}" + "".join(f"{n + ' ms':>13}" for n in names)
          + f"{'fused/unpad':>13}{'pad+q/fused':>13}{'unpad/bf16':>12}   TB/s (unpadded, fused, weight, columns)")
    for E, M, K, N in shapes:
        median, moved = bench_shape(E, M, K, N, args.device, rounds, calls)
        cells = "".join(f"{median[n] * 1e3:>13.3f}" for n in names)
        ratio = f"{median['fused'] / median['unpadded']:>13.3f}{median['pad+quant'] / median['fused']:>13.3f}"
        over_bf16 = f"{median['unpad'] / median['bf16 f+b']:>12.3f}" if cuda else f"{'-':>12}"
        bandwidth = ", ".join(f"{moved[n] / median[n] / 1e12:.2f}" for n in ("unpadded", "fused", "weight", "columns"))
        print(f"{f'{E}, {M}, {K}, {N}':<22}{cells}{ratio}{over_bf16}   {bandwidth}")


if __name__ == "__main__":
    main()
