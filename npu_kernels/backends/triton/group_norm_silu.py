"""GroupNorm fused with SiLU in Triton: ``silu(group_norm(x, G, weight, bias, eps))``.

Layout. ``x`` is ``[N, C, *spatial]``; the kernels address element ``(n, c, s)`` (``s`` the
flattened spatial index) through three strides, so the same kernels serve a contiguous tensor
(``stride_c = S, stride_s = 1``) and a channels_last one (``stride_c = 1, stride_s = C``) without a
layout copy, and the output is written in ``x``'s memory format. Anything else is made contiguous.

Parallelism. A group holds ``C/G * S`` elements (163,840 for SDXL's 320x128x128 with 32 groups), so
one program per group would leave a GPU mostly idle at batch 1. Every kernel therefore runs on a
``(N*G, chunks)`` grid whose programs each own one ``[BLOCK_C channels, BLOCK_S positions]`` tile of a
group:

forward
    1. ``_stats_kernel``: per tile, its element count, mean and sum of squared deviations (M2), an
       exact two-pass over registers (the tile is loaded once);
    2. ``_combine_kernel``: per group, Chan et al.'s parallel merge of the tile statistics into the
       group's mean and ``rstd = 1/sqrt(var + eps)`` (numerically safe, unlike ``E[x²] - E[x]²``);
    3. ``_norm_silu_kernel``: normalise, scale/shift, SiLU, store.
backward
    1. ``_bwd_reduce_kernel``: per tile, the two group sums the input gradient needs
       (``Σ dŷ·w`` and ``Σ dŷ·w·x̂``) and, per channel, the weight/bias gradient partial sums;
    2. tiny fp32 reductions of those partials (``torch.sum`` over a few hundred numbers);
    3. ``_bwd_dx_kernel``: the input gradient.

All statistics and sums are fp32 whatever the storage dtype.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Elements per program tile (BLOCK_C * BLOCK_S); BLOCK_C is capped so that a tile always spans
# several spatial positions (the coalesced axis of a contiguous tensor).
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 128
# Partial statistics merged per loop step in the combine kernel.
MAX_BLOCK_CHUNKS = 1024
NUM_WARPS = 8


# --------------------------------------------------------------------------------- shared pieces
@triton.jit
def _tile(pid_ng, chunk, num_groups, cpg, S, num_s_blocks, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Decode a program's tile: batch n, channels (absolute) and spatial positions, plus the mask."""
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    c_block = chunk // num_s_blocks
    s_block = chunk % num_s_blocks
    c_in_group = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = c_in_group < cpg
    mask = c_mask[:, None] & (s < S)[None, :]
    channels = g * cpg + c_in_group
    return n.to(tl.int64), channels, s, c_mask, mask, s_block


@triton.jit
def _offsets(n, channels, s, stride_n, stride_c, stride_s):
    # int64: N*C*S of a large batch can overflow 32-bit offsets.
    return n * stride_n + channels.to(tl.int64)[:, None] * stride_c + s.to(tl.int64)[None, :] * stride_s


@triton.jit
def _affine(x_hat, channels, c_mask, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = x̂·w + b`` (fp32) and the per-channel weight (1 when there is none)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros_like(channels).to(tl.float32) + 1.0
    y = x_hat * w[:, None]
    if HAS_BIAS:
        b = tl.load(b_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
        y = y + b[:, None]
    return y, w


# --------------------------------------------------------------------------------------- forward
@triton.jit
def _stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    num_groups, cpg, S, num_s_blocks, num_chunks,
    stride_n, stride_c, stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, s, c_mask, mask, _ = _tile(pid_ng, chunk, num_groups, cpg, S, num_s_blocks, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + _offsets(n, channels, s, stride_n, stride_c, stride_s), mask=mask, other=0.0).to(tl.float32)

    count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / tl.maximum(count, 1.0)
    diff = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(diff * diff, axis=1), axis=0)

    idx = pid_ng * num_chunks + chunk
    tl.store(count_ptr + idx, count)
    tl.store(mean_ptr + idx, mean)
    tl.store(m2_ptr + idx, m2)


@triton.jit
def _combine_kernel(
    count_ptr, mean_ptr, m2_ptr, group_mean_ptr, group_rstd_ptr,
    num_chunks, eps,
    BLOCK_CHUNKS: tl.constexpr,
):
    """Chan's parallel merge: mean = Σ nᵢ·meanᵢ / n,  M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ - mean)²."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * num_chunks

    total = tl.zeros([BLOCK_CHUNKS], tl.float32)
    weighted = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for start in range(0, num_chunks, BLOCK_CHUNKS):
        idx = start + tl.arange(0, BLOCK_CHUNKS)
        valid = idx < num_chunks
        cnt = tl.load(count_ptr + base + idx, mask=valid, other=0.0)
        total += cnt
        weighted += cnt * tl.load(mean_ptr + base + idx, mask=valid, other=0.0)
    n_total = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / n_total

    m2 = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for start in range(0, num_chunks, BLOCK_CHUNKS):
        idx = start + tl.arange(0, BLOCK_CHUNKS)
        valid = idx < num_chunks
        cnt = tl.load(count_ptr + base + idx, mask=valid, other=0.0)
        delta = tl.load(mean_ptr + base + idx, mask=valid, other=0.0) - mean
        m2 += tl.load(m2_ptr + base + idx, mask=valid, other=0.0) + cnt * delta * delta
    var = tl.sum(m2, axis=0) / n_total
    tl.store(group_mean_ptr + pid, mean)
    tl.store(group_rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _norm_silu_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr,
    num_groups, cpg, S, num_s_blocks,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, s, c_mask, mask, _ = _tile(pid_ng, chunk, num_groups, cpg, S, num_s_blocks, BLOCK_C, BLOCK_S)
    offs = _offsets(n, channels, s, stride_n, stride_c, stride_s)  # out shares x's strides
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)

    # Padding lanes (loaded as 0) would normalise to huge values: zero them (no exp overflow there).
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    y, _ = _affine(x_hat, channels, c_mask, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    out = y * tl.sigmoid(y)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- backward
@triton.jit
def _recompute(
    x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pid_ng, n, channels, s, c_mask, mask,
    stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """x̂, dL/dy (through SiLU) and the per-channel weight of one tile, all fp32."""
    x = tl.load(x_ptr + _offsets(n, channels, s, stride_n, stride_c, stride_s), mask=mask, other=0.0).to(tl.float32)
    go_offs = _offsets(n, channels, s, stride_go_n, stride_go_c, stride_go_s)
    grad_out = tl.load(go_ptr + go_offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + pid_ng).to(tl.float32)
    rstd = tl.load(rstd_ptr + pid_ng).to(tl.float32)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)  # padding lanes: 0, not a huge value
    y, w = _affine(x_hat, channels, c_mask, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    sig = tl.sigmoid(y)
    grad_y = grad_out * sig * (1.0 + y * (1.0 - sig))  # silu'(y) = σ(y)·(1 + y·(1 - σ(y)))
    grad_y = tl.where(mask, grad_y, 0.0)
    return x_hat, grad_y, w, rstd


@triton.jit
def _bwd_reduce_kernel(
    x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    sum_dxhat_ptr, sum_dxhat_xhat_ptr, dw_partial_ptr, db_partial_ptr,
    C, num_groups, cpg, S, num_s_blocks, num_chunks,
    stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, s, c_mask, mask, s_block = _tile(pid_ng, chunk, num_groups, cpg, S, num_s_blocks, BLOCK_C, BLOCK_S)
    x_hat, grad_y, w, _ = _recompute(
        x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pid_ng, n, channels, s, c_mask, mask,
        stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s, HAS_WEIGHT, HAS_BIAS,
    )
    grad_x_hat = grad_y * w[:, None]

    idx = pid_ng * num_chunks + chunk
    tl.store(sum_dxhat_ptr + idx, tl.sum(tl.sum(grad_x_hat, axis=1), axis=0))
    tl.store(sum_dxhat_xhat_ptr + idx, tl.sum(tl.sum(grad_x_hat * x_hat, axis=1), axis=0))

    # Per-channel partials of the parameter gradients, laid out [N, C, num_s_blocks].
    param_idx = (n * C + channels) * num_s_blocks + s_block
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + param_idx, tl.sum(grad_y * x_hat, axis=1), mask=c_mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + param_idx, tl.sum(grad_y, axis=1), mask=c_mask)


@triton.jit
def _bwd_dx_kernel(
    x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sum_dxhat_ptr, sum_dxhat_xhat_ptr, gx_ptr,
    num_groups, cpg, S, num_s_blocks, inv_group_size,
    stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, s, c_mask, mask, _ = _tile(pid_ng, chunk, num_groups, cpg, S, num_s_blocks, BLOCK_C, BLOCK_S)
    x_hat, grad_y, w, rstd = _recompute(
        x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pid_ng, n, channels, s, c_mask, mask,
        stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s, HAS_WEIGHT, HAS_BIAS,
    )
    mean_dxhat = tl.load(sum_dxhat_ptr + pid_ng) * inv_group_size
    mean_dxhat_xhat = tl.load(sum_dxhat_xhat_ptr + pid_ng) * inv_group_size
    # dx = rstd · (dx̂ - mean(dx̂) - x̂·mean(dx̂·x̂)), means over the group.
    grad_x = (grad_y * w[:, None] - mean_dxhat - x_hat * mean_dxhat_xhat) * rstd
    offs = _offsets(n, channels, s, stride_n, stride_c, stride_s)  # grad_x shares x's strides
    tl.store(gx_ptr + offs, grad_x.to(gx_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- wrappers
def _layout(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``(t, stride_n, stride_c, stride_s)`` addressing ``t`` as ``[N, C, S]``, copying only when needed.

    Contiguous (NCHW-like) and channels-last-like (channels innermost, any number of spatial dims)
    tensors are served in place.
    """
    n, c = t.shape[0], t.shape[1]
    s = math.prod(t.shape[2:])
    if t.is_contiguous():
        return t, c * s, s, 1
    if t.dim() > 2 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return t, s * c, 1, c
    return _layout(t.contiguous())


def _blocks(cpg: int, spatial: int) -> tuple[int, int, int, int]:
    """BLOCK_C, BLOCK_S, and how many channel/spatial blocks cover one group."""
    block_c = min(triton.next_power_of_2(cpg), MAX_BLOCK_C)
    block_s = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(spatial)))
    return block_c, block_s, triton.cdiv(cpg, block_c), triton.cdiv(spatial, block_s)


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(silu(group_norm(x)), mean, rstd)``; output in ``x``'s memory format, stats fp32 ``[N, G]``."""
    batch, channels = x.shape[0], x.shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels are not divisible by {num_groups} groups")
    x, stride_n, stride_c, stride_s = _layout(x)
    spatial = math.prod(x.shape[2:])
    cpg = channels // num_groups
    out = torch.empty_like(x)  # preserve_format keeps contiguous / channels_last strides
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan"))

    block_c, block_s, num_c_blocks, num_s_blocks = _blocks(cpg, spatial)
    num_chunks = num_c_blocks * num_s_blocks
    grid = (batch * num_groups, num_chunks)
    partial = torch.empty((3, batch * num_groups, num_chunks), dtype=torch.float32, device=x.device)
    _stats_kernel[grid](
        x, partial[0], partial[1], partial[2],
        num_groups, cpg, spatial, num_s_blocks, num_chunks, stride_n, stride_c, stride_s,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS,
    )
    _combine_kernel[(batch * num_groups,)](
        partial[0], partial[1], partial[2], mean, rstd, num_chunks, float(eps),
        BLOCK_CHUNKS=min(triton.next_power_of_2(num_chunks), MAX_BLOCK_CHUNKS), num_warps=4,
    )
    _norm_silu_kernel[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, mean, rstd, out,
        num_groups, cpg, spatial, num_s_blocks, stride_n, stride_c, stride_s,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=NUM_WARPS,
    )
    return out, mean, rstd


def group_norm_silu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)`` from the saved statistics (x̂, y and SiLU recomputed)."""
    batch, channels = x.shape[0], x.shape[1]
    x, stride_n, stride_c, stride_s = _layout(x)
    grad_out, stride_go_n, stride_go_c, stride_go_s = _layout(grad_out.expand_as(x))
    spatial = math.prod(x.shape[2:])
    cpg = channels // num_groups
    grad_x = torch.empty_like(x)
    mean = mean.reshape(batch * num_groups).float().contiguous()
    rstd = rstd.reshape(batch * num_groups).float().contiguous()
    if x.numel() == 0:
        zeros = lambda p: torch.zeros_like(p) if p is not None else None  # noqa: E731
        return grad_x, zeros(weight), zeros(bias)

    block_c, block_s, num_c_blocks, num_s_blocks = _blocks(cpg, spatial)
    num_chunks = num_c_blocks * num_s_blocks
    grid = (batch * num_groups, num_chunks)
    group_partial = torch.empty((2, batch * num_groups, num_chunks), dtype=torch.float32, device=x.device)
    param_partial = torch.empty(
        (int(weight is not None) + int(bias is not None), batch, channels, num_s_blocks),
        dtype=torch.float32, device=x.device,
    )
    dw_partial = param_partial[0] if weight is not None else group_partial
    db_partial = param_partial[-1] if bias is not None else group_partial
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_S=block_s,
                  num_warps=NUM_WARPS)
    _bwd_reduce_kernel[grid](
        x, grad_out, w_arg, b_arg, mean, rstd, group_partial[0], group_partial[1], dw_partial, db_partial,
        channels, num_groups, cpg, spatial, num_s_blocks, num_chunks,
        stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s, **common,
    )
    # The tiny combines: per-group sums over chunks, per-channel sums over batch and chunks (fp32).
    group_sums = group_partial.sum(-1)
    _bwd_dx_kernel[grid](
        x, grad_out, w_arg, b_arg, mean, rstd, group_sums[0], group_sums[1], grad_x,
        num_groups, cpg, spatial, num_s_blocks, 1.0 / (cpg * spatial),
        stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s, **common,
    )
    grad_weight = dw_partial.sum((0, 2)).to(weight.dtype) if weight is not None else None
    grad_bias = db_partial.sum((0, 2)).to(bias.dtype) if bias is not None else None
    return grad_x, grad_weight, grad_bias


def not_supported_reasons(x: Tensor | None = None, *_params: Tensor | None) -> list[str]:
    """Op-specific reasons (dtype and device checks live in the package ``__init__``)."""
    if x is not None and x.dim() < 2:
        return [f"group_norm_silu needs x of shape [N, C, *spatial], got {tuple(x.shape)}"]
    return []
