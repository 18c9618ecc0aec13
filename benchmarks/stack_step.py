"""A training step of each MoE stack's MoE layer: as shipped vs through the mxfp8_compat integration.

    python benchmarks/stack_step.py                 # both stacks that are installed, CPU sizes
    python benchmarks/stack_step.py --stack torchtitan --dim 1024 --experts 16
    python benchmarks/stack_step.py --device cuda --dtype bfloat16 --dim 2048 --hidden 1408 --experts 64 --tokens 16384

Stacks (each skipped when its package is missing):

  torchtitan   torchtitan's MoE layer (router, AllToAll dispatcher, GroupedExperts), stock vs
               built from a config converted by MXFP8CompatConverter (mode off / emulated)
  automodel    NeMo Automodel's MoE layer (experts="torch_mm_mxfp8"), with its own
               select_grouped_mm vs the library's (install(mode=...))

A step is forward, an MSE loss, backward and an AdamW step, on one layer with the same weights.
The variants are timed in one process, interleaved round by round (the order rotates); the script prints the median
and the minimum time per step and their ratios to the stack as shipped (on a shared machine the
minimum is the steadier figure). Nothing is asserted (times are for reading,
not for a test: a loaded machine moves them).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Callable

import torch


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=["torchtitan", "automodel", "all"], default="all")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024, help="per-expert intermediate size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 1 x sequence)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--modes", default="off,emulated", help="integration modes to time beside the stock layer")
    parser.add_argument("--device", default="cpu", help="where the layer runs (cuda: each timed batch ends in a synchronize)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="torchtitan's parameter dtype (default float32; Automodel's layer is always bf16)")
    return parser.parse_args()


def step_fn(module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(module(x).float(), target)
        loss.backward()
        optimizer.step()

    return step


def time_variants(
    variants: dict[str, Callable[[], None]], rounds: int, steps: int, device: torch.device
) -> dict[str, list[float]]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm-up (resolution, first-call allocations, kernel compilation)
        step()
        step()
    sync()
    names = list(variants)
    for round_index in range(rounds):
        # rotate the order each round: no variant always runs first (or right after another)
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            step = variants[name]
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def torchtitan_variants(args: argparse.Namespace, modes: list[str]) -> dict[str, Callable[[], None]]:
    from torchtitan.models.common.config_utils import make_moe_config, make_routed_experts_config, make_router_config

    from mxfp8_compat.integrations.torchtitan import MXFP8CompatConverter

    def config():
        return make_moe_config(
            num_experts=args.experts,
            router=make_router_config(dim=args.dim, num_experts=args.experts, gate_param_init={}, top_k=args.top_k),
            routed_experts=make_routed_experts_config(
                dim=args.dim, hidden_dim=args.hidden, num_experts=args.experts, top_k=args.top_k, param_init={},
                comm_backend="standard",
            ),
        )

    device, dtype = torch.device(args.device), getattr(torch, args.dtype or "float32")
    stock = config().build().to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(std=1 / math.sqrt(p.shape[-1]))
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype)
    target = torch.randn(1, args.tokens, args.dim, device=device)
    variants = {"as shipped": step_fn(stock, x, target)}
    for mode in modes:
        layer = MXFP8CompatConverter.Config(mode=mode).build().convert(config()).build().to(device=device, dtype=dtype)
        layer.load_state_dict(stock.state_dict())
        variants[mode] = step_fn(layer, x, target)
    return variants


def automodel_variants(args: argparse.Namespace, modes: list[str]) -> dict[str, Callable[[], None]]:
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.moe import experts as automodel_experts
    from nemo_automodel.components.moe.config import MoEConfig
    from nemo_automodel.components.moe.layers import MoE

    from mxfp8_compat.integrations import automodel

    config = MoEConfig(
        n_routed_experts=args.experts, n_shared_experts=0, n_activated_experts=args.top_k, n_expert_groups=1,
        n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0, score_func="softmax",
        route_scale=1.0, dim=args.dim, inter_dim=args.hidden, moe_inter_dim=args.hidden, norm_topk_prob=False,
        dtype=torch.bfloat16,
    )
    backend = BackendConfig(linear="torch", rms_norm="torch", attn="sdpa", experts="torch_mm_mxfp8", dispatcher="torch",
                            enable_hf_state_dict_adapter=False)
    shipped_selector = automodel_experts.select_grouped_mm
    device = torch.device(args.device)
    x = torch.randn(1, args.tokens, args.dim, device=device).bfloat16()
    target = torch.randn(1, args.tokens, args.dim, device=device)

    def layer() -> MoE:
        torch.manual_seed(0)
        moe = MoE(config, backend)
        with torch.no_grad():
            moe.init_weights(torch.device("cpu"))
        return moe.to(device)

    def with_selector(selector, step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            automodel_experts.select_grouped_mm = selector
            step()

        return run

    variants = {"as shipped": with_selector(shipped_selector, step_fn(layer(), x, target))}
    for mode in modes:
        variants[mode] = with_selector(automodel.selector(mode), step_fn(layer(), x, target))
    return variants


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    stacks = ["torchtitan", "automodel"] if args.stack == "all" else [args.stack]
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; dim {args.dim}, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.top_k}, {args.tokens} tokens; median of {args.rounds} rounds x {args.steps} steps")
    warnings.simplefilter("ignore")
    for stack in stacks:
        build = torchtitan_variants if stack == "torchtitan" else automodel_variants
        try:
            variants = build(args, modes)
        except ImportError as error:
            print(f"{stack}: skipped ({error})")
            continue
        times = time_variants(variants, args.rounds, args.steps, device)
        median = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        print(f"{stack}:            median ms/step  ratio    min ms/step  ratio")
        for name in times:
            print(
                f"  {name:<12} {median[name] * 1e3:14.2f} {median[name] / median['as shipped']:6.3f}x"
                f" {best[name] * 1e3:14.2f} {best[name] / best['as shipped']:6.3f}x"
            )


if __name__ == "__main__":
    main()
