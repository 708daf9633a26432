"""Inputs and checks shared by the two attention ops' tests (flash_attention, cross_attention)."""
from __future__ import annotations

import math

import pytest
import torch

import npu_kernels
from npu_kernels import backends
from tests import reference
from tests.ops._backends import leaf


def qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, device="cpu", head_dim_v=None, transposed=True):
    """q/k/v leaves; ``transposed``: as diffusers makes them, ``[B, S, H, D]`` projections viewed
    as ``[B, H, S, D]`` (not contiguous)."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    out = []
    for seq, dim in ((seq_q, head_dim), (seq_kv, head_dim), (seq_kv, head_dim_v)):
        shape = (batch, seq, heads, dim) if transposed else (batch, heads, seq, dim)
        t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
        out.append(leaf(t.transpose(1, 2) if transposed else t))
    return out


def mask(kind, batch, heads, seq_q, seq_kv, dtype, device="cpu"):
    """The masks a caller hands the public ops (never a fully masked row)."""
    if kind == "none":
        return None
    if kind == "random":  # additive, full [B, H, Sq, Skv]
        return torch.randn(batch, heads, seq_q, seq_kv, dtype=torch.float64).to(device, dtype)
    if kind == "additive_bcast":  # additive [B, 1, 1, Skv], broadcast over heads and queries
        return torch.randn(batch, 1, 1, seq_kv, dtype=torch.float64).to(device, dtype)
    if kind == "padding":  # additive -inf key padding [B, 1, 1, Skv]: the last keys of each batch
        keep = torch.ones(batch, 1, 1, seq_kv, dtype=torch.bool)
        for b in range(batch):
            keep[b, ..., max(1, seq_kv - 3 - 5 * b):] = False
        return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")).to(device)
    if kind == "bool_rows":  # boolean [1, 1, Sq, Skv], True = attend, one key kept per row
        keep = torch.rand(1, 1, seq_q, seq_kv) > 0.5
        keep[0, 0, torch.arange(seq_q), torch.arange(seq_q) % seq_kv] = True
        return keep.to(device)
    if kind == "bool_2d":  # boolean [Sq, Skv]
        keep = torch.rand(seq_q, seq_kv) > 0.3
        keep[:, 0] = True
        return keep.to(device)
    raise ValueError(kind)


MASK_KINDS = ("none", "random", "additive_bcast", "padding", "bool_rows", "bool_2d")


def check_public_op(op, q, k, v, attn_mask, dtype, what, scale=None):
    """``npu_kernels.<op>`` (inside the test's ``use_backend``) against float64 reference maths."""
    fn = getattr(npu_kernels, op)
    reference.check_against_reference(
        lambda q, k, v: fn(q, k, v, attn_mask=attn_mask, scale=scale),
        lambda q, k, v: reference.attention(q, k, v, attn_mask if attn_mask is None or attn_mask.dtype == torch.bool
                                            else attn_mask.double(), scale=scale),
        [q, k, v], dtype, what,
    )


def check_kernel_contract(backend, op, q, k, v, attn_mask, scale=None):
    """``<op>_forward`` gives float32 ``lse`` [B, H, Sq]; ``<op>_backward`` the three gradients in
    the inputs' dtypes: each against float64 maths. ``attn_mask``: ``None`` or additive 4-D."""
    module = backends.kernel_module(backend)
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = getattr(module, f"{op}_forward")(q, k, v, attn_mask, scale)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.device, dtype)

    q64, k64, v64 = reference.as_float64_leaves([leaf(t) for t in (q, k, v)])
    scores = q64 @ k64.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores + attn_mask.cpu().double()
    ref_out = torch.softmax(scores, -1) @ v64
    ref_grads = torch.autograd.grad(ref_out, [q64, k64, v64], grad_out.cpu().double())

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    reference.assert_close(out, ref_out, dtype, "out")
    # lse is float32 but computed from the dtype's q.k products: the dtype's tolerance.
    reference.assert_close(lse, torch.logsumexp(scores.detach(), -1), dtype, "lse")
    grads = getattr(module, f"{op}_backward")(grad_out, q, k, v, out, lse, attn_mask, scale)
    for name, grad, ref, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        reference.assert_close(grad, ref, dtype, name)


def check_single_key(op, dtype, device="cpu"):
    """Skv = 1: every query attends to its one key with weight 1, so out = v, dv = the sum of the
    output gradients over queries, and dq = dk = 0 in exact maths. Those two are differences of equal
    terms (``P·(dP - rowsum(dO·O))·scale`` times k or q), so they are judged against the size of
    those terms, not against their own (zero) RMS."""
    q, k, v = qkv(2, 3, 5, 1, 16, dtype, device)
    out, (dq, dk, dv) = reference.run_with_grads(getattr(npu_kernels, op), [q, k, v])
    ref_out, (_, _, ref_dv) = reference.run_with_grads(reference.attention, reference.as_float64_leaves([q, k, v]))
    reference.assert_close(out, ref_out, dtype, "out")
    reference.assert_close(dv, ref_dv, dtype, "dv")
    rms = lambda t: t.detach().double().square().mean().sqrt().item()  # noqa: E731
    # The cotangent run_with_grads drew: dP = dO·vᵀ sums D products, the softmax scale divides by sqrt(D).
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    for name, grad, other in (("dq", dq, k), ("dk", dk, q)):
        scale = rms(grad_out) * rms(v) * rms(other)
        reference.assert_close(grad, torch.zeros(grad.shape, dtype=torch.float64), dtype, name, scale=scale)


def check_fp16_large_magnitudes(op):
    """Scores reach ~1e5, beyond fp16's 65504: kernels must hold them in fp32 (a kernel that does not
    returns inf or NaN). Against float64 maths per element: the output and dv at fp16's tolerance.
    dq and dk are ill-conditioned here for any fp16 kernel: a near tie between two scores of ~1e5
    (this seed has one) turns the fp32 rounding of those scores into an error of the order of the
    gradient itself, so they get a bound of 32x their RMS (about twice the worst the PyTorch path
    needed): it still fails on inf, NaN or a gradient of the wrong size."""
    q, k = (leaf((torch.randn(1, 2, s, 64) * 30).half()) for s in (33, 77))
    v = leaf(torch.randn(1, 2, 77, 64).half())
    out, grads = reference.run_with_grads(getattr(npu_kernels, op), [q, k, v])
    ref_out, ref_grads = reference.run_with_grads(reference.attention, reference.as_float64_leaves([q, k, v]))
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        reference.assert_close(ours, ref, torch.float16, name, k=32 if name in ("dq", "dk") else None)


def needs_triton():
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")
