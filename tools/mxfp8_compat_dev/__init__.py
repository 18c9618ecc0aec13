"""Development tooling of mxfp8_compat, run from the checkout and never shipped in the wheel.

- :mod:`.matrix`: compat-matrix records written by real test runs, and the table rendered from them.
- :mod:`.matrix_totals`: the totals line (torch-free: ``.ci/run`` loads it by path).
- :mod:`.agreement`: torchao's own emulation against the reference, bit for bit.

``tools/`` must be on ``sys.path`` (tox sets ``PYTHONPATH``; ``tests/conftest.py`` inserts it).
"""
