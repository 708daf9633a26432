"""Float64 reference maths for the ops and a tolerance check against it, shared by the op tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Max error allowed, relative to the largest magnitude of the reference tensor.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def geglu(x, approximate="none"):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def attention(q, k, v, attn_mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


def run_with_grads(fn, inputs, grad_out_seed=1234):
    """Run ``fn`` and backpropagate a fixed random cotangent; return (output, grads of float inputs)."""
    out = fn(*inputs)
    generator = torch.Generator().manual_seed(grad_out_seed)
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, differentiable, cotangent)
    return out, grads


def as_float64_leaves(tensors):
    """Detached float64 copies that require grad (bool masks and None pass through)."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(t.detach().double().requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def check_against_reference(op, reference, inputs, dtype, what=""):
    """Forward and backward of ``op`` on ``inputs`` vs ``reference`` in float64 on the same values."""
    out, grads = run_with_grads(op, inputs)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype} != {dtype}"
    ref_out, ref_grads = run_with_grads(reference, as_float64_leaves(inputs))
    assert_close(out, ref_out, dtype, f"{what} forward")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, dtype, f"{what} grad {i}")
