"""python -m mxfp8_compat shows both native MXFP8 providers, torchao and torch, with verdicts and reasons."""

from __future__ import annotations

import io
import json

import pytest

import torch_sm100_standin as standin
from mxfp8_compat.backends import torch_native
from mxfp8_compat.cli import main


def test_json_shows_both_providers_with_reasons(no_torchao, monkeypatch):
    monkeypatch.delenv("MXFP8_COMPAT_PROVIDER", raising=False)
    out = io.StringIO()
    main(["--json", "--device", "cpu"], stdout=out)
    providers = json.loads(out.getvalue())["providers"]
    assert set(providers) == {"torchao", "torch"}
    assert providers["torchao"]["ok"] is False and providers["torchao"]["reasons"] == ["torchao is not installed"]
    assert providers["torch"]["ok"] is False and providers["torch"]["reasons"]
    assert all(reason.startswith("torch provider: ") for reason in providers["torch"]["reasons"])


def test_text_names_the_provider_that_runs(no_torchao, monkeypatch, native_capable_device):
    pytest.importorskip("triton")
    if torch_native.match_torch_generation().row is None:
        pytest.skip("no torch MXFP8 row for this torch")
    monkeypatch.delenv("MXFP8_COMPAT_PROVIDER", raising=False)
    monkeypatch.setattr(torch_native, "torch_kernel_problem", lambda row, device: None)
    out = io.StringIO()
    with standin.install():
        status = main(["--mode", "native", "--device", "cpu"], stdout=out)
    text = out.getvalue()
    assert status == 0
    assert "provider torch   : ok" in text and "provider torchao : unavailable" in text
    assert "torch" in text.splitlines()[-1] and "own grouped GEMM" in text.splitlines()[-1]
