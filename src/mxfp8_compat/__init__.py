"""mxfp8_compat: one MXFP8 grouped GEMM over every torchao release, or none.

    from mxfp8_compat import resolve
    grouped_mm = resolve()          # fn(A, B, offs, *, out_dtype=torch.bfloat16)
    out = grouped_mm(A, B, offs)    # same contract as torch._grouped_mm
    print(grouped_mm.backend, grouped_mm.reasons)

See README.md for modes, the adapter table and the compatibility matrix.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .dropin import select_grouped_mm
from .errors import MXFP8Unavailable
from .generations import GENERATIONS, Generation
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
from .metrics import sqnr_db
from .quantize import ScaleMode
from .reference import mxfp8_grouped_mm_reference
from .resolution import Resolution, resolve, reset
from .token_groups import TokenGroupPadding, pad_token_groups, unpad_token_groups

try:
    __version__ = version("mxfp8_compat")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

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
