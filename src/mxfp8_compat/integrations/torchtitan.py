"""A torchtitan model converter: every ``GroupedExperts`` through mxfp8_compat's grouped GEMM.

torchtitan's experts call one seam, ``GroupedExperts._grouped_mm(self, *, A, B_t, offs)``
(``torchtitan/models/common/moe.py``), which its own ``MXFP8GroupedExpertsConverter``
overrides; that converter needs torchao >= 0.17 and an sm_100 GPU and pads token groups in
the dispatcher to a fixed ``pad_multiple``. This one is registered the same way (a
``QuantizationConverter`` with a nested ``Config``, passed in ``converters=[...]`` to a
model registry), and works with any torchao or none, on any device::

    from mxfp8_compat.integrations.torchtitan import MXFP8CompatConverter
    config.model_spec = model_registry("debugmodel", converters=[MXFP8CompatConverter.Config(mode="auto")])

What it converts, in the model config tree (before the model is built):

* each ``GroupedExperts.Config`` (and subclasses such as gpt-oss's) becomes the config of a
  subclass whose ``_grouped_mm`` calls ``resolve(mode)`` for the device of the activations;
* the owning ``RoutedExperts``' token dispatcher (``AllToAllTokenDispatcher``, which is
  ``comm_backend="standard"``, its ``TorchAOTokenDispatcher`` subclass, or the local one)
  becomes :class:`MXFP8CompatTokenDispatcher`, which pads every local expert's token group to
  ``Resolution.group_alignment`` rows after the stock dispatch (EP all-to-all included) and
  strips it before the stock combine, so the experts pass ``groups_aligned=True`` and nothing
  is padded twice. Where the alignment is 1 (bf16, the reference emulation) it is the stock
  dispatcher exactly. Other dispatchers (DeepEP, HybridEP, ...) are left as they are; the
  grouped GEMM then pads by itself (logged once at conversion).

``torch.compile``, FSDP2 and expert parallelism apply as torchtitan applies them: the seam
receives local tensors (``GroupedExperts.forward`` unwraps DTensor weights), the resolution
is read as a constant while tracing, and padding needs no host sync.

Importing this module imports torchtitan (and, through torchtitan's quantization package,
torchao where it is installed); mxfp8_compat's own torchao probes run at the first forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import metadata
from typing import Any, Optional

import torch

from ..backends.grouped_mm import log_once
from ..token_groups import TokenGroupPadding, pad_with, token_group_padding, unpad_token_groups
from ._resolving import checked_mode, resolution_for

try:
    from torchtitan.components.quantization import QuantizationConverter
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher, LocalTokenDispatcher
except ImportError as error:  # pragma: no cover - exercised only without torchtitan
    try:
        _installed: Optional[str] = metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        _installed = None
    raise ImportError(
        "mxfp8_compat.integrations.torchtitan needs torchtitan >= 0.3.0 (GroupedExperts._grouped_mm, "
        f"converters on the model config); {'torchtitan is not installed' if _installed is None else f'torchtitan {_installed}: {error}'}. "
        "Install it with: pip install 'torchtitan>=0.3.0'"
    ) from error

__all__ = ["MXFP8CompatConverter", "MXFP8CompatTokenDispatcher", "mxfp8_experts_class"]


@dataclass(frozen=True)
class _PaddedDispatch:
    """What combine() needs: the stock dispatcher's metadata and the padding added after it."""

    inner: Any
    padding: TokenGroupPadding


class MXFP8CompatTokenDispatcher(AllToAllTokenDispatcher):
    """torchtitan's all-to-all dispatcher, with each local expert's group padded to the resolved alignment.

    ``dispatch`` runs the stock dispatch (local reorder, or EP all-to-all and expert-major
    permute), then pads every group to ``resolve(mode).group_alignment`` rows on the device
    (one row gather, no host sync; the buffer's static length is a multiple of the alignment
    too). ``combine`` gathers the rows back and runs the stock combine. Alignment 1: the stock
    dispatcher, untouched.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(AllToAllTokenDispatcher.Config):
        mode: Optional[str] = None
        """mxfp8_compat mode (auto, native, emulated, off); None reads MXFP8_COMPAT_MODE, else auto."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.mode = checked_mode(config.mode, "MXFP8CompatTokenDispatcher.Config.mode")

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):  # type: ignore[no-untyped-def]
        routed_RD, counts_e, metadata = super().dispatch(
            x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E
        )
        alignment = resolution_for(self.mode, x_TD.device).group_alignment
        if alignment <= 1:
            return routed_RD, counts_e, metadata
        offs = torch.cumsum(counts_e, dim=0, dtype=torch.int32)
        padding = token_group_padding(offs, routed_RD.shape[0], alignment)
        padded_counts = torch.diff(padding.padded_offs, prepend=padding.padded_offs.new_zeros(1))
        return pad_with(routed_RD, padding), padded_counts.to(counts_e.dtype), _PaddedDispatch(metadata, padding)

    def combine(self, routed_output_RD, metadata, x_TD):  # type: ignore[no-untyped-def]
        if isinstance(metadata, _PaddedDispatch):
            return super().combine(unpad_token_groups(routed_output_RD, metadata.padding), metadata.inner, x_TD)
        return super().combine(routed_output_RD, metadata, x_TD)


_experts_classes: dict[type, type] = {}


def mxfp8_experts_class(parent: type) -> type:
    """The subclass of a ``GroupedExperts`` class whose ``_grouped_mm`` is mxfp8_compat's (one per parent).

    Its ``Config`` adds ``mode`` (as :func:`mxfp8_compat.resolve`) and ``groups_aligned``
    (True where the dispatcher pads to the resolved alignment).
    """
    if not (isinstance(parent, type) and issubclass(parent, GroupedExperts)):
        raise TypeError(f"parent: expected a subclass of torchtitan's GroupedExperts, got {parent!r}")
    cached = _experts_classes.get(parent)
    if cached is not None:
        return cached
    parent_config = parent.Config  # type: ignore[attr-defined]

    class MXFP8CompatGroupedExperts(parent):  # type: ignore[valid-type, misc]
        @dataclass(kw_only=True, slots=True)
        class Config(parent_config):  # type: ignore[misc, valid-type]
            mode: Optional[str] = None
            groups_aligned: bool = False

        def __init__(self, config: Config):
            super().__init__(config)
            self._mxfp8_mode = checked_mode(config.mode, "Config.mode")
            self._mxfp8_groups_aligned = bool(config.groups_aligned)

        def _grouped_mm(self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
            grouped_mm = resolution_for(self._mxfp8_mode, A.device)
            return grouped_mm(A, B_t, offs, groups_aligned=self._mxfp8_groups_aligned)

    name = f"MXFP8Compat{parent.__name__}"
    MXFP8CompatGroupedExperts.__name__ = MXFP8CompatGroupedExperts.__qualname__ = name
    _experts_classes[parent] = MXFP8CompatGroupedExperts
    return MXFP8CompatGroupedExperts


def _swap_dispatcher(routed_experts_config: Any, mode: Optional[str]) -> bool:
    """Make the dispatcher pad to the resolved alignment; False where it is not ours to replace.

    The local and all-to-all dispatchers (and torchao's padding one, whose padding this replaces)
    become :class:`MXFP8CompatTokenDispatcher`; DeepEP, HybridEP and others stay as they are.
    """
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    dispatcher = routed_experts_config.token_dispatcher
    replaceable = (
        LocalTokenDispatcher.Config,
        AllToAllTokenDispatcher.Config,
        TorchAOTokenDispatcher.Config,
        MXFP8CompatTokenDispatcher.Config,
    )
    if type(dispatcher) not in replaceable:
        return False
    routed_experts_config.token_dispatcher = MXFP8CompatTokenDispatcher.Config(
        num_experts=dispatcher.num_experts, top_k=dispatcher.top_k, mode=mode
    )
    return True


class MXFP8CompatConverter(QuantizationConverter):
    """Route every ``GroupedExperts`` of a torchtitan model config through ``mxfp8_compat.resolve(mode)``.

    Works with any torchao (0.13 .. main) or none, on any device: ``mode="auto"`` is native
    MXFP8 where an sm_100 and a working torchao are present, else bf16 with the reasons
    logged; ``"emulated"`` gives MXFP8 numerics anywhere (CPU included); ``"off"`` is the
    stock bf16 path. The mode is resolved at the first forward on each device.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        mode: Optional[str] = None
        """mxfp8_compat mode: auto, native, emulated or off; None reads MXFP8_COMPAT_MODE, else auto."""

    def __init__(self, config: Config):
        self.config = config
        self.mode = checked_mode(config.mode, "MXFP8CompatConverter.Config.mode")

    def convert(self, model_config):  # type: ignore[no-untyped-def]
        """The model config with every ``GroupedExperts.Config`` (and its dispatcher) converted."""
        converted = 0
        for fqn, config, parent, attr in list(model_config.traverse(GroupedExperts.Config)):
            owner = type(config)._owner
            if owner in _experts_classes.values():
                owner = owner.__mro__[1]  # converted before: convert from the stock class again
            aligned = parent is not None and hasattr(parent, "token_dispatcher") and _swap_dispatcher(parent, self.mode)
            if parent is not None and hasattr(parent, "token_dispatcher") and not aligned:
                log_once(
                    f"mxfp8_compat: {fqn}: token dispatcher {type(parent.token_dispatcher).__qualname__} is not padded "
                    "by the converter; the grouped GEMM pads token groups itself"
                )
            experts_class = mxfp8_experts_class(owner)
            values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("mode", "groups_aligned")}
            new_config = experts_class.Config(**values, mode=self.mode, groups_aligned=aligned)
            if parent is None:
                model_config = new_config
            elif isinstance(parent, list):
                parent[attr] = new_config
            else:
                setattr(parent, attr, new_config)
            converted += 1
        if converted == 0:
            raise ValueError("model_config: no GroupedExperts.Config to convert (is this an MoE model?)")
        return model_config
