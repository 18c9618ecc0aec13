"""Weight layout: the per-group column-major B that torchao's MXFP8 kernels need.

torchao quantises B (E, K, N) along K and asserts that ``B.transpose(-2, -1)`` is contiguous,
i.e. strides ``(N*K, 1, K)``. Relaying a row-major weight out on every call costs more than
the bf16 grouped GEMM itself (1.15x-2.5x on an H100), so store the weight once in this layout
with :func:`prepare_weight`; ``torch._grouped_mm`` runs equally fast on either layout.
"""

from __future__ import annotations

import torch

__all__ = ["is_per_group_column_major", "weight_relayout", "prepare_weight"]


def is_per_group_column_major(B: torch.Tensor) -> bool:
    """True when ``B`` (E, K, N) is an (E, N, K)-contiguous tensor seen through a transpose."""
    return B.dim() == 3 and B.transpose(-2, -1).is_contiguous()


def weight_relayout(B: torch.Tensor) -> torch.Tensor:
    """Return ``B`` (E, K, N) with strides ``(N*K, 1, K)``: ``B`` itself when it already is.

    Same values, same autograd graph (the copy is differentiable).
    """
    if not isinstance(B, torch.Tensor):
        raise TypeError(f"B: expected a torch.Tensor, got {type(B).__name__}")
    if B.dim() != 3:
        raise ValueError(f"B: expected a 3D (E, K, N) tensor, got shape {tuple(B.shape)}")
    if B.transpose(-2, -1).is_contiguous():
        return B
    return B.transpose(-2, -1).contiguous().transpose(-2, -1)


def prepare_weight(param: torch.Tensor) -> torch.nn.Parameter:
    """An ``nn.Parameter`` with ``param``'s values stored once in the per-group column-major layout.

    Pass the result to the grouped GEMM as B: the MXFP8 callables then copy nothing per
    call. ``requires_grad`` is kept. Optimisers that allocate state with ``zeros_like``
    (Adam, SGD momentum) preserve the layout.
    """
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param: expected a torch.Tensor or nn.Parameter, got {type(param).__name__}")
    if param.dim() != 3:
        raise ValueError(f"param: expected a 3D (E, K, N) weight, got shape {tuple(param.shape)}")
    data = weight_relayout(param.detach())
    return torch.nn.Parameter(data, requires_grad=param.requires_grad)
