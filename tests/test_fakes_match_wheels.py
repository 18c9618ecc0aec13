"""The fake of the installed release's generation has that wheel's call and autograd shape.

``tests/support/fakes.py`` models every generation so that the adapter logic runs in every env. A fake written
from one reading of a wheel can be wrong in exactly the way the code it tests is wrong (0.15's fake
returned 8 gradients, as the shim assumed; the wheel returns 6). So, in each env with a real torchao,
this compares the fake of that env's generation with the wheel, for every entry the fake defines:
the entry's parameters, how many arguments it passes to ``_MXFP8GroupedMM.apply``, how many inputs
that Function's ``forward`` takes and how many gradients its ``backward`` returns (read from the
source of both).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Optional

import pytest

import fakes
from mxfp8_compat import GENERATIONS
from mxfp8_compat.probes import environment
from mxfp8_compat.providers import match as matching

INSTALLED = environment.installed_torchao_version()
EXPECT_GENERATION = os.environ.get("MXFP8_COMPAT_EXPECT_GENERATION")

pytestmark = pytest.mark.torchao  # skipped where no torchao is installed (conftest)

FAKES = {
    "0.18": fakes.GEN_018,
    "0.17": fakes.GEN_017,
    "0.16": fakes.GEN_016,
    "0.15": fakes.GEN_015,
    "0.14": fakes.GEN_014,
    "0.13": fakes.GEN_013,
}
_ENTRY_NAMES = ("_to_mxfp8_then_scaled_grouped_mm", "_quantize_then_scaled_grouped_mm", "_scaled_grouped_mm")
_FUNCTION = "_MXFP8GroupedMM"


@dataclass(frozen=True)
class AutogradShape:
    entry_parameters: tuple[str, ...]
    apply_arguments: Optional[int]  # None: the entry is the Function's apply itself
    forward_inputs: int
    backward_gradients: int


def _tree(function: Any) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(function))))


def _returned_tuple_lengths(function: Any) -> set[int]:
    return {len(node.value.elts) for node in ast.walk(_tree(function)) if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)}


def _apply_argument_counts(function: Any) -> set[int]:
    counts = set()
    for node in ast.walk(_tree(function)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "apply"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == _FUNCTION
        ):
            assert not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args), ast.unparse(node)
            counts.add(len(node.args))
    return counts


def autograd_shape(module: Any, entry_name: str) -> AutogradShape:
    function = getattr(module, _FUNCTION)
    forward = tuple(inspect.signature(function.forward).parameters)[1:]  # without ctx
    gradients = _returned_tuple_lengths(function.backward)
    assert len(gradients) == 1, f"{module.__name__}.{_FUNCTION}.backward returns tuples of lengths {gradients}"
    entry = getattr(module, entry_name)
    if getattr(entry, "__self__", None) is function:  # an `.apply` alias
        return AutogradShape(forward, None, len(forward), gradients.pop())
    counts = _apply_argument_counts(entry)
    assert len(counts) == 1, f"{entry_name} calls {_FUNCTION}.apply with {counts} arguments"
    return AutogradShape(tuple(inspect.signature(entry).parameters), counts.pop(), len(forward), gradients.pop())


def _key() -> str:
    if EXPECT_GENERATION:
        return EXPECT_GENERATION
    match = matching.match_generation(INSTALLED)
    assert match.bound is not None, match.reasons
    return match.bound.generation.key


def _entries(files: dict[str, str], module_name: str) -> list[str]:
    source = files[module_name.replace(".", "/") + ".py"]
    return [name for name in _ENTRY_NAMES if re.search(rf"^\s*(def {name}\(|{name} = {_FUNCTION}\.apply)", source, re.M)]


@pytest.fixture
def wheel_shapes() -> tuple[str, str, list[str], dict[str, AutogradShape]]:
    """The wheel's shapes, read before any fake is installed (re-importing torchao after the fake
    fixture purged it would register its custom ops twice)."""
    key = _key()
    row = next(row for row in GENERATIONS if row.key == key)
    module_name = row.entry_points[0][0]
    entries = _entries(FAKES[key], module_name)
    assert row.entry_points[0][1] in entries, f"the fake of {key} lacks the entry its row binds"
    wheel_module = importlib.import_module(module_name)
    assert environment.installed_torchao_version() == INSTALLED
    return key, module_name, entries, {name: autograd_shape(wheel_module, name) for name in entries}


def test_fake_has_the_wheels_autograd_shape(wheel_shapes, fake_torchao):
    key, module_name, entries, wheel = wheel_shapes
    for name, shape in wheel.items():  # what autograd needs of the wheel itself
        if shape.apply_arguments is not None:
            assert shape.apply_arguments <= shape.forward_inputs, (name, shape)
            assert shape.apply_arguments <= shape.backward_gradients, (name, shape)
    fake_torchao(INSTALLED, FAKES[key])
    fake_module = importlib.import_module(module_name)
    assert "site-packages" not in (fake_module.__file__ or ""), fake_module.__file__
    fake = {name: autograd_shape(fake_module, name) for name in entries}
    assert fake == wheel
