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
  or a bound through ``do_not_specialize`` and widen it first (see ``fast_quant``); the
  interpreter tests in ``tests/test_kernel_bounds.py`` run each one at offsets past 2**31
  and 2**32 (a kernel written later is added there too).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import torch

__all__ = ["launch", "kernel_module"]

# Index and offset tensors. Data reaches some kernels as an int16 view of bf16 (the arithmetic
# path), which must never be copied: a kernel may write into it.
_INDEX_DTYPES = (torch.int32, torch.int64)
_Tensor = torch.Tensor
# Where a kernel's tensor arguments are, per (kernel, argument count): found once, so that a launch
# looks only at its tensors (each check costs ~0.1 us, and a launch has a dozen other arguments).
_tensor_positions: dict[tuple[int, int], tuple[int, ...]] = {}


def _positions(kernel: Any, args: tuple[Any, ...]) -> tuple[int, ...]:
    key = (id(kernel), len(args))
    positions = _tensor_positions.get(key)
    if positions is None or not all(isinstance(args[p], _Tensor) for p in positions):
        positions = _tensor_positions[key] = tuple(p for p, arg in enumerate(args) if isinstance(arg, _Tensor))
    return positions


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """Run ``kernel[grid](*args, **options)`` on the device of its tensor arguments.

    int32/int64 tensor arguments (indices and offsets, which kernels read as flat arrays) are
    made contiguous first. Raises ValueError when the tensors lie on more than one device. A
    grid with no programs launches nothing. Costs a few microseconds over the bare launch.
    """
    if not all(grid):
        return
    positions = _positions(kernel, args)
    if not positions:
        kernel[grid](*args, **options)
        return
    first = args[positions[0]]
    device, is_cuda, is_cpu = first.get_device(), first.is_cuda, first.is_cpu
    for position in positions:
        arg = args[position]
        if arg.get_device() != device or arg.is_cuda is not is_cuda or arg.is_cpu is not is_cpu:
            name = getattr(kernel, "__name__", kernel)
            raise ValueError(f"kernel {name}: tensors on several devices: {first.device} and {arg.device}")
        if not arg.is_contiguous() and arg.dtype in _INDEX_DTYPES:
            args = args[:position] + (arg.contiguous(),) + args[position + 1 :]
    if is_cuda and device != torch.cuda.current_device():
        with torch.cuda.device(device):
            kernel[grid](*args, **options)
        return
    kernel[grid](*args, **options)


@functools.lru_cache(maxsize=None)
def kernel_module(name: str, interpret: bool) -> ModuleType:
    """This package's kernel module ``name`` (e.g. ``"fast_quant"``): compiled, or a second
    copy built for triton's interpreter, which runs the same kernels on CPU tensors (tests).

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when the module is executed, so the interpreted
    copy is the same file executed again under another module name with the variable set.
    """
    package = __package__ or "mxfp8_compat"
    if not interpret:
        return importlib.import_module(f"{package}.{name}")
    importlib.import_module("triton")  # fail here, not in the kernels, if triton is absent

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
