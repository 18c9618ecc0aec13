"""Triton kernels (imported only where triton is used) and the one way they are launched.

- :mod:`.launch`: ``launch()`` and ``kernel_module()`` (compiled, or a copy for triton's interpreter).
- :mod:`.fast_quant`: the fast emulation's quantisers.
- :mod:`.mx_quant`: the quantisers feeding torch's own MXFP8 grouped GEMM.
- :mod:`.token_groups`: sync-free token-group padding on CUDA.
- :mod:`.helpers`: helpers shared by the quantiser kernels.
"""
