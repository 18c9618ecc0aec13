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

And one thing for speed: **the direct launch.** Triton's own launch (``JITFunction.run``) binds
and specialises every argument, builds its cache key from them and the options, and looks the
compiled kernel up, in Python: 25-35 us per launch on an H200 host with triton 3.6, more than
the kernels themselves at small MoE shapes (issue 21). After triton has launched a kernel once
for a key, later launches with the same key call the compiled kernel's launcher directly, as
triton itself does. The key holds everything triton specialises on, and more: each tensor's
dtype and 16-byte alignment, each int's equality to 1, divisibility by 16 and 32/64-bit range,
the constexprs and launch options, the device. A launch repeating an earlier one's argument
values (a training step at the same sizes) finds its entry by those values, without computing
that key again. Launch hooks (profilers such as proton) and
triton before 3.4 take triton's own launch. ``MXFP8_COMPAT_DIRECT_LAUNCH=0`` (read at import),
or ``DIRECT_LAUNCH = False`` here, turns it off; ``with triton_launch():`` for one block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Iterator

import torch

__all__ = ["launch", "kernel_module", "DIRECT_LAUNCH", "triton_launch"]

#: Launch kernels already compiled for a key through their launcher, skipping triton's Python binder.
DIRECT_LAUNCH = os.environ.get("MXFP8_COMPAT_DIRECT_LAUNCH", "1").strip() != "0"

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
    if not is_cuda:
        kernel[grid](*args, **options)
    elif device != torch.cuda.current_device():
        with torch.cuda.device(device):
            _run_cuda(kernel, grid, device, args, positions, options)
    else:
        _run_cuda(kernel, grid, device, args, positions, options)


# --- the direct launch ------------------------------------------------------------------------

# (kernel, device, argument keys, options) -> (compiled kernel, values of the parameters after the
# positional ones), or None where the kernel cannot be launched directly (triton falls back).
_compiled: dict[tuple[Any, ...], Any] = {}
# The same entries by the arguments' values: (id(kernel), device, argument types, argument values
# with each tensor as its dtype and 16-byte alignment, options). A launch that repeats an earlier
# one's sizes (every step of a training run at a fixed batch) builds this key without a Python call
# per argument and without hashing the kernel (triton's JITFunction hashes under a lock); a new size
# computes the specialisation key above once and finds its compiled kernel there. Values determine
# every specialisation, so equal keys here mean equal keys there. Cleared when it reaches the limit
# (sizes that change every call).
_by_value: dict[tuple[Any, ...], Any] = {}
_BY_VALUE_LIMIT = 4096
_kernels: dict[int, Any] = {}  # id -> kernel, so that an id in _by_value's keys is never reused
_MISSING = object()


def _arg_key(arg: Any) -> Any:
    """What triton specialises an argument on (a superset of it): equal keys, same compiled kernel."""
    if isinstance(arg, _Tensor):
        return arg.dtype, not arg.data_ptr() & 15
    cls = arg.__class__
    if cls is int:
        return arg == 1, not arg & 15, -0x80000000 <= arg <= 0x7FFFFFFF, arg >= 1 << 63
    if cls is bool or cls is float or arg is None:
        return cls, arg if cls is not float else None
    raise TypeError  # anything else: triton's own launch


@functools.lru_cache(maxsize=None)
def _knobs_runtime() -> Any:
    """triton's launch settings (``knobs.runtime``, 3.4+: the launch hooks, and the launcher's call as
    used here), or None where this triton is older: then every launch is triton's own."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return getattr(knobs, "runtime", None)


def _hooks_set(runtime: Any) -> bool:
    """Whether a launch hook is installed (a profiler's): then every launch is triton's own, which calls it.

    A hook is None where none is set (triton 3.4, 3.9) or an empty ``HookChain`` (3.5-3.6)."""
    return _is_set(runtime.launch_enter_hook) or _is_set(runtime.launch_exit_hook)


def _is_set(hook: Any) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


@contextlib.contextmanager
def triton_launch() -> Iterator[None]:
    """Within the block every kernel takes triton's own launch (the direct launch off), then as before."""
    global DIRECT_LAUNCH
    before, DIRECT_LAUNCH = DIRECT_LAUNCH, False
    try:
        yield
    finally:
        DIRECT_LAUNCH = before


def _entry(kernel: Any, compiled: Any, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """(compiled, tail values) for direct launches, or None where they cannot be built."""
    try:
        params = kernel.signature.parameters
        constexpr = [param.is_constexpr for param in kernel.params]
    except AttributeError:
        return None
    names = list(params)
    if compiled is None or not hasattr(compiled, "packed_metadata") or len(args) > len(names):
        return None
    tail = []
    for name, is_constexpr in zip(names[len(args):], constexpr[len(args):]):
        value = options.get(name, params[name].default)
        if value is params[name].empty or not is_constexpr:
            return None  # a runtime argument passed by keyword: triton binds it
        tail.append(value)
    compiled.run  # noqa: B018 - loads the module and function handles now, as triton's launch did
    return compiled, tuple(tail)


# the CUDA stream triton would launch on (its torch driver's own query); CUDA builds of torch only
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _run_cuda(
    kernel: Any, grid: tuple[int, ...], device: int, args: tuple[Any, ...], positions: tuple[int, ...], options: dict[str, Any]
) -> None:
    """``kernel[grid](*args, **options)`` on the current device, directly where triton has compiled it for
    this key (``positions``: where ``args`` holds tensors)."""
    runtime = _knobs_runtime()
    if not DIRECT_LAUNCH or runtime is None or _hooks_set(runtime):
        kernel[grid](*args, **options)
        return
    values = list(args)
    for position in positions:
        tensor = values[position]
        values[position] = (tensor.dtype, not tensor.data_ptr() & 15)
    try:
        key = (id(kernel), device, tuple(map(type, args)), tuple(values), tuple(options.items()))
        entry = _by_value.get(key, _MISSING)
    except TypeError:  # an unhashable argument or option: triton handles it
        kernel[grid](*args, **options)
        return
    if entry is _MISSING:
        try:
            specialisation = (kernel, device, tuple(map(_arg_key, args)), tuple(options.items()))
        except TypeError:  # an argument of a type the keys do not know: triton handles it
            kernel[grid](*args, **options)
            return
        entry = _compiled.get(specialisation, _MISSING)
        launched = entry is _MISSING
        if launched:  # triton's own launch, which compiles or finds the kernel; later ones go direct
            entry = _compiled[specialisation] = _entry(kernel, kernel[grid](*args, **options), args, options)
        if len(_by_value) >= _BY_VALUE_LIMIT:
            _by_value.clear()
        _kernels.setdefault(id(kernel), kernel)
        _by_value[key] = entry
        if launched:
            return
    if entry is None:
        kernel[grid](*args, **options)
        return
    compiled, tail = entry
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, _current_stream(device), compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *tail)


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
