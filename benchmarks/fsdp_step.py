"""What the shim adds to an FSDP2 training step: step time and bytes copied, against torch._grouped_mm.

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_step.py --device cuda        # 2 GPUs, NCCL
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_step.py --preset tiny         # CPU, gloo

Model: ``--layers`` SwiGLU expert layers (E experts, dim -> hidden -> dim), the tokens already routed
and sorted by expert into uniform groups (a multiple of 128 rows, so every MXFP8 kernel takes them),
expert weights stored contiguous (E, N, K) (``expert_weight``), each layer and the root under
``fully_shard`` with bf16 parameters and float32 gradient reduction, AdamW. Variants, each its own
model from the same initial weights, fed the same tokens, timed round by round in turn:

* ``raw``: ``torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)`` called directly;
* ``off``: ``resolve("off")(x, as_grouped_mm_weight(w), offs)``, the shim's bf16 path;
* ``emulated``: ``resolve("emulated")``, MXFP8 numerics without the sm_100 kernel (slower by
  design: it quantises in plain PyTorch); ``native``/``auto`` where the hardware has it.

Per variant: the median step time (forward, backward, optimizer step; CUDA events on a GPU), its
ratio to ``raw``, the peak memory, and the bytes copied in one extra step run under a
``TorchDispatchMode`` that adds up every copying op (``copy_``, ``clone``, ``_to_copy``, ``cat``,
FSDP2's own copy ops...): in total, and from tensors shaped like an unsharded expert weight,
(E, N, K) or (E, K, N), i.e. what a relayout of the weights would copy (goal: zero). FSDP2's own
all-gather copies are the same for every variant, so ``total - raw's total`` is what the shim adds.
For ``emulated`` the weight-shaped copies include the backward's working copy of B for quantising it
along N (MXFP8 numerics need B read in the other order there; torchao's emulation does the same), not
a relayout: tests/support/distributed_worker.py counts the shim's relayouts under FSDP2 separately (zero).
The first step's loss of ``raw`` and ``off`` must be bitwise equal (same kernels, same inputs).
Nothing is asserted beyond that; rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from mxfp8_compat import as_grouped_mm_weight, expert_weight, resolve

PRESETS = {
    # layers, experts, dim, hidden, tokens (rows after routing) per rank
    "moe": (4, 8, 2048, 1408, 16384),
    "moe-large": (4, 16, 4096, 1536, 32768),
    "tiny": (2, 4, 64, 64, 512),
}

COPY_OPS = {
    "aten::copy_", "aten::clone", "aten::_to_copy", "aten::cat", "aten::stack", "aten::index_copy",
    "aten::_foreach_copy_", "fsdp::split_with_sizes_copy", "fsdp::all_gather_copy_in", "aten::split_with_sizes_copy",
}


class Experts(torch.nn.Module):
    def __init__(self, experts: int, dim: int, hidden: int, gmm: Callable[..., torch.Tensor], raw: bool, device: torch.device):
        super().__init__()
        self.gmm, self.raw = gmm, raw
        self.w_gate = expert_weight(experts, dim, hidden, device=device)
        self.w_up = expert_weight(experts, dim, hidden, device=device)
        self.w_down = expert_weight(experts, hidden, dim, device=device)

    def b(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(-2, -1) if self.raw else as_grouped_mm_weight(w)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.raw:
            mm = lambda a, w: torch._grouped_mm(a, self.b(w), offs=offs)  # noqa: E731
        else:
            mm = lambda a, w: self.gmm(a, self.b(w), offs)  # noqa: E731
        h = torch.nn.functional.silu(mm(x, self.w_gate)) * mm(x, self.w_up)
        return x + mm(h, self.w_down)


class Stack(torch.nn.Module):
    def __init__(self, layers: list[Experts]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, offs)
        return x


class CopyCounter(TorchDispatchMode):
    """Bytes written by copying ops, by op, and those read from expert-weight-shaped tensors."""

    def __init__(self, weight_shapes: set[tuple[int, ...]]):
        super().__init__()
        self.weight_shapes = weight_shapes
        self.by_op: dict[str, int] = defaultdict(int)
        self.from_weights = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in COPY_OPS:
            written = sum(t.numel() * t.element_size() for t in _tensors(out if name != "aten::copy_" else args[0]))
            self.by_op[name] += written
            sources = args[1:2] if name == "aten::copy_" else args[:1]
            if any(tuple(t.shape) in self.weight_shapes for t in _tensors(sources)):
                self.from_weights += written
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="moe")
    parser.add_argument("--modes", default="raw,off,emulated", help="comma-separated: raw, off, emulated, native, auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layers, E, dim, hidden, tokens = PRESETS[args.preset]
    modes = args.modes.split(",")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    variants: dict[str, dict[str, Any]] = {}
    for mode in modes:
        gmm = None if mode == "raw" else resolve(mode, device=device)
        torch.manual_seed(0)
        model = Stack([Experts(E, dim, hidden, gmm, mode == "raw", device) for _ in range(layers)])
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, p.shape[-1] ** -0.5)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        variants[mode] = {
            "model": model,
            "opt": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "times": [],
            "backend": "torch._grouped_mm" if gmm is None else f"{gmm.backend}" + (f" ({gmm.emulation})" if gmm.emulation else ""),
        }

    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(tokens, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    offs = (torch.arange(1, E + 1) * (tokens // E)).to(device=device, dtype=torch.int32)

    def step(v: dict[str, Any]) -> torch.Tensor:
        loss = v["model"](x, offs).float().pow(2).mean()
        loss.backward()
        v["opt"].step()
        v["opt"].zero_grad(set_to_none=True)
        return loss.detach()

    first_losses = {mode: step(v) for mode, v in variants.items()}
    for _ in range(args.warmup - 1):
        for v in variants.values():
            step(v)
    for _ in range(args.steps):
        for v in variants.values():
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(v)
                end.record()
                torch.cuda.synchronize()
                v["times"].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(v)
                v["times"].append(time.perf_counter() - t0)

    weight_shapes = {(E, hidden, dim), (E, dim, hidden)}
    for mode, v in variants.items():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with CopyCounter(weight_shapes) as counter:
            step(v)
        v["copies"] = counter
        v["peak"] = torch.cuda.max_memory_allocated() if cuda else 0

    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"FSDP2 step, {world} ranks on {name}, torch {torch.__version__}; preset {args.preset}: {layers} layers, "
              f"E={E}, dim={dim}, hidden={hidden}, {tokens} routed tokens per rank; {args.steps} timed steps after {args.warmup}")
        raw = variants.get("raw")
        raw_median = statistics.median(raw["times"]) if raw else None
        raw_total = sum(raw["copies"].by_op.values()) if raw else None
        print(f"{'variant':10s} {'backend':28s} {'median step':>12s} {'vs raw':>7s} {'copied from expert weights':>27s} "
              f"{'all copies':>11s} {'beyond raw':>11s} {'peak mem':>9s}")
        for mode, v in variants.items():
            median = statistics.median(v["times"])
            total = sum(v["copies"].by_op.values())
            ratio = f"{median / raw_median:.3f}" if raw_median else "-"
            beyond = f"{(total - raw_total) / 2**20:.1f} MiB" if raw_total is not None else "-"
            print(f"{mode:10s} {v['backend']:28s} {median * 1e3:9.2f} ms {ratio:>7s} {v['copies'].from_weights / 2**20:22.1f} MiB "
                  f"{total / 2**20:7.1f} MiB {beyond:>11s} {v['peak'] / 2**30:6.2f} GiB")
        for mode, v in variants.items():
            ops = ", ".join(f"{op} {b / 2**20:.1f} MiB" for op, b in sorted(v["copies"].by_op.items()))
            print(f"  {mode}: copies by op: {ops}")
        if "raw" in first_losses and "off" in first_losses:
            same = torch.equal(first_losses["raw"], first_losses["off"])
            print(f"first-step loss raw {first_losses['raw'].item():.6f} off {first_losses['off'].item():.6f}: "
                  f"{'bitwise equal' if same else 'DIFFERENT'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
