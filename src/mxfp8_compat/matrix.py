"""The compatibility matrix: records written by real test runs, and the table rendered from them.

    python -m mxfp8_compat.matrix record --env torchao016 --junit junit.xml
    python -m mxfp8_compat.matrix render

``record`` runs in a tox env after its pytest run: it resolves every mode on this machine's
device, measures emulated forward/backward SQNR against float64, reads pytest's JUnit XML
for the test counts, and writes ``compat_matrix/results/<env>-<device>.json``.
``render`` turns every record into ``compat_matrix/README.md``. Nothing in
``compat_matrix/`` is written by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .agreement import reference_agreement
from .errors import MXFP8Unavailable
from .reference import grouped_mm_float64, sqnr_db
from .report import environment_report
from .resolution import resolve

__all__ = ["write_record", "render", "main"]

DEFAULT_DIR = Path("compat_matrix")


def device_tag(device: torch.device) -> str:
    """``cpu``, or ``sm<major><minor>`` for a CUDA device (the file-name part of a record)."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def junit_counts(path: Optional[Path]) -> Optional[dict[str, int]]:
    """passed / failed / skipped from a pytest JUnit XML file (None when there is none)."""
    if path is None or not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def emulated_sqnr(device: torch.device) -> dict[str, Any]:
    """Emulated-mode SQNR (dB) of output and both gradients against float64, on fresh random inputs."""
    try:
        res = resolve("emulated", device=device)
    except MXFP8Unavailable as error:
        return {"ok": False, "reasons": list(error.reasons)}
    rows = (128, 64, 192, 128)
    torch.manual_seed(20261125)  # the same inputs in every env, so SQNRs compare across releases
    A = torch.randn(sum(rows), 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(len(rows), 256, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)
    grad = torch.randn(sum(rows), 128, device=device, dtype=torch.bfloat16)
    out = res(A, B, offs)
    out.backward(grad)
    A64 = A.detach().double().requires_grad_(True)
    B64 = B.detach().double().requires_grad_(True)
    ref = grouped_mm_float64(A64, B64, offs)
    ref.backward(grad.double())
    return {
        "ok": True,
        "emulation": res.emulation,
        "out_db": sqnr_db(ref, out),
        "grad_a_db": sqnr_db(A64.grad, A.grad),
        "grad_b_db": sqnr_db(B64.grad, B.grad),
    }


def write_record(env: str, junit: Optional[Path], out_dir: Path, runner: str, device: Optional[str] = None) -> Path:
    """Write ``<out_dir>/<env>-<device>.json`` for this process's environment and return its path."""
    logging.getLogger("mxfp8_compat").addHandler(logging.NullHandler())
    logging.getLogger("mxfp8_compat").propagate = False
    report = environment_report(device)
    resolved = torch.device(report["device"])
    record = {
        "env": env,
        "runner": runner,
        "date": datetime.date.today().isoformat(),
        **report,
        "emulated_sqnr": emulated_sqnr(resolved),
        "reference_agreement": reference_agreement(resolved),
        "tests": junit_counts(junit),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{env}-{device_tag(resolved)}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _db(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _cell(record: dict[str, Any]) -> dict[str, str]:
    modes = record["modes"]
    auto = modes["auto"]
    emulated = record["emulated_sqnr"]
    tests = record.get("tests")
    if emulated.get("ok"):
        emu = f"yes ({emulated['emulation']})"
        sqnr = f"{_db(emulated['out_db'])} / {_db(emulated['grad_a_db'])} / {_db(emulated['grad_b_db'])}"
    else:
        emu, sqnr = "no", "-"
    agreement = record.get("reference_agreement") or {}
    if not agreement.get("applicable"):
        vs_reference = "n/a"
    elif agreement["bitwise_equal"]:
        vs_reference = "bitwise"
    else:
        vs_reference = f"max {agreement['max_ulp']:g} ulp"
    return {
        "vs_reference": vs_reference,
        "generation": modes["emulated"].get("generation") or record.get("generation") or "-",
        "auto": auto["backend"] or "-",
        "native": "yes" if modes["native"]["ok"] else "no",
        "emulated": emu,
        "sqnr": sqnr,
        "smoke": _db(modes["emulated"].get("smoke_sqnr_db")),
        "tests": f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped" if tests else "-",
        "auto_reason": auto["reasons"][0] if auto["reasons"] else "",
    }


def render(results_dir: Path) -> str:
    """The Markdown of ``compat_matrix/README.md`` from every record in ``results_dir``."""
    records = [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]
    lines = [
        "# Compatibility matrix",
        "",
        "Generated by `python -m mxfp8_compat.matrix render` from the records in `results/`, each written",
        "by `python -m mxfp8_compat.matrix record` at the end of a real test run (a tox env on the CPU, or",
        "the same commands on the GPU machine). Do not edit by hand: rerun the env and render again.",
        "",
        "SQNR is emulated-mode output / input-grad / weight-grad against float64, in dB (torchao accepts",
        ">= 27 / 25 / 24). `auto` is what `resolve()` picks with no arguments.",
        "",
        "`vs reference`: torchao's own emulation against mxfp8_compat's reference with the same scale rule",
        "(`mxfp8_compat.agreement.reference_agreement`; n/a where the release has no emulation that runs here).",
        "",
        "| env | torchao | torch | device | generation | auto | native | emulated | SQNR out/dA/dB | vs reference | tests | runner |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for record in records:
        cell = _cell(record)
        capability = record.get("capability")
        device = record["device_name"] if not capability else f"{record['device_name']} (sm_{capability[0]}{capability[1]})"
        lines.append(
            f"| {record['env']} | {record['torchao_version'] or 'none'} | {record['torch_version']} | {device} | "
            f"{cell['generation']} | {cell['auto']} | {cell['native']} | {cell['emulated']} | {cell['sqnr']} | "
            f"{cell['vs_reference']} | {cell['tests']} | {record['runner']} |"
        )
        if cell["auto_reason"]:
            notes.append(f"- {record['env']} on {device}: auto -> {cell['auto']}: {cell['auto_reason']}")
    lines += ["", "Why `auto` did not pick native MXFP8 (first reason of each record):", ""] + notes
    lines += [
        "",
        "Not shown by any record here: native MXFP8 itself. It needs compute capability 10.x (B200/GB200,",
        "sm_100/sm_103) and a CUDA 12.8+ torchao build; the GPU rows come from an H100 (sm_90), where",
        "`native` must be (and is) unavailable and `auto` must pick bf16.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxfp8_compat.matrix", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write this environment's record")
    rec.add_argument("--env", required=True, help="env name, e.g. torchao016")
    rec.add_argument("--junit", type=Path, default=None, help="pytest JUnit XML of the env's test run")
    rec.add_argument("--dir", type=Path, default=DEFAULT_DIR / "results")
    rec.add_argument("--runner", default="tox", help="what ran the tests (tox, device tool)")
    rec.add_argument("--device", default=None)
    ren = sub.add_parser("render", help="render compat_matrix/README.md from the records")
    ren.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ren.add_argument("--print", action="store_true", help="also print the table")
    args = parser.parse_args(argv)
    if args.command == "record":
        path = write_record(args.env, args.junit, args.dir, args.runner, args.device)
        print(f"wrote {path}")
        return 0
    text = render(args.dir / "results")
    (args.dir / "README.md").write_text(text)
    if args.print:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
