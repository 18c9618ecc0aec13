"""Cold start of ``auto`` where no native kernel can run: no torchao, no torch._dynamo, no torch_native.

benchmarks/cold_start.py times it; here a fresh interpreter checks what the first
``resolve("auto")`` on the CPU leaves imported. torch._dynamo (pulled in by
``mxfp8_compat.backends.torch_native``'s ``torch.compiler.disable``) costs seconds of a cold start and is
imported only where torch's own MXFP8 kernel may run, or by the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
before = set(sys.modules)
import mxfp8_compat
resolution = mxfp8_compat.resolve("auto", device="cpu")
new = set(sys.modules) - before
print(json.dumps({"backend": resolution.backend, "reasons": list(resolution.reasons),
                  "new": sorted(m for m in new if m.split(".")[0] in ("torch", "torchao", "mxfp8_compat", "triton"))}))
"""


def test_auto_on_the_cpu_imports_neither_dynamo_nor_torch_native():
    env = dict(os.environ)
    env.pop("MXFP8_COMPAT_MODE", None)  # auto
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["backend"] == "bf16" and report["reasons"], report
    new = report["new"]
    assert "mxfp8_compat.resolution" in new, "the child imported mxfp8_compat"
    for module in ("torch._dynamo", "mxfp8_compat.backends.torch_native", "torchao", "triton"):
        assert module not in new, f"{module} imported by resolve('auto') on the CPU"
