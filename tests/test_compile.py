"""torch.compile: the Resolution callable under dynamo and CPU inductor.

* ``torch._dynamo.explain`` (dynamo only, no inductor): the shim itself must introduce no graph
  break, i.e. no break whose user stack reaches into ``src/mxfp8_compat``. torchao's own breaks
  are allowed and printed (run with ``-s`` to see them).
* ``torch.compile(fn)`` (default backend, inductor on the CPU), forward and backward: the
  results match eager (SQNR > 40 dB; in practice bitwise).

The paths that read ``offs`` on the host (the reference emulation, the per-group loop, float32
output where torch's kernel cannot emit it) are torch custom ops, opaque to dynamo; the CPU
value checks are skipped while compiling. Only two inductor compiles run in this file (bf16 and
emulated); they dominate its runtime.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import float64_reference, make_problem, run_with_grads
from mxfp8_compat import resolve, sqnr_db
from mxfp8_compat.numerics.highprec import grouped_mm_support

import mxfp8_compat

SRC_DIR = Path(mxfp8_compat.__file__).resolve().parent
HAS_CPU_GROUPED_MM = grouped_mm_support("cpu", torch.bfloat16)[0]
TorchRuntimeError = torch._dynamo.exc.TorchRuntimeError

@pytest.fixture(autouse=True)
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _problem():
    # Group ends at multiples of 32 (torchao's emulation needs them), one empty group.
    return make_problem(group_rows=(64, 32, 0, 96), k=64, n=64)


def _in_shim(frame) -> bool:
    try:
        return Path(frame.filename).resolve().is_relative_to(SRC_DIR)
    except (OSError, ValueError):
        return False


def _explain_breaks(fn, problem, **kwargs):
    """(shim breaks, other breaks) of ``fn`` under dynamo; every break is printed."""
    explained = torch._dynamo.explain(fn)(problem.A, problem.B, problem.offs, **kwargs)
    print(f"dynamo: {explained.graph_count} graph(s), {explained.graph_break_count} break(s)")
    shim, other = [], []
    for reason in explained.break_reasons:
        frames = list(reason.user_stack)
        (shim if any(_in_shim(frame) for frame in frames) else other).append(reason)
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        print(f"  break: {reason.reason.strip().splitlines()[0][:160]} at {where}")
    return shim, other


def _describe(reasons) -> str:
    return "; ".join(
        f"{r.reason.strip().splitlines()[0][:120]} ({', '.join(f'{Path(f.filename).name}:{f.lineno}' for f in r.user_stack if _in_shim(f))})"
        for r in reasons
    )


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_bf16_path_has_no_shim_graph_break(no_torchao, request, out_dtype):
    res = resolve("off", device="cpu")
    assert res.backend == "bf16"
    shim, _ = _explain_breaks(res, _problem(), out_dtype=out_dtype)
    assert not shim, f"graph breaks inside mxfp8_compat: {_describe(shim)}"


def test_bf16_path_compiles_and_matches_eager(no_torchao):
    res = resolve("off", device="cpu")
    problem = _problem()
    eager = run_with_grads(res, problem)
    compiled = _run_compiled(res, problem)
    for name, e, c in zip(("output", "grad A", "grad B"), eager, compiled):
        assert c.dtype == e.dtype == torch.bfloat16 and c.shape == e.shape
        # Inductor runs the same aten kernel for the bf16 path: bitwise in practice, 40 dB allowed.
        assert torch.equal(c, e) or sqnr_db(e, c) > 40, f"{name}: {sqnr_db(e, c):.1f} dB vs eager"


def _run_compiled(res, problem):
    """Forward and backward through ``torch.compile(res)``; skip where inductor cannot build C++.

    torch 2.9/2.10's inductor imports setuptools (torch.utils.cpp_extension) to build its CPU
    kernels, and a uv-made venv on Python < 3.12 has none: an environment gap, not the shim's.
    """
    try:
        return run_with_grads(torch.compile(res), problem)
    except Exception as error:  # noqa: BLE001 - InductorError wraps it; re-raised unless it is a known gap
        if "No module named 'setuptools'" in str(error):
            pytest.skip(f"CPU inductor cannot build kernels here: torch {torch.__version__} needs setuptools ({error!s:.80})")
        if "float8_e8m0fnu missing from torch._inductor.codegen.cpp" in str(error):
            # Seen with torchao 0.16's emulation on torch 2.10 and 2.11's CPU inductor (its e8m0 scales
            # have no C++ type there). A torchao limitation, recorded as an expected failure;
            # the eager checks above already showed the shim runs.
            pytest.xfail(f"torch {torch.__version__}'s CPU inductor cannot compile this torchao's e8m0 scales: {error!s:.120}")
        raise


def test_emulated_path_has_no_shim_graph_break(request):
    res = resolve("emulated", device="cpu")
    print(f"emulated: {res.emulation}, torchao {res.torchao_version}, generation {res.generation}")
    shim, other = _explain_breaks(res, _problem())
    # torchao's own breaks are allowed; they are printed above.
    assert not shim, f"graph breaks inside mxfp8_compat: {_describe(shim)}"


def test_emulated_path_compiles_and_matches_eager(request):
    res = resolve("emulated", device="cpu")
    problem = _problem()
    # Whatever compile does, the shim runs eagerly with MXFP8 accuracy.
    eager = run_with_grads(res, problem)
    reference = float64_reference(problem)
    for name, floor, ref, e in zip(("output", "grad A", "grad B"), (27, 25, 24), reference, eager):
        assert sqnr_db(ref, e) >= floor, f"eager {name}: {sqnr_db(ref, e):.1f} dB"
    compiled = _run_compiled(res, problem)
    for name, e, c in zip(("output", "grad A", "grad B"), eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape
        # Same quantisation ops, fused by inductor: only float32 rounding order may differ, far
        # below MXFP8's own ~28 dB. A different scale rule or a dropped quantisation would cost
        # > 10 dB here.
        db = sqnr_db(e, c)
        assert math.isinf(db) or db > 40, f"{name}: compiled vs eager {db:.1f} dB"
