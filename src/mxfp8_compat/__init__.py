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
from .layout import prepare_weight, weight_relayout
from .reference import ScaleMode, mxfp8_grouped_mm_reference, sqnr_db
from .resolution import Resolution, resolve, reset

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
    "mxfp8_grouped_mm_reference",
    "prepare_weight",
    "reset",
    "resolve",
    "select_grouped_mm",
    "sqnr_db",
    "weight_relayout",
    "__version__",
]
