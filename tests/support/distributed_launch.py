"""Start the ranks of tests/support/distributed_worker.py and collect their reports (no pytest needed).

    python tests/support/distributed_launch.py                 # every scenario, gloo on the CPU
    MXFP8_COMPAT_DIST_BACKEND=nccl python tests/support/distributed_launch.py   # the same on 2 GPUs

Prints one line per scenario and every failed check; exits 1 if any failed. tests/test_distributed.py
uses :func:`launch` and :func:`failures` to turn the same runs into pytest assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
ROOT = HERE.parents[1]  # the checkout (this file is tests/support/distributed_launch.py)
WORLD = 2
TIMEOUT_S = float(os.environ.get("MXFP8_COMPAT_DIST_TIMEOUT", "420"))
MODEL_SCENARIOS = ["fsdp:off", "fsdp:emulated", "ep:off", "ep:emulated", "dtensor:off", "dtensor:emulated"]


class LaunchError(AssertionError):
    """The ranks hung, crashed or wrote no report."""


def launch(tmp: Path, scenarios: list[str], env: Optional[dict[str, str]] = None, world: int = WORLD) -> dict[str, Any]:
    """Run ``scenarios`` on ``world`` ranks (FileStore rendezvous in ``tmp``); ``{scenario: [per-rank result]}``."""
    out = tmp / "reports"
    out.mkdir(parents=True)
    init_file = tmp / "rendezvous"
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(rank), "--world-size", str(world),
             "--init-file", str(init_file), "--out", str(out), "--scenarios", ",".join(scenarios)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, cwd=ROOT,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                tails = [p.communicate()[0][-3000:] for p in procs]
                raise LaunchError(f"ranks did not finish within {TIMEOUT_S:.0f} s; output tails:\n" + "\n---\n".join(tails)) from None
    finally:  # an interrupt (Ctrl-C, tox stopping the run) must not leave ranks behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        path = out / f"rank{rank}.json"
        if not path.exists():
            raise LaunchError(f"rank {rank} wrote no report (exit {proc.returncode}):\n{log[-4000:]}")
        reports.append(json.loads(path.read_text()))
        if proc.returncode != 0:
            raise LaunchError(f"rank {rank} exited {proc.returncode}:\n{log[-4000:]}")
    merged: dict[str, Any] = {"_meta": reports[0]["_meta"]}
    for key in scenarios:
        merged[key] = [report.get(key) for report in reports]
    return merged


def failures(report: dict[str, Any], key: str) -> list[str]:
    """Why scenario ``key`` failed on any rank (empty when every rank ran it and every check passed)."""
    problems = []
    for rank, result in enumerate(report[key]):
        if result is None:
            problems.append(f"{key}: rank {rank} did not run it")
        elif result["error"] is not None:
            problems.append(f"{key}: rank {rank} raised:\n{result['error']}")
        elif not result["checks"]:
            problems.append(f"{key}: rank {rank} checked nothing")
        else:
            problems += [f"{key}: rank {rank}: " + json.dumps(c, default=str) for c in result["checks"] if not c["ok"]]
    return problems


def isolation_env(tmp: Path) -> dict[str, str]:
    """A fake torchao 0.18 ahead of any real one and a fresh shared verdict cache."""
    sys.path.insert(0, str(HERE))
    import fakes

    fake_root = fakes.write_fake_torchao(tmp / "site", "0.18.0", fakes.GEN_018)
    pythonpath = os.pathsep.join(p for p in (str(fake_root), os.environ.get("PYTHONPATH", "")) if p)
    return {"MXFP8_COMPAT_CACHE_DIR": str(tmp / "verdicts"), "PYTHONPATH": pythonpath}


def main() -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(MODEL_SCENARIOS, None, Path(tmp, "model")), (["isolation"], isolation_env(Path(tmp, "iso")), Path(tmp, "iso"))]
        for scenarios, env, where in runs:
            start = time.monotonic()
            report = launch(where, scenarios, env)
            print(f"{report['_meta']}  ({time.monotonic() - start:.0f} s)")
            for key in scenarios:
                found = failures(report, key)
                checks = sum(len(r["checks"]) for r in report[key] if r)
                bitwise = sum(1 for r in report[key] if r for c in r["checks"] if c.get("bitwise"))
                print(f"  {key:18s} {'FAIL' if found else 'ok':4s}  {checks} checks over {WORLD} ranks, {bitwise} bitwise")
                problems += found
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
