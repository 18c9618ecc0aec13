"""A training step of a random mid-size Qwen3-MoE with the mxfp8 experts backend vs transformers' own.

    python benchmarks/hf_step.py                     # CUDA: hidden 2048, 64 experts, top-8, 4 layers
    python benchmarks/hf_step.py --small             # CPU smoke check (tiny model)

One model (bf16, random init, no download), switched between experts implementations with
``model.set_experts_implementation`` and timed side by side, interleaved round by round:

  grouped_mm   transformers' own backend (torch._grouped_mm)
  off          mxfp8_compat's backend, mode "off" (bf16 torch._grouped_mm through the shim)
  emulated     mxfp8_compat's backend, mode "emulated" (MXFP8 numerics without the sm_100 kernel:
               torchao's emulation where installed, groups padded to its alignment in the permutation)
  auto         mode "auto" (native MXFP8 on sm_100, else bf16), with --modes ... auto

A step is forward (loss over the batch), backward and an AdamW step. Prints the median time per
step of each implementation, its ratio to grouped_mm, peak memory, the loss of one forward on the
same weights (before any step), and what each mode resolved to. Nothing is asserted. Works with transformers 5.0+ (5.17 and 5.24 tested).
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import metadata

import torch

from mxfp8_compat import resolve
from mxfp8_compat.integrations.transformers import register


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a tiny model and batch (CPU smoke check)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--moe-intermediate", type=int, default=768, help="per-expert intermediate size (Qwen3-30B-A3B's)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768, help="smaller than Qwen3's 151936 so that the step is MoE-bound")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--modes", default="grouped_mm,off,emulated", help="comma-separated: grouped_mm, off, emulated, auto, native")
    args = parser.parse_args()
    if args.small:
        args.layers, args.hidden, args.experts, args.top_k, args.moe_intermediate = 2, 256, 8, 2, 128
        args.heads, args.kv_heads, args.vocab, args.batch, args.seq, args.rounds = 4, 2, 1024, 2, 128, 3
    return args


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        max_position_embeddings=max(4096, args.seq),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")
    return model.to(device=args.device, dtype=torch.bfloat16).train()


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    implementations = {}
    for mode in modes:
        if mode == "grouped_mm":
            implementations[mode] = "grouped_mm"
        else:
            register(f"mxfp8_{mode}", mode=mode)
            implementations[mode] = f"mxfp8_{mode}"

    print(
        f"torch {torch.__version__}, transformers {metadata.version('transformers')}, torchao "
        f"{_version('torchao')}, device {torch.cuda.get_device_name(device) if cuda else 'cpu'}"
    )
    for mode in modes:
        if mode != "grouped_mm":
            r = resolve(mode, device=device)
            print(f"  {mode}: backend {r.backend}, emulation {r.emulation}, group_alignment {r.group_alignment}; {'; '.join(r.reasons) or 'no reasons'}")

    model = build(args)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Qwen3-MoE: {args.layers} layers, hidden {args.hidden}, {args.experts} experts (intermediate "
        f"{args.moe_intermediate}), top-{args.top_k}, vocab {args.vocab}, {params / 1e9:.2f} B parameters, bf16; "
        f"batch {args.batch} x {args.seq} tokens; step = forward + backward + AdamW"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)

    def one_step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    loss, peak = {}, {}
    with torch.no_grad():  # the same weights for every implementation
        for mode in modes:
            model.set_experts_implementation(implementations[mode])
            loss[mode] = float(model(input_ids=ids, labels=ids).loss)
    for mode in modes:
        model.set_experts_implementation(implementations[mode])
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            one_step()
        sync()
        if cuda:
            peak[mode] = torch.cuda.max_memory_allocated(device) / 2**30

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            model.set_experts_implementation(implementations[mode])
            for _ in range(args.steps):
                sync()
                start = time.perf_counter()
                one_step()
                sync()
                times[mode].append(time.perf_counter() - start)

    base = statistics.median(times[modes[0]])
    print(f"\n{'implementation':<14} {'median ms/step':>15} {'min':>9} {'vs ' + modes[0]:>16} {'peak GiB':>9} {'loss':>11}")
    for mode in modes:
        median = statistics.median(times[mode])
        print(
            f"{mode:<14} {median * 1e3:>15.2f} {min(times[mode]) * 1e3:>9.2f} {median / base:>16.3f} "
            f"{peak.get(mode, float('nan')):>9.2f} {loss[mode]:>11.5f}"
        )
    print("loss: one forward of each implementation on the same initial weights.")
    print(f"{args.rounds} rounds x {args.steps} steps per implementation, interleaved; {args.warmup} warm-up steps each first.")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


if __name__ == "__main__":
    main()
