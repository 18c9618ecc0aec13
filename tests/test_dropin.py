"""select_grouped_mm(): the drop-in for code that calls torch._grouped_mm today."""

from __future__ import annotations

import warnings

import pytest
import torch

import mxfp8_compat
from mxfp8_compat import select_grouped_mm


def test_disabled_returns_torch_grouped_mm_itself():
    assert select_grouped_mm(False) is torch._grouped_mm


def test_requested_but_unavailable_warns_once_with_the_reason(no_torchao):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = select_grouped_mm(True)
        second = select_grouped_mm(True)
    assert first is torch._grouped_mm and second is torch._grouped_mm
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "torchao is not installed" in messages[0]


def test_non_bool_is_a_type_error():
    with pytest.raises(TypeError, match="use_mxfp8: expected a bool"):
        select_grouped_mm("yes")  # type: ignore[arg-type]


def test_reset_lets_the_warning_come_again(no_torchao):
    """reset() forgets the once-only warning, as it forgets cached resolutions and logs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_grouped_mm(True)
        mxfp8_compat.reset()
        select_grouped_mm(True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
