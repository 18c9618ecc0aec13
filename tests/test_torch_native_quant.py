"""mxfp8_compat's quantisers for torch's MXFP8 grouped GEMM, bit for bit against independent constructions.

Each output is compared with the reference quantiser (:func:`mxfp8_compat.numerics.quantize.mx_quantize`, RCEIL) for
data and exponents and with torch's own ``to_blocked`` for the scale layout, per group, placed where
MSLK's grouped kernel looks for it (``tests/support/torch_blocked.py``). On the CPU the Triton kernels run in
triton's interpreter; with ``@pytest.mark.cuda`` the same checks run on the GPU, on both conversion
paths (the cvt instruction and the arithmetic one).
"""

from __future__ import annotations

import pytest
import torch

import torch_blocked as tb
from mxfp8_compat.backends import torch_native as tn
from mxfp8_compat.token_groups import token_group_padding

pytest.importorskip("triton")

# (group sizes, rows after the last group): unaligned, empty and one-row groups, offs[-1] < M
GROUPINGS = {
    "unaligned": ((37, 0, 100, 1, 64, 5), 0),
    "tail": ((1, 33, 0, 0, 130), 7),
    "one-group": ((96,), 0),
    "all-empty": ((0, 0), 3),
}


def _inputs(seed: int, rows: int, cols: int, dtype=torch.bfloat16, special: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g).float())
    if special and rows and cols >= 64:
        x[0, :32] = 0.0  # an all-zero block
        x[min(1, rows - 1), 3] = float("nan")
        x[min(2, rows - 1), 40] = float("inf")
        x[min(3, rows - 1), 33:64] = 2.0**-140  # subnormal amax
        x[min(4, rows - 1), 0] = 3.0e38  # saturating block
    return x.to(dtype)


def _offs(sizes) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32) if sizes else torch.zeros(0, dtype=torch.int32)


def _assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """e4m3 bits equal, NaN (0x7F / 0xFF) compared as NaN."""
    a, e = actual.to(torch.int32), expected.to(torch.int32)
    nan_a, nan_e = (a & 0x7F) == 0x7F, (e & 0x7F) == 0x7F
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    diff = (a != e) & ~nan_e
    assert not diff.any(), f"{what}: {int(diff.sum())} of {a.numel()} bytes differ, first at {diff.nonzero()[0].tolist()}"


def _padding(sizes, tail, device="cpu"):
    offs = _offs(sizes).to(device)
    return offs, token_group_padding(offs, sum(sizes) + tail, tn.ALIGNMENT)


@pytest.mark.parametrize("cols", [64, 96, 288])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_quantize_rows_is_reference_and_to_blocked(grouping, cols, device="cpu", seed=1):
    sizes, tail = GROUPINGS[grouping]
    offs, padding = _padding(sizes, tail, device)
    x = _inputs(seed, sum(sizes) + tail, cols, special=True).to(device)
    out = tn.quantize_rows(x, padding)
    data, scales = out.data.cpu().view(torch.uint8), out.scales.cpu().view(torch.uint8)
    assert out.data.dtype == torch.float8_e4m3fn and out.scales.dtype == torch.float8_e8m0fnu
    assert data.shape == (padding.padded_rows, cols) and scales.shape[1] == tb.round_up(cols // 32, 4)
    assert scales.shape[0] >= padding.padded_rows
    datas, blocks, firsts = tb.expected_rows(x.cpu(), offs.cpu())
    flat = scales.reshape(-1)
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    used_rows = 0
    for g, (start, rows, padded_start) in enumerate(tb.padded_groups(offs.cpu())):
        _assert_bits_equal(data[padded_start : padded_start + datas[g].shape[0]], datas[g], f"group {g} data")
        first = firsts[g] * scales.shape[1]
        assert torch.equal(flat[first : first + blocks[g].numel()], blocks[g]), f"group {g} scales"
        covered[first : first + blocks[g].numel()] = True
        used_rows = padded_start + datas[g].shape[0]
    assert not data[used_rows:].any(), "rows after the last group must be zero"
    assert not flat[~covered].any(), "scales outside the groups' blocks must be zero"
    expected_ends = [p + tb.round_up(r, 32) for _, r, p in tb.padded_groups(offs.cpu())]
    expected_ends[-1] = padding.padded_rows  # the last group runs to the buffer's end (its rows: padding)
    assert torch.equal(padding.padded_offs.cpu(), torch.tensor(expected_ends, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(3, 64, 96), (2, 160, 32), (1, 32, 288)], ids=str)
@pytest.mark.parametrize("layout", ["column-major", "row-major"])
def test_quantize_weight_reads_once_for_both_orientations(shape, layout, device="cpu", seed=2):
    E, K, N = shape
    w = _inputs(seed, E * K, N, special=True).reshape(E, K, N)
    if layout == "column-major":
        w = w.transpose(-2, -1).contiguous().transpose(-2, -1)
    w = w.to(device)
    along_k, along_n = tn.quantize_weight(w)
    dk, sk, dn, sn = tb.expected_weight(w.cpu())
    assert along_k.data.shape == (E, N, K) and along_k.data.is_contiguous()
    assert along_n.data.shape == (E, K, N) and along_n.data.is_contiguous()
    _assert_bits_equal(along_k.data.cpu().view(torch.uint8), dk, "along K data")
    _assert_bits_equal(along_n.data.cpu().view(torch.uint8), dn, "along N data")
    assert torch.equal(along_k.scales.cpu().view(torch.uint8), sk), "along K scales"
    assert torch.equal(along_n.scales.cpu().view(torch.uint8), sn), "along N scales"
    only_n = tn.quantize_weight(w, along_k=False)
    assert only_n[0] is None and torch.equal(only_n[1].data.view(torch.uint8), along_n.data.view(torch.uint8))


@pytest.mark.parametrize("cols", [64, 160])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_quantize_grouped_columns_is_reference_and_to_blocked(grouping, cols, device="cpu", seed=3):
    sizes, tail = GROUPINGS[grouping]
    offs, padding = _padding(sizes, tail, device)
    x = _inputs(seed, sum(sizes) + tail, cols, special=True).to(device)
    out = tn.quantize_grouped_columns(x, padding)
    data, scales = out.data.cpu().view(torch.uint8), out.scales.cpu().view(torch.uint8)
    assert data.shape == (cols, padding.padded_rows) and scales.shape[0] == tb.round_up(cols, 128)
    datas, blocks, firsts = tb.expected_columns(x.cpu(), offs.cpu())
    flat = scales.reshape(-1)
    covered = torch.zeros(flat.numel(), dtype=torch.bool)
    used = 0
    for g, (start, rows, padded_start) in enumerate(tb.padded_groups(offs.cpu())):
        _assert_bits_equal(data[:, padded_start : padded_start + datas[g].shape[1]], datas[g], f"group {g} data")
        assert torch.equal(flat[firsts[g] : firsts[g] + blocks[g].numel()], blocks[g]), f"group {g} scales"
        covered[firsts[g] : firsts[g] + blocks[g].numel()] = True
        used = padded_start + datas[g].shape[1]
    assert not data[:, used:].any(), "columns after the last group must be zero"
    assert not flat[~covered].any(), "scales outside the groups' blocks must be zero"


def test_float32_input_and_bad_arguments():
    sizes, tail = GROUPINGS["unaligned"]
    offs, padding = _padding(sizes, tail)
    x = _inputs(4, sum(sizes) + tail, 64, dtype=torch.float32)
    datas, _, _ = tb.expected_rows(x, offs)
    data = tn.quantize_rows(x, padding).data.view(torch.uint8)
    for g, (_, _, padded_start) in enumerate(tb.padded_groups(offs)):
        _assert_bits_equal(data[padded_start : padded_start + datas[g].shape[0]], datas[g], f"group {g}")
    with pytest.raises(ValueError, match="scale_mode"):
        tn.quantize_rows(x, padding, scale_mode="floor")
    with pytest.raises(ValueError, match="x: dimension 1"):
        tn.quantize_rows(x[:, :40], padding)
    with pytest.raises(ValueError, match="padding"):
        tn.quantize_rows(x[:-1], padding)
    with pytest.raises(TypeError, match="w: expected bfloat16"):
        tn.quantize_weight(torch.zeros(2, 32, 32, dtype=torch.float16))


def test_unblock_inverts_to_blocked():
    """The stand-in's decoder (documented layout) and torch's encoder agree, padding included."""
    g = torch.Generator().manual_seed(5)
    for rows, cols in ((1, 1), (130, 5), (256, 8), (37, 12)):
        m = torch.randint(0, 255, (rows, cols), generator=g, dtype=torch.uint8)
        assert torch.equal(tb.unblock(tb.to_blocked(m), rows, cols), m)


def test_importing_mxfp8_compat_does_not_import_the_kernels():
    """The kernels (and so triton, for mxfp8_compat's part: torch._dynamo may import it on its own) load on first use."""
    import subprocess
    import sys

    code = (
        "import sys, mxfp8_compat, mxfp8_compat.backends.torch_native; "
        "assert 'mxfp8_compat.kernels.mx_quant' not in sys.modules, 'kernels imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the same on a GPU ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["cvt", "arith"])
def test_quantisers_bitwise_on_cuda(hw_cvt, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(tn, "USE_HW_CVT", hw_cvt)
    for grouping in GROUPINGS:
        test_quantize_rows_is_reference_and_to_blocked(grouping, 288, device="cuda", seed=11)
        test_quantize_grouped_columns_is_reference_and_to_blocked(grouping, 160, device="cuda", seed=12)
    for shape in ((3, 64, 96), (4, 256, 512)):
        test_quantize_weight_reads_once_for_both_orientations(shape, "column-major", device="cuda", seed=13)
