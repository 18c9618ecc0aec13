"""``python -m mxfp8_compat`` (or the console script ``mxfp8-compat``): report what resolves here, as text or JSON.

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
from typing import Any, Optional, Sequence, TextIO

__all__ = ["main", "format_report", "build_parser"]

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
    from .report import verdict

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

    from .report import environment_report  # imports torch: only after the arguments parsed

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
