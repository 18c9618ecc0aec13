"""Isolated probing: import torchao in a subprocess first, because it can kill the interpreter.

A torchao built against another torch can abort the process at ``import torchao``
(pytorch/ao issue 2901: "Aborted (core dumped)"), which no ``except`` can catch. With
``resolve(isolate=True)`` or ``MXFP8_COMPAT_ISOLATE=1``, the import and the smoke runs happen
in a child process first; the verdict is cached on disk per (python, torch, torchao,
device) so later processes pay nothing. Only a torchao whose child survived is imported here.

Cache location: ``$MXFP8_COMPAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxfp8_compat``, else
``~/.cache/mxfp8_compat``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ISOLATE_ENV_VAR", "cache_dir", "isolated_problem"]

ISOLATE_ENV_VAR = "MXFP8_COMPAT_ISOLATE"
_CHILD_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Where isolated verdicts are kept."""
    explicit = os.environ.get("MXFP8_COMPAT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mxfp8_compat"


def _verdict_path(torchao_version: str, device: torch.device) -> Path:
    try:
        location = str(importlib.metadata.distribution("torchao").locate_file(""))
    except importlib.metadata.PackageNotFoundError:
        location = "?"
    key = "|".join((sys.executable, platform.python_version(), torch.__version__, torchao_version, location, str(device)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / f"verdict-{digest}.json"


def _run_child(device: torch.device) -> Optional[str]:
    """Import torchao and resolve in a child; the reason it died, or None if it survived."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop(ISOLATE_ENV_VAR, None)
    code = "import sys; from mxfp8_compat.isolation import _child_main; _child_main(sys.argv[1])"
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, str(device)],
            capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, env=env,
        )
    except subprocess.TimeoutExpired:
        return f"the isolated torchao probe did not finish within {_CHILD_TIMEOUT_S} s"
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return f"importing torchao killed the isolated probe process ({name}); torchao is not imported in this process"
    if child.returncode != 0:
        tail = " ".join(child.stderr.strip().splitlines()[-1:]) or "no output"
        return f"the isolated torchao probe exited with status {child.returncode} ({tail[:200]})"
    return None


def _child_main(device: str) -> None:
    """Child side: import torchao and run every mode's probes (smoke runs included)."""
    from .resolution import MODES, resolve

    for mode in MODES:
        try:
            resolve(mode, device=device, isolate=False)
        except Exception:  # noqa: BLE001 - an unavailable mode is a verdict, not a crash
            pass
    print(json.dumps({"survived": True}))


def isolated_problem(torchao_version: str, device: torch.device) -> Optional[str]:
    """Why torchao must not be imported in this process (from a cached or fresh child run), or None."""
    path = _verdict_path(torchao_version, device)
    try:
        return json.loads(path.read_text())["problem"]
    except (OSError, ValueError, KeyError):
        pass
    problem = _run_child(device)
    try:
        _write_verdict(path, {"problem": problem, "torchao": torchao_version, "torch": torch.__version__})
    except OSError:
        pass  # an unwritable cache only costs the next process another child run
    return problem


def _write_verdict(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically: readers see the old file or the whole new one.

    Several processes (the ranks of one job) may probe at once and share the cache: each
    writes a temporary file in the same directory and renames it over ``path``
    (``os.replace`` is atomic on POSIX and Windows), so no reader ever parses a half-written
    verdict and concurrent writers cannot interleave their bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
