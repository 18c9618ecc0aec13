"""Paths that need neither torch._dynamo nor triton load neither (issue 23).

``import mxfp8_compat`` and the CPU paths (bf16, the reference emulation, float32 output
through the per-group fallback) must not import them: a broken triton would kill the process
before any isolation can help, and importing torch._dynamo costs seconds. Activation
checkpointing and anomaly mode: tests/test_checkpoint_and_anomaly.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mxfp8_compat

SRC = Path(mxfp8_compat.__file__).resolve().parent.parent

# --- import ---------------------------------------------------------------------------------


def _child(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(SRC), env.get("PYTHONPATH", "")) if p)
    env.pop("MXFP8_COMPAT_MODE", None)
    env.pop("MXFP8_COMPAT_ISOLATE", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_import_and_cpu_resolves_load_neither_dynamo_nor_triton():
    """Emulated joins in where no torchao is installed (torchao's emulation imports triton itself)."""
    child = _child(
        """
        import sys, torch
        import mxfp8_compat
        MODES = ("off", "auto") + (("emulated",) if __import__("mxfp8_compat.probes.environment").probes.environment.installed_torchao_version() is None else ())
        after_import = sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules)
        A = torch.randn(64, 64, dtype=torch.bfloat16); B = torch.randn(2, 64, 32, dtype=torch.bfloat16)
        offs = torch.tensor([32, 64], dtype=torch.int32)
        for mode in MODES:
            for out_dtype in (None, torch.float32):
                mxfp8_compat.resolve(mode, device="cpu")(A, B, offs, out_dtype=out_dtype)
        after_calls = sorted(m for m in ("torch._dynamo", "triton") if m in sys.modules)
        print(after_import, after_calls)
        """
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split("\n")[-2] == "[] []", child.stdout


def test_a_triton_that_aborts_at_import_does_not_reach_cpu_users(tmp_path):
    """A broken triton must not kill a process that never chose a path needing it."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("import os\nos.abort()\n")
    child = _child(
        """
        import torch, mxfp8_compat
        MODES = ("off", "auto") + (("emulated",) if __import__("mxfp8_compat.probes.environment").probes.environment.installed_torchao_version() is None else ())
        A = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
        B = torch.randn(2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
        offs = torch.tensor([32, 64], dtype=torch.int32)
        for mode in MODES:
            for out_dtype in (None, torch.float32):
                mxfp8_compat.resolve(mode, device="cpu")(A, B, offs, out_dtype=out_dtype).sum().backward()
        print("survived")
        """,
        extra_path=str(tmp_path),
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    assert child.stdout.strip().endswith("survived")
