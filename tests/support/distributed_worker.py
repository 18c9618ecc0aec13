"""One rank of the multi-process tests (tests/test_distributed.py starts them; never collected by pytest).

    python tests/support/distributed_worker.py --rank R --world-size W --init-file F --out DIR --scenarios a,b

Each scenario compares what the rank computed with the same model run in this one process
(every rank computes the single-process reference itself) and records every comparison in
``DIR/rank<R>.json``: ``{scenario: {"ok": bool, "error": traceback or None, "checks": [...]}}``.
A scenario that raises is recorded and the next one runs. ``MXFP8_COMPAT_DIST_BACKEND=nccl``
runs on ``cuda:<rank>`` with NCCL instead of the CPU with gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mxfp8_compat  # noqa: E402
from mxfp8_compat import (  # noqa: E402
    as_grouped_mm_weight,
    resolve,
    sqnr_db,
    state_dict_from_expert_layout,
    state_dict_to_expert_layout,
)
from mxfp8_compat.probes import environment  # noqa: E402
from mxfp8_compat.layout import is_per_group_column_major  # noqa: E402
from tiny_moe import TinyMoE  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K, TOKENS = 64, 64, 4, 2, 48
EXPERT_KEYS = ("w_gate", "w_up", "w_down")
U32 = 2.0**-24  # float32 unit roundoff


class Checks:
    """Comparisons of one scenario; each either passes or records why not."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, **detail: Any) -> None:
        self.items.append({"name": name, "ok": bool(ok), **detail})

    def equal(self, name: str, got: torch.Tensor, want: torch.Tensor, *, bitwise: bool = True, min_sqnr_db: float = 0.0) -> None:
        """Bitwise equal (``bitwise``), else at least ``min_sqnr_db`` SQNR; records the difference."""
        got, want = _plain(got), _plain(want)
        same_shape = tuple(got.shape) == tuple(want.shape)
        diff = (got.double() - want.double()).abs().max().item() if same_shape and got.numel() else 0.0
        exact = same_shape and torch.equal(got, want)
        sqnr = _sqnr(want, got) if same_shape else float("-inf")
        ok = exact if bitwise else (same_shape and (exact or sqnr >= min_sqnr_db))
        self.add(name, ok, bitwise=exact, max_abs_diff=diff, sqnr_db=sqnr, shape=list(got.shape), want_shape=list(want.shape))

    def within_order_bound(self, name: str, got: torch.Tensor, want: torch.Tensor, abs_products: torch.Tensor, length: int) -> None:
        """``|got - want| <= 2 * gamma_n * sum|terms|``: two float32 sums of the same ``length`` terms in other orders."""
        got, want = _plain(got).double(), _plain(want).double()
        bound = 2.0 * length * U32 / (1 - length * U32) * abs_products.double()
        ratio = ((got - want).abs() / bound.clamp_min(1e-300)).max().item()
        self.add(name, ratio <= 1.0, order_bound_ratio=ratio, bitwise=torch.equal(got, want), max_abs_diff=(got - want).abs().max().item())

    def raises(self, name: str, fn: Callable[[], Any], exc: type, *needles: str) -> None:
        try:
            fn()
        except exc as error:
            text = str(error)
            self.add(name, all(n in text for n in needles), message=text, needles=list(needles))
            return
        except Exception as error:  # noqa: BLE001 - recorded as the wrong exception
            self.add(name, False, message=f"{type(error).__name__}: {error}", expected=exc.__name__)
            return
        self.add(name, False, message="no exception", expected=exc.__name__)


def is_shard0(t: Any) -> bool:
    """A DTensor sharded over dim 0 on every mesh dimension."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and all(p == Shard(0) for p in t.placements)


def _plain(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def _sqnr(want: torch.Tensor, got: torch.Tensor) -> float:
    if torch.equal(want, got):
        return math.inf
    return float(sqnr_db(want.double(), got.double()))


# --- setup ------------------------------------------------------------------------------------


class Context:
    def __init__(self, rank: int, world: int, backend: str) -> None:
        self.rank, self.world, self.backend = rank, world, backend
        self.device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        # On the CPU every rank and the single-process reference run the same kernels on the same
        # shapes: results are bitwise equal. On GPUs they are made deterministic, but a GEMM over
        # a different number of rows may pick another kernel: see the EP scenario.
        self.exact = backend == "gloo"
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (world,))

    def batch(self, step: int, rank: int, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s inputs (bf16 values) and targets at ``step``: fresh random normals, any rank can make them."""
        g = torch.Generator().manual_seed(1000 + 97 * step + rank)
        x = torch.randn(tokens, DIM, generator=g).to(torch.bfloat16)
        target = torch.randn(tokens, DIM, generator=g)
        return x.to(self.device), target.to(self.device)


def loss_of(y: torch.Tensor, target: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of squares over this batch, scaled so that the sum over ranks is the global mean."""
    return (y - target).pow(2).sum() / (world * y.numel())


def make_moe(ctx: Context, grouped_mm: Callable[..., torch.Tensor], seed: int, **kwargs: Any) -> TinyMoE:
    model = TinyMoE(DIM, HIDDEN, EXPERTS, TOP_K, grouped_mm, **kwargs)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(ctx.device)


class Recorder:
    """Wraps a grouped GEMM: records how B reached it (type, layout, storage)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append({"B_type": type(B).__name__, "column_major": is_per_group_column_major(B)})
        return self.fn(A, B, offs, **kwargs)


_REAL_RELAYOUT = mxfp8_compat.backends.grouped_mm.weight_relayout


def count_relayouts() -> list[int]:
    """Patch the MXFP8 callables' relayout: the returned list collects bytes of every copy made."""
    from mxfp8_compat.backends import grouped_mm as backends

    copies: list[int] = []
    real = _REAL_RELAYOUT

    def counting(B: torch.Tensor) -> torch.Tensor:
        out = real(B)
        if out is not B:
            copies.append(out.numel() * out.element_size())
        return out

    backends.weight_relayout = counting
    return copies


# --- FSDP2 ------------------------------------------------------------------------------------


def fsdp_gradient_divisor(ctx: Context) -> float:
    """What FSDP2 divides the sum of the ranks' gradients by, measured on a one-weight module.

    The world size (an average), except on torch 2.8 with gloo: its FSDP2 asks for
    ``ReduceOp.AVG``, which gloo's reduce-scatter performs as a sum (torch 2.9+ divide).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    probe = torch.nn.Linear(ctx.world, ctx.world, bias=False, device=ctx.device)
    fully_shard(probe, mesh=ctx.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    probe(torch.ones(1, ctx.world, device=ctx.device)).sum().backward()  # every rank's gradient is all ones
    return float(ctx.world / probe.weight.grad.to_local().flatten()[0].item())


def scenario_fsdp(ctx: Context, mode: str) -> Checks:
    """fully_shard vs the same model in one process, fed the same per-rank batches (gradient accumulation).

    Every rank computes its batch exactly as the single process computes that batch; the only
    cross-rank arithmetic is FSDP2's reduce-scatter, which for two ranks adds g0/2 + g1/2 (one
    float32 addition, commutative; halving is exact): the single process's (g0 + g1) / 2 is the
    same number. So loss, gradients and updated weights are bitwise equal in both modes. (torch 2.8's
    FSDP2 on gloo sums instead of averaging: the divisor is measured, and the reference uses it.)
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    checks = Checks()
    fn = resolve(mode, device=ctx.device)
    checks.add("resolved the mode's backend", fn.backend == {"off": "bf16", "emulated": "mxfp8-emulated"}[mode],
               backend=fn.backend, emulation=fn.emulation, generation=fn.generation.key if fn.generation else None)
    copies = count_relayouts()
    bf16 = torch.bfloat16
    ref = make_moe(ctx, fn, seed=7, router_dtype=bf16)
    # The sharded model starts from an (E, K, N) checkpoint, as an existing MoE codebase has one.
    legacy = state_dict_from_expert_layout(ref.state_dict(), EXPERT_KEYS)
    checks.add("legacy checkpoint is (E, K, N)", tuple(legacy["w_gate"].shape) == (EXPERTS, DIM, HIDDEN))
    recorder = Recorder(fn)
    model = TinyMoE(DIM, HIDDEN, EXPERTS, TOP_K, recorder, router_dtype=bf16).to(ctx.device)
    model.load_state_dict(state_dict_to_expert_layout(legacy, EXPERT_KEYS))
    fully_shard(model, mesh=ctx.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32))
    checks.add("parameters are DTensors sharded over experts", all(
        type(p).__name__ == "DTensor" and is_shard0(p) for p in model.parameters()
    ))
    divisor = fsdp_gradient_divisor(ctx)
    checks.add("FSDP2 averages or sums gradients over ranks", divisor in (1.0, float(ctx.world)), divides_by=divisor)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    names = [n for n, _ in ref.named_parameters()]
    for step in range(2):
        x, target = ctx.batch(step, ctx.rank)
        loss = loss_of(model(x), target, ctx.world)
        loss.backward()
        ref_losses = []
        for r in range(ctx.world):  # the single process, one micro-batch per rank, gradients accumulated
            xr, tr = ctx.batch(step, r)
            ref_loss = loss_of(ref(xr), tr, ctx.world)
            ref_loss.backward()
            ref_losses.append(ref_loss)
        for p in ref.parameters():
            p.grad.div_(divisor)  # FSDP2 averages gradients over ranks (sums on torch 2.8 with gloo)
        checks.equal(f"step {step}: loss", loss, ref_losses[ctx.rank], bitwise=ctx.exact, min_sqnr_db=60)
        for name, p, q in zip(names, model.parameters(), ref.parameters()):
            checks.equal(f"step {step}: grad {name}", p.grad, q.grad, bitwise=ctx.exact, min_sqnr_db=60)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p, q in zip(names, model.parameters(), ref.parameters()):
        checks.equal(f"trained {name}", p, q, bitwise=ctx.exact, min_sqnr_db=60)
    checks.add("B reached the grouped GEMM as a plain per-group column-major tensor every call",
               bool(recorder.calls) and all(c["B_type"] == "Tensor" and c["column_major"] for c in recorder.calls),
               calls=len(recorder.calls), kinds=sorted({(c["B_type"], c["column_major"]) for c in recorder.calls}))
    checks.add("expert weights were never copied by the shim", not copies, bytes_copied=sum(copies))

    # Checkpoints: a full state dict equals the single process's; a sharded one converts shard by shard.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for name, value in ref.state_dict().items():
        checks.equal(f"full state dict {name}", full[name], value, bitwise=ctx.exact, min_sqnr_db=60)
    sharded = model.state_dict()
    exported = state_dict_from_expert_layout(sharded, EXPERT_KEYS)
    w = exported["w_gate"]
    checks.add("sharded export stays a Shard(0) DTensor of shape (E, K, N)",
               type(w).__name__ == "DTensor" and is_shard0(w) and tuple(w.shape) == (EXPERTS, DIM, HIDDEN))
    checks.equal("sharded export, local shard", w.to_local(), sharded["w_gate"].to_local().transpose(-2, -1))

    # Outside forward the weight is the sharded DTensor: the shim never gathers it silently.
    x, _ = ctx.batch(9, ctx.rank)
    offs = torch.tensor([16, 32, 48, 64], dtype=torch.int32, device=ctx.device)
    A = torch.cat([x, x]).to(torch.bfloat16)
    checks.raises("sharded weight outside forward with global offs", lambda: fn(A, as_grouped_mm_weight(model.w_gate), offs),
                  ValueError, "offs:", "Shard(dim=0)", "2 entries")
    return checks


# --- expert parallelism -------------------------------------------------------------------------


def scenario_ep(ctx: Context, mode: str) -> Checks:
    """Two ranks with half the experts each (all-to-all dispatch) vs all experts in one process on the global batch.

    Expert weights are DTensors ``Shard(0)`` passed to the grouped GEMM as they are. Each
    expert sees the same rows in the same order as in the single process (rank 0's tokens, then
    rank 1's, each in token order), padded the same way, so on the CPU outputs, losses, expert
    and input gradients are bitwise equal. The router is replicated; its gradient is the
    all-reduced sum of the ranks' float32 partial sums, while the single process sums all tokens
    in one GEMM: the same terms in another order, so it is checked against the classical bound
    for reordering a float32 sum of n terms, 2 * gamma_n * sum|terms| (gamma_n = n u / (1 - n u),
    u = 2**-24), with the terms' magnitudes computed from the single process's own factors.
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    checks = Checks()
    fn = resolve(mode, device=ctx.device)
    ref = make_moe(ctx, fn, seed=11)
    model = make_moe(ctx, fn, seed=11, ep_group=ctx.mesh.get_group())
    for name in EXPERT_KEYS:
        full = getattr(model, name)
        setattr(model, name, torch.nn.Parameter(distribute_tensor(full.detach(), ctx.mesh, [Shard(0)])))
    local = EXPERTS // ctx.world
    mine = slice(ctx.rank * local, (ctx.rank + 1) * local)
    rows = slice(ctx.rank * TOKENS, (ctx.rank + 1) * TOKENS)

    x, target = ctx.batch(0, ctx.rank)
    x = x.float().requires_grad_(True)
    y = model(x)
    loss = loss_of(y, target, ctx.world)
    loss.backward()
    dist.all_reduce(model.router.grad, group=ctx.mesh.get_group())

    batches = [ctx.batch(0, r) for r in range(ctx.world)]
    x_all = torch.cat([b[0] for b in batches]).float().requires_grad_(True)
    ref.keep_logits = True
    y_all = ref(x_all)
    ref_losses = [loss_of(y_all[r * TOKENS:(r + 1) * TOKENS], batches[r][1], ctx.world) for r in range(ctx.world)]
    sum(ref_losses).backward()

    exact = ctx.exact
    checks.equal("output", y, y_all[rows], bitwise=exact, min_sqnr_db=40 if mode == "off" else 25)
    checks.equal("loss", loss, ref_losses[ctx.rank], bitwise=exact, min_sqnr_db=40 if mode == "off" else 25)
    checks.equal("input gradient", x.grad, x_all.grad[rows], bitwise=exact, min_sqnr_db=40 if mode == "off" else 20)
    for name in EXPERT_KEYS:
        grad = getattr(model, name).grad
        checks.add(f"grad {name} is a Shard(0) DTensor", type(grad).__name__ == "DTensor" and is_shard0(grad))
        checks.equal(f"grad {name} (local experts)", grad.to_local(), getattr(ref, name).grad[mine], bitwise=exact,
                     min_sqnr_db=40 if mode == "off" else 20)
    if exact:
        abs_products = ref.logits.grad.abs().t() @ x_all.detach().abs()
        checks.within_order_bound("router gradient", model.router.grad, ref.router.grad, abs_products, x_all.shape[0])
    else:
        checks.equal("router gradient", model.router.grad, ref.router.grad, bitwise=False, min_sqnr_db=40 if mode == "off" else 20)
    return checks


# --- DTensor arguments --------------------------------------------------------------------------


def scenario_dtensor(ctx: Context, mode: str) -> Checks:
    """The placement rules of mxfp8_compat.distributed, each against the unsharded computation."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    checks = Checks()
    fn = resolve(mode, device=ctx.device)
    mesh, dev = ctx.mesh, ctx.device
    g = torch.Generator().manual_seed(5)  # same on every rank: the "global" tensors
    E, K, N = 4, 128, 128
    group_rows = (64, 32, 96, 32)
    M = sum(group_rows)
    A_full = torch.randn(M, K, generator=g).to(torch.bfloat16).to(dev)
    W_full = torch.randn(E, N, K, generator=g).to(torch.bfloat16).to(dev)  # (E, N, K) storage
    G_full = torch.randn(M, N, generator=g).to(torch.bfloat16).to(dev)
    offs = torch.tensor(group_rows, device=dev).cumsum(0).to(torch.int32)

    def full_run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        A = A_full.clone().requires_grad_(True)
        W = W_full.clone().requires_grad_(True)
        out = fn(A, as_grouped_mm_weight(W), offs)
        out.backward(G_full)
        return out.detach(), A.grad, W.grad

    out_ref, dA_ref, dW_ref = full_run()
    # Reduced over ranks: each rank's partial result is rounded to bf16 before the sum, so these differ
    # from the unsharded call by bf16 rounding (~50 dB SQNR); a missing or doubled reduction, or a
    # wrong shard, is off by 6 dB or worse.
    tol = dict(bitwise=False, min_sqnr_db=40)

    # Expert parallelism: B Shard(0), A = this rank's experts' rows, local offs. Same GEMMs as the
    # unsharded call restricted to these experts: bitwise on the CPU.
    local = E // ctx.world
    mine = slice(ctx.rank * local, (ctx.rank + 1) * local)
    row_lo = 0 if ctx.rank == 0 else int(offs[ctx.rank * local - 1])
    row_hi = int(offs[(ctx.rank + 1) * local - 1])
    W = torch.nn.Parameter(distribute_tensor(W_full.clone(), mesh, [Shard(0)]))
    A = A_full[row_lo:row_hi].clone().requires_grad_(True)
    local_offs = (offs[mine] - row_lo).to(torch.int32)
    with CommDebugMode() as comm:
        out = fn(A, as_grouped_mm_weight(W), local_offs)
    checks.add("EP: no communication", comm.get_total_counts() == 0, counts=str(comm.get_comm_counts()))
    checks.add("EP: result is a plain tensor", type(out) is torch.Tensor, type=type(out).__name__)
    out.backward(G_full[row_lo:row_hi])
    checks.equal("EP: output", out, out_ref[row_lo:row_hi], bitwise=ctx.exact, min_sqnr_db=40)
    checks.equal("EP: dA", A.grad, dA_ref[row_lo:row_hi], bitwise=ctx.exact, min_sqnr_db=40)
    checks.add("EP: dW is Shard(0)", is_shard0(W.grad))
    checks.equal("EP: dW (local experts)", W.grad.to_local(), dW_ref[mine], bitwise=ctx.exact, min_sqnr_db=40)
    checks.raises("EP: global offs", lambda: fn(A_full, as_grouped_mm_weight(W), offs), ValueError, "offs:", "local expert")

    # Column-parallel: A Replicate, B Shard(2) over N (the (E, N, K) storage's Shard(1)). Each rank's
    # output columns are the unsharded ones; A's gradient is the sum of the ranks' partial gradients.
    A = distribute_tensor(A_full.clone(), mesh, [Replicate()]).requires_grad_(True)
    W = torch.nn.Parameter(distribute_tensor(W_full.clone(), mesh, [Shard(1)]))
    with CommDebugMode() as comm:
        out = fn(A, as_grouped_mm_weight(W), offs)
    checks.add("column-parallel: no communication", comm.get_total_counts() == 0, counts=str(comm.get_comm_counts()))
    checks.add("column-parallel: result Shard(1)", tuple(out.placements) == (Shard(1),))
    out.backward(distribute_tensor(G_full, mesh, [Shard(1)]))
    checks.equal("column-parallel: output", out, out_ref, bitwise=ctx.exact, min_sqnr_db=40)
    checks.equal("column-parallel: dA (reduced over ranks)", A.grad, dA_ref, **tol)
    checks.equal("column-parallel: dW", W.grad, dW_ref, bitwise=ctx.exact, min_sqnr_db=40)

    # Row-parallel: A Shard(1) and B Shard(1) over K: the result is Partial (sum over ranks).
    A = distribute_tensor(A_full.clone(), mesh, [Shard(1)]).requires_grad_(True)
    W = torch.nn.Parameter(distribute_tensor(W_full.clone(), mesh, [Shard(2)]))
    with CommDebugMode() as comm:
        out = fn(A, as_grouped_mm_weight(W), offs)
    checks.add("row-parallel: no communication", comm.get_total_counts() == 0, counts=str(comm.get_comm_counts()))
    checks.add("row-parallel: result Partial", type(out.placements[0]).__name__ == "Partial")
    reduced = out.redistribute(mesh, [Replicate()])
    reduced.backward(distribute_tensor(G_full, mesh, [Replicate()]))
    checks.equal("row-parallel: output (reduced)", reduced, out_ref, **tol)
    checks.equal("row-parallel: dA", A.grad, dA_ref, bitwise=ctx.exact, min_sqnr_db=40)
    checks.equal("row-parallel: dW", W.grad, dW_ref, bitwise=ctx.exact, min_sqnr_db=40)

    # Replicated everything: the unsharded call on every rank.
    A = distribute_tensor(A_full.clone(), mesh, [Replicate()])
    W = distribute_tensor(W_full.clone(), mesh, [Replicate()])
    out = fn(A, as_grouped_mm_weight(W), offs)
    checks.equal("replicated: output", out, out_ref, bitwise=ctx.exact, min_sqnr_db=40)

    # What cannot be computed on local shards raises, naming the argument and the placement.
    W_rep = distribute_tensor(W_full, mesh, [Replicate()])
    W_col = distribute_tensor(W_full, mesh, [Shard(1)])
    A_rep = distribute_tensor(A_full, mesh, [Replicate()])
    A_rows = distribute_tensor(A_full, mesh, [Shard(0)])
    checks.raises("plain A with a replicated B", lambda: fn(A_full, as_grouped_mm_weight(W_rep), offs), ValueError, "B:", "Shard(0)")
    checks.raises("plain A with a column-parallel B", lambda: fn(A_full, as_grouped_mm_weight(W_col), offs), ValueError, "B:", "Replicate()")
    checks.raises("DTensor A with a plain B", lambda: fn(A_rep, as_grouped_mm_weight(W_full), offs), ValueError, "B:", "DTensor")
    checks.raises("A sharded over rows", lambda: fn(A_rows, as_grouped_mm_weight(W_rep), offs), ValueError, "A:", "Shard(1)")
    checks.raises("A Replicate with B Shard(1) over K", lambda: fn(A_rep, as_grouped_mm_weight(distribute_tensor(W_full, mesh, [Shard(2)])), offs),
                  ValueError, "B:", "Shard(2)")
    checks.raises("offs sharded", lambda: fn(A_rep, as_grouped_mm_weight(W_rep), distribute_tensor(offs, mesh, [Shard(0)])),
                  ValueError, "offs:", "Replicate()")
    from torch.distributed.tensor import DTensor, Partial

    A_partial = DTensor.from_local(A_full, mesh, [Partial()], run_check=False)
    checks.raises("Partial A", lambda: fn(A_partial, as_grouped_mm_weight(W_rep), offs), ValueError, "A:", "Partial")

    # A bias (E, N) follows the result's placement: routed by the same rules (a callable with a bias
    # keyword stands in for backends that take one).
    from mxfp8_compat.distributed import dtensor_aware

    def with_bias(A: torch.Tensor, B: torch.Tensor, offs: torch.Tensor, *, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = fn(A, B, offs)
        sizes = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        return out if bias is None else out + bias[torch.repeat_interleave(torch.arange(len(offs), device=A.device), sizes)]

    biased = dtensor_aware(with_bias)
    bias_full = torch.randn(E, N, generator=g).to(torch.bfloat16).to(dev)
    want = with_bias(A_full, as_grouped_mm_weight(W_full), offs, bias=bias_full)
    W = distribute_tensor(W_full, mesh, [Shard(0)])
    got = biased(A_full[row_lo:row_hi], as_grouped_mm_weight(W), local_offs, bias=distribute_tensor(bias_full, mesh, [Shard(0)]))
    checks.equal("bias, EP: Shard(0) bias", got, want[row_lo:row_hi], bitwise=ctx.exact, min_sqnr_db=40)
    got = biased(A_rep, as_grouped_mm_weight(W_col), offs, bias=distribute_tensor(bias_full, mesh, [Shard(1)]))
    checks.equal("bias, column-parallel: Shard(1) bias", got, want, bitwise=ctx.exact, min_sqnr_db=40)
    checks.raises("bias, column-parallel: plain bias", lambda: biased(A_rep, as_grouped_mm_weight(W_col), offs, bias=bias_full),
                  ValueError, "bias:", "Shard(dim=1)")
    A_k = distribute_tensor(A_full, mesh, [Shard(1)])
    W_k = distribute_tensor(W_full, mesh, [Shard(2)])
    checks.raises("bias, row-parallel", lambda: biased(A_k, as_grouped_mm_weight(W_k), offs, bias=distribute_tensor(bias_full, mesh, [Replicate()])),
                  ValueError, "bias:", "Partial")
    return checks


# --- isolation and the resolution cache from several ranks --------------------------------------


def scenario_isolation(ctx: Context, mode: str) -> Checks:
    """resolve(isolate=True) with one MXFP8_COMPAT_CACHE_DIR on every rank, from several threads at once."""
    from mxfp8_compat.probes import isolated as isolation, smoke

    checks = Checks()
    smoke_runs: list[str] = []
    children: list[int] = []
    real_smoke, real_child = smoke.smoke_run, isolation._run_child

    def counting_smoke(fn: Any, device: Any, **verdict_args: Any) -> Any:
        smoke_runs.append(getattr(fn, "__name__", "?"))
        return real_smoke(fn, device, **verdict_args)

    def counting_child(*args: Any) -> Any:
        children.append(1)
        return real_child(*args)

    smoke.smoke_run = counting_smoke
    isolation._run_child = counting_child
    cache = isolation.cache_dir()
    dist.barrier()
    results: list[Any] = []
    errors: list[str] = []

    def worker() -> None:
        try:
            results.append(resolve("emulated", device="cpu", isolate=True))
        except Exception:  # noqa: BLE001 - recorded
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    again = resolve("emulated", device="cpu", isolate=True)
    checks.add("no thread failed", not errors, errors=errors)
    checks.add("every call got the one cached Resolution", len(results) == 3 and all(r is again for r in results))
    checks.add("the fake torchao 0.18 passed isolation and is used",
               again.emulation == "torchao" and again.generation is not None and again.generation.key == "0.18",
               reasons=list(again.reasons))
    checks.add("one smoke run in this process", len(smoke_runs) == 1, smoke_runs=smoke_runs)
    checks.add("at most one isolated child in this process", len(children) <= 1, children=len(children))
    dist.barrier()  # every rank has written its verdict
    verdicts = sorted(p.name for p in cache.iterdir())
    checks.add("one verdict file, nothing else", len(verdicts) == 1 and verdicts[0].startswith("verdict-"), files=verdicts)
    if verdicts:
        text = (cache / verdicts[0]).read_text()
        try:
            record = json.loads(text)
            checks.add("the verdict parses and says torchao is usable", record.get("problem") is None, record=record)
        except ValueError:
            checks.add("the verdict parses", False, text=text)

    # Writers racing readers: every read of the verdict must parse (writes are atomic replaces).
    path = cache / verdicts[0] if verdicts else cache / "verdict-race.json"
    bad = []
    dist.barrier()
    for i in range(200):
        isolation._write_verdict(path, f"rank {ctx.rank} write {i} " + "x" * (i % 7) * 50, {"import": None}, "0.18.0")
        try:
            json.loads(path.read_text())
        except (ValueError, OSError) as error:
            bad.append(f"{type(error).__name__}: {error}")
    dist.barrier()
    checks.add("concurrent verdict writes never expose a partial file", not bad, bad=bad[:5], count=len(bad))
    leftovers = sorted(p.name for p in cache.iterdir() if p != path)
    checks.add("no temporary files left behind", not leftovers, files=leftovers)
    return checks


def scenario_hang(ctx: Context, mode: str) -> Checks:
    """Write this rank's pid next to the reports, then block in a collective (the interrupt test's subject)."""
    out = Path(os.environ["MXFP8_COMPAT_HANG_DIR"])
    (out / f"pid{ctx.rank}").write_text(str(os.getpid()))
    if ctx.rank == 0:
        threading.Event().wait(600)  # rank 1 waits in the barrier below meanwhile
    dist.barrier()
    return Checks()


SCENARIOS: dict[str, Callable[[Context, str], Checks]] = {
    "hang": scenario_hang,
    "fsdp": scenario_fsdp,
    "ep": scenario_ep,
    "dtensor": scenario_dtensor,
    "isolation": scenario_isolation,
}


def exit_with_parent() -> None:
    """Die when the launching process does (pytest killed by tox's interrupt): no rank outlives its run.

    A rank blocked in a collective never reaches Python code that could notice, so a daemon thread
    watches the parent pid (re-parenting changes it), and on Linux the kernel is asked as well.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: Optional[list[str]] = None) -> int:
    exit_with_parent()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated NAME:MODE, e.g. fsdp:off,ep:emulated")
    args = parser.parse_args(argv)
    backend = os.environ.get("MXFP8_COMPAT_DIST_BACKEND", "gloo")
    torch.set_num_threads(1)
    if backend == "nccl":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.cuda.set_device(args.rank)
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist.init_process_group(backend, init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world_size, timeout=timedelta(seconds=300))
    ctx = Context(args.rank, args.world_size, backend)
    report: dict[str, Any] = {"_meta": {"torch": torch.__version__, "backend": backend, "device": str(ctx.device),
                                        "torchao": environment.installed_torchao_version()}}
    for item in args.scenarios.split(","):
        name, _, mode = item.partition(":")
        key = f"{name}:{mode}" if mode else name
        try:
            checks = SCENARIOS[name](ctx, mode or "off")
            report[key] = {"ok": all(c["ok"] for c in checks.items), "error": None, "checks": checks.items}
        except Exception:  # noqa: BLE001 - recorded for the test to report
            report[key] = {"ok": False, "error": traceback.format_exc(), "checks": []}
        mxfp8_compat.reset()
        Path(args.out, f"rank{args.rank}.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
