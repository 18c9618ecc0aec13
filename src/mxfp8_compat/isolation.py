"""Isolated probing: import torchao in a subprocess first, because it can kill the interpreter.

A torchao built against another torch can abort the process at ``import torchao``
(pytorch/ao issue 2901: "Aborted (core dumped)"), which no ``except`` can catch. With
``resolve(isolate=True)`` or ``MXFP8_COMPAT_ISOLATE=1``, the import and the smoke runs happen
in a child process first. Only a torchao whose child survived is imported here.

The child imports exactly what this process would: it starts isolated (``python -I``: no
working directory or script directory prepended, no ``PYTHON*`` variables, no user site) and
then takes this process's ``sys.path`` verbatim before importing anything of ours.

Verdicts are cached on disk, keyed on this interpreter, mxfp8_compat (version and source
files), torch (version and location), the torchao installation itself (its location, its
``RECORD`` and the modification times of its metadata and ``__init__.py``, not only its
version) and the device, so a reinstalled or edited torchao is probed again. Only definite
verdicts are cached: the child survived, or a crash signal killed it (SIGABRT, SIGSEGV, ...).
A timeout, a child that could not start, was killed from outside (SIGKILL, SIGTERM) or exited
with an error status is reported but not cached; the next process tries again. A cache file
that does not hold a verdict for exactly this key is ignored and rewritten. Files are written
atomically (a temporary file, then ``os.replace``).

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
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ISOLATE_ENV_VAR", "cache_dir", "isolated_problem"]

ISOLATE_ENV_VAR = "MXFP8_COMPAT_ISOLATE"
_CHILD_TIMEOUT_S = 600
_VERDICT_FORMAT = 2
# Deaths that say something about the torchao installation itself (and recur on every try).
_CRASH_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE") if hasattr(signal, name)
)
_SURVIVED = '{"survived": true}'

# One lock per verdict file: concurrent resolves (of different modes) start one child, not several.
_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()


def cache_dir() -> Path:
    """Where isolated verdicts are kept."""
    explicit = os.environ.get("MXFP8_COMPAT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mxfp8_compat"


def _mtime(path: object) -> str:
    try:
        stat = os.stat(str(path))
    except OSError:
        return "-"
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def _torchao_identity(torchao_version: str) -> list[str]:
    """What identifies the torchao this process would import: where it is and what it holds."""
    try:
        dist = importlib.metadata.distribution("torchao")
    except importlib.metadata.PackageNotFoundError:
        return [torchao_version, "no distribution"]
    record = dist.read_text("RECORD") or ""
    metadata_dir = getattr(dist, "_path", None)  # PathDistribution's .dist-info directory, when it has one
    return [
        torchao_version,
        str(dist.locate_file("")),
        str(metadata_dir),
        hashlib.sha256(record.encode()).hexdigest(),
        _mtime(os.path.join(str(metadata_dir), "METADATA")) if metadata_dir else "-",
        _mtime(dist.locate_file("torchao/__init__.py")),
    ]


def _own_identity() -> list[str]:
    """mxfp8_compat's version and its source files (an editable install changes without a version bump)."""
    from . import __version__

    package = Path(__file__).parent
    files = sorted(package.glob("*.py"))
    return [__version__] + [f"{path.name}={_mtime(path)}" for path in files]


def _verdict_key(torchao_version: str, device: torch.device) -> str:
    parts = [
        f"format={_VERDICT_FORMAT}",
        sys.executable,
        platform.python_version(),
        torch.__version__,
        str(getattr(torch, "__file__", "")),
        *_own_identity(),
        *_torchao_identity(torchao_version),
        str(device),
    ]
    return "\n".join(parts)


def _verdict_path(key: str) -> Path:
    return cache_dir() / f"verdict-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_verdict(path: Path, key: str) -> tuple[bool, Optional[str]]:
    """(True, problem) for a valid cached verdict of exactly ``key``, else (False, None)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(data, dict) or data.get("key") != key or "problem" not in data:
        return False, None
    problem = data["problem"]
    if problem is not None and not isinstance(problem, str):
        return False, None
    return True, problem


def _write_verdict(path: Path, key: str, problem: Optional[str], torchao_version: str) -> None:
    """Write the verdict atomically: readers see the old file or the whole new one, never a part."""
    text = json.dumps({"key": key, "problem": problem, "torchao": torchao_version, "torch": torch.__version__})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                file.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass  # an unwritable cache only costs the next process another child run


# The child starts isolated (-I: neither the working directory nor PYTHONPATH nor user site),
# then takes the parent's sys.path verbatim, so it imports what the parent would.
_CHILD_CODE = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from mxfp8_compat.isolation import _child_main; _child_main(sys.argv[2])"
)


def _run_child(device: torch.device) -> tuple[Optional[str], bool]:
    """Import torchao and resolve in a child: (why it failed or None, whether that verdict may be cached)."""
    env = dict(os.environ)
    env.pop(ISOLATE_ENV_VAR, None)
    command = [sys.executable, "-I", "-c", _CHILD_CODE, json.dumps(list(sys.path)), str(device)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return f"the isolated torchao probe did not finish within {_CHILD_TIMEOUT_S} s", False
    except OSError as error:
        return f"the isolated torchao probe could not start ({type(error).__name__}: {error})", False
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        if -child.returncode in _CRASH_SIGNALS:
            return f"importing torchao killed the isolated probe process ({name}); torchao is not imported in this process", True
        return f"the isolated torchao probe was killed from outside ({name}); torchao is not imported in this process", False
    if child.returncode != 0:
        tail = " ".join(child.stderr.strip().splitlines()[-1:]) or "no output"
        return f"the isolated torchao probe exited with status {child.returncode} ({tail[:200]})", False
    if _SURVIVED not in child.stdout.strip().splitlines()[-1:]:
        return "the isolated torchao probe exited without reporting a verdict (something in the import ended the process)", False
    return None, True


def _child_main(device: str) -> None:
    """Child side: import torchao and run every mode's probes (smoke runs included)."""
    from .resolution import MODES, resolve

    for mode in MODES:
        try:
            resolve(mode, device=device, isolate=False)
        except Exception:  # noqa: BLE001 - an unavailable mode is a verdict, not a crash
            pass
    sys.stdout.write("\n" + _SURVIVED + "\n")
    sys.stdout.flush()


def isolated_problem(torchao_version: str, device: torch.device) -> Optional[str]:
    """Why torchao must not be imported in this process (from a cached or fresh child run), or None."""
    key = _verdict_key(torchao_version, device)
    path = _verdict_path(key)
    with _path_locks_guard:
        lock = _path_locks.setdefault(path, threading.Lock())
    with lock:
        cached, problem = _read_verdict(path, key)
        if cached:
            return problem
        problem, definite = _run_child(device)
        if definite:
            _write_verdict(path, key, problem, torchao_version)
        return problem
