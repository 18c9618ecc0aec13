"""DTensor arguments to the grouped GEMM: computed on local shards where the math allows, else a ValueError.

Every callable ``resolve()`` hands out goes through :func:`dtensor_aware`. Plain tensors (and
``nn.Parameter``) take a fast path of three ``type`` checks. When ``A``, ``B`` or ``offs`` is a
``torch.distributed.tensor.DTensor``, :func:`grouped_mm_on_local_shards` decides:

=====================================  ============================  =====================================
A                                      B                             result
=====================================  ============================  =====================================
plain tensor: the tokens this rank     ``Shard(0)`` on every mesh    plain tensor: ``fn`` on B's local
holds for its experts (after the       dim (expert parallelism);     experts; B's gradient stays
dispatch), ``offs`` plain with one     ``offs.shape[0]`` must be     ``Shard(0)``
entry per *local* expert               the local expert count
DTensor ``Replicate()``                ``Replicate()``               DTensor ``Replicate()``
DTensor ``Replicate()``                ``Shard(2)`` (N: column-      DTensor ``Shard(1)``; A's gradient
                                       parallel; ``Shard(1)`` of     is ``Partial()`` (summed by DTensor
                                       the (E, N, K) storage)        when it is redistributed)
DTensor ``Shard(1)`` (K)               ``Shard(1)`` (K: row-         DTensor ``Partial()`` (the sum over
                                       parallel; ``Shard(2)`` of     ranks of the local products; reduce
                                       the (E, N, K) storage)        it with ``redistribute``)
=====================================  ============================  =====================================

The rows are per mesh dimension (a 2-D mesh may combine them), A and B must share one mesh,
and ``offs`` must be a plain tensor or a DTensor replicated on every mesh dimension. Anything
else raises ValueError naming the argument and the placement it needs: A or ``offs`` sharded on
rows (``offs`` describes all of A's rows), ``Partial`` inputs (reduce them first), a plain A
with a replicated or tensor-parallel B, or a DTensor A with a plain B (which rows do other ranks
hold? the gradient of a replicated operand would be wrong without knowing). Nothing here ever
gathers a full tensor or communicates: the local GEMM is exactly what MoE stacks run after
``.to_local()``, and the DTensor result records how the ranks' pieces combine.

A ``bias`` keyword (E, N), for callables that take one, follows the result: ``Shard(0)`` with
expert-parallel B, the result's placements otherwise (``Shard(1)`` column-parallel); a plain
bias only where the result is replicated, and none on a ``Partial`` result (it would be added
once per rank). Other keywords must not be DTensors.

MXFP8 paths quantise blocks of 32 along K (forward) and N (input gradient): with K or N
sharded, each rank's local size must be a multiple of 32 (the callable checks the local shape),
which also puts every shard boundary on a block boundary, so the blocks are the unsharded
tensor's blocks. A row-parallel result sums per-rank outputs rounded to ``out_dtype``; pass
``out_dtype=torch.float32`` to keep that sum in float32.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import torch

__all__ = ["dtensor_aware", "grouped_mm_on_local_shards", "is_dtensor"]

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def _dtensor_type() -> Optional[type]:
    """The DTensor class if ``torch.distributed.tensor`` is imported (no DTensor exists otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(value: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``; never imports ``torch.distributed``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(value, cls)


def dtensor_aware(fn: Any) -> Any:
    """Wrap a grouped GEMM ``fn(A, B, offs, **kwargs)`` so that DTensor arguments are handled.

    Plain tensors and parameters go straight to ``fn`` (three ``type`` checks); anything else
    goes through :func:`grouped_mm_on_local_shards`. Keyword arguments (``out_dtype``,
    ``bias``, ...) are passed through.
    """

    def grouped_mm(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tB = type(B)
        if type(A) is _Tensor and (tB is _Tensor or tB is _Parameter) and type(offs) is _Tensor:
            return fn(A, B, offs, **kwargs)
        return grouped_mm_on_local_shards(fn, A, B, offs, **kwargs)

    grouped_mm.__wrapped__ = fn  # type: ignore[attr-defined]
    grouped_mm.__name__ = grouped_mm.__qualname__ = getattr(fn, "__name__", "grouped_mm")
    grouped_mm.__doc__ = getattr(fn, "__doc__", None)
    return grouped_mm


def grouped_mm_on_local_shards(fn: Any, A: Any, B: Any, offs: Any, **kwargs: Any) -> torch.Tensor:
    """``fn(A, B, offs, **kwargs)`` on local shards, by the rules in this module's docstring.

    Arguments that are not DTensors are passed to ``fn`` unchanged. Raises ValueError naming
    the argument and the placement it needs when the local shards cannot give the right result.
    """
    cls = _dtensor_type()
    a_dt = cls is not None and isinstance(A, cls)
    b_dt = cls is not None and isinstance(B, cls)
    o_dt = cls is not None and isinstance(offs, cls)
    if not (a_dt or b_dt or o_dt):
        return fn(A, B, offs, **kwargs)
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = (B if b_dt else A if a_dt else offs).device_mesh
    for name, value in kwargs.items():
        if name != "bias" and isinstance(value, DTensor):
            raise ValueError(f"{name}: a DTensor is not supported here; pass a plain value")
    if o_dt:
        offs = _replicated_local(offs, "offs", mesh, Replicate, "offs describes every row of A on every rank")
        if not (a_dt or b_dt):
            return fn(A, B, offs, **kwargs)

    if b_dt and not a_dt:
        placements = tuple(B.placements)
        if all(type(p) is Shard and p.dim == 0 for p in placements):
            B_local = B.to_local()
            experts = B_local.shape[0]
            if isinstance(offs, torch.Tensor) and offs.dim() == 1 and offs.shape[0] != experts:
                raise ValueError(
                    f"offs: B is a DTensor sharded over experts ({_fmt(placements)}), so this rank computes its "
                    f"{experts} local experts and offs needs {experts} entries (one per local expert), got "
                    f"{offs.shape[0]}: dispatch tokens to their experts' ranks first (all-to-all), or gather B "
                    "explicitly with B.full_tensor()"
                )
            bias = kwargs.get("bias")
            if isinstance(bias, DTensor):
                if not all(type(p) is Shard and p.dim == 0 for p in bias.placements):
                    raise ValueError(f"bias: expected Shard(0) (experts) like B, got {_fmt(bias.placements)}")
                kwargs["bias"] = bias.to_local()
            return fn(A, B_local, offs, **kwargs)
        raise ValueError(
            f"B: a DTensor with placements {_fmt(placements)} and a plain A: with a plain A only Shard(0) "
            "(experts, expert parallelism) on every mesh dimension runs on local shards; for tensor "
            "parallelism pass A as a DTensor on B's mesh (Replicate() for B Shard(2) or Replicate(), "
            "Shard(1) for B Shard(1))"
        )
    if a_dt and not b_dt:
        raise ValueError(
            f"B: a plain tensor with a DTensor A ({_fmt(A.placements)}): pass B as a DTensor on A's mesh "
            "(Replicate(), Shard(2) over N, or Shard(1) over K to match A's Shard(1)), or pass A.to_local() "
            "with B's local experts"
        )
    if A.device_mesh != B.device_mesh:
        raise ValueError(f"B: expected A's device mesh {A.device_mesh}, got {B.device_mesh}")

    out_placements: list[Any] = []
    a_grad_placements: list[Any] = []
    for dim, (pa, pb) in enumerate(zip(A.placements, B.placements)):
        where = f"mesh dim {dim}"
        if type(pa) is Replicate and type(pb) is Replicate:
            out_placements.append(Replicate())
            a_grad_placements.append(Replicate())
        elif type(pa) is Replicate and type(pb) is Shard and pb.dim == 2:
            out_placements.append(Shard(1))
            a_grad_placements.append(Partial())
        elif type(pa) is Shard and pa.dim == 1 and type(pb) is Shard and pb.dim == 1:
            out_placements.append(Partial())
            a_grad_placements.append(Shard(1))
        elif type(pb) is Shard and pb.dim == 0:
            raise ValueError(
                f"A: B is sharded over experts (Shard(0), {where}): pass A as a plain tensor holding the tokens "
                "dispatched to this rank's experts, with offs for the local experts"
            )
        elif type(pa) is Shard and pa.dim == 1:
            raise ValueError(f"B: A is sharded over K (Shard(1), {where}), so B needs Shard(1) there, got {pb!r}")
        elif type(pa) is Replicate:
            raise ValueError(f"B: expected Replicate(), Shard(2) (N) or Shard(1) (K, with A Shard(1)) on {where}, got {pb!r}")
        else:
            raise ValueError(
                f"A: expected Replicate() or Shard(1) (K, row-parallel) on {where}, got {pa!r}"
                + (": reduce a Partial first (redistribute)" if isinstance(pa, Partial) else
                   ": offs describes every row of A, so A's rows cannot be sharded")
            )
    bias = kwargs.get("bias")
    if bias is not None:
        if any(isinstance(p, Partial) for p in out_placements):
            raise ValueError(
                f"bias: with K sharded the result is Partial ({_fmt(out_placements)}), so a bias would be added "
                "once per rank; add it after reducing the result"
            )
        if isinstance(bias, DTensor):
            if bias.device_mesh != A.device_mesh or tuple(bias.placements) != tuple(out_placements):
                raise ValueError(f"bias: expected a DTensor on A's mesh with placements {_fmt(out_placements)}, got {_fmt(bias.placements)}")
            kwargs["bias"] = bias.to_local()
        elif not all(type(p) is Replicate for p in out_placements):
            raise ValueError(f"bias: expected a DTensor with placements {_fmt(out_placements)} (the result's), got a plain tensor")
    A_local = A.to_local(grad_placements=a_grad_placements)
    B_local = B.to_local()
    out = fn(A_local, B_local, offs, **kwargs)
    n = B.shape[2]
    return DTensor.from_local(
        out, A.device_mesh, out_placements, run_check=False, shape=torch.Size((A.shape[0], n)), stride=(n, 1)
    )


def _replicated_local(value: Any, name: str, mesh: Any, replicate: type, why: str) -> torch.Tensor:
    if value.device_mesh != mesh:
        raise ValueError(f"{name}: expected the device mesh of B/A {mesh}, got {value.device_mesh}")
    if not all(type(p) is replicate for p in value.placements):
        raise ValueError(f"{name}: expected Replicate() on every mesh dimension ({why}), got {_fmt(value.placements)}")
    return value.to_local()


def _fmt(placements: Sequence[Any]) -> str:
    return ", ".join(repr(p) for p in placements)
