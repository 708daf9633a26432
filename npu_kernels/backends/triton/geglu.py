"""GEGLU in Triton: ``out = a * gelu(g)`` where ``a, g = x.chunk(2, -1)``.

The kernels read the two halves of ``x`` in place (``a`` at column ``j``, ``g`` at column ``H + j``
of the same row), so no ``chunk`` copy is ever made. Maths is fp32 whatever the storage dtype.

Layout: the leading dimensions are viewed as rows with one row stride. That is a free view for a
contiguous tensor and for most slices (a row stride larger than ``2H``); only a last dimension that is
not stride-1, or leading dimensions that cannot be collapsed into one stride, cost a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_kernels.backends.triton import _device

Tensor = torch.Tensor

# Columns per program (a power of two); the row count per program fills ELEMENTS_PER_PROGRAM.
MAX_BLOCK_N = 1024
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 8

# approximate="none" / "tanh" as a compile-time switch.
_APPROX = {"none": 0, "tanh": 1}

# Kernel constants (globals read inside @triton.jit functions must be tl.constexpr).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_TANH_COEF = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # tanh through the exponential: portable (no libdevice) and exact enough for GELU's "tanh" form,
    # whose result is 0.5 * g * (1 + tanh(.)) (an absolute error of ~1e-7 in tanh is harmless).
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _gelu_and_grad(g, APPROX: tl.constexpr, NEED_GRAD: tl.constexpr):
    """``gelu(g)`` and, when NEED_GRAD, ``gelu'(g)`` (fp32 in, fp32 out)."""
    if APPROX == 0:
        # erf form: gelu = g * Phi(g); gelu' = Phi(g) + g * phi(g).
        cdf = 0.5 * (1.0 + tl.math.erf(g * _SQRT1_2))
        gelu = g * cdf
        if NEED_GRAD:
            dgelu = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
        else:
            dgelu = gelu
    else:
        # tanh form: gelu = 0.5 g (1 + tanh(k (g + c g^3))).
        inner = _SQRT_2_OVER_PI * (g + _TANH_COEF * g * g * g)
        t = _tanh(inner)
        gelu = 0.5 * g * (1.0 + t)
        if NEED_GRAD:
            dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEF * g * g)
            dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dinner
        else:
            dgelu = gelu
    return gelu, dgelu


@triton.jit
def _geglu_fwd_kernel(
    x_ptr, out_ptr,
    n_rows, half,  # rows, H
    stride_x_row, stride_out_row,
    APPROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    rows64 = rows.to(tl.int64)  # row * stride can exceed 2**31 for big activations

    x_row = x_ptr + rows64[:, None] * stride_x_row
    a = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(g, APPROX, False)
    out = a * gelu
    tl.store(out_ptr + rows64[:, None] * stride_out_row + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    grad_out_ptr, x_ptr, grad_x_ptr,
    n_rows, half,
    stride_go_row, stride_x_row, stride_gx_row,
    APPROX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    rows64 = rows.to(tl.int64)

    x_row = x_ptr + rows64[:, None] * stride_x_row
    a = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(grad_out_ptr + rows64[:, None] * stride_go_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Recompute gelu(g) rather than saving it: the op is memory bound, the maths is free.
    gelu, dgelu = _gelu_and_grad(g, APPROX, True)

    # Both halves of the gradient land in one [.., 2H] tensor, like the input.
    gx_row = grad_x_ptr + rows64[:, None] * stride_gx_row
    dtype = grad_x_ptr.dtype.element_ty
    tl.store(gx_row + cols[None, :], (dout * gelu).to(dtype), mask=mask)
    tl.store(gx_row + half + cols[None, :], (dout * a * dgelu).to(dtype), mask=mask)


def _as_rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D ``[rows, cols]`` tensor with unit column stride, copying only when unavoidable."""
    if t.dim() == 0:
        raise ValueError("geglu: expected at least a 1-D tensor")
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])  # free for contiguous tensors and slices along the last dim
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])  # leading dims not collapsible into one stride: copy


def _blocks(n_rows: int, half: int) -> tuple[int, int]:
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(max(half, 1)))
    block_m = max(1, min(ELEMENTS_PER_PROGRAM // block_n, triton.next_power_of_2(max(n_rows, 1))))
    return block_m, block_n


def _approx(approximate: str) -> int:
    if approximate not in _APPROX:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _APPROX[approximate]


def geglu_forward(x: Tensor, approximate: str) -> Tensor:
    """``x[..., :H] * gelu(x[..., H:])`` for ``x[..., 2H]``; returns a contiguous ``[..., H]`` tensor."""
    approx = _approx(approximate)
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: last dimension {x.shape[-1]} is odd")
    half = x.shape[-1] // 2
    x2 = _as_rows(x)
    n_rows = x2.shape[0]
    out = torch.empty((n_rows, half), dtype=x.dtype, device=x.device)
    if out.numel():
        block_m, block_n = _blocks(n_rows, half)
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(half, block_n))
        with _device.device_guard(x2):
            _geglu_fwd_kernel[grid](
                x2, out, n_rows, half, x2.stride(0), out.stride(0),
                APPROX=approx, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
            )
    return out.view(*x.shape[:-1], half)


def geglu_backward(grad_out: Tensor, x: Tensor, approximate: str) -> Tensor:
    """Gradient wrt ``x`` (contiguous, shape of ``x``), gelu recomputed from ``x``."""
    approx = _approx(approximate)
    half = x.shape[-1] // 2
    x2 = _as_rows(x)
    go2 = _as_rows(grad_out.expand(*x.shape[:-1], half))
    n_rows = x2.shape[0]
    grad_x = torch.empty((n_rows, 2 * half), dtype=x.dtype, device=x.device)
    if grad_x.numel():
        block_m, block_n = _blocks(n_rows, half)
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(half, block_n))
        with _device.device_guard(x2):
            _geglu_bwd_kernel[grid](
                go2, x2, grad_x, n_rows, half, go2.stride(0), x2.stride(0), grad_x.stride(0),
                APPROX=approx, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
            )
    return grad_x.view(x.shape)


def not_supported_reasons(x: Tensor | None = None, *_ignored: Tensor | None) -> list[str]:
    """Op-specific reasons (dtype and device checks live in the package ``__init__``)."""
    if x is not None and (x.dim() == 0 or x.shape[-1] % 2):
        return [f"geglu needs an even last dimension, got shape {tuple(x.shape)}"]
    return []
