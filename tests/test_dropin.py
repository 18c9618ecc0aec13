"""select_grouped_mm(): the drop-in for code that calls torch._grouped_mm today.

It mirrors NeMo Automodel's ``select_grouped_mm`` (the seed): the same one-time warnings word
for word (the fallback's reasons appended), one message per fallback, any truthy flag, and no
torchao import where no native kernel can run.
"""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pytest
import torch

import fakes
import mxfp8_compat
from conftest import make_problem
from mxfp8_compat import select_grouped_mm
from mxfp8_compat.probes import environment
from mxfp8_compat.dropin import ACTIVE_MESSAGE, FALLBACK_MESSAGE

# NeMo Automodel 0.7.0, nemo_automodel/components/moe/mxfp8.py: the seed's words, copied here so
# that a change to the library's copy fails this test (users filter warnings on these texts).
SEED_ACTIVE = (
    "experts='torch_mm_mxfp8': MXFP8 grouped GEMM active "
    "(routing expert GEMMs through torchao.prototype.moe_training)."
)
SEED_FALLBACK = (
    "experts='torch_mm_mxfp8' requested but MXFP8 grouped GEMM is unavailable "
    "(requires CUDA compute capability >= 10 and an importable "
    "torchao.prototype.moe_training; note torchao may be absent from the base "
    "image). Falling back to torch._grouped_mm."
)


def _user_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_the_messages_are_the_seeds():
    assert ACTIVE_MESSAGE == SEED_ACTIVE and FALLBACK_MESSAGE == SEED_FALLBACK


def test_disabled_returns_torch_grouped_mm_itself():
    assert select_grouped_mm(False) is torch._grouped_mm


def test_requested_but_unavailable_warns_once_with_the_seeds_text_and_the_reason(no_torchao, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="mxfp8_compat"):
        warnings.simplefilter("always")
        first = select_grouped_mm(True)
        second = select_grouped_mm(True)
    assert first is torch._grouped_mm and second is torch._grouped_mm
    [message] = _user_warnings(caught)
    assert message.startswith(SEED_FALLBACK + " Reasons: ")
    assert "torchao is not installed" in message and "device is cpu" in message
    assert not caplog.records, f"one message per fallback, not a log line too: {[r.getMessage() for r in caplog.records]}"


def test_a_filter_keyed_on_the_seeds_text_silences_it(no_torchao):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"experts='torch_mm_mxfp8' requested but MXFP8 grouped GEMM is unavailable")
        select_grouped_mm(True)
    assert _user_warnings(caught) == []


def test_resolve_itself_still_logs_its_fallback(no_torchao, caplog):
    """Only the drop-in's own resolution is quiet (its warning is the message); resolve() logs as before."""
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        mxfp8_compat.resolve("auto", device="cpu", validate=True)
    assert sum("using bf16" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("flag", [True, np.bool_(True), 1, torch.tensor(True)], ids=["bool", "np.bool_", "int", "tensor"])
def test_any_truthy_flag_requests_mxfp8(no_torchao, flag):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_grouped_mm(flag) is torch._grouped_mm
    assert len(_user_warnings(caught)) == 1, "a truthy flag requests MXFP8 (and so warns that it is unavailable)"


@pytest.mark.parametrize("flag", [False, np.bool_(False), 0, None], ids=["bool", "np.bool_", "int", "None"])
def test_any_falsy_flag_is_bf16_without_a_word(flag):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_grouped_mm(flag) is torch._grouped_mm
    assert _user_warnings(caught) == []


@pytest.mark.parametrize("flag", ["yes", "false", b"1"])
def test_a_string_is_a_type_error_naming_the_argument(flag):
    with pytest.raises(TypeError, match="use_mxfp8: expected a bool"):
        select_grouped_mm(flag)


def test_a_flag_without_a_truth_value_is_a_type_error():
    with pytest.raises(TypeError, match="use_mxfp8: expected a bool"):
        select_grouped_mm(torch.tensor([True, False]))


def test_no_torchao_import_on_a_cpu_host(fake_torchao):
    fake_torchao("0.18.0", fakes.import_raising("raise RuntimeError('torchao was imported')"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_grouped_mm(True) is torch._grouped_mm
    assert not any(name == "torchao" or name.startswith("torchao.") for name in sys.modules)
    [message] = _user_warnings(caught)
    assert "torchao 0.18.0 is installed but was not imported" in message


def test_native_engaged_announces_once_with_the_seeds_text(fake_torchao, native_capable_device, monkeypatch):
    fake = fake_torchao("0.18.0", fakes.GEN_018)
    fake.impl.NATIVE_WORKS = True
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = select_grouped_mm(True)
        second = select_grouped_mm(True)
    assert first is second and first is not torch._grouped_mm
    [message] = _user_warnings(caught)
    assert message.startswith(SEED_ACTIVE) and "torchao 0.18.0" in message
    problem = make_problem(group_rows=(32, 64, 0, 32), k=64, n=32, requires_grad=False)
    out = first(problem.A, problem.B, problem.offs)
    assert out.shape == (128, 32) and torch.isfinite(out).all()
    assert fake.impl.CALLS, "the native entry ran"


def test_reset_lets_the_warning_come_again(no_torchao):
    """reset() forgets the once-only warning, as it forgets cached resolutions and logs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_grouped_mm(True)
        mxfp8_compat.reset()
        select_grouped_mm(True)
    assert len(_user_warnings(caught)) == 2
