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
    with pytest.raises(TypeError, match="out_dtype: expected None, torch.bfloat16 or torch.float32"):
        resolve(mode, device="cpu")(*_inputs(), out_dtype=torch.float16)


@pytest.mark.parametrize("mode", MODES)
def test_value_checks_with_validate(no_torchao, mode):
    A, B, offs = _inputs()
    fn = resolve(mode, device="cpu", validate=True)
    with pytest.raises(ValueError, match=r"offs: expected offs\[-1\] <= M == 64"):
        fn(A, B, torch.tensor([32, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs: expected non-negative"):
        fn(A, B, torch.tensor([-1, 48], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs: expected non-decreasing"):
        fn(A, B, torch.tensor([64, 32], dtype=torch.int32))


def test_mxfp8_shape_requirements_raise_in_emulated_mode(no_torchao):
    p = make_problem(group_rows=(32, 32), k=48, n=64, requires_grad=False)
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        resolve("emulated", device="cpu")(p.A, p.B, p.offs)
    p = make_problem(group_rows=(32, 32), k=64, n=40, requires_grad=False)
    with pytest.raises(ValueError, match="N=40 is not a multiple of 32"):
        resolve("emulated", device="cpu")(p.A, p.B, p.offs)


def test_auto_runs_unaligned_shapes_in_bf16_and_logs_once(fake_torchao, native_capable_device, monkeypatch, caplog):
    """In auto mode a call MXFP8 cannot take runs in bf16 (logged once); native mode raises."""
    import fakes
    from mxfp8_compat.probes import environment
    from mxfp8_compat.numerics.highprec import grouped_mm_highprec

    working_native = fakes._ENUMS["torchao/_fake_impl.py"].replace("if not NATIVE_WORKS:", "if False:")
    fake_torchao("0.18.0", {**fakes.GEN_018, "torchao/_fake_impl.py": working_native})
    monkeypatch.setattr(environment, "native_kernel_problem", lambda bound, device: None)
    fn = resolve("auto", device="cpu")
    assert fn.backend == "mxfp8"
    p = make_problem(group_rows=(32, 32), k=48, n=64, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="mxfp8_compat"):
        out1 = fn(p.A, p.B, p.offs)
        out2 = fn(p.A, p.B, p.offs)
    assert torch.equal(out1, grouped_mm_highprec(p.A, p.B, p.offs)) and torch.equal(out1, out2)
    assert len([r for r in caplog.records if "K=48 is not a multiple of 128" in r.getMessage()]) == 1
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False)  # K, N not multiples of 128 (0.18 native)
    assert torch.equal(fn(p.A, p.B, p.offs), grouped_mm_highprec(p.A, p.B, p.offs))
    assert any("K=64 is not a multiple of 128" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="K=64 is not a multiple of 128"):
        resolve("native", device="cpu")(p.A, p.B, p.offs)


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_non_contiguous_A_and_either_B_layout_give_the_same_result(no_torchao, mode):
    from mxfp8_compat import weight_relayout

    p = make_problem(group_rows=(64, 32, 32), k=64, n=64, requires_grad=False)
    fn = resolve(mode, device="cpu")
    expected = fn(p.A, weight_relayout(p.B), p.offs)
    A_strided = p.A.t().contiguous().t()  # same values, column-major
    assert not A_strided.is_contiguous()
    if mode == "off":
        # bf16 hands A and B to torch._grouped_mm as they are, so its kernel choice (and the
        # bits, which differ between layouts on some CPU builds) are torch's own.
        from mxfp8_compat import sqnr_db
        from mxfp8_compat.numerics.highprec import grouped_mm_highprec

        for A, B in ((A_strided, p.B), (p.A, p.B.contiguous())):
            out = fn(A, B, p.offs)
            assert torch.equal(out, grouped_mm_highprec(A, B, p.offs))
            assert sqnr_db(expected, out) > 40
    else:  # MXFP8 paths make A contiguous and B per-group column-major first: the same bits
        assert torch.equal(fn(A_strided, p.B, p.offs), expected)
        assert torch.equal(fn(p.A, p.B.contiguous(), p.offs), expected)


@pytest.mark.parametrize("mode", ["off", "emulated"])
def test_empty_groups_give_zero_rows_of_work_and_zero_weight_grads(no_torchao, mode):
    from conftest import float64_reference, run_with_grads
    from mxfp8_compat import sqnr_db

    p = make_problem(group_rows=(0, 64, 0, 96), k=64, n=64)
    out, dA, dB = run_with_grads(resolve(mode, device="cpu"), p)
    ref_out, _, _ = float64_reference(p)
    assert sqnr_db(ref_out, out) >= 27
    assert torch.count_nonzero(dB[0]) == 0 and torch.count_nonzero(dB[2]) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_A_poisons_the_same_output_rows_as_bf16(no_torchao, bad):
    """Documented result: a non-finite A element makes its output row non-finite, as in bf16; other rows are untouched."""
    from mxfp8_compat import sqnr_db

    p = make_problem(group_rows=(64, 64), k=64, n=64, requires_grad=False)
    A = p.A.clone()
    A[5, 7] = bad
    A[70, 40] = bad
    bf16 = resolve("off", device="cpu")(A, p.B, p.offs)
    emulated = resolve("emulated", device="cpu")(A, p.B, p.offs)
    bad_rows_bf16 = ~torch.isfinite(bf16).all(dim=1)
    bad_rows_emulated = ~torch.isfinite(emulated).all(dim=1)
    assert bad_rows_bf16.nonzero().flatten().tolist() == [5, 70]
    assert torch.equal(bad_rows_emulated, bad_rows_bf16)
    good = ~bad_rows_bf16
    assert sqnr_db(bf16[good], emulated[good]) >= 27


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, mutate, error, message", BAD_METADATA[:7], ids=[c[0] for c in BAD_METADATA[:7]])
def test_metadata_errors_on_cuda(no_torchao, mode, case, mutate, error, message):
    p = make_problem(group_rows=(32, 32), k=64, n=64, requires_grad=False, device="cuda")
    with pytest.raises(error, match=message):
        resolve(mode, device="cuda")(*mutate(p.A, p.B, p.offs))
