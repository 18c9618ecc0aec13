"""Weight layout: the per-group column-major B that torchao's MXFP8 kernels need.

torchao quantises B (E, K, N) along K and asserts that ``B.transpose(-2, -1)`` is contiguous,
i.e. strides ``(N*K, 1, K)``. Relaying a row-major weight out on every call costs more than
the bf16 grouped GEMM itself (1.15x-2.5x on an H100), so the weight must be stored in that
layout once.

The recommended storage is a **contiguous (E, N, K) parameter** used through its transpose
view: :func:`expert_weight` makes one, :func:`as_grouped_mm_weight` gives the (E, K, N) view
passed as B (no copy: the view *is* the per-group column-major layout). A contiguous parameter
is what ``torch.distributed.fsdp.fully_shard``, DTensor placements and checkpoints expect:
FSDP2 shards it on the expert dimension and hands forward an unsharded contiguous tensor,
whose transpose is again the layout torchao needs. torchtitan stores its expert weights the
same way. :func:`expert_weight_from_kn` / :func:`state_dict_to_expert_layout` convert
existing (E, K, N) row-major weights and checkpoints (and back, for export).

:func:`prepare_weight` (an (E, K, N) parameter with column-major strides) predates this and
is kept for single-process code; it warns, because ``fully_shard`` rejects its parameter.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

__all__ = [
    "is_per_group_column_major",
    "weight_relayout",
    "expert_weight",
    "as_grouped_mm_weight",
    "expert_weight_from_kn",
    "expert_weight_to_kn",
    "state_dict_to_expert_layout",
    "state_dict_from_expert_layout",
    "prepare_weight",
]


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


def expert_weight(
    num_experts: int,
    k: int,
    n: int,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    requires_grad: bool = True,
) -> torch.nn.Parameter:
    """A contiguous ``(num_experts, n, k)`` parameter for the B ``(E, K, N)`` of a grouped GEMM.

    The values are uninitialised (``torch.empty``): initialise them with ``torch.nn.init``
    or load them (see :func:`expert_weight_from_kn` for (E, K, N) checkpoints). Pass
    ``as_grouped_mm_weight(param)`` as B. The parameter is contiguous, so ``fully_shard``
    shards it (on the expert dimension), DTensor placements apply to it and ``state_dict``
    saves it as it is; optimiser state (``zeros_like``) has the same layout.
    """
    for name, value in (("num_experts", num_experts), ("k", k), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    data = torch.empty(num_experts, n, k, dtype=dtype, device=device)
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def as_grouped_mm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``(E, K, N)`` B of a grouped GEMM, viewed from its contiguous ``(E, N, K)`` storage.

    ``weight.transpose(-2, -1)``: a view, never a copy, differentiable, and exactly the
    per-group column-major layout torchao's MXFP8 kernels take without relaying out. Works on
    a parameter, on the unsharded tensor ``fully_shard`` hands forward, and on a DTensor (its
    placements follow the transpose; see ``mxfp8_compat.distributed`` for what the grouped
    GEMM accepts). A non-contiguous ``weight`` (for example a :func:`prepare_weight`
    parameter) raises ValueError: its transpose is not the layout torchao needs.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3:
        raise ValueError(f"weight: expected a 3D (E, N, K) expert weight, got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError(
            f"weight: expected a contiguous (E, N, K) tensor (see expert_weight), got strides {weight.stride()} "
            f"for shape {tuple(weight.shape)}; convert an (E, K, N) tensor once with expert_weight_from_kn"
        )
    return weight.transpose(-2, -1)


def expert_weight_from_kn(weight: torch.Tensor) -> torch.Tensor:
    """Convert an ``(E, K, N)`` weight (any strides) to the contiguous ``(E, N, K)`` storage.

    One copy, for loading a checkpoint or converting a model, never per step; the result is
    detached. A DTensor stays a DTensor, its placements transposed, converted shard by shard
    with no communication. ``as_grouped_mm_weight`` of the result equals ``weight``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight: expected a 3D (E, K, N) tensor, got {_describe(weight)}")
    return weight.detach().transpose(-2, -1).contiguous()


def expert_weight_to_kn(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`expert_weight_from_kn`: a contiguous ``(E, K, N)`` copy of ``(E, N, K)`` storage."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight: expected a 3D (E, N, K) tensor, got {_describe(weight)}")
    return weight.detach().transpose(-2, -1).contiguous()


KeySelector = Union[Iterable[str], Callable[[str], bool]]


def state_dict_to_expert_layout(state_dict: Mapping[str, object], keys: KeySelector) -> dict[str, object]:
    """A copy of ``state_dict`` with the selected ``(E, K, N)`` expert weights stored ``(E, N, K)``.

    ``keys``: the exact names to convert, or a predicate on the name (for example
    ``lambda name: name.endswith(("w1", "w2", "w3"))``). Every named key must exist and be
    3D (KeyError / ValueError otherwise); other entries are passed through untouched. Works
    on full and on sharded (DTensor) state dicts.
    """
    return _convert(state_dict, keys, expert_weight_from_kn)


def state_dict_from_expert_layout(state_dict: Mapping[str, object], keys: KeySelector) -> dict[str, object]:
    """A copy of ``state_dict`` with the selected ``(E, N, K)`` expert weights exported ``(E, K, N)``."""
    return _convert(state_dict, keys, expert_weight_to_kn)


def _convert(
    state_dict: Mapping[str, object], keys: KeySelector, convert: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, object]:
    if callable(keys):
        selected = [name for name in state_dict if keys(name)]
    elif isinstance(keys, str):
        raise TypeError("keys: expected an iterable of names or a predicate, got a single str (wrap it in a list)")
    else:
        selected = list(keys)
        missing = [name for name in selected if name not in state_dict]
        if missing:
            raise KeyError(f"keys: not in the state dict: {', '.join(missing)}")
    converted = dict(state_dict)
    for name in selected:
        value = state_dict[name]
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise ValueError(f"state_dict[{name!r}]: expected a 3D expert weight, got {_describe(value)}")
        converted[name] = convert(value)
    return converted


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


_prepare_weight_warned = False

PREPARE_WEIGHT_WARNING = (
    "mxfp8_compat.prepare_weight returns a non-contiguous parameter, which "
    "torch.distributed.fsdp.fully_shard rejects ('FSDP does not support non-contiguous parameters'). "
    "Store expert weights as a contiguous (E, N, K) parameter instead: "
    "w = mxfp8_compat.expert_weight(E, K, N), pass mxfp8_compat.as_grouped_mm_weight(w) as B "
    "(zero copies on every path), and convert (E, K, N) checkpoints with "
    "mxfp8_compat.state_dict_to_expert_layout."
)


def prepare_weight(param: torch.Tensor) -> torch.nn.Parameter:
    """An ``(E, K, N)`` ``nn.Parameter`` stored per-group column-major (strides ``(N*K, 1, K)``).

    Superseded by :func:`expert_weight` + :func:`as_grouped_mm_weight`, and kept so that
    single-process code written against it keeps running unchanged (same values, same
    zero-copy behaviour in the MXFP8 callables). It warns, once per process
    (``FutureWarning``, shown by default), instead of raising: nothing is wrong until the
    parameter meets ``fully_shard``, and raising would break working single-GPU code for a
    problem it does not have. It cannot be made FSDP-safe in place: ``fully_shard`` needs a
    contiguous parameter, and a contiguous ``(E, K, N)`` tensor is the row-major layout the
    MXFP8 kernels would copy on every call; only the shape change to ``(E, N, K)`` storage
    satisfies both, which is what :func:`expert_weight` gives.
    """
    global _prepare_weight_warned
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param: expected a torch.Tensor or nn.Parameter, got {type(param).__name__}")
    if param.dim() != 3:
        raise ValueError(f"param: expected a 3D (E, K, N) weight, got shape {tuple(param.shape)}")
    if not _prepare_weight_warned:
        _prepare_weight_warned = True
        warnings.warn(PREPARE_WEIGHT_WARNING, FutureWarning, stacklevel=2)
    data = weight_relayout(param.detach())
    return torch.nn.Parameter(data, requires_grad=param.requires_grad)
