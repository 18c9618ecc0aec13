"""Who supplies the MXFP8 grouped GEMM: the adapter tables and one module per provider family.

- :mod:`.schema`: the columns a row may have.
- :mod:`.table`: the rows, newest first, as frozen data (torchao's and torch's own).
- :mod:`.torchao`: torchao 0.16+'s entry, fingerprint and binder.
- :mod:`.torchao_013_015`: everything only torchao 0.13-0.15 need (their rows included).
- :mod:`.torch_mm`: torch's own MXFP8 grouped GEMM's binders.
- :mod:`.match`: which row fits the installed torchao.

Nothing outside this folder names a torchao release or tests a row key (``tests/test_layout_of_package.py``).
"""
