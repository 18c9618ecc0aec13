"""Integrations of mxfp8_compat's grouped GEMM into other libraries.

Each integration lives in its own module and imports its library only when it is used:
importing ``mxfp8_compat`` (or this package) imports none of them.

* :mod:`mxfp8_compat.integrations.transformers`: an ``experts_implementation`` backend for
  Hugging Face transformers 5.x (``register()``, then ``experts_implementation="mxfp8"``).
"""

__all__: list[str] = []
