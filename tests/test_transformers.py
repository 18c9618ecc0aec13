"""The Hugging Face transformers experts backend (mxfp8_compat.integrations.transformers).

Models are built from tiny configs of four families that route their experts through
transformers' ExpertsInterface (Qwen3-MoE, Mixtral, gpt-oss with biases and transposed
weights, DeepSeek-V3), on the CPU, with no download. The reference is transformers' own
"grouped_mm" backend. Run with ``tox -e transformers`` (or ``transformers517``); elsewhere
only the tests that need no transformers run.

Bitwise comparisons run under ``torch.use_deterministic_algorithms(True)``: without it,
transformers' own backend is not deterministic on the CPU (the backward of its
``hidden_states[perm // k]`` is an ``index_put_(accumulate=True)`` whose threads add in any
order), while this backend is (see ``test_deterministic_without_deterministic_mode``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import types
from importlib import metadata
from typing import Iterator

import pytest
import torch

import mxfp8_compat
from mxfp8_compat.integrations import _resolving as resolving
from mxfp8_compat.integrations import transformers as hf

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (tox -e transformers)")

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")
VOCAB = 128
# Registered once per session: transformers' registry is process-wide.
OFF, EMULATED, ENV = "mxfp8_test_off", "mxfp8_test_emulated", "mxfp8_test_env"


# --- no transformers needed ---------------------------------------------------------------------


def test_importing_mxfp8_compat_imports_no_transformers() -> None:
    code = (
        "import sys, mxfp8_compat, mxfp8_compat.integrations, mxfp8_compat.integrations.transformers\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert 'torchao' not in sys.modules, 'torchao was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_names_the_version_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.7\.0 .*transformers is not installed"):
        hf.register()


def test_transformers_without_experts_interface_names_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformers 4.x: importable, but without transformers.integrations.moe."""
    monkeypatch.setattr(metadata, "version", lambda name: "4.57.1")
    old = types.ModuleType("transformers")
    old.__path__ = []  # type: ignore[attr-defined]
    integrations = types.ModuleType("transformers.integrations")
    integrations.__path__ = []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", old)
    monkeypatch.setitem(sys.modules, "transformers.integrations", integrations)
    monkeypatch.delitem(sys.modules, "transformers.integrations.moe", raising=False)
    with pytest.raises(ImportError) as raised:
        hf.register()
    message = str(raised.value)
    assert "needs transformers >= 5.7.0" in message
    assert "transformers 4.57.1 has no transformers.integrations.moe.ExpertsInterface" in message
    assert "pip install 'transformers>=5.7.0'" in message


def test_transformers_before_registered_names_names_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """5.0-5.6 have ExpertsInterface, but from_pretrained accepts only the built-in names there."""
    monkeypatch.setattr(metadata, "version", lambda name: "5.3.0")
    for name in ("transformers", "transformers.integrations", "transformers.integrations.moe"):
        module = types.ModuleType(name)
        module.__path__ = []  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["transformers.integrations.moe"].ExpertsInterface = type("ExpertsInterface", (), {})  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.7\.0 .*transformers 5\.3\.0 has the registry, but"):
        hf.register()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def names() -> Iterator[None]:
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed (tox -e transformers)")
    hf.register(OFF, mode="off")
    hf.register(EMULATED, mode="emulated")
    hf.register(ENV)
    yield


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def config(family: str, top_k: int | None = None):  # type: ignore[no-untyped-def]
    """A tiny config: hidden 64, expert intermediate 32 (multiples of 32, as MXFP8 needs), 8 experts."""
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
    )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=top_k or 4, decoder_sparse_step=1, norm_topk_prob=True,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=top_k or 3)
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=top_k or 3,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "deepseek_v3":
        common.update(num_key_value_heads=2)
        common.pop("head_dim")
        return transformers.DeepseekV3Config(
            **common, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=top_k or 3, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
            topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
            v_head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    raise AssertionError(family)


def build(family: str, implementation: str, dtype: torch.dtype = torch.float32, top_k: int | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    """A random model (every parameter, biases included, ~N(0, 0.1)) with the given experts backend."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, top_k), experts_implementation=implementation)
    model = model.to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def step(model, implementation: str, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """(logits, loss, {name: grad}) of one forward and backward with ``implementation``."""
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


def experts_modules(model) -> list[torch.nn.Module]:  # type: ignore[no-untyped-def]
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[mxfp8_compat.Resolution]:
    """The Resolution of every experts forward that went through this backend."""
    seen: list[mxfp8_compat.Resolution] = []
    real = hf.experts_forward

    def spy(self, hidden_states, top_k_index, top_k_weights, grouped_mm):  # type: ignore[no-untyped-def]
        seen.append(grouped_mm)
        return real(self, hidden_states, top_k_index, top_k_weights, grouped_mm)

    monkeypatch.setattr(hf, "experts_forward", spy)
    return seen


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --- mode "off": transformers' own grouped_mm, bit for bit --------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_off_is_bitwise_grouped_mm(family: str, names: None, deterministic: None, calls: list) -> None:
    """float32: logits, loss and every parameter's gradient are bitwise those of "grouped_mm"."""
    model = build(family, "grouped_mm")
    ids = tokens()
    logits, loss, grads = step(model, "grouped_mm", ids)
    assert not calls
    got_logits, got_loss, got_grads = step(model, OFF, ids)
    assert len(calls) == len([m for m in experts_modules(model)]) and all(r.backend == "bf16" for r in calls)
    assert torch.equal(got_logits, logits) and torch.equal(got_loss, loss)
    assert got_grads.keys() == grads.keys()
    differ = [name for name in grads if not torch.equal(got_grads[name], grads[name])]
    assert not differ, f"gradients differ: {differ}"


@pytest.mark.parametrize("family", FAMILIES)
def test_off_bf16(family: str, names: None, deterministic: None) -> None:
    """bf16: forward bitwise; gradients bitwise except where top_k >= 3 sums a token's slots.

    transformers adds a token's k slot gradients one at a time into a bf16 tensor (the
    ``index_put_`` backward, rounding after each add); this backend sums them in float32 and
    rounds once. With top_k = 2 the two agree (one rounding either way), so Mixtral top-2 is
    bitwise throughout; with more, gradients upstream of a MoE layer's input differ by that
    rounding only.
    """
    model = build(family, "grouped_mm", torch.bfloat16)
    ids = tokens()
    logits, loss, grads = step(model, "grouped_mm", ids)
    got_logits, got_loss, got_grads = step(model, OFF, ids)
    assert torch.equal(got_logits, logits) and torch.equal(got_loss, loss)
    for name in grads:
        assert relative_error(got_grads[name], grads[name]) < 2e-2, name

    top2 = build("mixtral", "grouped_mm", torch.bfloat16, top_k=2)
    _, _, grads = step(top2, "grouped_mm", ids)
    _, _, got_grads = step(top2, OFF, ids)
    assert all(torch.equal(got_grads[name], grads[name]) for name in grads)


def test_deterministic_without_deterministic_mode(names: None) -> None:
    """Every gather has a gather as its backward: two runs give the same bits, no opt-in needed."""
    assert not torch.are_deterministic_algorithms_enabled()
    model = build("qwen3_moe", OFF)
    ids = tokens(4, 32)
    first = step(model, OFF, ids)[2]
    second = step(model, OFF, ids)[2]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_off_twenty_adamw_steps_bitwise(names: None, deterministic: None) -> None:
    """The bitwise agreement survives training: 20 AdamW steps, identical loss curves."""
    curves = {}
    for implementation in ("grouped_mm", OFF):
        curves[implementation] = train("qwen3_moe", implementation)
    assert torch.equal(curves[OFF], curves["grouped_mm"])


def train(family: str, implementation: str, steps: int = 20, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = build(family, implementation, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokens(4, 32)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses)


# --- mode "emulated": MXFP8 numerics, tracking bf16 ---------------------------------------------

# Largest relative loss difference seen over the 20 steps of these tests: 6e-4 (gpt-oss, torchao
# 0.18's emulation); MXFP8's own error is ~28 dB SQNR per GEMM (~4 % of a GEMM's output).
EMULATED_LOSS_RTOL = 5e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_tracks_grouped_mm_over_twenty_adamw_steps(family: str, names: None, calls: list) -> None:
    reference = train(family, "grouped_mm")
    emulated = train(family, EMULATED)
    resolution = calls[-1]
    assert resolution.backend == "mxfp8-emulated"
    assert not torch.equal(emulated, reference), "MXFP8 changed nothing: was it applied?"
    assert emulated[-1] < emulated[0] - 0.3, "emulated MXFP8 does not train"
    error = ((emulated - reference).abs() / reference).max().item()
    assert error < EMULATED_LOSS_RTOL, f"relative loss difference {error:.2e} ({resolution.emulation} emulation)"


def test_emulated_on_the_reference_emulation(names: None, no_torchao: None, calls: list) -> None:
    """Without torchao, "emulated" is mxfp8_compat's reference (group_alignment 1: no padding)."""
    reference = train("mixtral", "grouped_mm", steps=8)
    emulated = train("mixtral", EMULATED, steps=8)
    assert calls[-1].emulation == "reference" and calls[-1].group_alignment == 1
    assert ((emulated - reference).abs() / reference).max().item() < EMULATED_LOSS_RTOL


# --- the padded layout, with the GEMMs' unspecified rows poisoned -------------------------------


def poisoned(resolution: mxfp8_compat.Resolution, alignment: int) -> mxfp8_compat.Resolution:
    """``resolution`` claiming ``group_alignment`` and writing NaN where the contract leaves rows unspecified.

    Output rows from ``offs[-1]`` on and their input gradient are NaN, and it checks the
    promise ``groups_aligned=True`` makes (every group size a multiple of ``alignment``).
    """

    class PoisonTailGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, A, offs):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(offs)
            return A.view_as(A)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            (offs,) = ctx.saved_tensors
            return poison_tail(grad, offs), None

    def poison_tail(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0]).unsqueeze(-1)
        return torch.where(rows < offs[-1], x, float("nan"))

    def fn(A, B, offs, *, out_dtype=None, bias=None, groups_aligned=False):  # type: ignore[no-untyped-def]
        assert groups_aligned
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        assert A.shape[0] % alignment == 0 and bool((sizes % alignment == 0).all()), "groups not aligned"
        out = resolution.fn(PoisonTailGrad.apply(A, offs), B, offs, out_dtype=out_dtype)
        return poison_tail(out, offs)

    return dataclasses.replace(resolution, fn=fn, group_alignment=alignment)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alignment", [1, 32])
def test_padded_layout_ignores_unspecified_rows(
    family: str, alignment: int, names: None, deterministic: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Groups padded to 32 inside the permutation give grouped_mm's results; NaN in the rows the
    GEMMs leave unspecified (the static tail, sentinels) never reaches the output or a gradient
    (biases and routing weights included)."""
    model = build(family, "grouped_mm")
    ids = tokens()
    logits, loss, grads = step(model, "grouped_mm", ids)
    real = mxfp8_compat.resolve("off", device="cpu")
    monkeypatch.setattr(resolving, "resolve", lambda mode, device: poisoned(real, alignment))
    got_logits, got_loss, got_grads = step(model, OFF, ids)
    assert torch.isfinite(got_logits).all() and all(torch.isfinite(g).all() for g in got_grads.values())
    # Padding rows are zeros: every row's product, and every sum over a group's rows, is unchanged
    # (within the CPU GEMM's blocking, which may depend on a group's row count).
    assert relative_error(got_logits, logits) < 1e-6 and relative_error(got_loss, loss) < 1e-6
    for name in grads:
        assert relative_error(got_grads[name], grads[name]) < 1e-5, name


# --- expert-parallel sentinels, routing weights ----------------------------------------------------


def sentinel_problem(family: str, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """An experts module of ``family`` and a routing with sentinel ids (>= num_experts), zero-weighted as EP does."""
    model = build(family, "grouped_mm", dtype)
    experts = experts_modules(model)[-1]
    experts._is_expert_parallel = True
    generator = torch.Generator().manual_seed(2)
    tokens_, top_k = 40, 3
    hidden = torch.randn(tokens_, 64, generator=generator, dtype=dtype)
    index = torch.stack([torch.randperm(experts.num_experts + 2, generator=generator)[:top_k] for _ in range(tokens_)])
    weights = torch.rand(tokens_, top_k, generator=generator, dtype=dtype)
    weights = torch.where(index >= experts.num_experts, 0.0, weights)
    assert (index >= experts.num_experts).any()
    return experts, hidden, index, weights


def run_experts(experts, hidden, index, weights, implementation: str, resolution=None):  # type: ignore[no-untyped-def]
    experts.config._experts_implementation_internal = implementation
    experts.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    if resolution is None:
        out = experts(hidden, index, weights)
    else:
        out = hf.experts_forward(experts, hidden, index, weights, resolution)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad, weights.grad, grads


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_parallel_sentinels_as_grouped_mm(family: str, names: None, deterministic: None) -> None:
    """Sentinel ids contribute zero and get zero gradient, bit for bit as transformers' grouped_mm."""
    from packaging.version import Version

    if Version(metadata.version("transformers")) < Version("5.8.0"):
        pytest.skip("transformers < 5.8's grouped_mm computes sentinel slots in the last expert's group (clamped ids)")
    experts, hidden, index, weights = sentinel_problem(family)
    reference = run_experts(experts, hidden, index, weights, "grouped_mm")
    got = run_experts(experts, hidden, index, weights, OFF)
    for a, b in zip(got[:3], reference[:3]):
        assert torch.equal(a, b)
    assert got[3].keys() == reference[3].keys()
    assert all(torch.equal(got[3][name], reference[3][name]) for name in got[3])
    assert bool((got[2][index >= experts.num_experts] == 0).all())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_parallel_sentinels_emulated(family: str, names: None, calls: list) -> None:
    """In the padded MXFP8 layout sentinel slots are dropped: same result as routing them nowhere."""
    experts, hidden, index, weights = sentinel_problem(family)
    got = run_experts(experts, hidden, index, weights, EMULATED)
    assert calls[-1].backend == "mxfp8-emulated"
    for value in (got[0], got[1], got[2], *got[3].values()):
        assert torch.isfinite(value).all()
    assert bool((got[2][index >= experts.num_experts] == 0).all())
    # The same slots sent to expert 0 with weight zero: same output, same expert-weight gradients.
    # (MXFP8 blocks restart at each group; an extra zero-weighted row changes no block of the forward
    # or of the bf16 weight gradient, so only float32 summation order can differ.)
    dropped = torch.where(index >= experts.num_experts, 0, index)
    experts._is_expert_parallel = False
    expected = run_experts(experts, hidden, dropped, weights, EMULATED)
    assert relative_error(got[0], expected[0]) < 1e-6
    assert relative_error(got[1], expected[1]) < 1e-6
    for name in expected[3]:
        assert relative_error(got[3][name], expected[3][name]) < 1e-5, name


# --- the weights are views of transformers' storage ---------------------------------------------


class CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records aten ops that copy one of ``storages`` into a new buffer of the same dtype (a relayout).

    Dtype conversions (the MXFP8 quantiser reading a weight into float32 to find block maxima)
    are arithmetic on the weight, as a GEMM's read is, and are not counted.
    """

    COPIES = {"aten::clone", "aten::_to_copy", "aten::copy_", "aten::as_strided_copy"}

    def __init__(self, storages: set[int]) -> None:
        super().__init__()
        self.storages, self.copies = storages, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.COPIES and isinstance(out, torch.Tensor):
            for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
                if (
                    isinstance(tensor, torch.Tensor)
                    and tensor.untyped_storage().data_ptr() in self.storages
                    and tensor.dtype == out.dtype
                ):
                    self.copies.append((func._schema.name, tuple(tensor.shape), tensor.stride()))
        return out


@pytest.mark.parametrize(
    "family, implementation, forward_copies, backward_copies",
    [
        ("qwen3_moe", OFF, 0, 0),
        ("gpt_oss", OFF, 0, 0),
        # torchao's backward quantises the weight along N for the input gradient and makes that
        # copy itself (one per weight, its own choice, whatever layout it is handed): not counted.
        ("qwen3_moe", EMULATED, 0, None),
        # is_transposed weights are stored (E, K, N) row-major; MXFP8 quantises along K, so the
        # shim relays each one out per call (weight_relayout): the one case that copies.
        ("gpt_oss", EMULATED, "one per weight", None),
    ],
)
def test_weights_are_passed_as_views(
    family: str, implementation: str, forward_copies, backward_copies, names: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both GEMMs get transpose views of transformers' weight storage (no copy); "off" copies no
    weight anywhere in forward or backward."""
    model = build(family, "grouped_mm", torch.bfloat16)
    weights = {
        p.untyped_storage().data_ptr(): p for m in experts_modules(model) for p in (m.gate_up_proj, m.down_proj)
    }
    seen: list[torch.Tensor] = []
    resolution = mxfp8_compat.resolve("off" if implementation == OFF else "emulated", device="cpu")

    def spy(A, B, offs, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(B)
        return resolution.fn(A, B, offs, **kwargs)

    monkeypatch.setattr(resolving, "resolve", lambda mode, device: dataclasses.replace(resolution, fn=spy))
    model.set_experts_implementation(implementation)
    ids = tokens()
    with CopyCounter(set(weights)) as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with CopyCounter(set(weights)) as backward:
        loss.backward()

    transposed = experts_modules(model)[0].is_transposed
    assert len(seen) == len(weights)  # two GEMMs per MoE layer, one per weight
    for B in seen:
        parameter = weights[B.untyped_storage().data_ptr()]
        view = parameter if transposed else parameter.transpose(-2, -1)
        assert B.data_ptr() == parameter.data_ptr() and B.shape == view.shape and B.stride() == view.stride()
    if forward_copies == "one per weight":
        forward_copies = len(weights)
    assert len(forward.copies) == forward_copies, forward.copies
    if backward_copies is not None:
        assert len(backward.copies) == backward_copies, backward.copies


# --- how users select it ------------------------------------------------------------------------


def test_from_pretrained_and_set_experts_implementation(names: None, deterministic: None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    build("qwen3_moe", "grouped_mm").save_pretrained(tmp_path)
    ids = tokens()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouped_mm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=OFF)
    assert loaded.config._experts_implementation == OFF
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        reference.set_experts_implementation(OFF)
        assert torch.equal(reference(input_ids=ids).logits, expected)


def test_mode_follows_the_environment(names: None, calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """mode=None: MXFP8_COMPAT_MODE, read by resolve() (after reset()), per device."""
    model = build("mixtral", ENV)
    ids = tokens()
    for mode, backend in (("off", "bf16"), ("emulated", "mxfp8-emulated")):
        monkeypatch.setenv("MXFP8_COMPAT_MODE", mode)
        mxfp8_compat.reset()
        calls.clear()
        with torch.no_grad():
            model(input_ids=ids)
        assert {(r.mode, r.backend, r.device.type) for r in calls} == {(mode, backend, "cpu")}


def test_register_refuses_bad_names_and_modes(names: None) -> None:
    with pytest.raises(ValueError, match="mode"):
        hf.register("mxfp8_bad", mode="fast")
    with pytest.raises(ValueError, match="already an experts implementation of transformers' own"):
        hf.register("grouped_mm")
    with pytest.raises(ValueError, match="eager"):
        hf.register("eager")
    assert hf.register(OFF, mode="off").__name__.startswith("mxfp8_experts_forward")  # re-registering is fine


# --- torch.compile and generation ---------------------------------------------------------------


@pytest.mark.parametrize("implementation", [OFF, EMULATED])
def test_compile_fullgraph_aot_eager_training(implementation: str, names: None) -> None:
    """fullgraph=True (no graph break), forward and backward through AOTAutograd (bf16).

    resolve() runs while dynamo traces (the cache is cleared first), outside the graph. The
    forward is eager's, bit for bit; the gradients are eager's within bf16 rounding (torch
    2.11's AOTAutograd decomposes some bf16 backward ops of the attention and norms differently
    from eager, for transformers' own backend alike; on torch 2.13 they are bitwise too).
    """
    model = build("qwen3_moe", implementation, torch.bfloat16)
    ids = tokens()
    logits, loss, grads = step(model, implementation, ids)
    mxfp8_compat.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.equal(out.logits, logits) and torch.equal(out.loss, loss)
    compiled_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert compiled_grads.keys() == grads.keys()
    for name in grads:
        assert relative_error(compiled_grads[name], grads[name]) < 2e-2, name


@pytest.mark.parametrize("implementation", [OFF, EMULATED])
def test_compile_fullgraph_inductor_forward(implementation: str, names: None) -> None:
    """CPU inductor, fullgraph=True, the model's forward (bf16).

    With "emulated" this is torchao's emulation where installed (groups padded to 32 in the
    permutation). Its backward does not build on the CPU inductor of torch 2.13 (a codegen
    assertion in torchao's quantisation kernels), and on torch 2.11 neither does its forward
    (e8m0 scales have no C++ type there): recorded as an expected failure, as in test_compile.py.
    Training compiles through aot_eager above.
    """
    model = build("qwen3_moe", implementation, torch.bfloat16)
    ids = tokens()
    mxfp8_compat.reset()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        try:
            got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
        except Exception as error:  # noqa: BLE001 - InductorError wraps it; re-raised unless the known gap
            if "float8_e8m0fnu missing from torch._inductor.codegen.cpp" in str(error):
                pytest.xfail(f"torch {torch.__version__}'s CPU inductor cannot compile torchao's e8m0 scales: {error!s:.120}")
            raise
    assert relative_error(got, expected) < 2e-2  # inductor fuses and reorders the bf16 attention


def test_generate(names: None, deterministic: None) -> None:
    model = build("qwen3_moe", "grouped_mm").eval()
    prompt = tokens(2, 8)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    model.set_experts_implementation(OFF)
    assert torch.equal(model.generate(prompt, **kwargs), expected)
    model.set_experts_implementation(EMULATED)
    emulated = model.generate(prompt, **kwargs)
    assert emulated.shape == expected.shape and torch.equal(emulated[:, :8], prompt)
