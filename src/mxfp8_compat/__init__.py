"""mxfp8_compat: one MXFP8 grouped GEMM over every torchao release, or none.

    from mxfp8_compat import resolve
    grouped_mm = resolve()          # fn(A, B, offs, *, out_dtype=torch.bfloat16)
    out = grouped_mm(A, B, offs)    # same contract as torch._grouped_mm
    print(grouped_mm.backend, grouped_mm.reasons)

See README.md for the contract and docs/reference.md for the modes, the adapter table and the numerics.
This module holds public names only; where each concern lives: docs/reference.md, "Layout".
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mxfp8_compat")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

# Names are imported on first use (PEP 562), so `import mxfp8_compat` and `mxfp8-compat --help`
# do not import torch; `from mxfp8_compat import resolve` imports what it needs then.
_EXPORTS = {
    "select_grouped_mm": "dropin",
    "MXFP8Unavailable": "errors",
    "GENERATIONS": "providers.table",
    "Generation": "providers.table",
    "as_grouped_mm_weight": "layout",
    "expert_weight": "layout",
    "expert_weight_from_kn": "layout",
    "expert_weight_to_kn": "layout",
    "prepare_weight": "layout",
    "state_dict_from_expert_layout": "layout",
    "state_dict_to_expert_layout": "layout",
    "weight_relayout": "layout",
    "sqnr_db": "numerics.metrics",
    "ScaleMode": "numerics.quantize",
    "mxfp8_grouped_mm_reference": "numerics.reference",
    "Resolution": "resolution",
    "resolve": "resolution",
    "reset": "resolution",
    "TokenGroupPadding": "token_groups",
    "pad_token_groups": "token_groups",
    "unpad_token_groups": "token_groups",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .dropin import select_grouped_mm
    from .errors import MXFP8Unavailable
    from .providers.table import GENERATIONS, Generation
    from .layout import (
        as_grouped_mm_weight,
        expert_weight,
        expert_weight_from_kn,
        expert_weight_to_kn,
        prepare_weight,
        state_dict_from_expert_layout,
        state_dict_to_expert_layout,
        weight_relayout,
    )
    from .numerics.metrics import sqnr_db
    from .numerics.quantize import ScaleMode
    from .numerics.reference import mxfp8_grouped_mm_reference
    from .resolution import Resolution, reset, resolve
    from .token_groups import TokenGroupPadding, pad_token_groups, unpad_token_groups


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "GENERATIONS",
    "Generation",
    "MXFP8Unavailable",
    "Resolution",
    "ScaleMode",
    "TokenGroupPadding",
    "as_grouped_mm_weight",
    "expert_weight",
    "expert_weight_from_kn",
    "expert_weight_to_kn",
    "mxfp8_grouped_mm_reference",
    "pad_token_groups",
    "prepare_weight",
    "reset",
    "resolve",
    "select_grouped_mm",
    "sqnr_db",
    "state_dict_from_expert_layout",
    "state_dict_to_expert_layout",
    "unpad_token_groups",
    "weight_relayout",
    "__version__",
]
