"""resolve() in real programs: evaluation under no_grad, meta-device init, pickling, compiled callers."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from conftest import make_problem, torch_grouped_mm
from mxfp8_compat import MXFP8Unavailable, resolve


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "meta default device", "float64 default dtype"])
def test_first_resolve_does_not_depend_on_the_callers_context(no_torchao, context):
    previous_dtype = torch.get_default_dtype()
    managers = {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "meta default device": lambda: torch.device("meta"),
        "float64 default dtype": torch.no_grad,
    }
    try:
        if context == "float64 default dtype":
            torch.set_default_dtype(torch.float64)
        with managers[context]():
            res = resolve("emulated", device="cpu")
    finally:
        torch.set_default_dtype(previous_dtype)
    assert res.backend == "mxfp8-emulated" and res.smoke_sqnr_db is not None, res.reasons


def test_meta_device_gets_a_clear_verdict(no_torchao):
    res = resolve("auto", device="meta")
    assert res.backend == "bf16" and any("device meta holds no data" in r for r in res.reasons)
    A = torch.empty(64, 32, dtype=torch.bfloat16, device="meta")
    B = torch.empty(2, 32, 16, dtype=torch.bfloat16, device="meta")
    assert res(A, B, torch.empty(2, dtype=torch.int32, device="meta")).shape == (64, 16)
    with pytest.raises(MXFP8Unavailable, match="device meta holds no data"):
        resolve("emulated", device="meta")


def test_cli_on_the_meta_device_answers():
    child = subprocess.run([sys.executable, "-m", "mxfp8_compat", "--device", "meta", "--mode", "emulated"],
                           capture_output=True, text=True, timeout=300)
    assert "Traceback" not in child.stderr, child.stderr
    assert "device meta holds no data" in child.stdout + child.stderr
    assert child.returncode != 0  # the requested mode does not resolve there


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grouped_mm = resolve("off", device="cpu")
        self.weight = torch.nn.Parameter(torch.randn(2, 32, 16, dtype=torch.bfloat16))


def test_a_resolution_pickles_as_its_request_and_re_resolves(no_torchao, tmp_path):
    res = resolve("EMULATED", device=torch.device("cpu"))
    clone = pickle.loads(pickle.dumps(res))
    assert clone is res  # same process, same request: the cached resolution
    layer = _Layer()
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert loaded.grouped_mm.backend == "bf16" and torch.equal(loaded.weight, layer.weight)


def test_unpickling_in_another_process_resolves_there(no_torchao):
    payload = pickle.dumps(resolve("off", device="cpu"))
    code = "import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); print(r.backend, r.mode, r.device)"
    child = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=300)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stdout.decode().split() == ["bf16", "off", "cpu"]


def test_first_resolve_inside_a_compiled_function(no_torchao):
    """The probes cannot be traced: a first resolve() there runs eagerly (one graph break); the GEMM compiles."""
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)

    def step(A, B, offs):
        return resolve("off", device="cpu")(A, B, offs)

    out = torch.compile(step, backend="aot_eager")(p.A, p.B, p.offs)
    assert torch.equal(out, torch_grouped_mm(p.A, p.B, p.offs))
    resolved_outside = resolve("off", device="cpu")
    compiled = torch.compile(lambda A, B, offs: resolved_outside(A, B, offs), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(p.A, p.B, p.offs), out)
