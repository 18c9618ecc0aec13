"""The ``matrix: N passed, N failed, N skipped`` line, with every env that did not run its tests named.

No torch here: ``.ci/run`` loads this file by path with a bare ``python3`` to print the totals of
the records a CI run produced, and ``python -m mxfp8_compat_dev.matrix finish`` prints the same line.

* A record without test counts (its env wrote a record but pytest never ran or left no JUnit
  XML, e.g. ``commands_pre`` failed) counts as **one failed test** and is named.
* An env the run was expected to produce (the tox ``matrix`` env's ``depends``) with no record
  is named as not run: ``main`` is left out by design when no torchao source is given
  (``MXFP8_COMPAT_TORCHAO_SRC``), any other missing env "has no record in this run".
"""

from __future__ import annotations

import configparser
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

__all__ = ["SOURCE_ENV_VAR", "GATED_ENVS", "summarize", "totals_line", "expected_envs", "read_records"]

SOURCE_ENV_VAR = "MXFP8_COMPAT_TORCHAO_SRC"
# env -> the variable without which it is left out of the default run (toxfile.py does the leaving out)
GATED_ENVS = {"main": SOURCE_ENV_VAR}


def read_records(results_dir: Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob(pattern))]


def expected_envs(tox_ini: Path) -> list[str]:
    """The envs whose records the tox ``matrix`` env waits for (its ``depends``), in order."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(tox_ini)
    depends = ini.get("testenv:matrix", "depends", fallback="")
    return [name.strip() for name in depends.replace("\n", ",").split(",") if name.strip()]


def summarize(records: Iterable[dict[str, Any]], expected: Iterable[str] = (),
              environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Counts over ``records`` plus ``no_tests`` (env names, each counted failed) and ``not_run`` ({env: why})."""
    environ = os.environ if environ is None else environ
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    no_tests: list[str] = []
    seen: set[str] = set()
    for record in records:
        env = str(record.get("env", "?"))
        seen.add(env)
        tests = record.get("tests")
        if not tests:
            no_tests.append(env)
            counts["failed"] += 1
            continue
        for key in counts:
            counts[key] += int(tests.get(key, 0))
    not_run: dict[str, str] = {}
    for env in expected:
        if env in seen:
            continue
        variable = GATED_ENVS.get(env)
        if variable and not environ.get(variable, "").strip():
            not_run[env] = f"left out: {variable} is not set (a pytorch/ao checkout or .tar.gz; see docs/testing.md)"
        else:
            not_run[env] = "no record in this run"
    return {**counts, "no_tests": no_tests, "not_run": not_run}


def totals_line(summary: Mapping[str, Any]) -> str:
    line = f"matrix: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped"
    if summary["no_tests"]:
        line += f"; no test results, each counted as 1 failed: {', '.join(summary['no_tests'])}"
    if summary["not_run"]:
        line += "; not run: " + ", ".join(f"{env} ({why})" for env, why in summary["not_run"].items())
    return line
