"""Cold start of resolve("auto") and select_grouped_mm(True) beyond ``import torch``, in fresh processes.

    python benchmarks/cold_start.py             # 7 fresh processes on this host's default device
    python benchmarks/cold_start.py --runs 15

Each process imports torch, then times ``import mxfp8_compat`` plus the first
``resolve("auto")`` (and, separately, ``select_grouped_mm(True)``), and reports whether torchao
was imported. On a CPU or a CUDA device below capability 10 no native kernel can run, so auto
decides from the device and torchao (installed or not) stays unimported. Prints medians; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import mxfp8_compat
t2 = time.perf_counter()
if sys.argv[1] == "resolve":
    res = mxfp8_compat.resolve("auto")
    backend = res.backend
else:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = mxfp8_compat.select_grouped_mm(True)
    backend = "torch._grouped_mm" if fn is torch._grouped_mm else "mxfp8"
t3 = time.perf_counter()
print(json.dumps({"torch_s": t1 - t0, "import_s": t2 - t1, "first_s": t3 - t2, "backend": backend,
                  "torchao_imported": any(m == "torchao" or m.startswith("torchao.") for m in sys.modules)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    try:
        from importlib.metadata import version

        torchao = version("torchao")
    except Exception:  # noqa: BLE001
        torchao = None
    print(f"python {sys.version.split()[0]}; torchao installed: {torchao}")
    for what in ("resolve", "select_grouped_mm"):
        runs = [
            json.loads(subprocess.run([sys.executable, "-c", CHILD, what], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(args.runs)
        ]
        med = lambda key: statistics.median(r[key] for r in runs) * 1e3  # noqa: E731
        label = 'resolve("auto")' if what == "resolve" else "select_grouped_mm(True)"
        print(
            f"{label:<24} -> {runs[0]['backend']:<17} beyond import torch: {med('import_s') + med('first_s'):7.1f} ms "
            f"(import mxfp8_compat {med('import_s'):6.1f} ms + first call {med('first_s'):6.1f} ms); "
            f"import torch {med('torch_s'):7.1f} ms; torchao imported: {any(r['torchao_imported'] for r in runs)}; "
            f"median of {args.runs} fresh processes"
        )


if __name__ == "__main__":
    main()
