"""``python -m mxfp8_compat``: report what resolves here, as text or JSON.

Exit status 0 when the requested mode (default auto) resolves, 1 when it does not, so a
downstream CI can run ``python -m mxfp8_compat --mode native || ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Optional, Sequence, TextIO

from .report import environment_report, verdict
from .resolution import MODES

__all__ = ["main", "format_report"]


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


def main(argv: Optional[Sequence[str]] = None, stdout: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mxfp8_compat",
        description="Report which MXFP8 grouped-GEMM path resolves on this machine, and why.",
    )
    parser.add_argument("--mode", choices=MODES, default="auto", help="mode whose resolution sets the exit status (default: auto)")
    parser.add_argument("--device", default=None, help="device to probe, e.g. cpu or cuda:0 (default: current CUDA device, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--validate", action="store_true", help="resolve with validate=True")
    args = parser.parse_args(argv)

    logging.getLogger("mxfp8_compat").addHandler(logging.NullHandler())
    logging.getLogger("mxfp8_compat").propagate = False
    try:
        report = environment_report(args.device, validate=args.validate)
    except ValueError as error:
        parser.error(str(error))
    report["requested_mode"] = args.mode
    if args.json:
        stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        stdout.write(format_report(report, colour=stdout.isatty()) + "\n")
    return 0 if report["modes"][args.mode]["ok"] else 1
