"""What the shim costs: per-call overhead of the Resolution callable, and of per-call relayout.

    python benchmarks/overhead.py                       # CPU: tiny shapes, bf16 and emulated
    python benchmarks/overhead.py --device cuda --shapes all

Side by side in one process, interleaved round by round (so clock drift and thermal state hit
every variant alike), it times forward and forward+backward of:

  (a) raw      the call the shim wraps: torch._grouped_mm for bf16; torchao's emulated entry
               (or the reference, where torchao has no emulation) for emulated
  (b) shim     the Resolution callable returned by resolve()
  (c) relayout (a) behind the per-call relayout many MoE codebases write, on the natural
               row-major (E, K, N) weight they store:
               fn(A.contiguous(), B.transpose(-2, -1).contiguous().transpose(-2, -1), offs)

and prints medians with the ratios (b)/(a) and (c)/(b). (a) and (b) get the weight stored once
(E, N, K) and passed as as_grouped_mm_weight(w) (the layout torchao needs), as a training loop using the shim would. It also times resolve() cold (in a fresh
subprocess, torchao import included, smoke run shown separately) and cached.
Nothing here is asserted: pytest never times anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import timeit
from typing import Callable

import torch

import mxfp8_compat
from mxfp8_compat import as_grouped_mm_weight, expert_weight_from_kn, resolve

TINY = [(2, 64, 32, 32), (4, 256, 64, 64), (8, 1024, 128, 128)]
MOE = [
    (8, 4096, 2048, 1024),
    (8, 16384, 7168, 2048),
    (8, 16384, 2048, 7168),
    (16, 32768, 4096, 1536),
    (64, 65536, 2048, 768),
]


def make_inputs(E: int, M: int, K: int, N: int, device: str, requires_grad: bool):
    """A, the weight row-major (as MoE code stores it) and prepared (as the shim's user does), offs, grad."""
    rows = M // E
    A = torch.randn(M, K, device=device, dtype=torch.bfloat16, requires_grad=requires_grad)
    B_row_major = torch.nn.Parameter(torch.randn(E, K, N, device=device, dtype=torch.bfloat16), requires_grad=requires_grad)
    storage = torch.nn.Parameter(expert_weight_from_kn(B_row_major), requires_grad=requires_grad)  # (E, N, K)
    B_prepared = as_grouped_mm_weight(storage)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * rows
    grad = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    return A, {"prepared": B_prepared, "row_major": B_row_major}, offs, grad


WEIGHT_OF = {"raw": "prepared", "shim": "prepared", "relayout": "row_major"}


def raw_call(res: mxfp8_compat.Resolution) -> Callable:
    """The callable the shim wraps, for this resolution."""
    if res.backend == "bf16":
        return lambda A, B, offs: torch._grouped_mm(A, B, offs=offs)
    if res.emulation == "fast":  # the fast emulation itself, without the shim around it
        from mxfp8_compat.backends.fast_emulation import fast_mxfp8_grouped_mm

        return lambda A, B, offs: fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, wgrad_with_hp=True)
    if res.emulation == "reference" or res.generation is None:
        from mxfp8_compat.numerics.reference import mxfp8_grouped_mm_reference

        mode = res.generation.scale_mode if res.generation else mxfp8_compat.numerics.quantize.DEFAULT_SCALE_MODE
        return lambda A, B, offs: mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, mode, True)
    from mxfp8_compat.providers import match as matching, torchao as generations

    bound = matching.match_generation(res.torchao_version).bound
    if res.generation.bind is generations.bind_kernel_preference:  # torchao 0.16+: call the entry itself
        entry, emulated, rceil = bound.entry, generations._kernel_preference("emulated"), generations._rceil()
        return lambda A, B, offs: entry(
            A, B, offs=offs, out_dtype=torch.bfloat16, kernel_preference=emulated, wgrad_with_hp=True, scale_calculation_mode=rceil
        )
    call = bound.bind("emulated", res.generation.wgrad_with_hp)
    return lambda A, B, offs: call(A, B, offs, torch.bfloat16)


def time_variants(variants: dict[str, Callable], inputs, backward: bool, device: str, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved round by round."""
    A, weights, offs, grad = inputs
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(name, fn):
        out = fn(A, weights[WEIGHT_OF[name]], offs)
        if backward:
            out.backward(grad)

    samples: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up
        step(name, fn)
        step(name, fn)
    sync()
    start = time.perf_counter()  # calibrate: about 20 ms per variant per round
    step("raw", variants["raw"])
    sync()
    calls = max(1, min(calls, int(0.02 / max(time.perf_counter() - start, 1e-7))))
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                step(name, fn)
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    for tensor in (A, *weights.values()):
        tensor.grad = None
    return {name: statistics.median(values) for name, values in samples.items()}


def allocated_bytes(name: str, fn: Callable, inputs, device: str) -> int:
    """Bytes the caching allocator hands out during one forward call (CUDA only; -1 elsewhere)."""
    if not device.startswith("cuda"):
        return -1
    A, weights, offs, _ = inputs
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
    with torch.no_grad():
        fn(A, weights[WEIGHT_OF[name]], offs)
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - before


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:10.3f} ms"


def bench_paths(device: str, shapes, modes, rounds: int) -> list[dict]:
    rows = []
    for mode in modes:
        res = resolve(mode, device=device)
        raw = raw_call(res)

        def relayout(A, B, offs, raw=raw):
            return raw(A.contiguous(), B.transpose(-2, -1).contiguous().transpose(-2, -1), offs)

        variants = {"raw": raw, "shim": res, "relayout": relayout}
        label = f"{res.backend}" + (f"/{res.emulation}" if res.emulation else "")
        for E, M, K, N in shapes:
            calls = 200  # at most; calibrated down to ~20 ms per variant per round
            for backward in (False, True):
                inputs = make_inputs(E, M, K, N, device, requires_grad=backward)
                medians = time_variants(variants, inputs, backward, device, rounds, calls)
                extra = {name: allocated_bytes(name, fn, inputs, device) for name, fn in variants.items()} if not backward else {}
                row = {
                    "path": label, "shape": (E, M, K, N), "pass": "fwd+bwd" if backward else "fwd",
                    **{name: value for name, value in medians.items()},
                    "shim/raw": medians["shim"] / medians["raw"],
                    "relayout/shim": medians["relayout"] / medians["shim"],
                }
                rows.append(row)
                print(
                    f"{label:<22} E={E:<3} M={M:<6} K={K:<5} N={N:<5} {row['pass']:<8}"
                    f"raw {fmt(row['raw'])}  shim {fmt(row['shim'])}  relayout {fmt(row['relayout'])}"
                    f"  shim/raw {row['shim/raw']:.3f}  relayout/shim {row['relayout/shim']:.3f}"
                    + (f"  bytes allocated beyond raw: shim {extra['shim'] - extra['raw']}, relayout {extra['relayout'] - extra['raw']}"
                       if extra and extra["raw"] >= 0 else ""),
                    flush=True,
                )
    return rows


COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from mxfp8_compat import resolve
from mxfp8_compat.probes import smoke
from mxfp8_compat.providers import match as matching
smoke = []
real = smoke.smoke_run
def timed(*a, **k):
    s = time.perf_counter(); r = real(*a, **k); smoke.append(time.perf_counter() - s); return r
smoke.smoke_run = timed
t2 = time.perf_counter()
res = resolve(sys.argv[1], device=sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "resolve_s": t3 - t2, "smoke_s": sum(smoke),
                  "backend": res.backend, "torchao_imported": "torchao" in sys.modules}))
"""


def bench_resolve(device: str, modes) -> None:
    for mode in modes:
        runs = [json.loads(subprocess.run([sys.executable, "-c", COLD, mode, device], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(3)]
        median = lambda key: statistics.median(r[key] for r in runs)
        print(
            f"cold resolve({mode!r}) -> {runs[0]['backend']:<15} {median('resolve_s') * 1e3:9.1f} ms "
            f"(of which smoke run {median('smoke_s') * 1e3:8.1f} ms; torchao imported: {runs[0]['torchao_imported']}; "
            f"import torch before it {median('import_torch_s'):.2f} s), median of 3 fresh processes",
            flush=True,
        )
    resolve("auto", device=device)
    number = 200_000
    cached = min(timeit.repeat(lambda: resolve("auto", device=device), number=number, repeat=5)) / number
    default = min(timeit.repeat(resolve, number=number, repeat=5)) / number
    print(f"cached resolve('auto', device=...) {cached * 1e9:.0f} ns/call; cached resolve() {default * 1e9:.0f} ns/call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", choices=["tiny", "moe", "all"], default=None, help="default: tiny on cpu, all on cuda")
    parser.add_argument("--modes", default="off,emulated", help="comma-separated resolve modes to time")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    shapes_name = args.shapes or ("tiny" if args.device == "cpu" else "all")
    shapes = {"tiny": TINY, "moe": MOE, "all": TINY + MOE}[shapes_name]
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, torchao {mxfp8_compat.probes.environment.installed_torchao_version()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", {time.strftime('%Y-%m-%d')}, median of {args.rounds} interleaved rounds", flush=True)
    modes = args.modes.split(",")
    if not args.skip_cold:
        bench_resolve(args.device, ["off", "auto", "emulated"])
    bench_paths(args.device, shapes, modes, args.rounds)


if __name__ == "__main__":
    main()
