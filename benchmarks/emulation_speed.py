"""How fast is emulated MXFP8? Forward+backward of one grouped GEMM, side by side in one process.

    python benchmarks/emulation_speed.py                         # CUDA, the four MoE shapes of issue 13
    python benchmarks/emulation_speed.py --sweep --profile --check --json out.json
    python benchmarks/emulation_speed.py --device cpu --shapes 2,64,64,64   # dry run (triton interpreter)

Variants, each ``torch.autograd.grad(fn(A, B, offs), (A, B), grad_out)`` with bf16 A (M, K),
B (E, K, N) stored per-group column-major (``weight_relayout``) and equal token groups:

  bf16        torch._grouped_mm (its own autograd)
  fast        mxfp8_compat.backends.fast_emulation.fast_mxfp8_grouped_mm (RCEIL, wgrad_with_hp=True)
  fast-requant  the same, B quantised along N again in backward instead of kept from forward
  fast-triton-launch  "fast" with the direct launch off: every kernel through triton's own launch
              (mxfp8_compat.kernels.launch; what the host time was before it)
  torchao     torchao's _to_mxfp8_then_scaled_grouped_mm, KernelPreference.EMULATED, wgrad_with_hp=True
              (0.16+, where installed)
  reference   mxfp8_compat.mxfp8_grouped_mm_reference (RCEIL, wgrad_with_hp=True)

Variants are interleaved round by round (clock and thermal drift hit all alike); each round
times ``--iters`` back-to-back calls with CUDA events; the median round is reported. Options:
``--sweep`` times the quantisation kernels alone over a few launch configurations first and
keeps the fastest; ``--graphs`` also times each variant replayed from a CUDA graph (device time
without host overhead, which dominates small shapes); ``--profile`` prints the fast variant's kernels (time, bytes moved, achieved
bandwidth or TFLOP/s); ``--check`` compares the fast variant with the reference bit for bit at
each shape. Nothing here is asserted: pytest never times anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from typing import Callable, Optional

import torch

from mxfp8_compat.backends import fast_emulation as fast
from mxfp8_compat.numerics import reference
from mxfp8_compat.layout import weight_relayout

SHAPES = [(8, 16384, 7168, 2048), (16, 32768, 4096, 1536), (64, 65536, 2048, 768), (8, 4096, 2048, 1024)]
GOAL_VS_BF16 = 1.5
GOAL_VS_TORCHAO = 4.0


def make_inputs(E: int, M: int, K: int, N: int, device: str):
    g = torch.Generator(device=device).manual_seed(13)
    A = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16).requires_grad_(True)
    B = weight_relayout(torch.randn(E, K, N, device=device, generator=g).to(torch.bfloat16)).requires_grad_(True)
    offs = (torch.arange(1, E + 1, device=device, dtype=torch.int32) * (M // E)).to(torch.int32)
    grad = torch.randn(M, N, device=device, generator=g).to(torch.bfloat16)
    return A, B, offs, grad


def torchao_emulated() -> Optional[tuple[str, Callable]]:
    try:
        import torchao
        from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm
        from torchao.quantization.quantize_.common import KernelPreference
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
    except Exception as error:  # noqa: BLE001
        print(f"torchao emulation not available: {type(error).__name__}: {error}")
        return None

    def call(A, B, offs):
        return _to_mxfp8_then_scaled_grouped_mm(
            A, B, offs=offs, out_dtype=torch.bfloat16, kernel_preference=KernelPreference.EMULATED,
            wgrad_with_hp=True, scale_calculation_mode=ScaleCalculationMode.RCEIL,
        )

    return torchao.__version__, call


def _triton_launch(fn: Callable) -> Callable:
    """``fn`` marked to run with the direct launch off (``fwd_bwd`` sets it around forward and backward)."""

    def variant(A, B, offs):  # type: ignore[no-untyped-def]
        return fn(A, B, offs)

    variant.direct_launch = False  # type: ignore[attr-defined]
    return variant


def variants(with_reference: bool) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "bf16": lambda A, B, offs: torch._grouped_mm(A, B, offs=offs),
        "fast": lambda A, B, offs: fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True, True),
        "fast-requant": lambda A, B, offs: fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True, False),
        "fast-triton-launch": _triton_launch(
            lambda A, B, offs: fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True, True)
        ),
    }
    ao = torchao_emulated()
    if ao is not None:
        out["torchao"] = ao[1]
    if with_reference:
        out["reference"] = lambda A, B, offs: reference.mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, "rceil", True)
    return out


def fwd_bwd(fn: Callable, A, B, offs, grad):
    if getattr(fn, "direct_launch", True):
        return torch.autograd.grad(fn(A, B, offs), (A, B), grad)
    from mxfp8_compat.kernels import launch as _kernel_launch

    with _kernel_launch.triton_launch():
        return torch.autograd.grad(fn(A, B, offs), (A, B), grad)


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self, fn: Callable[[], object], iters: int) -> float:
        """Milliseconds per call over ``iters`` back-to-back calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters


def time_shape(shape, fns: dict[str, Callable], device: str, iters: int, rounds: int) -> dict[str, float]:
    A, B, offs, grad = make_inputs(*shape, device)
    timer = Timer(device)
    per_round: dict[str, list[float]] = defaultdict(list)
    slow = {"reference", "torchao"}
    for name, fn in fns.items():  # warm up: compile kernels, probe torch, fill the allocator
        fwd_bwd(fn, A, B, offs, grad)
    for _ in range(rounds):
        for name, fn in fns.items():
            n = max(1, iters // 4) if name in slow else iters
            per_round[name].append(timer(lambda: fwd_bwd(fn, A, B, offs, grad), n))
    return {name: statistics.median(times) for name, times in per_round.items()}


def graphed_ms(fn: Callable, shape, device: str, iters: int, rounds: int) -> Optional[float]:
    """Milliseconds per fwd+bwd replayed from a CUDA graph: device time without host overhead
    (None where the call cannot be captured)."""
    A, B, offs, grad = make_inputs(*shape, device)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fwd_bwd(fn, A, B, offs, grad)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd_bwd(fn, A, B, offs, grad)
    except Exception as error:  # noqa: BLE001
        print(f"not capturable: {type(error).__name__}: {str(error)[:200]}")
        torch.cuda.synchronize()
        return None
    timer = Timer(device)
    graph.replay()
    return statistics.median(timer(graph.replay, iters) for _ in range(rounds))


def check_bitwise(shape, device: str) -> dict[str, bool]:
    A, B, offs, grad = make_inputs(*shape, device)
    got = fwd_bwd(lambda *a: fast.fast_mxfp8_grouped_mm(*a, torch.bfloat16, "rceil", True), A, B, offs, grad)
    out_fast = fast.fast_mxfp8_grouped_mm(A.detach(), B.detach(), offs, torch.bfloat16, "rceil", True)
    want = fwd_bwd(lambda *a: reference.mxfp8_grouped_mm_reference(*a, torch.bfloat16, "rceil", True), A, B, offs, grad)
    out_ref = reference.mxfp8_grouped_mm_reference(A.detach(), B.detach(), offs, torch.bfloat16, "rceil", True)

    def same(a, b):
        return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))

    return {"output": same(out_fast, out_ref), "grad_A": same(got[0], want[0]), "grad_B": same(got[1], want[1])}


def sweep(shapes, device: str) -> dict[str, object]:
    """Time the forward's quantisation launch (A and B together) alone over a few launch
    configurations; keep the fastest overall."""
    timer = Timer(device)
    results: dict[str, object] = {}
    configs = [(blocks, bk, warps) for blocks in (32, 64, 128) for bk in (64, 128, 256) for warps in (4, 8)]
    totals: dict[tuple, float] = defaultdict(float)
    for shape in shapes:
        A, B, offs, grad = make_inputs(*shape, device)
        A, B = A.detach(), B.detach()
        moved = 4 * A.numel() + 6 * B.numel()
        for cfg in configs:
            fast.QUANT_BLOCKS, fast.WEIGHT_BK, fast.QUANT_WARPS = cfg
            run = lambda: fast._quantize(A, B, "rceil", True, True)  # noqa: E731
            run()
            ms = statistics.median(timer(run, 20) for _ in range(3))
            totals[cfg] += ms
            results[f"{shape} blocks={cfg[0]} bk={cfg[1]} warps={cfg[2]}"] = f"{ms:.3f} ms, {moved / ms / 1e9:.2f} TB/s"
    fast.QUANT_BLOCKS, fast.WEIGHT_BK, fast.QUANT_WARPS = min(totals, key=totals.get)
    results["chosen"] = {"QUANT_BLOCKS": fast.QUANT_BLOCKS, "WEIGHT_BK": fast.WEIGHT_BK, "QUANT_WARPS": fast.QUANT_WARPS}
    return results


def cpu_profile(shape, device: str, fn: Callable, iters: int = 200) -> list[str]:
    """Where the host time of ``iters`` fast fwd+bwd calls goes (cProfile, by own time)."""
    import cProfile
    import io
    import pstats

    A, B, offs, grad = make_inputs(*shape, device)
    for _ in range(5):
        fwd_bwd(fn, A, B, offs, grad)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        fwd_bwd(fn, A, B, offs, grad)
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue().splitlines()


def profile(shape, device: str, fn: Callable) -> list[dict[str, object]]:
    """The fast variant's kernels over 5 calls: time per call, bytes moved, bandwidth / TFLOP/s."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    E, M, K, N = shape
    A, B, offs, grad = make_inputs(*shape, device)
    for _ in range(2):
        fwd_bwd(fn, A, B, offs, grad)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd_bwd(fn, A, B, offs, grad)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time_total / 1e3 if hasattr(event, "device_time_total") else event.cuda_time_total / 1e3)
    bytes_of = {  # analytic traffic of one step's launches of our kernels, bf16 (B kept for backward)
        "quantize_kernel": 2 * 2 * (M * K + M * N) + 2 * 3 * E * K * N,  # A + B (forward), grad_out (backward)
    }
    flops = 2 * M * K * N
    rows = []
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        per_call = sum(times) / 5
        launches = len(times) / 5
        row: dict[str, object] = {"kernel": name[:90], "ms_per_step": round(per_call, 4), "launches_per_step": launches}
        short = next((k for k in bytes_of if k in name), None)
        if short is not None:
            row["GB_per_step"] = round(bytes_of[short] / 1e9, 3)
            row["TB_per_s"] = round(bytes_of[short] / (per_call / 1e3) / 1e12, 2)
        elif "gemm" in name.lower() or "cutlass" in name.lower() or "grouped" in name.lower():
            row["TFLOP_per_s_if_one_gemm_each"] = round(flops * launches / (per_call / 1e3) / 1e12, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="*", default=None, help="E,M,K,N ...")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also time the reference emulation")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="also time CUDA-graph replays (device time, no host overhead)")
    parser.add_argument("--cpu-profile", default=None, help="E,M,K,N: cProfile the fast variant's host time there")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    import triton

    info = {
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (triton interpreter)",
    }
    print(json.dumps(info))
    report: dict[str, object] = {"info": info}
    if args.sweep:
        report["sweep"] = sweep(shapes, args.device)
        for key, value in report["sweep"].items():
            print(f"sweep {key}: {value}")
    fns = variants(args.reference)
    ao = torchao_emulated()
    report["torchao"] = ao[0] if ao else None
    report["config"] = {k: getattr(fast, k) for k in ("QUANT_BLOCKS", "WEIGHT_BK", "QUANT_WARPS", "ROWS_BC", "KEEP_QUANTIZED_WEIGHT", "USE_HW_CVT")}
    print(json.dumps(report["config"]))
    table = []
    for shape in shapes:
        ms = time_shape(shape, fns, args.device, args.iters, args.rounds)
        row: dict[str, object] = {"shape": shape, **{f"{k}_ms": round(v, 4) for k, v in ms.items()}}
        row["fast_vs_bf16"] = round(ms["fast"] / ms["bf16"], 3)
        row["fast_requant_vs_bf16"] = round(ms["fast-requant"] / ms["bf16"], 3)
        row["fast_triton_launch_vs_bf16"] = round(ms["fast-triton-launch"] / ms["bf16"], 3)
        if "torchao" in ms:
            row["torchao_vs_fast"] = round(ms["torchao"] / ms["fast"], 2)
            row["torchao_vs_bf16"] = round(ms["torchao"] / ms["bf16"], 2)
        if args.graphs and args.device.startswith("cuda"):
            for name in ("bf16", "fast", "torchao"):
                if name in fns:
                    graph_ms = graphed_ms(fns[name], shape, args.device, args.iters, args.rounds)
                    row[f"{name}_graph_ms"] = None if graph_ms is None else round(graph_ms, 4)
            if row.get("fast_graph_ms") and row.get("bf16_graph_ms"):
                row["fast_vs_bf16_graph"] = round(row["fast_graph_ms"] / row["bf16_graph_ms"], 3)
        if args.check:
            row["bitwise_vs_reference"] = check_bitwise(shape, args.device)
        if args.profile and args.device.startswith("cuda"):
            row["profile_fast"] = profile(shape, args.device, fns["fast"])
        table.append(row)
        print(json.dumps(row))
    report["results"] = table
    print()
    print("| E, M, K, N | bf16 ms | fast ms | fast / bf16 | fast, triton's launch / bf16 | fast-requant / bf16 | torchao ms | torchao / fast |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {', '.join(map(str, row['shape']))} | {row['bf16_ms']:.3f} | {row['fast_ms']:.3f} | {row['fast_vs_bf16']:.2f}x "
            f"| {row['fast_triton_launch_vs_bf16']:.2f}x | {row['fast_requant_vs_bf16']:.2f}x | {row.get('torchao_ms', float('nan')):.3f} | {row.get('torchao_vs_fast', float('nan')):.1f}x |"
        )
    if any("fast_vs_bf16_graph" in row for row in table):
        print()
        print("CUDA-graph replay (device time, no host overhead):")
        print("| E, M, K, N | bf16 ms | fast ms | fast / bf16 | torchao ms |")
        print("|---|---|---|---|---|")
        for row in table:
            ao = row.get("torchao_graph_ms")
            print(
                f"| {', '.join(map(str, row['shape']))} | {row.get('bf16_graph_ms')} | {row.get('fast_graph_ms')} "
                f"| {row.get('fast_vs_bf16_graph')}x | {ao if ao is not None else 'not capturable'} |"
            )
    if args.cpu_profile:
        shape = tuple(int(v) for v in args.cpu_profile.split(","))
        report["cpu_profile"] = cpu_profile(shape, args.device, fns["fast"])
        print("\n".join(report["cpu_profile"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
