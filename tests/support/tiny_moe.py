"""A small MoE layer for the distributed tests and the FSDP2 step benchmark.

Router (top-k over a softmax), token permutation sorted by expert, token groups padded to a
multiple of ``align`` rows (as torchtitan pads for MXFP8), and three grouped GEMMs (gate, up,
down) with SiLU, on expert weights stored the FSDP2-friendly way: contiguous ``(E, N, K)``
parameters passed as ``as_grouped_mm_weight(w)``. With ``ep_group`` the experts are spread
over the ranks of that group (expert parallelism: all-to-all token dispatch and combine) and
the expert weights are DTensors sharded ``Shard(0)`` that go to the grouped GEMM as they are.

Precision: ``compute_dtype`` (bf16) for the experts, ``router_dtype`` for the router; every
parameter is cast with ``.to(dtype)`` in forward, which is a no-op where FSDP2's mixed
precision already hands forward that dtype, and the same cast in a single process.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from mxfp8_compat import as_grouped_mm_weight, expert_weight


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits, differentiable (backward sends gradients back)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        import torch.distributed as dist

        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def pad_token_groups(rows: torch.Tensor, counts: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by group -> (padded rows, destination row of each input row, int32 offs).

    Each group is padded with zero rows to a multiple of ``align`` (an empty group stays
    empty). Reads ``counts`` on the host (fine for tests; MoE stacks pad on the device).
    """
    padded_counts = (counts + align - 1) // align * align
    ends = padded_counts.cumsum(0)
    group_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts)
    rank_in_group = torch.arange(rows.shape[0], device=rows.device) - (counts.cumsum(0) - counts)[group_of_row]
    dest = (ends - padded_counts)[group_of_row] + rank_in_group
    total = int(ends[-1]) if ends.numel() else 0
    padded = rows.new_zeros((total,) + tuple(rows.shape[1:])).index_copy(0, dest, rows)
    return padded, dest, ends.to(torch.int32)


class TinyMoE(torch.nn.Module):
    """Router + top-k + permutation + SwiGLU experts through a grouped GEMM ``grouped_mm``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        grouped_mm: Callable[..., torch.Tensor],
        *,
        align: int = 32,
        compute_dtype: torch.dtype = torch.bfloat16,
        router_dtype: torch.dtype = torch.float32,
        ep_group: Optional[Any] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.grouped_mm, self.align = grouped_mm, align
        self.compute_dtype, self.router_dtype = compute_dtype, router_dtype
        self.ep_group = ep_group
        self.keep_logits = False  # keep the router logits (and their gradient) as self.logits
        self.logits: Optional[torch.Tensor] = None
        self.router = torch.nn.Parameter(torch.empty(num_experts, dim, device=device))
        # Stored (E, N, K): gate/up map dim -> hidden, down maps hidden -> dim.
        self.w_gate = expert_weight(num_experts, dim, hidden, device=device)
        self.w_up = expert_weight(num_experts, dim, hidden, device=device)
        self.w_down = expert_weight(num_experts, hidden, dim, device=device)

    def init_weights(self, generator: torch.Generator) -> None:
        """Fresh random weights from ``generator`` (the same on every rank that uses the same seed)."""
        with torch.no_grad():
            for p, fan_in in ((self.router, self.dim), (self.w_gate, self.dim), (self.w_up, self.dim), (self.w_down, self.hidden)):
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, k, E = x.shape[0], self.top_k, self.num_experts
        logits = F.linear(x.to(self.router_dtype), self.router.to(self.router_dtype)).float()
        if self.keep_logits:
            logits.retain_grad()
            self.logits = logits
        weights, experts = logits.softmax(-1).topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        rows = x[order // k].float()  # (T*k, D), sorted by expert; float32 over the wire
        if self.ep_group is None:
            out = self.experts(rows, counts)
        else:
            out = self.experts_parallel(rows, counts)
        unsorted = torch.empty_like(out).index_copy(0, order, out)  # back to (token, k) order
        return (unsorted.view(T, k, -1) * weights.unsqueeze(-1)).sum(1)

    def experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each row by its group's expert; ``counts`` rows per (local) expert, in order."""
        cdt = self.compute_dtype
        padded, dest, offs = pad_token_groups(rows.to(cdt), counts, self.align)
        gate = self.grouped_mm(padded, as_grouped_mm_weight(self.w_gate.to(cdt)), offs)
        up = self.grouped_mm(padded, as_grouped_mm_weight(self.w_up.to(cdt)), offs)
        down = self.grouped_mm(F.silu(gate) * up, as_grouped_mm_weight(self.w_down.to(cdt)), offs)
        return down[dest].float()

    def experts_parallel(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: send rows to their experts' ranks, compute, send them back."""
        import torch.distributed as dist

        group = self.ep_group
        world = dist.get_world_size(group)
        local = self.num_experts // world
        # How many rows each rank sends this rank for each of its local experts.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        received = received.view(world, local)
        send_splits = counts.view(world, local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        got = AllToAll.apply(rows, recv_splits, send_splits, group)  # by source rank, then expert
        # Regroup by local expert, source ranks in rank order (the single-process row order).
        starts = torch.cumsum(received.reshape(-1), 0) - received.reshape(-1)
        blocks = [
            torch.arange(int(starts[s * local + e]), int(starts[s * local + e]) + int(received[s, e]))
            for e in range(local)
            for s in range(world)
        ]
        by_expert = torch.cat(blocks).to(rows.device) if blocks else torch.zeros(0, dtype=torch.long, device=rows.device)
        out = self.experts(got[by_expert], received.sum(0))
        back = torch.empty_like(out).index_copy(0, by_expert, out)
        return AllToAll.apply(back, send_splits, recv_splits, group)
