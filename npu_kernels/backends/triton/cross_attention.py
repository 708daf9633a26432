"""Cross-attention in Triton for short key/value sequences (``Skv <= 256``, SDXL's 77 text tokens).

All of K/V fits one ``BLOCK_N = next_pow2(Skv)`` tile, so:

* the forward is a plain (not online) softmax per query block: one QKᵀ, one row max, one PV, no
  rescaling loop;
* the backward is ONE fused kernel. A program owns a chunk of query blocks and all keys; for each
  query block it computes ``delta = rowsum(dO ∘ O)`` inline, ``P`` from the saved logsumexp, the
  complete ``dQ`` (every key is in registers), and accumulates ``dK``/``dV`` partial sums over its
  chunk. The few per-chunk fp32 partials are summed afterwards (deterministic, no atomics). With
  Sq = 4096 and only 77 keys, splitting the *query* axis is what fills the GPU: the flash kernels'
  dK/dV grid would have ``cdiv(77, 64) * B * H`` programs.

When the key tile is too large (the fused backward's fp32 dK/dV accumulators must stay in
registers: ``BLOCK_N * BLOCK_D > CROSS_BWD_MAX_TILE``, e.g. Skv 256 with head dim 64; the forward's
K/V tile must fit shared memory: fp32 Skv 256 with head dim 128) the flash-attention kernels run
instead: same maths and result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_kernels.backends.triton import _device
from npu_kernels.backends.triton.flash_attention import (
    _LN2,
    LOG2E,
    _head_offset,
    _load_lse_log2,
    _load_mask_tile,
    dot_precision,
    flash_attention_backward,
    flash_attention_forward,
    head_block,
    mask_strides,
    out_like_sdpa,
)

Tensor = torch.Tensor

MAX_KV = 256
# Forward: query rows per program; fewer when the K/V tile is large (shared memory / registers).
FWD_BLOCK_M = 128
FWD_BLOCK_M_LARGE_TILE = 64
FWD_LARGE_TILE = 128 * 64  # BLOCK_N * BLOCK_D above which the smaller BLOCK_M is used
FWD_NUM_WARPS = 8
# K + V tile bytes above which the forward runs the flash kernel instead (the whole K/V tile sits in
# shared memory: fp32 with Skv 256 and head dim 128 would need ~192 KiB, more than an A100 has).
FWD_MAX_KV_TILE_BYTES = 128 * 1024
# Fused backward: query rows per step, and the largest key tile (BLOCK_N * max(BLOCK_D, BLOCK_DV))
# whose fp32 dK/dV accumulators stay in registers.
BWD_BLOCK_M = 64
CROSS_BWD_MAX_TILE = 128 * 64
BWD_NUM_WARPS = 8
# Aim for this many programs in the fused backward (a couple of waves on a 100+ SM GPU): the
# query axis is cut into ``~TARGET / (B·H)`` chunks.
CROSS_BWD_TARGET_PROGRAMS = 256


@triton.jit
def _cross_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_kv, head_dim, head_dim_v, qk_scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)  # batch·heads on axis 0: no 65,535 limit there
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = rows < seq_q
    col_valid = cols < seq_kv
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    q = tl.load(Q + _head_offset(bh, num_heads, stride_qb, stride_qh)
                + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    k_t = tl.load(K + _head_offset(bh, num_heads, stride_kb, stride_kh)
                  + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=col_valid[None, :] & d_valid[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        s += _load_mask_tile(Mask + _head_offset(bh, num_heads, stride_mb, stride_mh),
                             rows, cols, stride_mm, stride_mn, row_valid, col_valid, False)
    s = tl.where(col_valid[None, :], s, float("-inf"))

    # One-shot softmax over the whole key range (log2 domain).
    m = tl.max(s, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row (not allowed): avoid inf - inf
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, axis=1)
    v = tl.load(V + _head_offset(bh, num_heads, stride_vb, stride_vh)
                + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_valid[:, None] & dv_valid[None, :], other=0.0)
    out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION) / tl.where(l == 0.0, 1.0, l)[:, None]
    lse = (m + tl.math.log2(l)) * _LN2

    tl.store(Out + _head_offset(bh, num_heads, stride_ob, stride_oh)
             + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    tl.store(Lse + bh.to(tl.int64) * seq_q + rows, lse, mask=row_valid)


@triton.jit
def _cross_bwd_kernel(
    Q, K, V, Mask, O, DO, Lse, DQ, DK_partial, DV_partial,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, seq_q, seq_kv, head_dim, head_dim_v, qk_scale, scale, blocks_per_program,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of ``blocks_per_program`` query blocks, and their partial dK/dV (fp32, one slot per chunk)."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_valid = cols < seq_kv
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    q_base = Q + _head_offset(bh, num_heads, stride_qb, stride_qh)
    o_base = O + _head_offset(bh, num_heads, stride_ob, stride_oh)
    do_base = DO + _head_offset(bh, num_heads, stride_dob, stride_doh)
    dq_base = DQ + _head_offset(bh, num_heads, stride_dqb, stride_dqh)
    mask_base = Mask + _head_offset(bh, num_heads, stride_mb, stride_mh)
    k = tl.load(K + _head_offset(bh, num_heads, stride_kb, stride_kh)
                + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    v = tl.load(V + _head_offset(bh, num_heads, stride_vb, stride_vh)
                + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_valid[:, None] & dv_valid[None, :], other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first_row = chunk * blocks_per_program * BLOCK_M
    for i in range(0, blocks_per_program):
        rows = first_row + i * BLOCK_M + offs_m
        row_valid = rows < seq_q
        qd_mask = row_valid[:, None] & d_valid[None, :]
        ov_mask = row_valid[:, None] & dv_valid[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask=ov_mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=ov_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # the FA2 preprocess, fused
        lse = _load_lse_log2(Lse, bh, rows, row_valid, seq_q)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            s += _load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, row_valid, col_valid, False)
        s = tl.where(col_valid[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])  # padded rows: lse = +inf -> 0
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])

        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
        tl.store(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    # Partials laid out [chunks, B·H, Skv, D] (contiguous), summed by the wrapper.
    slot = (chunk.to(tl.int64) * tl.num_programs(0) + bh) * seq_kv
    tl.store(DK_partial + (slot + cols[:, None]) * head_dim + offs_d[None, :], dk * scale,
             mask=col_valid[:, None] & d_valid[None, :])
    tl.store(DV_partial + (slot + cols[:, None]) * head_dim_v + offs_dv[None, :], dv,
             mask=col_valid[:, None] & dv_valid[None, :])


def _kv_block(seq_kv: int) -> int:
    return max(16, triton.next_power_of_2(seq_kv))


def cross_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq])`` for ``Skv <= 256``."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv, head_dim_v = k.shape[2], v.shape[3]
    if seq_kv > MAX_KV:
        raise ValueError(f"cross_attention: Skv {seq_kv} > {MAX_KV}; use flash_attention_forward")
    mask, m_strides = mask_strides(attn_mask, (batch, heads, seq_q, seq_kv))
    out = out_like_sdpa(q, head_dim_v)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seq_kv == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_n, block_d, block_dv = _kv_block(seq_kv), head_block(head_dim), head_block(head_dim_v)
    if q.element_size() * block_n * (block_d + block_dv) > FWD_MAX_KV_TILE_BYTES:
        return flash_attention_forward(q, k, v, attn_mask, scale)  # same maths, K/V streamed in blocks
    block_m = FWD_BLOCK_M if block_n * max(block_d, block_dv) <= FWD_LARGE_TILE else FWD_BLOCK_M_LARGE_TILE
    grid = (batch * heads, triton.cdiv(seq_q, block_m))
    with _device.device_guard(q):
        _cross_fwd_kernel[grid](
            q, k, v, mask if mask is not None else q, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            heads, seq_q, seq_kv, head_dim, head_dim_v, scale * LOG2E,
            HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=FWD_NUM_WARPS, num_stages=1,
        )
    return out, lse


def cross_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``: one fused kernel plus a sum of per-chunk dK/dV partials."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv, head_dim_v = k.shape[2], v.shape[3]
    block_n, block_d, block_dv = _kv_block(seq_kv), head_block(head_dim), head_block(head_dim_v)
    if block_n * max(block_d, block_dv) > CROSS_BWD_MAX_TILE:
        # Key tile too large for register-resident dK/dV accumulators: tile the keys instead.
        return flash_attention_backward(grad_out, q, k, v, out, lse, attn_mask, scale)
    mask, m_strides = mask_strides(attn_mask, (batch, heads, seq_q, seq_kv))
    dq = torch.empty_like(q)
    bh = batch * heads
    if seq_q == 0 or seq_kv == 0 or bh == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    grad_out = grad_out.expand_as(out)
    lse = lse.float().contiguous()

    num_q_blocks = triton.cdiv(seq_q, BWD_BLOCK_M)
    chunks = max(1, min(num_q_blocks, CROSS_BWD_TARGET_PROGRAMS // bh))
    blocks_per_program = triton.cdiv(num_q_blocks, chunks)
    chunks = triton.cdiv(num_q_blocks, blocks_per_program)
    dk_partial = torch.empty((chunks, batch, heads, seq_kv, head_dim), dtype=torch.float32, device=q.device)
    dv_partial = torch.empty((chunks, batch, heads, seq_kv, head_dim_v), dtype=torch.float32, device=q.device)

    with _device.device_guard(q):
        _cross_bwd_kernel[(bh, chunks)](
            q, k, v, mask if mask is not None else q, out, grad_out, lse, dq, dk_partial, dv_partial,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(), *grad_out.stride(), *dq.stride(),
            heads, seq_q, seq_kv, head_dim, head_dim_v, scale * LOG2E, scale, blocks_per_program,
            HAS_MASK=mask is not None, BLOCK_M=BWD_BLOCK_M, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=BWD_NUM_WARPS, num_stages=1,
        )
        # fp32 sum over chunks, cast once into k/v's dtype and layout.
        dk = torch.empty_like(k).copy_(dk_partial.sum(0))
        dv = torch.empty_like(v).copy_(dv_partial.sum(0))
    return dq, dk, dv


def not_supported_reasons(q: Tensor | None = None, k: Tensor | None = None, *_ignored: Tensor | None) -> list[str]:
    """Cross-attention only adds the key-length limit to the flash-attention checks."""
    if k is not None and k.dim() == 4 and k.shape[2] > MAX_KV:
        return [f"Skv {k.shape[2]} > {MAX_KV} for cross_attention"]
    return []
