"""The torch provider under torch.compile, without host reads, and its quantisers under CUDA-graph capture.

* ``torch.compile(..., fullgraph=True)`` (``aot_eager`` and CPU ``inductor``) of the callable, forward and
  backward through torch's own dispatcher with only its sm_100 kernel stood in
  (``tests/support/torch_sm100_standin.py``): equal to eager bit for bit, the two custom ops in the graph.
* ``torch.library.opcheck`` of both custom ops (schema, fake kernels, autograd registration, AOT
  dispatch with dynamic shapes) on real operands: unaligned, empty and one-row groups, ``offs[-1] < M``.
* No host read of a tensor anywhere in the forward and backward: a guard fails the test on any
  ``aten::_local_scalar_dense``, any op whose output shape depends on tensor data (``nonzero`` and
  the like: a sync on CUDA), and any Python-level ``item``/``tolist``/``int``/``bool``/``numpy`` of a
  tensor. Only the device code is exempt: the Triton launches and the GEMM (the stand-in reads
  ``offs`` on the host to loop over groups, as the GPU kernel reads it on the device).
* ``@pytest.mark.cuda``: the quantisers captured in one CUDA graph and replayed on new ``offs`` and
  inputs, bitwise equal to eager (a host read would fail the capture).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import torch_sm100_standin as standin
from mxfp8_compat import resolve
from mxfp8_compat.backends import torch_native as tn
from mxfp8_compat.layout import weight_relayout
from mxfp8_compat.token_groups import token_group_padding

pytest.importorskip("triton")

ROW = tn.match_torch_generation().row
needs_row = pytest.mark.skipif(ROW is None, reason=f"no torch MXFP8 row for torch {torch.__version__}")

SIZES, TAIL = (37, 0, 64, 1, 5), 9  # unaligned, empty and one-row groups; 9 rows after offs[-1]
K, N = 64, 96
OPS = ("mxfp8_compat::torch_mxfp8_forward", "mxfp8_compat::torch_mxfp8_backward")


@pytest.fixture(autouse=True)
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def sm100(monkeypatch, native_capable_device):
    monkeypatch.delenv("MXFP8_COMPAT_PROVIDER", raising=False)
    monkeypatch.setattr(tn, "torch_kernel_problem", lambda row, device: None)
    with standin.install() as calls:
        yield calls


def _inputs(seed: int, sizes=SIZES, tail=TAIL, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    M, E = sum(sizes) + tail, len(sizes)
    offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
    A = torch.randn(M, K, generator=g).to(dtype)
    B = weight_relayout(torch.randn(E, K, N, generator=g).to(dtype))  # per-group column-major
    return A, B, offs, torch.randn(M, N, generator=g).to(torch.bfloat16)


def _fwd_bwd(fn, A, B, offs, grad, **kwargs):
    A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    out = fn(A, B, offs, **kwargs)
    out.backward(grad.to(out.dtype))
    return out.detach(), A.grad, B.grad


def _assert_bitwise(actual, expected, what):
    for name, a, e in zip(("output", "grad A", "grad B"), actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} {name}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert not e.isnan().any() and e.abs().sum() > 0, f"{what} {name}: a degenerate expectation"
        assert torch.equal(a, e), f"{what} {name}: {int((a != e).sum())} of {a.numel()} elements differ from eager"


class _Recorder:
    """A torch.compile backend that records the ops of each dynamo graph, then runs aot_eager or inductor."""

    def __init__(self, backend: str):
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs):
        self.graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)


# --- torch.compile --------------------------------------------------------------------------------


@needs_row
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("wgrad_with_hp", [True, False], ids=["wgrad-hp", "wgrad-mxfp8"])
def test_compiled_fullgraph_equals_eager(sm100, backend, wgrad_with_hp):
    """resolve()'s callable under torch.compile(fullgraph=True): one graph, the custom ops in it,
    forward and backward bitwise equal to eager, every GEMM through torch's op and its meta checks."""
    res = resolve("native", device="cpu", provider="torch", wgrad_with_hp=wgrad_with_hp)
    assert res.provider == "torch", res.reasons
    A, B, offs, grad = _inputs(seed=1)
    sm100.clear()
    eager = _fwd_bwd(res, A, B, offs, grad)
    eager_calls = list(sm100)
    recorder = _Recorder(backend)
    compiled = torch.compile(lambda A, B, offs: res(A, B, offs), backend=recorder, fullgraph=True)
    sm100.clear()
    actual = _fwd_bwd(compiled, A, B, offs, grad)
    _assert_bitwise(actual, eager, f"{backend}, {'hp' if wgrad_with_hp else 'mxfp8'} weight gradient")
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs"
    assert "mxfp8_compat.torch_mxfp8_forward.default" in recorder.graphs[0], sorted(recorder.graphs[0])
    assert sm100 == eager_calls and len(sm100) == (2 if wgrad_with_hp else 3), sm100
    assert all("_scaled_grouped_mm meta" in checked for _, checked in sm100)


@needs_row
def test_compiled_call_without_input_grad_and_float32(sm100):
    """Only B needing a gradient (no weight copy kept along N), float32 operands and output: still one
    graph, bitwise eager; a second call with other group sizes (same shapes) runs without recompiling."""
    gemm = tn.match_torch_generation().gemm()
    call = tn.torch_native_call(gemm, wgrad_with_hp=False)
    A, B, offs, grad = _inputs(seed=2, dtype=torch.float32)

    def only_b(fn, offs):
        B_ = B.clone().requires_grad_(True)
        out = fn(A, B_, offs, torch.bfloat16)
        out.backward(grad)
        return out.detach(), B_.grad

    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for a, e in zip(only_b(compiled, offs), only_b(call, offs)):
        assert a.dtype == e.dtype == torch.float32 or a.dtype == e.dtype == torch.bfloat16
        assert torch.equal(a, e) and e.abs().sum() > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other = torch.tensor([64, 64, 70, 100, 106], dtype=torch.int32)  # other group sizes, same E and M
    for a, e in zip(only_b(compiled, other), only_b(call, other)):
        assert torch.equal(a, e) and e.abs().sum() > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "new offs values recompiled"


# --- opcheck --------------------------------------------------------------------------------------


@needs_row
@pytest.mark.parametrize("wgrad_with_hp", [True, False], ids=["wgrad-hp", "wgrad-mxfp8"])
def test_custom_ops_pass_opcheck(sm100, wgrad_with_hp):
    """Schema, fake kernels (shapes, strides, dtypes, the e4m3/e8m0 weight the forward hands to the
    backward, as uint8 bits), autograd registration and AOT dispatch (dynamic shapes) of both ops, with
    real operands."""
    key = tn._gemm_key(tn.match_torch_generation().gemm())
    A, B, offs, grad = _inputs(seed=3)
    padding = token_group_padding(offs, A.shape[0], tn.ALIGNMENT)
    maps = (padding.padded_offs, padding.source_rows, padding.padded_positions)
    forward_args = (A.requires_grad_(True), B.requires_grad_(True), offs, *maps, key, wgrad_with_hp, True)
    torch.library.opcheck(tn._torch_forward, forward_args)
    out, data, scales = tn._torch_forward(*forward_args)
    _, along_n = tn.quantize_weight(B.detach(), along_k=False)
    assert torch.equal(data, along_n.data.view(torch.uint8)) and torch.equal(scales, along_n.scales.view(torch.uint8)), \
        "the forward hands the backward the bits of B quantised along N"
    assert data.any() and scales.any()
    for need_A, need_B in ((True, True), (False, True), (True, False)):
        backward_args = (grad, A.detach(), offs, *maps, data, scales, key, wgrad_with_hp, torch.bfloat16, need_A, need_B)
        torch.library.opcheck(tn._torch_backward, backward_args)
    no_weight = (A.detach(), B.detach(), offs, *maps, key, wgrad_with_hp, False)
    torch.library.opcheck(tn._torch_forward, no_weight)


# --- no host read ---------------------------------------------------------------------------------


class HostRead(AssertionError):
    pass


_HOST_READS = ("item", "tolist", "numpy", "__int__", "__index__", "__float__", "__bool__")


_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_", "aten::_unsafe_index"}


def _reads_data(func, args) -> bool:
    """Whether ``func`` reads tensor data on the host: ``_local_scalar_dense`` (``item``), or an op whose
    output depends on it (``nonzero``, ``masked_select``, ``repeat_interleave``, ...). Indexing carries
    the dynamic-shape tag for boolean masks only: with integer index tensors it is a device gather."""
    if func is torch.ops.aten._local_scalar_dense.default:
        return True
    if not set(getattr(func, "tags", ())) & {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}:
        return False
    if func._schema.name in _INDEXING:
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return True


class NoHostReads(TorchDispatchMode):
    """While entered, fails on every op that reads tensor data on the host or whose output shape
    depends on it (a device sync on CUDA), and on the Python methods that read a tensor's value.
    ``exempt(fn)`` wraps device code (a kernel launch, the GEMM), which runs unguarded."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.active, self.exempt_depth = False, 0
        for name in _HOST_READS:
            real = getattr(torch.Tensor, name)

            def guarded(tensor, *args, _real=real, _name=name, **kwargs):
                if self.active and not self.exempt_depth:
                    raise HostRead(f"Tensor.{_name} reads tensor data on the host")
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, guarded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_data(func, args):
            raise HostRead(f"{func} reads tensor data on the host (a device sync on CUDA)")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def exempt(self, fn):
        def device_code(*args, **kwargs):
            self.exempt_depth += 1
            try:
                with _disable_current_modes():
                    return fn(*args, **kwargs)
            finally:
                self.exempt_depth -= 1

        return device_code


def _guarded_call(monkeypatch, wgrad_with_hp):
    """(the backend's callable with the kernel launches and the GEMM exempt, the guard, call counts)."""
    guard, calls = NoHostReads(monkeypatch), {"launch": 0, "gemm": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tn, "launch", guard.exempt(counted("launch", tn.launch)))
    if wgrad_with_hp:
        monkeypatch.setattr(tn, "wgrad_gemm", guard.exempt(tn.wgrad_gemm))
    call = tn.torch_native_call(guard.exempt(counted("gemm", tn.match_torch_generation().gemm())), wgrad_with_hp)
    return (lambda A, B, offs: call(A, B, offs, torch.bfloat16)), guard, calls


@needs_row
@pytest.mark.parametrize("wgrad_with_hp", [True, False], ids=["wgrad-hp", "wgrad-mxfp8"])
def test_forward_backward_read_nothing_on_the_host(sm100, monkeypatch, wgrad_with_hp):
    """Everything between the kernels (the token-group map, gathers, masks, the Function, autograd)
    runs under the guard. With ``wgrad_with_hp`` the bf16 weight-gradient GEMM is exempt too: on the
    CPU it is the shared per-group loop (``reference.wgrad_gemm``), on CUDA with bf16 operands (the
    provider always passes bf16) one ``torch._grouped_mm``, sync-free."""
    A, B, offs, grad = _inputs(seed=4)
    plain = tn.torch_native_call(tn.match_torch_generation().gemm(), wgrad_with_hp)
    expected = _fwd_bwd(lambda A, B, offs: plain(A, B, offs, torch.bfloat16), A, B, offs, grad)
    call, guard, calls = _guarded_call(monkeypatch, wgrad_with_hp)
    with guard:
        actual = _fwd_bwd(call, A, B, offs, grad)
    assert calls["gemm"] == (2 if wgrad_with_hp else 3), calls
    assert calls["launch"] == (3 if wgrad_with_hp else 5), calls  # A, weight, grad_out (, grad_out^T, A^T)
    _assert_bitwise(actual, expected, "guarded")


@needs_row
def test_the_guard_catches_host_reads(sm100, monkeypatch):
    """The guard is not vacuous: the same call with one host read added fails it, in the forward
    (a Python int of offs) and in the backward (an op with a data-dependent shape)."""
    A, B, offs, grad = _inputs(seed=5)
    call, guard, _ = _guarded_call(monkeypatch, wgrad_with_hp=False)
    real_padding, real_columns = tn.token_group_padding, tn.quantize_grouped_columns

    def reads_offs(offs, rows, alignment):
        assert int(offs[-1]) <= rows
        return real_padding(offs, rows, alignment)

    def reads_sizes(x, padding, scale_mode="rceil"):
        padding.padded_offs.nonzero()
        return real_columns(x, padding, scale_mode)

    with monkeypatch.context() as patch:
        patch.setattr(tn, "token_group_padding", reads_offs)
        with guard, pytest.raises(HostRead, match="Tensor.__int__"):
            call(A, B, offs)
    with monkeypatch.context() as patch:
        patch.setattr(tn, "quantize_grouped_columns", reads_sizes)
        with guard, pytest.raises(HostRead, match="nonzero"):
            _fwd_bwd(call, A, B, offs, grad)
    with guard:
        for read in (lambda: offs[offs > 0], lambda: torch.repeat_interleave(offs.long()), lambda: offs.tolist(), lambda: bool(offs[0])):
            with pytest.raises(HostRead):
                read()
        offs.long()[torch.tensor([0, 2])]  # integer indexing reads nothing on the host
    assert int(offs[-1]) > 0, "outside the guard, reads work"


# --- CUDA graphs (the quantisers; torch's sm_100 kernel does not run on the GPUs here) -----------------


def _quantise_all(x, w, offs):
    padding = token_group_padding(offs, x.shape[0], tn.ALIGNMENT)
    rows = tn.quantize_rows(x, padding)
    along_k, along_n = tn.quantize_weight(w)
    columns = tn.quantize_grouped_columns(x, padding)
    operands = (rows, along_k, along_n, columns)
    return [padding.padded_offs, padding.source_rows, padding.padded_positions] + [t for op in operands for t in (op.data, op.scales)]


@pytest.mark.cuda
@pytest.mark.parametrize("hw_cvt", [True, False], ids=["cvt", "arith"])
def test_quantisers_cuda_graph_replay_equals_eager(hw_cvt, monkeypatch):
    """The token-group map and the three quantisers with padding fused, captured once, replayed on new
    offs (other group sizes: empty, one-row, offs[-1] < M) and new inputs: every output byte as eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(tn, "USE_HW_CVT", hw_cvt)
    device = torch.device("cuda")
    groupings = ((37, 0, 100, 1, 64, 5), (0, 0, 0, 0, 0, 200), (1, 33, 0, 7, 130, 2), (64, 64, 0, 0, 32, 0))
    M, C, E, K_w, N_w = 240, 288, 6, 256, 160
    g = torch.Generator().manual_seed(7)

    def fresh(sizes):
        x = (torch.randn(M, C, generator=g) * torch.exp2(torch.randint(-20, 20, (M, 1), generator=g).float())).bfloat16()
        w = torch.randn(E, N_w, K_w, generator=g).bfloat16().transpose(-2, -1)  # (E, K, N) column-major
        offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
        return x.to(device), w.to(device), offs.to(device)

    static_x, static_w, static_offs = fresh(groupings[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm the kernels outside the capture
        for _ in range(2):
            _quantise_all(static_x, static_w, static_offs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _quantise_all(static_x, static_w, static_offs)
    padded_offs_seen = set()
    for sizes in groupings[1:] + groupings[:1]:
        x, w, offs = fresh(sizes)
        static_x.copy_(x), static_w.copy_(w), static_offs.copy_(offs)
        graph.replay()
        torch.cuda.synchronize()
        eager = _quantise_all(x, w, offs)
        assert len(captured) == len(eager) == 11
        for i, (c, e) in enumerate(zip(captured, eager)):
            assert c.dtype == e.dtype and c.shape == e.shape, (sizes, i)
            assert torch.equal(c.view(torch.uint8) if c.element_size() == 1 else c, e.view(torch.uint8) if e.element_size() == 1 else e), f"groups {sizes}: output {i} differs from eager"
        assert eager[3].view(torch.uint8).any() and eager[4].view(torch.uint8).any(), "degenerate quantised data"
        padded_offs_seen.add(tuple(captured[0].tolist()))
    assert len(padded_offs_seen) == len(groupings), "the replays did not see the new offs"
