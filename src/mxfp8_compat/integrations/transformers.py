"""An ``experts_implementation`` backend for Hugging Face transformers: MXFP8 for every MoE model.

Since 5.0, transformers routes the expert GEMMs of its MoE models through one registry,
``transformers.integrations.moe.ExpertsInterface``. :func:`register` adds a backend to it::

    from mxfp8_compat.integrations.transformers import register
    register()                                   # "mxfp8", mode from MXFP8_COMPAT_MODE, else "auto"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="mxfp8")
    model.set_experts_implementation("mxfp8")    # or switch a loaded model

(transformers 5.7+: earlier 5.x releases have the registry but accept only their built-in names.)

The backend's forward sorts the (token, k) slots by expert as transformers' own ``grouped_mm``
backend does, and pads every expert's group to ``Resolution.group_alignment`` rows in that
same permutation: one row gather from ``hidden_states`` straight into the padded buffer
(the sort permutation composed with :func:`mxfp8_compat.token_groups.token_group_padding`'s
maps), then both grouped GEMMs through the resolved callable with ``groups_aligned=True``.
The expert weights are passed as transpose views of transformers' storage (no copy); biases
(gpt-oss), gated and ungated experts, a post-expert norm, expert-parallel sentinel ids
(``>= num_experts``: they contribute zero) and routing weights are handled as transformers
does. Every scatter is a gather through the inverse map (no ``index_add_``, no atomics), so
forward and backward are deterministic.

Importing this module imports neither transformers nor torchao; :func:`register` does.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable, Optional

import torch
from packaging.version import Version

from ..resolution import MODES, Resolution
from ._resolving import resolution_for as _resolution
from ..token_groups import gather_rows, gather_rows_with_inverse, token_group_padding

__all__ = ["MIN_TRANSFORMERS_VERSION", "register", "experts_forward", "require_transformers"]

#: The first transformers release whose ``from_pretrained``/``set_experts_implementation`` accept
#: names registered in ``transformers.integrations.moe.ExpertsInterface`` (5.0-5.6 have the
#: registry but check a fixed list of built-in names).
MIN_TRANSFORMERS_VERSION = "5.7.0"

_REGISTERED: dict[str, Callable[..., torch.Tensor]] = {}


def require_transformers() -> Any:
    """``transformers.integrations.moe.ExpertsInterface``, or an ImportError naming the version needed."""
    try:
        installed: Optional[str] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        installed = None
    found = None
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception as error:  # noqa: BLE001 - missing, too old, or broken: one clear sentence
        if installed is None:
            found = "transformers is not installed"
        elif isinstance(error, ImportError):
            found = f"transformers {installed} has no transformers.integrations.moe.ExpertsInterface ({error})"
        else:
            found = f"importing transformers {installed} failed: {type(error).__name__}: {error}"
        cause: Optional[BaseException] = error
    else:
        cause = None
        if installed is not None and Version(installed) < Version(MIN_TRANSFORMERS_VERSION):
            found = (
                f"transformers {installed} has the registry, but its from_pretrained and set_experts_implementation "
                "accept only the built-in names"
            )
    if found is not None:
        raise ImportError(
            f"mxfp8_compat.integrations.transformers needs transformers >= {MIN_TRANSFORMERS_VERSION} "
            f"(its experts registry, transformers.integrations.moe.ExpertsInterface, open to registered names); "
            f"{found}. Install it with: pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        ) from cause
    return ExpertsInterface


def register(name: str = "mxfp8", mode: Optional[str] = None) -> Callable[..., torch.Tensor]:
    """Register the MXFP8 experts backend under ``name`` in transformers' ``ExpertsInterface``.

    After this, ``from_pretrained(..., experts_implementation=name)``, ``from_config(...,
    experts_implementation=name)`` and ``model.set_experts_implementation(name)`` select it.

    Args:
        name: the ``experts_implementation`` name. Registering the same name again replaces
            the earlier registration; transformers' own names (``"grouped_mm"``, ...) and
            ``"eager"`` are refused.
        mode: as :func:`mxfp8_compat.resolve`: ``"auto"``, ``"native"``, ``"emulated"``,
            ``"off"``, or None to read ``MXFP8_COMPAT_MODE`` (else ``"auto"``). It is resolved
            at the first forward on each device (the device of the hidden states), and
            cached per device by ``resolve()``.

    Returns:
        The experts forward function that was registered.

    Raises:
        ImportError: transformers is missing or older than ``MIN_TRANSFORMERS_VERSION``.
        ValueError: an unknown ``mode``, or a ``name`` that is not ours to take.
    """
    interface = require_transformers()
    if mode is not None:
        if not isinstance(mode, str) or mode.strip().lower() not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)} or None, got {mode!r}")
        mode = mode.strip().lower()
    if not isinstance(name, str) or not name or name == "eager":
        raise ValueError(f"name: expected a non-empty experts_implementation name other than 'eager', got {name!r}")
    existing = interface._global_mapping.get(name)
    if existing is not None and existing is not _REGISTERED.get(name):
        raise ValueError(f"name: {name!r} is already an experts implementation of transformers' own; choose another name")

    def mxfp8_experts_forward(
        self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, _resolution(mode, hidden_states.device))

    mxfp8_experts_forward.__qualname__ = mxfp8_experts_forward.__name__ = f"mxfp8_experts_forward[{name}, mode={mode}]"
    interface.register(name, mxfp8_experts_forward)
    _REGISTERED[name] = mxfp8_experts_forward
    return mxfp8_experts_forward


# --- the experts forward -----------------------------------------------------------------------


class _GatherTokens(torch.autograd.Function):
    """``x[token]`` (zeros where ``token >= len(x)``) for a token gathered once per (token, k) slot.

    Backward: each token's gradient is the sum of its k slots' rows, gathered (no atomics) and
    added in the order of the rows (ascending padded position): the order in which the backward
    of transformers' ``hidden_states[perm // k]`` (``index_put_(accumulate=True)``) adds them on
    the CPU under ``torch.use_deterministic_algorithms`` (without it, its threads add in any order).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(slot_rows)
        return gather_rows(x, token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (slot_rows,) = ctx.saved_tensors
        tokens, top_k = slot_rows.shape
        ordered = slot_rows.sort(dim=1).values if top_k > 1 else slot_rows
        rows = gather_rows(grad, ordered.reshape(-1)).view(tokens, top_k, grad.shape[-1])
        return rows.sum(dim=1), None, None


class _Combine(torch.autograd.Function):
    """``y[t] = sum_k rows[slot_rows[t, k]]`` (rows past the end read as zeros), as transformers sums.

    Backward: row r's gradient is ``grad[token[r]]`` (zero where ``token[r]`` is past the end):
    a gather, since each row belongs to at most one token.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, slot_rows: torch.Tensor, token: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(token)
        tokens, top_k = slot_rows.shape
        return gather_rows(rows, slot_rows.reshape(-1)).view(tokens, top_k, rows.shape[-1]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (token,) = ctx.saved_tensors
        return gather_rows(grad, token), None, None


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    grouped_mm: Resolution,
) -> torch.Tensor:
    """The MoE experts of a transformers experts module through ``grouped_mm`` (a Resolution).

    ``self`` is a module decorated with transformers' ``@use_experts_implementation``:
    ``gate_up_proj`` ``(E, 2I, H)`` (``up_proj`` when ungated) and ``down_proj`` ``(E, H, I)``,
    or ``(E, H, 2I)`` / ``(E, I, H)`` when ``is_transposed``, optional ``*_bias`` ``(E, N)``,
    ``_apply_gate`` or ``act_fn``, optional ``post_expert_norm``. ``hidden_states`` ``(T, H)``,
    ``top_k_index`` ``(T, k)`` expert ids (ids ``>= E`` are expert-parallel sentinels: they
    contribute zero), ``top_k_weights`` ``(T, k)``. Returns ``(T, H)`` in
    ``hidden_states``' dtype.
    """
    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, shape[-1])
    top_k = top_k_index.shape[-1]
    top_k_index = top_k_index.reshape(-1, top_k)
    tokens, hidden = hidden_states.shape
    slots = tokens * top_k
    device = hidden_states.device

    gated = getattr(self, "has_gate", True)
    up = self.gate_up_proj if gated else self.up_proj
    down = self.down_proj
    experts = up.shape[0]
    # B (E, K, N) for the grouped GEMM: transformers stores (E, N, K) contiguous unless
    # is_transposed, and the transpose view is the per-group column-major layout MXFP8 needs.
    transposed = getattr(self, "is_transposed", False)
    up_b = up if transposed else up.transpose(-2, -1)
    down_b = down if transposed else down.transpose(-2, -1)
    if slots == 0:
        return hidden_states.new_zeros(shape)

    routing = top_k_weights.reshape(slots, 1)

    # Sort the slots by expert exactly as transformers' grouped_mm backend does; sentinels sort last.
    sorted_ids, perm = torch.sort(top_k_index.reshape(-1))
    offs = torch.searchsorted(
        sorted_ids, torch.arange(experts, device=device, dtype=sorted_ids.dtype), right=True
    ).to(torch.int32)
    # Releases with `_is_expert_parallel` (after 5.17) say when ids may be sentinels; for earlier
    # ones, assume they may (their grouped_mm masks them always).
    sentinels = getattr(self, "_is_expert_parallel", True)

    # Layout of the buffer the GEMMs see (P rows): `source` is the slot each row holds (`slots`
    # for padding rows), `slot_rows` the row of each slot (P for sentinels, which no row holds).
    alignment = grouped_mm.group_alignment
    arange = torch.arange(slots, device=device)
    if alignment <= 1:
        rows = slots
        padded_offs = offs
        slot_rows = torch.empty_like(perm).scatter_(0, perm, arange)
        row_expert = sorted_ids
        source = perm
        holds = None
        if sentinels:
            holds = arange < offs[-1]
            source = torch.where(holds, perm, slots)
            slot_rows = torch.where(slot_rows < offs[-1], slot_rows, slots)
            row_expert = sorted_ids.clamp(max=experts - 1)
    else:
        padding = token_group_padding(offs, slots, alignment)
        rows = padding.padded_rows
        padded_offs = padding.padded_offs
        holds = padding.source_rows < slots
        source = torch.where(holds, perm[padding.source_rows.clamp(max=slots - 1)], slots)
        slot_rows = torch.empty_like(perm).scatter_(0, perm, padding.padded_positions)
        row_expert = torch.searchsorted(
            padded_offs, torch.arange(rows, device=device, dtype=padded_offs.dtype), right=True
        ).clamp_(max=experts - 1)
    slot_rows = slot_rows.view(tokens, top_k)
    token = source // top_k  # `tokens` (a zero row) for padding rows

    # One gather from hidden_states into the padded, expert-sorted buffer.
    x = _GatherTokens.apply(hidden_states, token, slot_rows)
    weights = gather_rows_with_inverse(routing, source, slot_rows.reshape(-1))

    h = grouped_mm(x.to(up_b.dtype), up_b, padded_offs, groups_aligned=True)
    h = _bias_and_mask(self, h, ("gate_up_proj_bias" if gated else "up_proj_bias"), row_expert, holds)
    h = self._apply_gate(h) if gated else self.act_fn(h)
    h = grouped_mm(h.to(down_b.dtype), down_b, padded_offs, groups_aligned=True)
    h = _bias_and_mask(self, h, "down_proj_bias", row_expert, holds)
    if getattr(self, "has_post_expert_norm", False):
        h = self.post_expert_norm(h)
    out = _Combine.apply(h * weights, slot_rows, token)
    return out.to(hidden_states.dtype).reshape(shape)


def _bias_and_mask(
    self: torch.nn.Module, h: torch.Tensor, bias_name: str, row_expert: torch.Tensor, holds: Optional[torch.Tensor]
) -> torch.Tensor:
    """Add each row's expert bias; zero the rows that hold no token (the GEMMs leave them unspecified).

    The mask keeps those rows' values out of every later reduction over rows (a post-expert
    norm's weight gradient, a bias gradient), as transformers' own masks do for sentinels.
    """
    if getattr(self, "has_bias", False):
        h = h + getattr(self, bias_name)[row_expert]
    if holds is not None:
        h = torch.where(holds.unsqueeze(-1), h, 0)
    return h
