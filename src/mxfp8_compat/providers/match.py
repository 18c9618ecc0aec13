"""Row matching: which row of the adapter table fits the installed torchao, and its entry.

A version inside a row's range must pass that row's fingerprint; a version newer than every
row (a nightly, the next release) is matched by fingerprint, newest row first. Reads only the
rows' columns, the same way for every row.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from packaging.version import InvalidVersion, Version

from ..probes.environment import one_line
from .schema import Generation, GroupedMMCall, Kernel
from .table import GENERATIONS

__all__ = ["BoundEntry", "GenerationMatch", "match_generation"]


@dataclass(frozen=True)
class BoundEntry:
    """A generation row together with the torchao callable it was matched to."""

    generation: Generation
    entry: Callable[..., Any]
    location: str  # "module.attribute"
    module: Any

    def bind(self, kernel: Kernel, wgrad_with_hp: bool) -> GroupedMMCall:
        return self.generation.bind(self.entry, kernel, wgrad_with_hp)


@dataclass(frozen=True)
class GenerationMatch:
    """Outcome of matching the installed torchao against the adapter table."""

    bound: Optional[BoundEntry]
    reasons: tuple[str, ...]  # failures, and how a row was chosen when not by version


def _locate(generation: Generation) -> tuple[Optional[BoundEntry], list[str]]:
    problems: list[str] = []
    for module_name, attribute in generation.entry_points:
        location = f"{module_name}.{attribute}"
        try:
            module = importlib.import_module(module_name)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001
            problems.append(f"{module_name} does not import ({type(error).__name__})")
            continue
        entry = getattr(module, attribute, None)
        if entry is None:
            problems.append(f"{location} is missing")
            continue
        try:
            params = generation.params(entry)
        except (TypeError, ValueError) as error:
            problems.append(f"{location} has no readable signature ({one_line(error)})")
            continue
        mismatch = generation.fingerprint_mismatch(params)
        if mismatch:
            problems.append(f"{location}: {mismatch}")
            continue
        owner = sys.modules.get(getattr(entry, "__module__", "") or "", module)
        return BoundEntry(generation, entry, location, owner), problems
    return None, problems


def match_generation(version: str, table: tuple[Generation, ...] = GENERATIONS) -> GenerationMatch:
    """Find the adapter row for torchao ``version`` and check its entry's signature.

    A version inside a row's range must pass that row's fingerprint. A version newer than
    every row (a nightly, the next release) is matched by fingerprint, newest row first.
    """
    try:
        parsed = Version(version)
    except InvalidVersion:
        return GenerationMatch(None, (f"torchao version {version!r} is not a valid version string",))
    release = Version(parsed.base_version)
    in_range = [row for row in table if row.versions.contains(parsed, prereleases=True)]
    oldest = min(table, key=lambda row: _lowest(row))
    newest = max(table, key=lambda row: _lowest(row))
    if in_range:
        candidates, how = in_range, None
    elif release < _lowest(oldest):
        return GenerationMatch(
            None,
            (f"torchao {version} is older than the oldest supported generation ({oldest.key}: {oldest.versions}); "
             "it has no MXFP8 grouped GEMM",),
        )
    elif release >= _lowest(newest):
        candidates = list(table)
        how = f"torchao {version} is newer than the adapter table (newest row {newest.key}); matched by signature fingerprint"
    else:
        candidates = list(table)
        how = f"torchao {version} falls between the adapter table's rows; matched by signature fingerprint"
    reasons: list[str] = []
    for row in candidates:
        bound, problems = _locate(row)
        if bound is not None:
            if how:
                reasons.append(f"{how}: row {row.key} ({bound.location})")
            return GenerationMatch(bound, tuple(reasons))
        reasons.append(f"generation {row.key} does not fit torchao {version}: " + "; ".join(problems))
    return GenerationMatch(None, tuple(reasons))


def _lowest(row: Generation) -> Version:
    bounds = [Version(spec.version) for spec in row.versions if spec.operator in (">=", "==", "~=")]
    return Version(min(bounds).base_version)
