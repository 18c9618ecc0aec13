"""What is usable on this machine, decided by trying it, never by guessing.

- :mod:`.environment`: installed versions, the torchao import, the device gate (no GEMM runs).
- :mod:`.smoke`: the smoke run that recognises a path as MXFP8 before anything uses it.
- :mod:`.isolated`: the same in a child process first, for a torchao that can kill the interpreter.

Row matching (which adapter row fits the installed torchao) is the table's: :mod:`mxfp8_compat.providers.match`.
"""
