"""Under torch.compile each op is either our custom op or its plain maths, chosen per device and op
by ``backends.compiled_choice``: both modes compile without graph breaks and match the float64
reference forward and backward, the choice can be forced, and ``python -m npu_kernels`` shows it."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import npu_kernels
from npu_kernels import backends, registry
from npu_kernels.__main__ import main as print_report
from tests.reference import assert_close, attention, check_against_reference, geglu, group_norm_silu

MODES = backends.COMPILED_CHOICES


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


def _cases(dtype: torch.dtype) -> dict:
    """op -> (public call, float64 reference, inputs): odd sizes, a non-contiguous input, masks."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x_geglu = rand(3, 5, 2 * 7)
    x_gn = rand(2, 6, 5, 3).to(memory_format=torch.channels_last)  # channels_last: not contiguous
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    k_short, v_short = rand(1, 2, 3, 8), rand(1, 2, 3, 8)
    mask = torch.rand(1, 1, 9, 3, generator=g) > 0.3
    mask[..., 0] = True  # every query attends to something
    return {
        "geglu": (npu_kernels.geglu, geglu, (_leaf(x_geglu),)),
        "group_norm_silu": (
            lambda x, w, b: npu_kernels.group_norm_silu(x, 3, w, b, 1e-5),
            lambda x, w, b: group_norm_silu(x, 3, w, b, 1e-5),
            (_leaf(x_gn), _leaf(rand(6)), _leaf(rand(6))),
        ),
        "flash_attention": (npu_kernels.flash_attention, attention, (_leaf(q), _leaf(k), _leaf(v))),
        "cross_attention": (
            lambda q, k, v: npu_kernels.cross_attention(q, k, v, mask, 0.3),
            lambda q, k, v: attention(q, k, v, mask, 0.3),
            (_leaf(q.detach().clone()), _leaf(k_short), _leaf(v_short)),
        ),
    }


def _custom_ops_in(counter: CompileCounterWithBackend) -> set[str]:
    """Names of our custom ops called in the graphs dynamo handed to the backend."""
    return {
        str(node.target)
        for graph in counter.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and "npu_kernels" in str(node.target)
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", registry.decomposable_ops())
def test_fullgraph_compile_matches_reference_in_each_mode(op, mode):
    fn, reference, inputs = _cases(torch.float32)[op]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    # The PyTorch path forced: auto gives the CPU's attention to SDPA, itself one ATen op in the graph.
    with backends.use_compiled(mode), npu_kernels.use_backend("torch"):
        compiled = torch.compile(fn, fullgraph=True, backend=counter)  # fullgraph: a graph break fails
        check_against_reference(compiled, reference, inputs, torch.float32, f"{op} compiled as {mode}")
    assert counter.frame_count == 1
    seen = _custom_ops_in(counter)
    if mode == "custom_op":
        assert any(name.endswith(f"npu_kernels.{op}.default") for name in seen), seen
    else:
        assert not seen, f"{op} decomposed, yet the graph calls {seen}"


@pytest.mark.parametrize("mode", MODES)
def test_inductor_compiles_every_op_in_each_mode(mode):
    # Inductor itself (C++ codegen on the CPU), not only the graph capture: one function using all
    # four ops, each output and every input gradient judged per element against float64 maths. In
    # float32: at bf16's tolerance a wrong element of 1% would pass.
    cases = _cases(torch.float32)
    starts = (0, 1, 4, 7)

    def fn(*flat):
        return tuple(op_fn(*flat[start:start + len(inputs)]) for (op_fn, _, inputs), start in zip(cases.values(), starts))

    def reference_fn(*flat):
        return tuple(ref(*flat[start:start + len(inputs)]) for (_, ref, inputs), start in zip(cases.values(), starts))

    flat = tuple(t for _, _, inputs in cases.values() for t in inputs)
    g = torch.Generator().manual_seed(11)
    torch._dynamo.reset()
    with backends.use_compiled(mode):
        compiled = torch.compile(fn, fullgraph=True)
        outs = compiled(*flat)
        cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        grads = torch.autograd.grad(outs, flat, [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    ref_leaves = [t.detach().double().requires_grad_() for t in flat]
    ref_outs = reference_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, cotangents)
    for op, out, ref_out in zip(cases, outs, ref_outs):
        assert_close(out, ref_out, torch.float32, f"{op} compiled by inductor as {mode}")
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert_close(got, want, torch.float32, f"input {i} gradient, compiled by inductor as {mode}")


def test_eager_calls_ignore_the_compiled_choice():
    x = torch.randn(2, 3, 8, requires_grad=True)
    with backends.use_compiled("decompose"), torch.profiler.profile() as prof:
        npu_kernels.geglu(x).sum().backward()
    # The eager path runs the backend's kernel through the autograd.Function: its backward is ours.
    assert any(e.name == "aten::gelu_backward" for e in prof.events())
    assert not any(e.name.startswith("npu_kernels::") for e in prof.events())


def test_routes_per_device_and_op():
    assert backends.forced_compiled() == "auto" and backends.forced_backend() == "auto"
    choice = backends.compiled_choice
    for op in registry.decomposable_ops():
        assert choice(op, "cpu") == "decompose"
        assert choice(op, "npu", "npu") == "custom_op"  # torch_npu's fused ops
        assert choice(op, "npu", "torch") == "decompose"  # no torch_npu: a custom op would only hide the maths
    assert choice("geglu", "cuda", "triton") == "custom_op"  # our GEGLU beat inductor's
    assert choice("group_norm_silu", "cuda", "triton") == "decompose"  # inductor's beat our kernel
    assert choice("flash_attention", "cuda", "sdpa") == "decompose"  # SDPA under compile
    assert choice("cross_attention", "cuda", "sdpa") == "decompose"
    assert choice("lora_linear", "cpu") == "custom_op"  # no plain maths registered for it


def test_forcing_a_choice_or_a_backend():
    with backends.use_compiled("custom_op"):
        assert backends.compiled_choice("group_norm_silu", "cpu", "torch") == "custom_op"
    with backends.use_compiled("decompose"):
        assert backends.compiled_choice("geglu", "cuda", "triton") == "decompose"
    assert backends.forced_compiled() == "auto"
    with npu_kernels.use_backend("torch"):  # a forced backend's kernel is what the user asked for
        assert backends.compiled_choice("geglu", "cpu", "torch") == "custom_op"
    with pytest.raises(ValueError, match="unknown compiled choice 'inline'"):
        with backends.use_compiled("inline"):
            pass


def test_python_m_npu_kernels_shows_the_compiled_choice(capsys):
    print_report()
    lines = capsys.readouterr().out.splitlines()
    cuda = lines[lines.index("cuda float32 (no such device here: what auto would pick on one):") + 1:][:4]
    assert "compiled: custom_op" in next(line for line in cuda if line.strip().startswith("geglu"))
    assert "compiled: decompose" in next(line for line in cuda if line.strip().startswith("group_norm_silu"))
    cpu = lines[lines.index("cpu float32:") + 1:][:4]
    assert all("compiled: decompose" in line for line in cpu), cpu
    with backends.use_compiled("custom_op"):
        print_report()
    out = capsys.readouterr().out
    assert "under torch.compile: custom_op" in out and "compiled: decompose" not in out
