"""The one way this package launches a Triton kernel (imported only where triton is used).

``launch(kernel, grid, *args, **options)`` is ``kernel[grid](*args, **options)`` plus the three
things every launch here needs and no kernel should have to remember:

* **the tensors' device.** Triton launches on ``torch.cuda.current_device()``; a tensor on
  ``cuda:1`` while ``cuda:0`` is current (``device_map="auto"``, ``resolve(device="cuda:1")``)
  would be read by a kernel on the wrong GPU. The launch enters the device of its tensor
  arguments, and refuses tensors on several devices with a ValueError.
* **unit-stride index tensors.** Kernels read integer tensors (``offs``, row maps) as flat
  arrays; a strided view (``offs[::2]``) would be read as if it were contiguous, silently.
  int32/int64 tensor arguments are made contiguous (free when they already are).
* **64-bit sizes.** Python ints of 2**31 and more reach the kernel as int64 by Triton's own
  rule; smaller ones arrive as int32, so products of them (``rows * cols``) must be formed in
  int64 inside the kernel. The kernels of this package take every size that enters an address
  or a bound through ``do_not_specialize`` and widen it first (see ``_fast_kernels``); the
  interpreter tests in ``tests/test_kernel_bounds.py`` launch each one at offsets past 2**31
  and 2**32. ``launch`` checks what it can see: no argument is a bool posing as a size, and
  every int fits int64.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import torch

__all__ = ["launch", "kernel_module"]

_INT64_MAX = 2**63 - 1
# Index and offset tensors. Data reaches some kernels as an int16 view of bf16 (the arithmetic
# path), which must never be copied: a kernel may write into it.
_INDEX_DTYPES = (torch.int32, torch.int64)


def _prepare(arg: Any, devices: set[torch.device]) -> Any:
    if isinstance(arg, torch.Tensor):
        devices.add(arg.device)
        if arg.dtype in _INDEX_DTYPES and not arg.is_contiguous():
            return arg.contiguous()
        return arg
    if isinstance(arg, int) and not isinstance(arg, bool) and not -_INT64_MAX - 1 <= arg <= _INT64_MAX:
        raise ValueError(f"kernel argument {arg} does not fit int64")
    return arg


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """Run ``kernel[grid](*args, **options)`` on the device of its tensor arguments.

    int32/int64 tensor arguments (indices, offsets: read-only in every kernel here) are made
    contiguous first. Raises ValueError when the tensors
    lie on more than one device. A grid with no programs launches nothing.
    """
    if not all(grid):
        return
    devices: set[torch.device] = set()
    prepared = [_prepare(arg, devices) for arg in args]
    if len(devices) > 1:
        raise ValueError(f"kernel {getattr(kernel, '__name__', kernel)}: tensors on several devices: {sorted(map(str, devices))}")
    device = next(iter(devices), None)
    guard: Any = contextlib.nullcontext()
    if device is not None and device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        guard = torch.cuda.device(device.index)
    with guard:
        kernel[grid](*prepared, **options)


@functools.lru_cache(maxsize=None)
def kernel_module(name: str, interpret: bool) -> ModuleType:
    """This package's kernel module ``name`` (e.g. ``"_fast_kernels"``): compiled, or a second
    copy built for triton's interpreter, which runs the same kernels on CPU tensors (tests).

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when the module is executed, so the interpreted
    copy is the same file executed again under another module name with the variable set.
    """
    package = __package__ or "mxfp8_compat"
    if not interpret:
        return importlib.import_module(f"{package}.{name}")
    import triton  # noqa: F401 - fail here if absent

    qualified = f"{package}.{name}_interpreted"
    path = os.path.join(os.path.dirname(__file__), f"{name}.py")
    spec = importlib.util.spec_from_file_location(qualified, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    sys.modules[qualified] = module
    return module
