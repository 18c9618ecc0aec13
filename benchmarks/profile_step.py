"""torch.profiler traces of one forward+backward at the small MoE shape: the fast emulation beside bf16.

    OUT=/tmp/out python benchmarks/profile_step.py              # CUDA: tables, and $OUT/trace-{fast,bf16}.json
    python benchmarks/profile_step.py --timeline T.json[.gz]     # one iteration of a trace, per thread

The tables are torch.profiler's (20 iterations each, by self CPU time). The timeline lists the
CPU ops and CUDA calls of the 11th iteration with their start (us from the iteration's start) and
duration, per thread (the main thread runs the forward, the autograd engine's device thread the
backward): the gaps between them are Python. The traces open in Perfetto. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import torch


def profile(out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from host_time import make_inputs  # this folder
    from mxfp8_compat.backends import fast_emulation as fast

    A, B, offs, grad = make_inputs(8, 4096, 2048, 1024, "cuda")

    def fast_step():
        return torch.autograd.grad(fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, wgrad_with_hp=True), (A, B), grad)

    def bf16_step():
        return torch.autograd.grad(torch._grouped_mm(A, B, offs=offs), (A, B), grad)

    for step in (fast_step, bf16_step):
        for _ in range(5):
            step()
    torch.cuda.synchronize()
    for name, step in (("fast", fast_step), ("bf16", bf16_step)):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        print("=====", name)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        prof.export_chrome_trace(os.path.join(out_dir, f"trace-{name}.json"))


def timeline(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    events.sort(key=lambda e: e["ts"])
    # an iteration starts with the forward's first op on the main thread (the first event's thread)
    main_thread = events[0]["tid"]
    first_name = next(e["name"] for e in events if e["cat"] == "cpu_op")
    starts = [e["ts"] for e in events if e["tid"] == main_thread and e["name"] == first_name]
    begin, end = starts[10], starts[11]
    for e in events:
        if begin <= e["ts"] < end:
            print(f"{e['ts'] - begin:9.1f} {e['dur']:8.1f}  thread {e['tid']}  {e['cat'][:11]:11s} {e['name'][:70]}")
    print(f"iteration: {end - begin:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeline", metavar="TRACE", help="print one iteration of a trace this script wrote")
    args = parser.parse_args()
    if args.timeline:
        timeline(args.timeline)
    else:
        profile(os.environ.get("OUT", "."))


if __name__ == "__main__":
    main()
