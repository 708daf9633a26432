"""Each op on each usable backend vs the stock PyTorch/diffusers maths: forward and forward+backward.

``extra_info`` carries the bytes saved for backward (activation memory) and, on GPU, the achieved
bandwidth (memory-bound ops) or TFLOP/s (attention).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import npu_kernels
from benchmarks.memory import saved_bytes
from npu_kernels import backends
from tests import reference

SHAPES = {
    "full": {
        "geglu": [(1, 4096, 2 * 2560), (1, 1024, 2 * 5120)],
        "group_norm_silu": [(1, 320, 128, 128), (1, 640, 64, 64), (1, 1280, 32, 32)],
        "flash_attention": [(1, 10, 4096, 4096, 64), (1, 20, 1024, 1024, 64)],
        "cross_attention": [(1, 10, 4096, 77, 64), (1, 20, 1024, 77, 64)],
    },
    "smoke": {
        "geglu": [(1, 64, 2 * 40)],
        "group_norm_silu": [(1, 64, 8, 8)],
        "flash_attention": [(1, 2, 64, 64, 16)],
        "cross_attention": [(1, 2, 64, 77, 16)],
    },
}


def _inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_()  # noqa: E731
    if op == "geglu":
        return [make(*shape)]
    if op == "group_norm_silu":
        return [make(*shape), make(shape[1]), make(shape[1])]
    b, h, sq, skv, d = shape
    return [make(b, h, sq, d), make(b, h, skv, d), make(b, h, skv, d)]


def _stock(op: str):
    """What stock diffusers runs for the same maths."""
    if op == "geglu":
        def geglu(x):
            hidden, gate = x.chunk(2, dim=-1)
            return hidden * F.gelu(gate)
        return geglu
    if op == "group_norm_silu":
        return lambda x, w, b: F.silu(F.group_norm(x, 32, w, b))
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)


def _ours(op: str, backend: str):
    fn = {
        "geglu": npu_kernels.geglu,
        "group_norm_silu": lambda x, w, b: npu_kernels.group_norm_silu(x, 32, w, b),
        "flash_attention": npu_kernels.flash_attention,
        "cross_attention": npu_kernels.cross_attention,
    }[op]

    def run(*args):
        with npu_kernels.use_backend(backend):
            return fn(*args)
    return run


def _assert_agrees_with_stock(op: str, fn, inputs: list[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype) -> None:
    """Ours and stock on the same inputs: output and every input gradient, per element, each judged at
    the dtype's tolerance against the float64 maths (so that neither hides behind the other's rounding)."""
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = _stock(op)(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    for name, call in (("stock", _stock(op)), ("ours", fn)):
        out = call(*inputs)
        grads = torch.autograd.grad(out, inputs, grad)
        reference.assert_close(out, expected, dtype, f"{op} {name} output")
        for i, (got, want) in enumerate(zip(grads, expected_grads)):
            reference.assert_close(got, want, dtype, f"{op} {name} grad {i}")


def _implementations(device: torch.device) -> list[str]:
    """stock, plus every backend that is fast-meaningful here (Triton's interpreter is not)."""
    names = ["stock", "torch"]
    if device.type == "cuda" and backends.load("triton") is not None:
        names.append("triton")
    if device.type == "npu" and backends.load("npu") is not None:
        names.append("npu")
    return names


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _work(op: str, shape: tuple, dtype: torch.dtype, mode: str) -> dict:
    """Bytes moved (memory-bound ops, minimum traffic) or FLOPs (attention) of one call."""
    size = torch.tensor([], dtype=dtype).element_size()
    numel = 1
    for s in shape[:4] if op in ("geglu", "group_norm_silu") else ():
        numel *= s
    if op == "geglu":  # read 2H, write H; backward reads 2H + H, writes 2H
        return {"bytes": numel * size * (1.5 if mode == "forward" else 4.0)}
    if op == "group_norm_silu":  # read + write; backward reads x and dy, writes dx
        return {"bytes": numel * size * (2 if mode == "forward" else 5)}
    b, h, sq, skv, d = shape
    flops = 4 * b * h * sq * skv * d
    return {"flops": flops * (1 if mode == "forward" else 3.5)}  # FA2 convention: bwd = 2.5x fwd


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Only the cases this size and device can run: each op's shapes x stock and usable backends."""
    if "op" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [
        pytest.param(op, shape, impl, id=f"{op}-{'x'.join(map(str, shape))}-{impl}")
        for op, shapes in SHAPES[size].items()
        for shape in shapes
        for impl in _implementations(device)
    ]
    metafunc.parametrize("op,shape,impl", cases)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op(benchmark, bench_size, device, op, shape, impl, dtype, mode):
    inputs = _inputs(op, shape, dtype, device)
    fn = _stock(op) if impl == "stock" else _ours(op, impl)
    grad = torch.randn_like(fn(*inputs))
    if impl != "stock":
        _assert_agrees_with_stock(op, fn, inputs, grad, dtype)

    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(*inputs)
            _sync(device)
    else:
        def step():
            torch.autograd.backward(fn(*inputs), grad)
            for t in inputs:
                t.grad = None
            _sync(device)

    benchmark.group = f"{op} {shape} {str(dtype).replace('torch.', '')} {mode}"
    benchmark.extra_info.update(op=op, shape=list(shape), impl=impl, dtype=str(dtype), mode=mode, device=device.type)
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: fn(*inputs), exclude=inputs)
    benchmark.pedantic(step, rounds=5 if bench_size == "full" else 2, warmup_rounds=1)
    if benchmark.stats is not None and device.type == "cuda":
        seconds = benchmark.stats.stats.median
        work = _work(op, shape, dtype, mode)
        if "bytes" in work:
            benchmark.extra_info["GB_per_s"] = work["bytes"] / seconds / 1e9
        else:
            benchmark.extra_info["TFLOP_per_s"] = work["flops"] / seconds / 1e12
