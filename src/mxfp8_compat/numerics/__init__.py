"""MXFP8 numerics in plain PyTorch: the quantiser, the reference GEMM, high-precision GEMMs, SQNR.

- :mod:`.quantize`: blocks, scale rules, special values.
- :mod:`.reference`: the reference MXFP8 grouped GEMM (the project's yardstick).
- :mod:`.backward`: the backward GEMMs the reference and the fast emulation share.
- :mod:`.highprec`: high-precision grouped GEMMs (bf16 fallbacks, the float64 truth).
- :mod:`.metrics`: SQNR and the forward/backward harness the smoke run measures with.
"""
