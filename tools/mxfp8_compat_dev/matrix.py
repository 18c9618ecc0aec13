"""The compatibility matrix: records written by real test runs, and the table rendered from them.

    python -m mxfp8_compat_dev.matrix record --env torchao016 --junit junit.xml --dir .tox/matrix-records
    python -m mxfp8_compat_dev.matrix finish --run-dir .tox/matrix-records [--refresh]
    python -m mxfp8_compat_dev.matrix render

(with ``tools/`` on ``sys.path``: tox sets ``PYTHONPATH={tox_root}/tools``; this package is not shipped.)

``record`` runs in a tox env after its pytest run: it resolves every mode on this machine's
device, measures emulated forward/backward SQNR against float64, reads pytest's JUnit XML
for the test counts, and writes ``<dir>/<env>-<device>.json`` with the project commit it ran
at. Records hold no paths of the machine.

``finish`` is the tox ``matrix`` env: it prints the table of the run's records and the
``matrix: N passed, N failed, N skipped`` totals. Only with ``--refresh`` (or
``MXFP8_COMPAT_REFRESH_RECORDS=1``, or ``CI=true``) does it copy them into
``compat_matrix/results/`` and render ``compat_matrix/README.md``: a developer's tox run
leaves the checkout as it was. ``render`` turns every record of ``compat_matrix/results/``
into ``compat_matrix/README.md``. Nothing in ``compat_matrix/`` is written by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mxfp8_compat import MXFP8Unavailable, resolve
from mxfp8_compat.cli import environment_report
from mxfp8_compat.numerics.metrics import float64_forward_backward, forward_backward, sqnr_db
from mxfp8_compat.providers.table import by_key

from . import matrix_totals
from .agreement import reference_agreement

__all__ = ["write_record", "render", "render_records", "totals", "finish", "project_commit", "main"]

DEFAULT_DIR = Path("compat_matrix")
REFRESH_ENV_VAR = "MXFP8_COMPAT_REFRESH_RECORDS"
COMMIT_ENV_VAR = "MXFP8_COMPAT_COMMIT"


def _git(*args: str, cwd: Optional[Path] = None) -> Optional[str]:
    """``git args`` in ``cwd`` (default: the working directory); its stdout, or None if it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def project_commit(cwd: Optional[Path] = None) -> dict[str, Any]:
    """The commit this code runs at: ``{"commit": sha or "unknown", "src_modified": bool or None}``.

    ``$MXFP8_COMPAT_COMMIT`` wins (a copy of the tree without ``.git``, e.g. a GPU machine);
    else ``git rev-parse HEAD``; "unknown" outside a checkout. ``src_modified`` says whether
    ``src/`` differed from that commit (None when unknown).
    """
    explicit = os.environ.get(COMMIT_ENV_VAR)
    if explicit:
        return {"commit": explicit, "src_modified": None}
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if not commit:
        return {"commit": "unknown", "src_modified": None}
    status = _git("status", "--porcelain", "--", "src", cwd=cwd)
    return {"commit": commit, "src_modified": None if status is None else bool(status)}


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
    A = torch.randn(sum(rows), 256, device=device, dtype=torch.bfloat16)
    B = torch.randn(len(rows), 256, 128, device=device, dtype=torch.bfloat16)
    offs = torch.tensor(rows, device=device).cumsum(0).to(torch.int32)
    grad = torch.randn(sum(rows), 128, device=device, dtype=torch.bfloat16)
    actual = forward_backward(res, A, B, offs, grad)
    exact = float64_forward_backward(A, B, offs, grad)
    out_db, grad_a_db, grad_b_db = (sqnr_db(e, a) for e, a in zip(exact, actual))
    return {"ok": True, "emulation": res.emulation, "out_db": out_db, "grad_a_db": grad_a_db, "grad_b_db": grad_b_db}


def write_record(env: str, junit: Optional[Path], out_dir: Path, runner: str, device: Optional[str] = None) -> Path:
    """Write ``<out_dir>/<env>-<device>.json`` for this process's environment and return its path."""
    logging.getLogger("mxfp8_compat").addHandler(logging.NullHandler())
    logging.getLogger("mxfp8_compat").propagate = False
    report = environment_report(device)
    report.pop("torchao_location", None)  # a path of this machine: records are shared
    resolved = torch.device(report["device"])
    record = {
        "env": env,
        "runner": runner,
        "date": datetime.date.today().isoformat(),
        **project_commit(),
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
        "tests": f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped" if tests
        else "no test results (counted as 1 failed)",
        "auto_reason": auto["reasons"][0] if auto["reasons"] else "",
    }


def _device(record: dict[str, Any]) -> str:
    capability = record.get("capability")
    return record["device_name"] if not capability else f"{record['device_name']} (sm_{capability[0]}{capability[1]})"


def _staleness(records: list[dict[str, Any]], repo: Optional[Path]) -> tuple[dict[int, str], Optional[str]]:
    """Per record index, why its commit is not current ("" when it is); and the last commit touching src/.

    A record is stale when the last commit that changed ``src/`` is not an ancestor of (or
    equal to) the commit it was produced at, or when ``src/`` was modified when it ran.
    Outside a checkout nothing can be said and every mark is "".
    """
    last_src = _git("log", "-1", "--format=%H", "--", "src/", cwd=repo)
    marks: dict[int, str] = {}
    for index, record in enumerate(records):
        commit = record.get("commit") or "unknown"
        if last_src is None:
            marks[index] = ""
        elif commit == "unknown":
            marks[index] = "commit unknown"
        elif _git("merge-base", "--is-ancestor", last_src, commit, cwd=repo) is None:
            marks[index] = "stale"
        elif record.get("src_modified"):
            marks[index] = "src modified"
        else:
            marks[index] = ""
    return marks, last_src


def _has_native_path(record: dict[str, Any]) -> bool:
    """Whether the record's generation ships a native kernel (its row's ``native`` column)."""
    row = by_key(record.get("generation"))
    return row is not None and row.native


def _native_footer(records: list[dict[str, Any]]) -> list[str]:
    """What the records say about native MXFP8, computed from them (not assumed)."""
    lines = ["Native MXFP8 (compute capability 10.x, sm_100/sm_103, and a CUDA 12.8+ torchao build):", ""]
    by_device: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_device.setdefault(_device(record), []).append(record)
    for device, group in by_device.items():
        capability = group[0].get("capability")
        capable = bool(capability) and capability[0] == 10
        native = [r["env"] for r in group if r["modes"]["native"]["ok"]]
        auto_native = [r["env"] for r in group if r["modes"]["auto"]["backend"] == "mxfp8"]
        if native:
            text = f"native resolves in {len(native)} of {len(group)} records ({', '.join(native)})"
            text += f"; auto picks it in {len(auto_native)}"
        else:
            autos = sorted({r["modes"]["auto"]["backend"] or "-" for r in group})
            text = f"native resolves in none of {len(group)} records; auto picks {', '.join(autos)}"
        if native and not capable:
            text += " - UNEXPECTED: this device cannot run the sm_100 kernels"
        elif capable and len(native) < sum(1 for r in group if _has_native_path(r)):
            text += " - this device could run native: see the reasons above"
        lines.append(f"- {device}: {text}")
    if not any((r.get("capability") or [0])[0] == 10 for r in records):
        lines += ["", "No record here comes from a compute capability 10.x device, so none shows native MXFP8 running."]
    return lines


def totals(records: list[dict[str, Any]]) -> dict[str, int]:
    """passed / failed / skipped summed over the records' test counts; a record without counts is 1 failed."""
    summary = matrix_totals.summarize(records)
    return {key: summary[key] for key in ("passed", "failed", "skipped")}


def _totals_line(records: list[dict[str, Any]], expected: Sequence[str] = ()) -> str:
    return matrix_totals.totals_line(matrix_totals.summarize(records, expected))


def _read_records(results_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]


def render_records(records: list[dict[str, Any]], repo: Optional[Path] = None) -> str:
    """The Markdown table, reasons and native summary of ``records`` (staleness read from git in ``repo``)."""
    marks, last_src = _staleness(records, repo)
    lines = [
        "| env | torchao | torch | device | generation | auto | native | emulated | SQNR out/dA/dB | vs reference | tests | commit | runner |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for index, record in enumerate(records):
        cell = _cell(record)
        device = _device(record)
        commit = (record.get("commit") or "unknown")[:10]
        if marks[index]:
            commit = f"{commit} ({marks[index]})" if commit != "unknown" else marks[index]
        lines.append(
            f"| {record['env']} | {record['torchao_version'] or 'none'} | {record['torch_version']} | {device} | "
            f"{cell['generation']} | {cell['auto']} | {cell['native']} | {cell['emulated']} | {cell['sqnr']} | "
            f"{cell['vs_reference']} | {cell['tests']} | {commit} | {record['runner']} |"
        )
        if cell["auto_reason"]:
            notes.append(f"- {record['env']} on {device}: auto -> {cell['auto']}: {cell['auto_reason']}")
    if notes:
        lines += ["", "Why `auto` did not pick native MXFP8 (first reason of each record):", ""] + notes
    flagged = [index for index, mark in marks.items() if mark]
    if flagged:
        lines += [
            "",
            f"{len(flagged)} of {len(records)} records were not produced at the current code: the last change to `src/` "
            f"is {(last_src or '?')[:10]}; `stale` records come from an older commit, `commit unknown` ones name none, "
            "`src modified` ones ran on uncommitted changes. Rerun their env to refresh them.",
        ]
    lines += [""] + _native_footer(records) + [""]
    return "\n".join(lines)


def render(results_dir: Path, repo: Optional[Path] = None) -> str:
    """The Markdown of ``compat_matrix/README.md`` from every record in ``results_dir``."""
    records = _read_records(results_dir)
    header = [
        "# Compatibility matrix",
        "",
        "Generated by `python -m mxfp8_compat_dev.matrix render` from the records in `results/`, each written",
        "by `python -m mxfp8_compat_dev.matrix record` at the end of a real test run (a tox env on the CPU, or",
        "the same commands on a GPU machine, `tools/device_matrix.sh`). Do not edit by hand: rerun the env",
        "with records refreshed (`tox -e <env>` then `tox -e matrix -- --refresh`) and render again.",
        "",
        "SQNR is emulated-mode output / input-grad / weight-grad against float64, in dB (torchao accepts",
        ">= 27 / 25 / 24). `auto` is what `resolve()` picks with no arguments. `commit` is the project",
        "commit the record was produced at.",
        "",
        "`vs reference`: torchao's own emulation against mxfp8_compat's reference with the same scale rule",
        "(`mxfp8_compat_dev.agreement.reference_agreement`; n/a where the release has no emulation that runs here).",
        "",
    ]
    return "\n".join(header) + render_records(records, repo)


def _refresh_requested(flag: bool) -> bool:
    if flag or os.environ.get(REFRESH_ENV_VAR, "").strip().lower() in ("1", "true", "yes"):
        return True
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def finish(run_dir: Path, matrix_dir: Path, refresh: bool, out: Any = None, expected: Sequence[str] = ()) -> int:
    """The tox ``matrix`` env: print the run's table and totals; with ``refresh``, update ``matrix_dir``.

    ``expected`` names the envs this run should have recorded: the totals line names those with
    no record as not run (see :mod:`mxfp8_compat_dev.matrix_totals`). Returns 1 when a record has no
    test counts (its env did not run its tests), else 0: failed tests are each env's own exit status.
    """
    out = out or sys.stdout
    records = _read_records(run_dir) if run_dir.is_dir() else []
    if refresh:
        results = matrix_dir / "results"
        results.mkdir(parents=True, exist_ok=True)
        for path in sorted(run_dir.glob("*.json")):
            shutil.copyfile(path, results / path.name)
        text = render(results)
        (matrix_dir / "README.md").write_text(text)
        out.write(text + "\n")
        out.write(f"refreshed {len(records)} records in {results} and rendered {matrix_dir / 'README.md'}\n")
    elif records:
        out.write(f"Records of the tox runs in {run_dir} (compat_matrix/ is left as it is; "
                  f"`tox -e matrix -- --refresh` or {REFRESH_ENV_VAR}=1 copies them there):\n\n")
        out.write(render_records(records) + "\n")
    else:
        out.write(f"no records in {run_dir}: run a test env first (e.g. tox -e notorchao)\n")
    summary = matrix_totals.summarize(records, expected)
    out.write(matrix_totals.totals_line(summary) + "\n")
    return 1 if summary["no_tests"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mxfp8_compat_dev.matrix", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write this environment's record")
    rec.add_argument("--env", required=True, help="env name, e.g. torchao016")
    rec.add_argument("--junit", type=Path, default=None, help="pytest JUnit XML of the env's test run")
    rec.add_argument("--dir", type=Path, default=DEFAULT_DIR / "results")
    rec.add_argument("--runner", default="tox", help="what ran the tests (tox, a GPU machine script)")
    rec.add_argument("--device", default=None)
    fin = sub.add_parser("finish", help="print the run's table and totals; --refresh also updates compat_matrix/")
    fin.add_argument("--run-dir", type=Path, required=True, help="where this run's records were written")
    fin.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    fin.add_argument("--tox-ini", type=Path, default=None,
                     help="name the envs of its [testenv:matrix] depends that left no record as not run")
    fin.add_argument("--refresh", action="store_true",
                     help=f"copy the records into <dir>/results and render <dir>/README.md (also: {REFRESH_ENV_VAR}=1 or CI=true)")
    ren = sub.add_parser("render", help="render compat_matrix/README.md from the records")
    ren.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ren.add_argument("--print", action="store_true", help="also print the table and the totals")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "finish":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # `tox run-parallel -- <pytest args>` hands them to every env, this one included
        print(f"matrix finish: ignoring {' '.join(extra)} (pytest arguments)")
    if args.command == "record":
        path = write_record(args.env, args.junit, args.dir, args.runner, args.device)
        print(f"wrote {path}")
        return 0
    if args.command == "finish":
        expected = matrix_totals.expected_envs(args.tox_ini) if args.tox_ini else ()
        if args.tox_ini and not expected:
            parser.error(f"--tox-ini {args.tox_ini}: no [testenv:matrix] depends found")
        return finish(args.run_dir, args.dir, _refresh_requested(args.refresh), expected=expected)
    text = render(args.dir / "results")
    (args.dir / "README.md").write_text(text)
    if args.print:
        print(text)
        print(_totals_line(_read_records(args.dir / "results")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
