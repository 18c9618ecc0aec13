"""torch's own blocked-scale helper and independent pure-torch constructions of what its MXFP8 grouped GEMM reads.

``to_blocked`` is ``torch.testing._internal.common_quantized.to_blocked``, shipped in every wheel. That
module imports ``expecttest`` (a test-only dependency); where it is missing, the function and its
``ceil_div`` are taken from the installed module's source text and executed alone: still torch's own
code, not a copy in this repository.

The expected operands are built with nothing of :mod:`mxfp8_compat.backends.torch_native`: groups from ``offs``
with plain Python, data and exponents from the reference quantiser
(:func:`mxfp8_compat.numerics.quantize.mx_quantize`), per-group scale blocks from ``to_blocked``, placed at the
offsets MSLK's ``mx8mx8bf16_grouped`` computes (``shared/torch-scaled-grouped-mm.md``).
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Callable

import torch

from mxfp8_compat.numerics.quantize import mx_quantize

ALIGN = 32


def _load_to_blocked() -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from torch.testing._internal.common_quantized import to_blocked

        return to_blocked
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch.testing._internal.common_quantized")
    assert spec is not None and spec.origin
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in ("ceil_div", "to_blocked")]
    assert {node.name for node in wanted} == {"ceil_div", "to_blocked"}, "torch's common_quantized changed"
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), spec.origin, "exec"), namespace)
    return namespace["to_blocked"]


to_blocked = _load_to_blocked()


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def groups(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in offs.tolist()]
    return list(zip([0] + ends[:-1], ends))


def padded_groups(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(source start, rows, padded start) of each group, groups padded to multiples of 32."""
    out, at = [], 0
    for start, end in groups(offs):
        rows = max(end - start, 0)
        out.append((start, rows, at))
        at += round_up(rows, ALIGN)
    return out


def pad_group(x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    block = torch.zeros((round_up(rows, ALIGN), x.shape[1]), dtype=x.dtype)
    block[:rows] = x[start : start + rows]
    return block


def blocked(exponents: torch.Tensor) -> torch.Tensor:
    """to_blocked of a uint8 exponent matrix (flat)."""
    return to_blocked(exponents.to(torch.uint8))


def expected_rows(x: torch.Tensor, offs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per group: padded e4m3 data (uint8 bits), flat blocked scales, and the scale row where its block starts."""
    datas, scales, first_rows, at = [], [], [], 0
    for start, rows, _ in padded_groups(offs):
        data, exponent = mx_quantize(pad_group(x, start, rows))
        datas.append(data.view(torch.uint8))
        scales.append(blocked(exponent) if rows else torch.empty(0, dtype=torch.uint8))
        first_rows.append(at)
        at += round_up(round_up(rows, ALIGN), 128)
    return datas, scales, first_rows


def expected_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data along K (E, N, K), scales (E, -1), data along N (E, K, N), scales (E, -1)), uint8."""
    wt = w.transpose(-2, -1).contiguous()  # (E, N, K)
    dk, ek = mx_quantize(wt)
    dn, en = mx_quantize(w.contiguous())  # (E, K, N) blocks along N
    sk = torch.stack([blocked(ek[e]) for e in range(w.shape[0])])
    sn = torch.stack([blocked(en[e]) for e in range(w.shape[0])])
    return dk.view(torch.uint8), sk, dn.view(torch.uint8), sn


def expected_columns(x: torch.Tensor, offs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per group: the transposed padded data (C, P_g) bits, flat blocked (C, P_g/32) scales, flat start."""
    datas, scales, firsts, at = [], [], [], 0
    rows_padded = round_up(x.shape[1], 128)
    for start, rows, _ in padded_groups(offs):
        data, exponent = mx_quantize(pad_group(x, start, rows).t().contiguous())  # (C, P_g), blocks along tokens
        datas.append(data.view(torch.uint8))
        scales.append(blocked(exponent) if rows else torch.empty(0, dtype=torch.uint8))
        firsts.append(at)
        at += rows_padded * round_up(round_up(rows, ALIGN) // 32, 4)
    return datas, scales, firsts


def unblock(flat: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocked for a (rows, cols) scale matrix, read from the documented layout:
    element (r, c) sits at ((r//128) * (cols_padded//4) + c//4) * 512 + (r%32) * 16 + ((r%128)//32) * 4 + c%4."""
    n_rb, n_cb = -(-rows // 128), -(-cols // 4)
    tiles = flat[: n_rb * n_cb * 512].reshape(n_rb, n_cb, 32, 4, 4)  # (row tile, col tile, r%32, (r%128)//32, c%4)
    return tiles.permute(0, 3, 2, 1, 4).reshape(n_rb * 128, n_cb * 4)[:rows, :cols]
