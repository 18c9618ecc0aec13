"""Bad input: a clear exception naming the argument, in every mode, before any kernel."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_problem
from mxfp8_compat import resolve

MODES = ["off", "emulated", "auto"]


def _inputs():
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)
    return p.A, p.B, p.offs


BAD_METADATA = [
    ("A is 3D", lambda A, B, o: (A[None], B, o), ValueError, r"A: expected a 2D \(M, K\) tensor"),
    ("B is 2D", lambda A, B, o: (A, B[0], o), ValueError, r"B: expected a 3D \(E, K, N\) tensor"),
    ("offs int64", lambda A, B, o: (A, B, o.long()), TypeError, "offs: expected dtype torch.int32"),
    ("offs 2D", lambda A, B, o: (A, B, o[None]), ValueError, r"offs: expected a 1D"),
    ("offs too short", lambda A, B, o: (A, B, o[:1]), ValueError, "offs: expected length E=2"),
    ("K mismatch", lambda A, B, o: (A[:, :32], B, o), ValueError, "B: expected K=32"),
    ("dtype mismatch", lambda A, B, o: (A, B.float(), o), TypeError, "B: expected the dtype of A"),
    ("float16", lambda A, B, o: (A.half(), B.half(), o), TypeError, "A: expected dtype torch.bfloat16 or torch.float32"),
    ("A not a tensor", lambda A, B, o: (A.tolist(), B, o), TypeError, "A: expected a torch.Tensor, got list"),
    ("offs a list", lambda A, B, o: (A, B, [32, 64]), TypeError, "offs: expected a torch.Tensor"),
    ("devices differ", lambda A, B, o: (A, B.to("meta"), o), ValueError, "expected one device"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, mutate, error, message", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_metadata_errors_name_the_argument(no_torchao, mode, case, mutate, error, message):
    fn = resolve(mode, device="cpu")
    with pytest.raises(error, match=message):
        fn(*mutate(*_inputs()))


@pytest.mark.parametrize("mode", MODES)
def test_bad_out_dtype(no_torchao, mode):
    with pytest.raises(TypeError, match="out_dtype: expected torch.bfloat16 or torch.float32"):
        resolve(mode, device="cpu")(*_inputs(), out_dtype=torch.float16)


@pytest.mark.parametrize("mode", MODES)
def test_value_checks_with_validate(no_torchao, mode):
    A, B, offs = _inputs()
    fn = resolve(mode, device="cpu", validate=True)
    with pytest.raises(ValueError, match=r"offs: expected offs\[-1\] == M == 64"):
        fn(A, B, torch.tensor([32, 48], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs: expected non-decreasing"):
        fn(A, B, torch.tensor([64, 32], dtype=torch.int32))


def test_mxfp8_shape_requirements_raise_in_emulated_mode(no_torchao):
    p = make_problem(group_rows=(32, 32), k=48, n=64, requires_grad=False)
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        resolve("emulated", device="cpu")(p.A, p.B, p.offs)
    p = make_problem(group_rows=(32, 32), k=64, n=40, requires_grad=False)
    with pytest.raises(ValueError, match="N=40 is not a multiple of 32"):
        resolve("emulated", device="cpu")(p.A, p.B, p.offs)
