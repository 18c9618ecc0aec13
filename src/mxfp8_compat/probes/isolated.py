"""Isolated probing: import torchao in a subprocess first, because it can kill the interpreter.

A torchao built against another torch can abort the process at ``import torchao``
(pytorch/ao issue 2901: "Aborted (core dumped)"), which no ``except`` can catch; a smoke run
of its kernels can crash as well. With ``resolve(isolate=True)`` or ``MXFP8_COMPAT_ISOLATE``
set to a truthy spelling (``1``, ``true``, ``yes``, ``on``; ``0``, ``false``, ``no``, ``off``
or empty for off; anything else is a ValueError), the import and every mode's resolution
(smoke runs included) happen in a child process first. Only a torchao whose import survived
there is imported here, and only for modes whose resolution survived.

The child imports exactly what this process would: it starts isolated (``python -I``: no
working directory or script directory prepended, no ``PYTHON*`` variables, no user site) and
then takes this process's ``sys.path`` verbatim before importing anything of ours. It reports
each step it starts and finishes over a pipe of its own (not stdout, which imported code can
write to), so a death names its step: the import, or the resolution of one mode. A death
after a successful import is that mode's verdict only; the other modes are tried in a new child.

Verdicts are cached on disk, keyed on this interpreter, mxfp8_compat (version and source
files), torch (version and location), the torchao installation itself (its location, its
``RECORD`` and a hash of the content of every file of the package, so an edited submodule is
probed again) and the device (for CUDA: the GPU's name and compute capability, so a verdict
from one node type is not reused on another sharing the home directory). Only definite
verdicts are cached: the child survived, or a crash signal killed it (SIGABRT, SIGSEGV, ...).
A timeout, a child that could not start, was killed from outside (SIGKILL, SIGTERM) or exited
with an error status is reported and remembered for the rest of this process (one wait per
process, not one per mode), but not cached; the next process tries again. A cache file
that does not hold a verdict for exactly this key is ignored and rewritten. Files are written
atomically (a temporary file, then ``os.replace``).

Cache location: ``$MXFP8_COMPAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mxfp8_compat``, else
``~/.cache/mxfp8_compat``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
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

__all__ = ["ISOLATE_ENV_VAR", "cache_dir", "isolated_problem", "isolation_requested", "forget_session_verdicts"]

ISOLATE_ENV_VAR = "MXFP8_COMPAT_ISOLATE"
_CHILD_TIMEOUT_S = 600
_VERDICT_FORMAT = 3
# Deaths that say something about the torchao installation itself (and recur on every try).
_CRASH_SIGNALS = frozenset(
    getattr(signal, name) for name in ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE") if hasattr(signal, name)
)
# The modes whose resolution imports and runs torchao ("off" never does).
TORCHAO_MODES = ("auto", "native", "emulated")
_IMPORT = "import"  # the verdict of the import step, beside one per mode
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"", "0", "false", "no", "off", "n", "f"})

# One lock per verdict file: concurrent resolves (of different modes) start one child, not several.
_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()
# This process's verdicts that are not cached on disk: a hanging import is waited for once.
_session: dict[str, dict[str, Optional[str]]] = {}


def isolation_requested(value: str) -> bool:
    """``MXFP8_COMPAT_ISOLATE``'s value as a bool: the usual spellings, any case; else ValueError."""
    spelled = value.strip().lower()
    if spelled in _TRUE:
        return True
    if spelled in _FALSE:
        return False
    raise ValueError(
        f"{ISOLATE_ENV_VAR}: expected 1, true, yes or on (isolate) or 0, false, no, off or unset (do not), got {value!r}"
    )


def forget_session_verdicts() -> None:
    """Forget this process's uncached verdicts (``mxfp8_compat.reset()``: as if a new process)."""
    _session.clear()


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


def _package_directories() -> list[str]:
    """Where ``import torchao`` would load the package from (found without importing it)."""
    try:
        spec = importlib.util.find_spec("torchao")
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return sorted(str(location) for location in (spec.submodule_search_locations or ()))


def _content_hash(directories: list[str]) -> str:
    """sha256 over the relative path and bytes of every file under ``directories`` (bytecode caches excluded).

    The version and RECORD stay the same when a file is edited or replaced in place.
    """
    digest = hashlib.sha256()
    for directory in directories:
        for root, subdirectories, files in os.walk(directory):
            subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, directory).encode() + b"\0")
                try:
                    with open(path, "rb") as file:
                        for chunk in iter(lambda: file.read(1 << 20), b""):
                            digest.update(chunk)
                except OSError:
                    digest.update(b"<unreadable>")
                digest.update(b"\0")
    return digest.hexdigest()


def _torchao_identity(torchao_version: str) -> list[str]:
    """What identifies the torchao this process would import: where it is and what it holds."""
    directories = _package_directories()
    content = [*directories, _content_hash(directories)]
    try:
        dist = importlib.metadata.distribution("torchao")
    except importlib.metadata.PackageNotFoundError:
        return [torchao_version, "no distribution", *content]
    record = dist.read_text("RECORD") or ""
    metadata_dir = getattr(dist, "_path", None)  # PathDistribution's .dist-info directory, when it has one
    return [
        torchao_version,
        str(dist.locate_file("")),
        str(metadata_dir),
        hashlib.sha256(record.encode()).hexdigest(),
        _mtime(os.path.join(str(metadata_dir), "METADATA")) if metadata_dir else "-",
        *content,
    ]


def _device_identity(device: torch.device) -> str:
    """The device, and for CUDA which GPU it is: a verdict from an sm_90 node says nothing about an sm_100 one."""
    if device.type != "cuda":
        return str(device)
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    except Exception as error:  # noqa: BLE001 - an unqueryable GPU is keyed as such
        return f"{device} (name and capability unknown: {type(error).__name__})"


def _own_identity() -> list[str]:
    """mxfp8_compat's version and its source files (an editable install changes without a version bump)."""
    from .. import __version__

    package = Path(__file__).resolve().parent.parent
    files = sorted(package.rglob("*.py"))
    return [__version__] + [f"{path.relative_to(package).as_posix()}={_mtime(path)}" for path in files]


def _verdict_key(torchao_version: str, device: torch.device) -> str:
    parts = [
        f"format={_VERDICT_FORMAT}",
        sys.executable,
        platform.python_version(),
        torch.__version__,
        str(getattr(torch, "__file__", "")),
        *_own_identity(),
        *_torchao_identity(torchao_version),
        _device_identity(device),
    ]
    return "\n".join(parts)


def _verdict_path(key: str) -> Path:
    return cache_dir() / f"verdict-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_verdict(path: Path, key: str) -> dict[str, Optional[str]]:
    """The cached verdicts of exactly ``key`` (``"import"`` and one per mode), or {} for none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or "problem" not in data:
        return {}
    modes = data.get("modes", {})
    verdicts = {_IMPORT: data["problem"], **modes} if isinstance(modes, dict) else {}
    if not all(problem is None or isinstance(problem, str) for problem in verdicts.values()):
        return {}
    return verdicts


def _write_verdict(path: Path, key: str, verdicts: dict[str, Optional[str]], torchao_version: str) -> None:
    """Write the verdicts atomically: readers see the old file or the whole new one, never a part."""
    modes = {mode: problem for mode, problem in verdicts.items() if mode != _IMPORT}
    text = json.dumps(
        {"key": key, "problem": verdicts.get(_IMPORT), "modes": modes, "torchao": torchao_version, "torch": torch.__version__}
    )
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
    "from mxfp8_compat.probes.isolated import _child_main; _child_main(sys.argv[2], sys.argv[3], sys.argv[4])"
)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def _events(text: str) -> list[dict[str, object]]:
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _run_child(device: torch.device, modes: list[str]) -> dict[str, tuple[Optional[str], bool]]:
    """Import torchao and resolve ``modes`` in a child: {step: (why it failed or None, whether it may be cached)}.

    Steps are ``"import"`` and mode names; a step the child never reached is absent.
    """
    env = dict(os.environ)
    env.pop(ISOLATE_ENV_VAR, None)
    read_end, write_end = os.pipe()
    command = [sys.executable, "-I", "-c", _CHILD_CODE, json.dumps(list(sys.path)), str(write_end), str(device), json.dumps(modes)]
    death: Optional[str] = None
    definite = False
    try:
        try:
            child = subprocess.run(
                command, capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, env=env, pass_fds=(write_end,)
            )
        except subprocess.TimeoutExpired:
            child, death = None, f"the isolated torchao probe did not finish within {_CHILD_TIMEOUT_S} s"
        except OSError as error:
            child, death = None, f"the isolated torchao probe could not start ({type(error).__name__}: {error})"
    finally:
        os.close(write_end)
    try:
        events = _events(_read_all(read_end))
    finally:
        os.close(read_end)
    if child is not None and child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        definite = -child.returncode in _CRASH_SIGNALS
        death = (
            f"killed the isolated probe process ({name})"
            if definite
            else f"the isolated torchao probe was killed from outside ({name})"
        )
    elif child is not None and child.returncode != 0:
        tail = " ".join(child.stderr.strip().splitlines()[-1:]) or "no output"
        death = f"the isolated torchao probe exited with status {child.returncode} ({tail[:200]})"
    elif child is not None and not any(event.get("survived") is True for event in events):
        death = "the isolated torchao probe exited without reporting a verdict (something in the import ended the process)"

    outcomes: dict[str, tuple[Optional[str], bool]] = {}
    imported = any("imported" in event for event in events)
    if imported:
        outcomes[_IMPORT] = (None, True)
    finished = {event["finished"] for event in events if "finished" in event}
    outcomes.update({mode: (None, True) for mode in modes if mode in finished})
    if death is None:  # survived: every mode it was given is safe to resolve here
        return {_IMPORT: (None, True), **{mode: (None, True) for mode in modes}}
    started = [event["step"] for event in events if "step" in event]
    step = started[-1] if started else _IMPORT
    if step == _IMPORT or not imported:
        if definite:
            death = f"importing torchao {death}"
        outcomes[_IMPORT] = (f"{death}; torchao is not imported in this process", definite)
    elif step not in finished:
        if definite:
            death = f"torchao imported, but resolving mode {step!r} (its smoke runs) {death}"
        else:
            death = f"{death}, while resolving mode {step!r}"
        outcomes[str(step)] = (f"{death}; that mode does not use torchao in this process", definite)
    return outcomes


def _run_torchao_paths(mode: str, device: torch.device) -> None:
    """The torchao part of resolving ``mode`` on ``device``: the row match, and the smoke runs of the
    torchao paths the parent's resolution of ``mode`` would run (native for auto and native, the
    emulation for emulated), built by the same code (:mod:`mxfp8_compat.backends.torchao_paths`)."""
    from ..backends.torchao_paths import smoke_torchao_path
    from ..providers.match import match_generation
    from . import environment

    version = environment.installed_torchao_version()
    match = match_generation(version) if version is not None else None
    if match is None or match.bound is None:
        return
    row = match.bound.generation
    if mode in ("auto", "native") and environment.native_kernel_problem(match.bound, device) is None:
        smoke_torchao_path(match.bound, "native", device, wgrad_with_hp=row.wgrad_with_hp)
    elif mode == "emulated" and row.emulation == "torchao":
        smoke_torchao_path(match.bound, "emulated", device, wgrad_with_hp=row.wgrad_with_hp)


def _child_main(channel_fd: str, device: str, modes: str) -> None:
    """Child side: import torchao, then run each mode's torchao probes (smoke runs included), reporting each step.

    The reports go to the pipe ``channel_fd``, opened before anything else is imported: code
    imported later can print whatever it likes on stdout without forging a verdict.
    """
    channel = os.fdopen(int(channel_fd), "w", buffering=1)

    def report(**event: object) -> None:
        channel.write(json.dumps(event) + "\n")
        channel.flush()

    from . import environment

    report(step=_IMPORT)
    problem = environment.import_problem()  # an import that raises is survivable: the parent catches it too
    report(imported=problem)
    if problem is None:
        for mode in json.loads(modes):
            report(step=mode)
            try:
                _run_torchao_paths(mode, torch.device(device))
            except Exception:  # noqa: BLE001 - an unavailable path is a verdict, not a crash
                pass
            report(finished=mode)
    report(survived=True)
    channel.close()


def isolated_problem(torchao_version: str, device: torch.device, mode: Optional[str] = None) -> Optional[str]:
    """Why this process must not import torchao, or not resolve ``mode`` with it (None: the import only), or None.

    From the cached verdicts, this process's earlier ones, or fresh child runs: a child that
    dies resolving one mode is followed by one for the modes it did not reach.
    """
    key = _verdict_key(torchao_version, device)
    path = _verdict_path(key)
    with _path_locks_guard:
        lock = _path_locks.setdefault(path, threading.Lock())
    with lock:
        cached = _read_verdict(path, key)
        transient = _session.setdefault(key, {})
        verdicts = {**cached, **transient}
        wanted = mode if mode in TORCHAO_MODES else _IMPORT
        while True:
            if verdicts.get(_IMPORT) is not None:
                return verdicts[_IMPORT]
            if wanted in verdicts:
                return verdicts[wanted]
            pending = sorted((m for m in TORCHAO_MODES if m not in verdicts), key=lambda m: m != wanted)
            outcomes = _run_child(device, pending)
            if not outcomes:  # nothing learned (cannot happen with a well-behaved child): do not loop
                outcomes = {_IMPORT: ("the isolated torchao probe reported nothing", False)}
            verdicts.update((step, problem) for step, (problem, _) in outcomes.items())
            transient.update((step, problem) for step, (problem, final) in outcomes.items() if not final)
            definite = {step: problem for step, (problem, final) in outcomes.items() if final}
            if definite:
                cached.update(definite)
                _write_verdict(path, key, cached, torchao_version)
