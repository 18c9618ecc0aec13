"""Under PyTorch's training tools: activation checkpointing and anomaly mode, in every mode.

Before: a first resolve() inside a non-reentrant checkpointed region hung (the smoke run's
backward recomputed the region, which resolved again and waited on the lock held by the first
resolve), and anomaly mode raised "returned nan values" in torchao's emulation (the padded
buffer's rows after the last padded group were left uninitialised by torchao's backward).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mxfp8_compat
from conftest import make_problem
from mxfp8_compat import resolve

MODES = ["off", "emulated", "auto"]


def _plain(f, a, b):
    return f(a, b)


def _step(fn, p, wrap):
    A = p.A.detach().clone().requires_grad_(True)
    B = p.B.detach().clone().requires_grad_(True)
    out = wrap(lambda a, b: fn(a, b, p.offs), A, B)
    out.float().mul(p.grad_out.float()).sum().backward()
    return out.detach(), A.grad, B.grad


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_call_equals_the_plain_call(mode, use_reentrant):
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    fn = resolve(mode, device="cpu")
    plain = _step(fn, p, _plain)
    checkpointed = _step(fn, p, lambda f, a, b: checkpoint(f, a, b, use_reentrant=use_reentrant))
    for name, x, y in zip(("out", "grad_A", "grad_B"), plain, checkpointed):
        assert torch.equal(x[: 96], y[: 96]) if name != "grad_B" else torch.equal(x, y), name


def _within(seconds: float, fn):
    """``fn()`` in a daemon thread; fail (rather than hang the suite) if it does not return in time."""
    import threading

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s (a deadlock)"
    assert "value" in outcome, "raised (see the thread's traceback above)"
    return outcome["value"]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_a_first_resolve_inside_a_checkpointed_region(mode, use_reentrant):
    """The probes run in a thread of their own: the region's saved-tensor hooks never see them."""
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    mxfp8_compat.reset()

    def region(a, b):
        return resolve(mode, device="cpu")(a, b, p.offs)

    out, grad_A, grad_B = _within(
        300, lambda: _step(None, p, lambda f, a, b: checkpoint(region, a, b, use_reentrant=use_reentrant))
    )
    expected = _step(resolve(mode, device="cpu"), p, _plain)
    assert torch.equal(out[:96], expected[0][:96]) and torch.equal(grad_A[:96], expected[1][:96])
    assert torch.equal(grad_B, expected[2])


def test_a_first_resolve_under_no_grad_inference_mode_and_a_default_device():
    mxfp8_compat.reset()
    with torch.inference_mode(), torch.device("meta"):
        res = resolve("emulated", device="cpu")
    assert res.backend == "mxfp8-emulated" and res.smoke_sqnr_db is not None


@pytest.mark.parametrize("mode", MODES)
def test_anomaly_mode_raises_no_false_alarm(mode):
    """A training step with rows after offs[-1] (a static-length buffer) under detect_anomaly()."""
    fn = resolve(mode, device="cpu")
    if fn.backend == "bf16":
        pytest.skip("bf16 is torch's own kernel, which leaves those gradient rows uninitialised (as documented)")
    p = make_problem(group_rows=(40, 0, 33, 7), k=64, n=64)
    A = torch.cat([p.A.detach(), torch.randn(11, 64, dtype=torch.bfloat16)]).requires_grad_(True)
    B = p.B.detach().clone().requires_grad_(True)
    with torch.autograd.detect_anomaly():
        out = fn(A, B, p.offs)
        (out[:80].float() ** 2).sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
    assert A.grad[80:].count_nonzero() == 0


@pytest.mark.torchao
def test_anomaly_mode_through_torchaos_emulation():
    res = resolve("emulated", device="cpu")
    if res.emulation != "torchao":
        pytest.skip(f"emulated here is {res.emulation}, not torchao's emulation")
    p = make_problem(group_rows=(40, 0, 33, 7), k=64, n=64)
    A0 = torch.cat([p.A.detach(), torch.randn(11, 64, dtype=torch.bfloat16)])

    def step(anomaly: bool):
        A = A0.clone().requires_grad_(True)
        B = p.B.detach().clone().requires_grad_(True)
        for rows in range(64, 512, 32):  # freed NaN blocks: what the allocator hands out uninitialised
            del_me = torch.full((rows, 64), float("nan"), dtype=torch.bfloat16)
            del del_me
        with torch.autograd.set_detect_anomaly(anomaly):
            out = res(A, B, p.offs)
            (out[:80].float() * p.grad_out.float()).sum().backward()
        return out[:80], A.grad, B.grad

    with_anomaly, without = step(True), step(False)
    assert torch.isfinite(with_anomaly[1]).all() and with_anomaly[1][80:].count_nonzero() == 0
    for x, y in zip(with_anomaly, without):
        assert torch.equal(x, y)


# --- double backward: right (bf16) or a clear error naming the backend (every MXFP8 path) ----------


def _second_order(fn, p):
    A = p.A.detach().clone().requires_grad_(True)
    B = p.B.detach().clone().requires_grad_(True)
    out = fn(A, B, p.offs)
    (grad_A,) = torch.autograd.grad(out.float().mul(p.grad_out.float()).sum(), A, create_graph=True)
    grad_A.float().pow(2).sum().backward()
    return B.grad


def _bf16_and_torchs(run, what: str):
    """``run(fn, problem)`` through resolve("off") and through torch._grouped_mm itself (skipped where
    this torch has no bf16 grouped GEMM, or its own op cannot do ``what``)."""
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    fn = resolve("off", device="cpu")
    if fn.backend != "bf16" or not hasattr(torch, "_grouped_mm"):
        pytest.skip("no bf16 grouped GEMM here")
    try:
        expected = run(lambda A, B, offs: torch._grouped_mm(A, B, offs=offs), p)
    except RuntimeError as error:
        pytest.skip(f"torch {torch.__version__}'s torch._grouped_mm has no {what} here: {error}")
    return run(fn, p), expected


def test_double_backward_in_bf16_is_torchs():
    got, expected = _bf16_and_torchs(_second_order, "double backward")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_double_backward_through_mxfp8_is_a_clear_error(mode):
    """Before: the reference returned a second-order gradient without its weight term (silently wrong),
    torchao 0.16 NaN and 0.18 one 6.6 dB from torch's."""
    try:
        fn = resolve(mode, device="cpu")
    except mxfp8_compat.MXFP8Unavailable:
        pytest.skip(f"no {mode} MXFP8 path here")
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported") as raised:
        _second_order(fn, p)
    assert "MXFP8" in str(raised.value)


# --- torch.func: torch's own in bf16, one clear refusal in every MXFP8 backend ---------------------


def _func_transforms(fn, p):
    """torch.func.grad, vjp and vmap of one call: what each returns."""
    A, B = p.A.detach(), p.B.detach()
    grad_A = torch.func.grad(lambda a: fn(a, B, p.offs).float().mul(p.grad_out.float()).sum())(A)
    _, vjp = torch.func.vjp(lambda a, b: fn(a, b, p.offs), A, B)
    batched = torch.func.vmap(lambda a: fn(a, B, p.offs))(torch.stack([A, A.flip(1)]))
    return grad_A, vjp(p.grad_out), batched


def test_torch_func_in_bf16_is_torchs():
    got, expected = _bf16_and_torchs(_func_transforms, "torch.func support")
    for x, y in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap"])
@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_torch_func_through_mxfp8_is_a_clear_error(mode, transform):
    """Before: the reference's grad was refused as a "double backward", its vmap failed inside torch
    ("does not have vmap support"), and torchao's Functions without setup_context failed otherwise."""
    try:
        fn = resolve(mode, device="cpu")
    except mxfp8_compat.MXFP8Unavailable:
        pytest.skip(f"no {mode} MXFP8 path here")
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64)
    A, B = p.A.detach(), p.B.detach()
    run = {
        "grad": lambda: torch.func.grad(lambda a: fn(a, B, p.offs).float().sum())(A),
        "vjp": lambda: torch.func.vjp(lambda a, b: fn(a, b, p.offs), A, B),
        "vmap": lambda: torch.func.vmap(lambda a: fn(a, B, p.offs))(torch.stack([A, A])),
    }[transform]
    with pytest.raises(RuntimeError, match=r"torch\.func transforms .* are not supported") as raised:
        run()
    assert "MXFP8" in str(raised.value) and "resolve('off')" in str(raised.value)
    assert torch.equal(fn(A, B, p.offs), fn(A, B, p.offs))  # and the backend still runs outside them


# --- float32 operands: compiled as eager in bf16, the reference's numerics in emulated -------------


def test_float32_operands_compile_in_bf16():
    """Before: torch.compile failed inside torch's bf16-only meta kernel ("Expected inputs of BF16 type")."""
    fn = resolve("off", device="cpu")
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64, dtype=torch.float32)
    eager = _step(fn, p, _plain)
    torch._dynamo.reset()
    compiled = _step(torch.compile(fn, backend="eager", fullgraph=True), p, _plain)
    assert compiled[0].dtype is torch.float32
    for got, want in zip(compiled, eager):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.torchao
def test_float32_operands_in_emulated_are_the_references_with_or_without_torchao(caplog):
    """Before: torchao's emulation rounded float32 operands to bf16 first and landed 33 dB from the reference."""
    res = resolve("emulated", device="cpu")
    if res.emulation != "torchao":
        pytest.skip(f"emulated here is {res.emulation}, not torchao's emulation")
    p = make_problem(group_rows=(32, 0, 45, 19), k=64, n=64, dtype=torch.float32)
    generation = res.generation
    reference = _step(
        lambda A, B, offs: mxfp8_compat.mxfp8_grouped_mm_reference(
            A, B, offs, torch.float32, scale_mode=generation.scale_mode, wgrad_with_hp=generation.wgrad_with_hp
        ),
        p,
        _plain,
    )
    with caplog.at_level("WARNING", logger="mxfp8_compat"):
        got = _step(res, p, _plain)
    for x, y in zip(got, reference):
        assert x.dtype is torch.float32 and torch.equal(x, y)
    assert any("float32 operands run on the reference emulation" in r.getMessage() for r in caplog.records)
