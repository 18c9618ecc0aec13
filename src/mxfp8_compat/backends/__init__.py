"""The callables a Resolution hands out.

- :mod:`.grouped_mm`: the bf16 and MXFP8 factories and their autograd helpers.
- :mod:`.torchao_paths`: torchao's native and emulated paths, built from their row's columns.
- :mod:`.fast_emulation`: mxfp8_compat's fast emulation (Triton quantisers, CUDA).
- :mod:`.torch_native`: torch's own MXFP8 grouped GEMM fed by mxfp8_compat's quantisers.
"""
