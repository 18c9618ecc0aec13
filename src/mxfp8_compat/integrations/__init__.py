"""Integrations of mxfp8_compat's grouped GEMM into other libraries.

Each integration lives in its own module and imports its library only when it is used:
importing ``mxfp8_compat`` (or this package) imports none of them.

* :mod:`mxfp8_compat.integrations.transformers`: an ``experts_implementation`` backend for
  Hugging Face transformers 5.x (``register()``, then ``experts_implementation="mxfp8"``).
* :mod:`mxfp8_compat.integrations.torchtitan`: a model converter for torchtitan 0.3.0+
  (``MXFP8CompatConverter.Config(mode=...)`` in ``converters=[...]``).
* :mod:`mxfp8_compat.integrations.automodel`: ``install()`` switches NeMo Automodel 0.7.0+'s
  experts to the drop-in.

docs/integrations.md gives the lines a user adds for each.
"""

__all__: list[str] = []
