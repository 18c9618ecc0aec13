"""The fast emulation is bitwise the reference emulation.

Without a GPU the Triton kernels run in triton's interpreter on CPU tensors (small shapes;
the GEMMs are the reference's own calls there too), which checks every kernel's arithmetic:
scale exponents, e4m3 rounding, special values, group bookkeeping. The `cuda` tests repeat
the comparisons with the compiled kernels, check that nothing syncs the device and that
torch.compile changes nothing, and train a tiny MoE with both backends.
"""

from __future__ import annotations

import itertools
from typing import Callable

import pytest
import torch

from mxfp8_compat.backends import fast_emulation as fast
from mxfp8_compat.numerics import quantize, reference
from mxfp8_compat.layout import weight_relayout

triton = pytest.importorskip("triton", reason="the fast emulation's kernels need triton")
# the interpreter's numpy multiply warns where float32 overflows to inf (448 * 2**127): expected
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

MODES = ["rceil", "floor"]
GROUPS = [0, 1, 33, 0, 64, 7]  # empty groups, a group of one row, short last blocks
TAIL = 5  # rows after offs[-1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every bit equal, except that any NaN equals any NaN (payloads differ between conversions)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape, actual.dtype, expected.dtype)
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    if not torch.equal(nan_a, nan_e):
        return False
    as_int = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[actual.dtype]
    return torch.equal(torch.where(nan_a, 0, actual).view(as_int), torch.where(nan_e, 0, expected).view(as_int))


def adversarial(rows: int, cols: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """bf16 (rows, cols) whose 32-element blocks along the last dim hit every special case.

    Each block is one of: random normal values times 2**k (k from -140 to 120); random bit
    patterns (every bf16 value: NaN, inf, subnormals); a block maximum at exactly 448 * 2**k
    or one bf16 step either side (RCEIL's boundary); saturating maxima (1.75..2 times a power
    of two, FLOOR's); NaN, +inf or -inf among normal values; zeros, negative zeros, all-zero
    blocks, subnormals and values straddling the e4m3 flush-to-zero threshold.
    """
    assert cols % 32 == 0
    g = torch.Generator().manual_seed(seed)
    blocks = rows * cols // 32
    out = torch.empty(blocks, 32, dtype=torch.float32)
    kind = torch.randint(0, 10, (blocks,), generator=g)
    k = torch.randint(-140, 121, (blocks, 1), generator=g).float()
    normal = torch.randn(blocks, 32, generator=g)
    out[:] = normal * torch.exp2(k)
    bits = torch.randint(-32768, 32768, (blocks, 32), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    out[kind == 1] = bits[kind == 1]
    pos = torch.randint(0, 32, (blocks,), generator=g)
    edge = torch.tensor([446.0, 448.0, 450.0])[torch.randint(0, 3, (blocks,), generator=g)]
    small = (normal.abs().clamp(max=1.0) * 440.0 / 2).clamp(max=440.0)
    boundary = torch.where(kind == 2)[0]
    out[boundary] = (small[boundary] * torch.exp2(k[boundary]))
    out[boundary, pos[boundary]] = edge[boundary] * torch.exp2(k[boundary, 0])
    saturating = torch.where(kind == 3)[0]
    out[saturating, pos[saturating]] = (torch.rand(len(saturating), generator=g) * 0.25 + 1.75) * torch.exp2(k[saturating, 0])
    for value, which in ((float("nan"), 4), (float("inf"), 5), (-float("inf"), 6)):
        sel = torch.where(kind == which)[0]
        out[sel, pos[sel]] = value
    zeros = torch.where(kind == 7)[0]
    out[zeros] = 0.0
    out[zeros[::2], :16] = -0.0
    tiny = torch.where(kind == 8)[0]  # around the flush threshold of blocks scaled by 2**-127..2**-110
    out[tiny] = normal[tiny] * torch.exp2(torch.randint(-150, -100, (len(tiny), 1), generator=g).float())
    bf16_limits = torch.where(kind == 9)[0]
    out[bf16_limits] = normal[bf16_limits] * 1e37
    out[bf16_limits, pos[bf16_limits]] = 3.3895313892515355e38  # bf16 max
    return out.reshape(rows, cols).to(torch.bfloat16).to(device)


def random_bf16(*shape: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)


def make_offs(groups: list[int], device: str) -> torch.Tensor:
    return torch.tensor(groups, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def run_fwd_bwd(fn: Callable[..., torch.Tensor], A: torch.Tensor, B: torch.Tensor, grad: torch.Tensor, **kwargs):
    A = A.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    out = fn(A, B, **kwargs)
    out.backward(grad)
    return out.detach(), A.grad, B.grad


ALL_CASES = list(itertools.product(MODES, (True, False), (True, False)))  # scale mode, wgrad_with_hp, keep weight


def check_grouped_mm(device: str, M: int, K: int, N: int, groups: list[int], inputs: str, seed: int,
                     out_dtypes=(torch.bfloat16,), cases=ALL_CASES) -> None:
    offs = make_offs(groups, device)
    E, end = len(groups), sum(groups)
    make = adversarial if inputs == "adversarial" else (lambda r, c, seed, device: random_bf16(r, c, seed=seed, device=device))
    A = make(M, K, seed, device)
    B = weight_relayout(make(E * K, N, seed + 1, device).reshape(E, K, N))
    grad = random_bf16(M, N, seed=seed + 2, device=device)
    for (mode, hp, keep), out_dtype in itertools.product(cases, out_dtypes):
        expected = run_fwd_bwd(reference.mxfp8_grouped_mm_reference, A, B, grad.to(out_dtype), offs=offs,
                               out_dtype=out_dtype, scale_mode=mode, wgrad_with_hp=hp)
        actual = run_fwd_bwd(fast.fast_mxfp8_grouped_mm, A, B, grad.to(out_dtype), offs=offs,
                             out_dtype=out_dtype, scale_mode=mode, wgrad_with_hp=hp, keep_quantized_weight=keep)
        case = f"{inputs} {mode} wgrad_with_hp={hp} keep={keep} out_dtype={out_dtype}"
        assert bitwise_equal(actual[0][:end], expected[0][:end]), f"output: {case}"
        assert bitwise_equal(actual[1], expected[1]), f"grad_A: {case}"
        assert bitwise_equal(actual[2], expected[2]), f"grad_B: {case}"
        assert not actual[1][end:].any(), f"rows after offs[-1] have a nonzero input gradient: {case}"
        for e, rows in enumerate(groups):
            if rows == 0:
                assert not actual[2][e].any(), f"empty group {e} has a nonzero weight gradient: {case}"


# --- interpreter: the kernels' arithmetic, on CPU ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fake_quantize_bitwise_interpreter(mode: str) -> None:
    x = torch.cat([adversarial(48, 64, seed=1), random_bf16(16, 64, seed=2)])
    assert bitwise_equal(fast.fast_fake_quantize(x, -1, mode), quantize.mx_fake_quantize(x, -1, mode))
    assert bitwise_equal(fast.fast_fake_quantize(x, 0, mode), quantize.mx_fake_quantize(x, 0, mode))
    # float32 inputs holding bf16 values: the same blocks, exponents read from float32
    assert bitwise_equal(fast.fast_fake_quantize(x.float(), -1, mode), quantize.mx_fake_quantize(x.float(), -1, mode))


@pytest.mark.parametrize("mode", MODES)
def test_weight_quantize_both_orientations_interpreter(mode: str) -> None:
    B = weight_relayout(adversarial(3 * 64, 96, seed=3).reshape(3, 64, 96))  # (E, K, N), per-group column-major
    along_k, along_n = fast._quantize_weight(B, mode, along_k=True, along_n=True)
    expected_k = quantize.mx_fake_quantize(B, dim=1, scale_mode=mode)
    expected_n = quantize.mx_fake_quantize(B, dim=2, scale_mode=mode).transpose(-2, -1).contiguous()
    assert bitwise_equal(along_k.transpose(-2, -1), expected_k)
    assert along_k.transpose(-2, -1).stride() == expected_k.stride()
    assert bitwise_equal(along_n, expected_n)
    # a row-major weight reads through strides: same values
    row_major = B.contiguous()
    assert bitwise_equal(fast._quantize_weight(row_major, mode, along_k=True, along_n=False)[0], along_k)


@pytest.mark.parametrize("mode", MODES)
def test_grouped_rows_bitwise_interpreter(mode: str) -> None:
    offs = make_offs(GROUPS, "cpu")
    x = adversarial(sum(GROUPS) + TAIL, 64, seed=4)
    actual = fast.fast_fake_quantize_grouped_rows(x, offs, mode)
    assert bitwise_equal(actual, quantize.mx_fake_quantize_grouped_rows(x, offs, mode))


@pytest.mark.parametrize(
    "inputs, cases",
    [
        ("random", [("rceil", True, False), ("floor", False, True)]),
        ("adversarial", [("rceil", False, False), ("floor", True, True)]),
    ],
    ids=["random", "adversarial"],
)
def test_grouped_mm_bitwise_interpreter(inputs: str, cases: list) -> None:
    """Each scale mode, weight gradient and weight path once (the interpreter is slow; CUDA runs all)."""
    check_grouped_mm("cpu", sum(GROUPS) + TAIL, 64, 32, GROUPS, inputs, seed=5, cases=cases)


def test_float32_output_interpreter() -> None:
    check_grouped_mm("cpu", 72, 64, 32, [40, 0, 32], "random", seed=6, out_dtypes=(torch.float32,), cases=[("rceil", True, True)])


def test_compiles_without_graph_breaks() -> None:
    """Custom ops: torch.compile(fullgraph=True) traces fwd+bwd through their fake impls."""
    offs = make_offs([40, 0, 24], "cpu")
    A, B = random_bf16(64, 64, seed=7), weight_relayout(random_bf16(3, 64, 32, seed=8))
    grad = random_bf16(64, 32, seed=9)

    def step(A, B):
        return fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = run_fwd_bwd(step, A, B, grad)
    traced = run_fwd_bwd(compiled, A, B, grad)
    for a, b in zip(traced, eager):
        assert bitwise_equal(a, b)


def test_problem_names_the_device_and_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "CUDA" in fast.fast_emulation_problem("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def no_triton(interpret: bool):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(fast, "_kernels", no_triton)
    problem = fast.fast_emulation_problem("cuda")
    assert problem is not None and "triton" in problem


# --- CUDA: compiled kernels --------------------------------------------------------------


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["hw-cvt", "arithmetic"])
@pytest.mark.parametrize("mode", MODES)
def test_quantizers_bitwise_cuda(mode: str, hw_cvt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "USE_HW_CVT", hw_cvt)
    x = torch.cat([adversarial(4096, 512, seed=10, device="cuda"), random_bf16(1024, 512, seed=11, device="cuda")])
    for dim in (-1, 0):
        assert bitwise_equal(fast.fast_fake_quantize(x, dim, mode), quantize.mx_fake_quantize(x, dim, mode)), dim
    B = weight_relayout(adversarial(8 * 256, 512, seed=12, device="cuda").reshape(8, 256, 512))
    along_k, along_n = fast._quantize_weight(B, mode, along_k=True, along_n=True)
    assert bitwise_equal(along_k.transpose(-2, -1), quantize.mx_fake_quantize(B, dim=1, scale_mode=mode))
    assert bitwise_equal(along_n, quantize.mx_fake_quantize(B, dim=2, scale_mode=mode).transpose(-2, -1).contiguous())
    groups = [0, 1, 33, 0, 640, 7, 2000, 31, 32, 1]
    offs = make_offs(groups, "cuda")
    rows = adversarial(sum(groups) + 100, 512, seed=13, device="cuda")
    assert bitwise_equal(fast.fast_fake_quantize_grouped_rows(rows, offs, mode), quantize.mx_fake_quantize_grouped_rows(rows, offs, mode))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("inputs", ["random", "adversarial"])
@pytest.mark.parametrize(
    "groups", [[512] * 8, [0, 1, 33, 0, 640, 7, 2000, 31], [1] * 4 + [0] * 3 + [3000]], ids=["aligned", "ragged", "tiny-and-empty"]
)
def test_grouped_mm_bitwise_cuda(groups: list[int], inputs: str) -> None:
    check_grouped_mm("cuda", sum(groups) + 96, 512, 256, groups, inputs, seed=14, out_dtypes=(torch.bfloat16, torch.float32))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("hp", [True, False])
def test_no_device_sync_cuda(hp: bool) -> None:
    groups = [0, 100, 33, 0, 640, 7]
    offs = make_offs(groups, "cuda")
    A = random_bf16(sum(groups) + 10, 256, seed=15, device="cuda").requires_grad_(True)
    B = weight_relayout(random_bf16(len(groups), 256, 128, seed=16, device="cuda")).requires_grad_(True)
    grad = random_bf16(A.shape[0], 128, seed=17, device="cuda")
    fast.fast_mxfp8_grouped_mm(A, B, offs, wgrad_with_hp=hp).backward(grad)  # compile kernels, probe torch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.fast_mxfp8_grouped_mm(A, B, offs, wgrad_with_hp=hp).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@cuda
def test_cuda_graph_replay_is_bitwise_eager_cuda() -> None:
    """No host reads, so fwd+bwd can be captured in a CUDA graph (small shapes are host-bound)."""
    groups = [0, 100, 33, 640, 7]
    offs = make_offs(groups, "cuda")
    A = random_bf16(sum(groups) + 20, 256, seed=26, device="cuda").requires_grad_(True)
    B = weight_relayout(random_bf16(len(groups), 256, 128, seed=27, device="cuda")).requires_grad_(True)
    grad = random_bf16(A.shape[0], 128, seed=28, device="cuda")

    def step():
        out = fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True)
        return (out,) + torch.autograd.grad(out, (A, B), grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    end = sum(groups)
    assert bitwise_equal(captured[0][:end], eager[0][:end])
    for a, b in zip(captured[1:], eager[1:]):
        assert bitwise_equal(a, b)


@pytest.mark.cuda
@cuda
def test_inductor_compile_is_bitwise_eager_cuda() -> None:
    groups = [0, 100, 33, 640, 7]
    offs = make_offs(groups, "cuda")
    A = random_bf16(sum(groups), 256, seed=18, device="cuda")
    B = weight_relayout(random_bf16(len(groups), 256, 128, seed=19, device="cuda"))
    grad = random_bf16(A.shape[0], 128, seed=20, device="cuda")

    def step(A, B):
        return torch.nn.functional.silu(fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", True)) * 2

    eager = run_fwd_bwd(step, A, B, grad)
    compiled = run_fwd_bwd(torch.compile(step, fullgraph=True), A, B, grad)
    for a, b in zip(compiled, eager):
        assert bitwise_equal(a, b)


class TinyMoE(torch.nn.Module):
    """Top-1 routed experts: tokens sorted by expert, two grouped GEMMs (ragged group sizes)."""

    def __init__(self, dim: int, hidden: int, experts: int, grouped_mm: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(21)
        self.router = torch.nn.Parameter(torch.randn(dim, experts, generator=g) * dim**-0.5)
        self.up = torch.nn.Parameter(weight_relayout(torch.randn(experts, dim, hidden, generator=g) * dim**-0.5))
        self.down = torch.nn.Parameter(weight_relayout(torch.randn(experts, hidden, dim, generator=g) * hidden**-0.5))
        self.experts = experts
        self.grouped_mm = grouped_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (x.float() @ self.router.float()).softmax(-1)
        weight, expert = gate.max(-1)
        order = torch.argsort(expert, stable=True)
        offs = torch.bincount(expert, minlength=self.experts).cumsum(0).to(torch.int32)
        h = self.grouped_mm(x[order], self.up, offs)
        y = self.grouped_mm(torch.nn.functional.gelu(h), self.down, offs)
        out = torch.empty_like(y)
        out[order] = y
        return x + out * weight.unsqueeze(-1).to(y.dtype)


def train_losses(grouped_mm: Callable[..., torch.Tensor], steps: int, device: str) -> tuple[list[float], list[torch.Tensor]]:
    dim, hidden, experts, tokens = 128, 256, 8, 1000
    model = TinyMoE(dim, hidden, experts, grouped_mm).to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(22)
    data = torch.randn(steps, tokens, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    target = torch.randn(steps, tokens, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    losses = []
    for step in range(steps):
        loss = (model(data[step]).float() - target[step].float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("hp", [True, False])
def test_tiny_moe_trains_bitwise_like_reference_cuda(hp: bool) -> None:
    def reference_mm(A, B, offs):
        return reference.mxfp8_grouped_mm_reference(A, B, offs, torch.bfloat16, "rceil", hp)

    def fast_mm(A, B, offs):
        return fast.fast_mxfp8_grouped_mm(A, B, offs, torch.bfloat16, "rceil", hp)

    expected, expected_params = train_losses(reference_mm, 50, "cuda")
    actual, actual_params = train_losses(fast_mm, 50, "cuda")
    assert actual == expected
    for a, b in zip(actual_params, expected_params):
        assert bitwise_equal(a, b)


def test_custom_ops_pass_opcheck_interpreter() -> None:
    """The ops torch.compile sees: schema, fake tensors, autograd registration, AOT dispatch.
    (offs[-1] == M: the output rows after it are unspecified, so would differ run to run.)"""
    offs = make_offs([40, 0, 30], "cpu")
    A = random_bf16(70, 64, seed=23).requires_grad_(True)
    B = weight_relayout(random_bf16(3, 64, 32, seed=24)).requires_grad_(True)
    torch.library.opcheck(fast._fast_forward, (A, B, offs, torch.bfloat16, "rceil", True, True))
    grad = random_bf16(70, 32, seed=25)
    no_weight = torch.empty(0, dtype=torch.bfloat16)
    torch.library.opcheck(fast._fast_backward, (grad, A.detach(), B.detach(), no_weight, offs, "floor", False, False))
