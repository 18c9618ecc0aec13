"""``python -m mxfp8_compat`` (or the console script ``mxfp8-compat``): report what resolves here, as text or JSON.

The report itself (:func:`environment_report`, one JSON-ready dict) is here too: the CLI prints it,
the compat-matrix records (``tools/mxfp8_compat_dev/matrix.py``) store it.

Exit status 0 when the requested mode (default auto) resolves, 1 when it does not, so a
downstream CI can run ``python -m mxfp8_compat --mode native || ...``; 2 for a usage error.
Arguments are parsed before torch is imported: ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import platform
from typing import TYPE_CHECKING, Any, Optional, Sequence, TextIO, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["main", "format_report", "build_parser", "environment_report", "verdict"]

# resolution.MODES, spelled out so that parsing imports no torch (tests/test_cli.py keeps them equal)
MODES = ("auto", "native", "emulated", "off")

_EPILOG = """\
The report lists python, torch and torchao (version and location), the device and its compute
capability, the adapter-table row torchao matched, and for every mode the backend it resolves
to, the smoke run's SQNR in dB and every reason a faster path was not taken.

exit status: 0 when --mode resolves here, 1 when it does not, 2 for a usage error. A CI can
gate on it: %(prog)s --mode native || echo "no native MXFP8 here"

isolation: the report imports torchao and runs its smoke runs in a child process first (a
torchao that aborts at import is reported, not fatal); --no-isolate skips that.
MXFP8_COMPAT_ISOLATE=1 does the same for resolve() in your own programs; MXFP8_COMPAT_CACHE_DIR
is where those verdicts are cached. Same report: python -m mxfp8_compat, or the console script mxfp8-compat.
"""


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if colour else text


def _sqnr(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f} dB"


def _backend_label(entry: dict[str, Any]) -> str:
    label = entry["backend"] or "unavailable"
    return f"{label} ({entry['emulation']})" if entry["emulation"] else label


def format_report(report: dict[str, Any], *, colour: bool = False) -> str:
    """The human-readable report."""
    capability = report["capability"]
    lines = [
        f"python        {report['python']}",
        f"torch         {report['torch_version']}",
        f"torchao       {report['torchao_version'] or 'not installed'}"
        + (f"  ({report['torchao_location']})" if report["torchao_location"] else ""),
        f"device        {report['device']} ({report['device_name']})"
        + (f", compute capability {capability[0]}.{capability[1]}" if capability else ""),
        f"generation    {report['generation'] or '-'}",
    ]
    for reason in report["generation_reasons"]:
        lines.append(f"              {reason}")
    lines.append("")
    labels = {mode: _backend_label(entry) for mode, entry in report["modes"].items()}
    width = max(len(label) for label in labels.values()) if labels else 0
    for mode, entry in report["modes"].items():
        # Pad the plain label, then colour it: escape codes must not count towards the width.
        shown = _paint(labels[mode], "32" if entry["ok"] else "31", colour) + " " * (width - len(labels[mode]))
        lines.append(f"{mode:<9} -> {shown}  smoke {_sqnr(entry['smoke_sqnr_db'])}")
        for reason in entry["reasons"]:
            lines.append(f"             - {reason}")
    lines.append("")
    for name, entry in report.get("providers", {}).items():  # native MXFP8, one provider each
        shown = _paint("ok" if entry["ok"] else "unavailable", "32" if entry["ok"] else "31", colour)
        lines.append(f"provider {name:<8}: {shown}  smoke {_sqnr(entry['smoke_sqnr_db'])}")
        for reason in entry["reasons"]:
            lines.append(f"             - {reason}")
    lines.append("")
    lines.append(f"verdict: {verdict(report)}")
    return "\n".join(lines)


def _prog(argv0: str) -> str:
    """The command this was run as: ``python -m mxfp8_compat`` or the console script's name."""
    name = os.path.basename(argv0 or "")
    if not name or name in ("__main__.py", "-c") or name.endswith(".py"):
        return "python -m mxfp8_compat"
    return name


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or _prog(sys.argv[0]),
        description="Report which MXFP8 grouped-GEMM path resolves on this machine for every mode, and why.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="the mode whose resolution sets the exit status; every mode is reported (default: auto)")
    parser.add_argument("--device", default=None,
                        help="device to probe, e.g. cpu or cuda:1 (default: the current CUDA device, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the same fields) instead of text")
    parser.add_argument("--validate", action="store_true",
                        help="resolve with validate=True: the callables also check offs' values (a device sync on a GPU)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="import torchao in this process (default: first in a child process, so that a torchao "
                             "that aborts at import is reported, not fatal)")
    return parser


def main(argv: Optional[Sequence[str]] = None, stdout: Optional[TextIO] = None, prog: Optional[str] = None) -> int:
    stdout = stdout or sys.stdout
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    # environment_report imports torch: only after the arguments parsed
    logging.getLogger("mxfp8_compat").addHandler(logging.NullHandler())
    logging.getLogger("mxfp8_compat").propagate = False
    try:
        report = environment_report(args.device, validate=args.validate, isolate=args.isolate)
    except ValueError as error:
        parser.error(str(error))
    report["requested_mode"] = args.mode
    if args.json:
        stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        stdout.write(format_report(report, colour=stdout.isatty()) + "\n")
    return 0 if report["modes"][args.mode]["ok"] else 1


# --- the environment report: what resolves here for every mode, as one JSON-ready dict -----------
# (the CLI's text and JSON, and the compat-matrix records). Imports torch inside, on first use.


def _torchao_location() -> Optional[str]:
    module = sys.modules.get("torchao")
    return getattr(module, "__file__", None) if module is not None else None


def _mode_entry(
    mode: str, device: "torch.device", validate: bool, provider: Optional[str] = None, isolate: Optional[bool] = None
) -> dict[str, Any]:
    from .errors import MXFP8Unavailable
    from .resolution import resolve

    try:
        resolution = resolve(mode, device=device, validate=validate, provider=provider, isolate=isolate)
    except MXFP8Unavailable as error:
        return {"ok": False, "backend": None, "generation": None, "emulation": None,
                "reasons": list(error.reasons), "smoke_sqnr_db": None, "provider": None}
    return {
        "ok": True,
        "backend": resolution.backend,
        "generation": resolution.generation.key if resolution.generation else None,
        "emulation": resolution.emulation,
        "reasons": list(resolution.reasons),
        "smoke_sqnr_db": resolution.smoke_sqnr_db,
        "provider": resolution.provider,
    }


def environment_report(
    device: "Union[str, torch.device, None]" = None, validate: bool = False, isolate: Optional[bool] = None
) -> dict[str, Any]:
    """Resolve every mode on ``device`` and describe the environment.

    ``isolate`` is resolve()'s (None: ``MXFP8_COMPAT_ISOLATE``); the CLI passes True, so that
    the one tool meant to explain a crashing torchao survives it.

    Keys: ``python``, ``platform``, ``torch_version``, ``torchao_version``,
    ``torchao_location``, ``device``, ``device_name``, ``capability``, ``generation``
    (row matched, or None), ``generation_reasons``, and ``modes`` mapping each mode to
    ``{ok, backend, generation, emulation, reasons, smoke_sqnr_db, provider}``, and ``providers``
    mapping each native MXFP8 provider ("torchao", "torch") to its ``native`` verdict, same keys.
    """
    import torch

    from .probes import environment
    from .providers.match import match_generation
    from .resolution import MODES as RESOLVE_MODES, PROVIDERS, normalise_device

    resolved_device = normalise_device(device)
    modes = {mode: _mode_entry(mode, resolved_device, validate, isolate=isolate) for mode in RESOLVE_MODES}
    providers = {
        name: _mode_entry("native", resolved_device, validate, provider=name, isolate=isolate) for name in PROVIDERS
    }
    torchao_version = environment.installed_torchao_version()
    match = match_generation(torchao_version) if torchao_version and "torchao.prototype.moe_training" in sys.modules else None
    capability = environment.device_capability(resolved_device)
    if resolved_device.type == "cuda":
        device_name = torch.cuda.get_device_name(resolved_device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "torchao_version": torchao_version,
        "torchao_location": _torchao_location(),
        "device": str(resolved_device),
        "device_name": device_name,
        "capability": list(capability) if capability else None,
        "generation": match.bound.generation.key if match and match.bound else None,
        "generation_reasons": list(match.reasons) if match else [],
        "modes": modes,
        "providers": providers,
    }


def verdict(report: dict[str, Any]) -> str:
    """One line: the fastest path that resolves here."""
    auto = report["modes"]["auto"]
    if auto["backend"] == "mxfp8" and auto.get("provider") == "torch":
        return f"native MXFP8 (torch {report['torch_version']}'s own grouped GEMM, mxfp8_compat's quantisers) is active"
    if auto["backend"] == "mxfp8":
        return f"native MXFP8 (torchao {report['torchao_version']}, generation {auto['generation']}) is active"
    emulated = report["modes"]["emulated"]
    tail = "emulated MXFP8 available for numerics checks" if emulated["ok"] else "emulated MXFP8 unavailable"
    return f"bf16 grouped GEMM in auto mode ({tail})"
