"""One rank of the torchtitan FSDP2 + expert-parallel test (tests/test_torchtitan_distributed.py starts it).

    python tests/support/torchtitan_worker.py --rank R --world-size 2 --init-file F --out DIR --scenarios titan:off,titan:emulated

The same command line and report format as tests/support/distributed_worker.py, so that
tests/support/distributed_launch.py's ``launch`` starts it: ``DIR/rank<R>.json`` holds
``{scenario: {"ok", "error", "checks"}}``; a scenario that raises is recorded and the next one runs.

Each ``titan:<mode>`` scenario builds a tiny qwen3 MoE decoder (2 MoE layers, 4 experts, top-2)
through torchtitan 0.3.0's own config tree, converts it with ``MXFP8CompatConverter(mode)``, and
parallelizes it with torchtitan's own code, as its trainer does for
``parallelism.expert_parallel_degree=2``, ``data_parallel_shard_degree=-1``,
``spmd_backend="partial_dtensor"``: ``set_qwen3_sharding_config(enable_ep=True)``, then
``ParallelDims.build_mesh()`` and ``parallelize_qwen3`` (``model.parallelize`` for EP: expert
weights ``Shard(0)`` over ``ep``, the stock ``AllToAllTokenDispatcher`` all-to-all wired by
``RoutedExperts.parallelize``; then ``apply_fsdp_to_decoder`` with bf16 params / float32
reductions, per-parameter meshes for the experts, and FSDP's gradient division disabled).
Two SGD steps on each rank's half of a random global batch are compared with the same model in
this one process.

What is not torchtitan's own code here (each because of the CPU/gloo host, nothing else):

* ``torchtitan.distributed.parallel_dims.device_type`` is set to ``"cpu"``: torchtitan picks
  ``"cuda"`` when no accelerator is visible, and ``init_device_mesh("cuda")`` needs CUDA.
* Every FSDP module gets ``set_force_sum_reduction_for_comms(True)``: torchtitan disables FSDP's
  gradient division (factor 1.0), which FSDP2 then performs as ``ReduceOp.PREMUL_SUM(1.0)``,
  an NCCL-only op that gloo refuses. Forced to a SUM followed by a division by 1.0, it is the same
  arithmetic (a multiplication by 1.0 is exact).
* The attention layers' inner attention is torchtitan's ``ScaledDotProductAttention`` (causal)
  instead of ``FlexAttention``: torchtitan's flex path is ``torch.compile``d, minutes of CPU
  inductor on a shared 2-core host. The MoE layers, which are what the converter changes, are stock.
* ``update_from_config`` is not called (it imports torchtitan.trainer, which needs torchdata):
  its parallelism part, ``set_qwen3_sharding_config``, is called directly.

The single-process reference keeps float32 master weights, computes in bf16 as FSDP2's
mixed-precision policy does (parameters cast, buffers float32), and mirrors where the
distributed run adds things up:

* The experts under EP see every rank's tokens for their experts, in rank order, exactly as one
  process sees the global batch (stable sort by expert; the all-to-all puts rank 0's tokens
  first): the reference's logits and expert-weight gradients come from one pass over the global
  batch. (``efsdp`` has size 1: expert gradients are the bf16 gradient cast to float32.)
* Every other parameter is data parallel: FSDP2 casts each rank's bf16 gradient to float32 and
  sums the two (one commutative addition). The reference runs each rank's half separately and
  adds the float32 casts.

On the CPU each row's result does not depend on the other rows of its GEMM, so in ``off`` logits,
losses, every gradient and the trained weights are bitwise equal. In ``emulated`` too: the
grouped GEMMs get the same padded groups, rows in the same order, so every MXFP8 block (32 along
K for activations and weights; 32 tokens along M for the weight gradient) holds the same values;
and on top of that the logits must be MXFP8's (a finite SQNR to the bf16 model's) and the losses
within 1% of bf16's.

Padding after the all-to-all: every grouped GEMM call records its rows, offsets and
``groups_aligned``; the stock dispatch under the converter's dispatcher records the
per-local-expert counts the all-to-all produced and that it ran with the EP mesh. Each group the
GEMM receives must be that count rounded up to ``Resolution.group_alignment`` (32 for the
emulation, 1 in bf16).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mxfp8_compat  # noqa: E402
from mxfp8_compat.numerics.metrics import sqnr_db  # noqa: E402

DIM, HEAD_DIM, HIDDEN, EXPERTS, TOP_K, LAYERS, VOCAB = 64, 32, 64, 4, 2, 2, 128
BATCH, SEQ = 4, 24  # the global batch: BATCH / world rows per rank
STEPS, LR = 2, 0.5
EXPERT_PARAMS = ("w1_EFD", "w2_EDF", "w3_EFD")


class Checks:
    """Comparisons of one scenario; each either passes or records why not."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, **detail: Any) -> None:
        self.items.append({"name": name, "ok": bool(ok), **detail})

    def equal(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        """Bitwise equal, and not all zeros; records the difference (max and SQNR) otherwise."""
        got, want = _plain(got), _plain(want)
        same_shape = tuple(got.shape) == tuple(want.shape)
        exact = same_shape and torch.equal(got, want)
        diff = (got.double() - want.double()).abs().max().item() if same_shape and got.numel() else math.inf
        sqnr = _sqnr(want, got) if same_shape else -math.inf
        nonzero = bool(want.ne(0).any())
        ok = nonzero and exact
        self.add(name, ok, bitwise=exact, max_abs_diff=diff, sqnr_db=sqnr, nonzero=nonzero, shape=list(got.shape))


def _plain(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def _sqnr(want: torch.Tensor, got: torch.Tensor) -> float:
    if torch.equal(want, got):
        return math.inf
    return float(sqnr_db(want.double(), got.double()))


# --- the model, as torchtitan configures it -----------------------------------------------------


def model_config(mode: str, enable_ep: bool):  # type: ignore[no-untyped-def]
    """A tiny qwen3 MoE decoder config, converted, with torchtitan's sharding config for EP."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_moe_layers, _qwen3_norm
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

    from mxfp8_compat.integrations.torchtitan import MXFP8CompatConverter

    init = {"weight": lambda p: torch.nn.init.normal_(p, std=0.5 / math.sqrt(p.shape[-1]))}
    config = Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=_qwen3_norm(DIM),
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=init),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=init),
        layers=_build_qwen3_moe_layers(
            n_layers=LAYERS, dim=DIM, n_heads=2, n_kv_heads=1, head_dim=HEAD_DIM, moe_hidden_dim=HIDDEN,
            num_experts=EXPERTS, top_k=TOP_K, attn_backend="flex",
            rope=CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=4 * SEQ, theta=1e6), moe_comm_backend="standard",
        ),
    )
    for layer in config.layers:  # flex attention is torch.compile'd: see the module docstring
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = MXFP8CompatConverter.Config(mode=mode).build().convert(config)
    set_qwen3_sharding_config(config, enable_sp=False, enable_ep=enable_ep)
    return config


def build_model(mode: str):  # type: ignore[no-untyped-def]
    """The converted model with random weights (the same on every rank: seeded)."""
    torch.manual_seed(1234)
    model = model_config(mode, enable_ep=True).build()
    with torch.no_grad():
        model.init_weights(buffer_device=None)
        for name, p in model.named_parameters():  # experts: larger weights, so routing and MXFP8 matter
            if name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
                p.normal_(std=1.0 / math.sqrt(p.shape[-1]))
    return model


def parallelize(model, world: int):  # type: ignore[no-untyped-def]
    """torchtitan's parallelize_qwen3 for EP=2 (FSDP over the same two ranks), as its trainer calls it."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.qwen3 import parallelize_qwen3

    parallel_dims_module.device_type = "cpu"  # stub: torchtitan falls back to "cuda" without an accelerator
    parallelism = ParallelismConfig(data_parallel_shard_degree=-1, expert_parallel_degree=world, spmd_backend="partial_dtensor")
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    parallel_dims = ParallelDims.from_config(parallelism, world)
    parallel_dims.build_mesh()
    training = TrainingConfig()
    assert training.mixed_precision_param == "bfloat16" and training.mixed_precision_reduce == "float32"
    model = parallelize_qwen3(
        model, parallel_dims=parallel_dims, training=training, parallelism=parallelism,
        compile_config=CompileConfig(), ac_config=None, dump_folder=os.environ.get("TMPDIR", "/tmp"),
    )
    for module in model.modules():  # stub: gloo has no PREMUL_SUM (see the module docstring)
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model, parallel_dims


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch at ``step``: random tokens and labels (any rank can make it)."""
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed over these tokens, divided by the global token count (torchtitan's scaling)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / (BATCH * SEQ)


def is_expert(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMS


# --- the single-process reference ---------------------------------------------------------------


def reference_step(master, tokens, labels, world: int):  # type: ignore[no-untyped-def]
    """One step of ``master`` (float32 weights) computed as FSDP2 + EP compute it, in one process.

    Returns the global logits, each rank's loss and the float32 gradients (see the module docstring).
    """
    work = copy.deepcopy(master)
    for p in work.parameters():
        p.data = p.data.to(torch.bfloat16)  # FSDP2's param_dtype; buffers stay float32
    logits = work(tokens)
    loss_of(logits, labels).backward()
    grads = {name: p.grad.float() for name, p in work.named_parameters() if is_expert(name)}
    losses = []
    rows = BATCH // world
    for rank in range(world):
        work.zero_grad(set_to_none=True)
        loss = loss_of(work(tokens[rank * rows:(rank + 1) * rows]), labels[rank * rows:(rank + 1) * rows])
        loss.backward()
        losses.append(loss.detach())
        for name, p in work.named_parameters():
            if not is_expert(name):
                grads[name] = p.grad.float() if rank == 0 else grads[name] + p.grad.float()
    return logits.detach(), losses, grads


# --- spies on the grouped GEMM and the stock dispatch -------------------------------------------


class Spy:
    """Records every grouped GEMM call and every stock dispatch under the converter's dispatcher."""

    def __init__(self, mode: str) -> None:
        from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

        self.resolution = mxfp8_compat.resolve(mode, device="cpu")
        self.gemms: list[dict[str, Any]] = []
        self.dispatches: list[dict[str, Any]] = []
        self._cls, self._real_call = type(self.resolution), type(self.resolution).__call__
        self._dispatcher, self._real_dispatch = AllToAllTokenDispatcher, AllToAllTokenDispatcher.dispatch

    def __enter__(self) -> "Spy":
        spy, real_call, real_dispatch = self, self._real_call, self._real_dispatch

        def call(resolution, A, B, offs, **kwargs):  # type: ignore[no-untyped-def]
            spy.gemms.append({"rows": A.shape[0], "offs": offs.tolist(), "aligned": kwargs.get("groups_aligned")})
            return real_call(resolution, A, B, offs, **kwargs)

        def dispatch(dispatcher, x_TD, *args):  # type: ignore[no-untyped-def]
            routed, counts, metadata = real_dispatch(dispatcher, x_TD, *args)
            spy.dispatches.append({"ep_mesh": dispatcher.ep_mesh is not None, "counts": counts.tolist(),
                                   "rows": routed.shape[0], "tokens": x_TD.shape[0], "class": type(dispatcher).__name__})
            return routed, counts, metadata

        self._cls.__call__ = call  # type: ignore[method-assign]
        self._dispatcher.dispatch = dispatch  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.__call__ = self._real_call  # type: ignore[method-assign]
        self._dispatcher.dispatch = self._real_dispatch  # type: ignore[method-assign]


def check_padding(checks: Checks, spy: Spy, world: int) -> None:
    """Each GEMM group is the all-to-all's count for that local expert, rounded up to the alignment."""
    alignment = spy.resolution.group_alignment
    checks.add("the converter's dispatcher ran the stock EP dispatch (all-to-all)",
               len(spy.dispatches) == LAYERS and all(d["ep_mesh"] and d["class"] == "MXFP8CompatTokenDispatcher"
                                                     for d in spy.dispatches), dispatches=spy.dispatches)
    checks.add("three grouped GEMMs per MoE layer, each told groups_aligned=True",
               len(spy.gemms) == 3 * LAYERS and all(g["aligned"] is True for g in spy.gemms),
               calls=[(g["rows"], g["aligned"]) for g in spy.gemms])
    local_experts = EXPERTS // world
    for layer, dispatch in enumerate(spy.dispatches):
        counts = dispatch["counts"]
        want = [math.ceil(c / alignment) * alignment for c in counts]
        for call in spy.gemms[3 * layer:3 * layer + 3]:
            sizes = [b - a for a, b in zip([0] + call["offs"][:-1], call["offs"])]
            # every group but the last padded to the alignment; the last runs to the buffer's end
            # (token_groups' layout: no row after the last group), so it holds at least its padded size
            padded = (sizes[:-1] == want[:-1] and sizes[-1] >= want[-1] and sizes[-1] % alignment == 0
                      and call["offs"][-1] == call["rows"]) if sizes else not want
            checks.add(f"layer {layer}: groups padded to {alignment} after the all-to-all", padded
                       and len(counts) == local_experts and call["rows"] % alignment == 0 and call["rows"] >= sum(want),
                       sizes=sizes, all_to_all_counts=counts, rows=call["rows"], alignment=alignment)
    # Every routed token reached an expert-owning rank: the counts received add up to the global T * K.
    received = torch.tensor([sum(d["counts"]) for d in spy.dispatches], dtype=torch.int64)
    dist.all_reduce(received)
    checks.add("the all-to-all delivered every routed token", received.tolist() == [BATCH * SEQ * TOP_K] * LAYERS,
               received=received.tolist(), want=BATCH * SEQ * TOP_K)


# --- the scenario -------------------------------------------------------------------------------


def scenario_titan(rank: int, world: int, mode: str) -> Checks:
    checks = Checks()
    model = build_model(mode)
    master = copy.deepcopy(model)  # float32, unsharded: the single-process reference
    bf16_master = None
    if mode != "off":  # the same weights in mode off (bitwise the stock layer: tests/test_torchtitan.py)
        bf16_master = model_config("off", enable_ep=True).build()
        bf16_master.load_state_dict(master.state_dict())
    model, parallel_dims = parallelize(model, world)
    ep_sharded = [n for n, p in model.named_parameters() if is_expert(n)]
    w1 = model.layers["0"].moe.routed_experts.inner_experts.w1_EFD
    checks.add("expert weights are DTensors sharded over ep (and efsdp)", type(w1).__name__ == "DTensor"
               and w1.to_local().shape[0] == EXPERTS // world and len(ep_sharded) == 3 * LAYERS,
               placements=str(getattr(w1, "placements", None)), local_shape=list(w1.to_local().shape))
    checks.add("model.parallelize wired the EP mesh into the converter's dispatcher",
               all(layer.moe.routed_experts.token_dispatcher.ep_mesh is not None for layer in model.layers.values()))

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    reference_optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    rows = BATCH // world
    bf16_losses, losses = [], []
    for step in range(STEPS):
        tokens, labels = batch(step)
        local_tokens, local_labels = tokens[rank * rows:(rank + 1) * rows], labels[rank * rows:(rank + 1) * rows]
        want_logits, want_losses, want_grads = reference_step(master, tokens, labels, world)

        optimizer.zero_grad(set_to_none=True)
        with Spy(mode) as spy:
            logits = model(local_tokens)
            loss = loss_of(logits, local_labels)
            loss.backward()
        if step == 0:
            check_padding(checks, spy, world)
        gathered = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(gathered, logits.detach().contiguous())
        checks.equal(f"step {step}: logits (global batch)", torch.cat(gathered), want_logits)
        checks.equal(f"step {step}: loss", loss.detach(), want_losses[rank])
        grads = {name: p.grad for name, p in model.named_parameters()}
        checks.add(f"step {step}: every parameter has a gradient", grads.keys() == want_grads.keys()
                   and all(g is not None for g in grads.values()), missing=sorted(k for k, g in grads.items() if g is None))
        for name, want in want_grads.items():
            if grads.get(name) is not None:
                checks.equal(f"step {step}: grad {name}", grads[name], want)

        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        if bf16_master is not None:  # the bf16 model, one process, global batch, its own SGD steps
            work = copy.deepcopy(bf16_master)
            for p in work.parameters():
                p.data = p.data.to(torch.bfloat16)
            bf16_logits = work(tokens)
            bf16_loss = loss_of(bf16_logits, labels)
            bf16_loss.backward()
            bf16_losses.append(bf16_loss.item())
            with torch.no_grad():
                for p, q in zip(bf16_master.parameters(), work.parameters()):
                    p.sub_(LR * q.grad.float())
            if step == 0:
                sqnr = _sqnr(bf16_logits.detach().float(), torch.cat(gathered).float())
                checks.add("step 0: logits are MXFP8's, not bf16's (a finite SQNR to the bf16 model's)",
                           5 <= sqnr < 60, sqnr_db=sqnr)

        optimizer.step()
        for name, p in master.named_parameters():
            p.grad = want_grads[name]
        reference_optimizer.step()

    trained = dict(model.named_parameters())
    for name, want in master.named_parameters():
        checks.equal(f"trained {name}", trained[name], want)
    checks.add("the loss is finite", all(math.isfinite(x) for x in losses), losses=losses)
    if bf16_losses:
        checks.add("emulated losses stay close to bf16's", all(abs(a - b) <= 0.01 * b for a, b in zip(losses, bf16_losses)),
                   losses=losses, bf16_losses=bf16_losses)
    return checks


SCENARIOS = {"titan": scenario_titan}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated NAME:MODE, e.g. titan:off,titan:emulated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world_size, timeout=timedelta(seconds=300))
    from importlib import metadata

    report: dict[str, Any] = {"_meta": {"torch": torch.__version__, "backend": "gloo", "device": "cpu",
                                        "torchtitan": metadata.version("torchtitan")}}
    for item in args.scenarios.split(","):
        name, _, mode = item.partition(":")
        try:
            checks = SCENARIOS[name](args.rank, args.world_size, mode or "off")
            report[item] = {"ok": all(c["ok"] for c in checks.items), "error": None, "checks": checks.items}
        except Exception:  # noqa: BLE001 - recorded for the test to report
            report[item] = {"ok": False, "error": traceback.format_exc(), "checks": []}
        mxfp8_compat.reset()
        Path(args.out, f"rank{args.rank}.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
