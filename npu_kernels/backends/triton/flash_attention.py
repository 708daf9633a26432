"""Non-causal FlashAttention-2 in Triton: ``softmax(q kᵀ·scale + mask) v`` for any sequence length.

Forward (``_fwd_kernel``): one program per ``(BLOCK_M query rows, batch·head)``; it streams K/V in
``BLOCK_N`` blocks with the online softmax (running max ``m``, running sum ``l``, fp32 accumulator
rescaled by ``exp(m_old - m_new)``) and stores the output and the natural-log logsumexp, the only
thing the backward needs besides the output. Scores live in the log2 domain
(``qk_scale = scale·log2(e)``, ``exp2``) as in the Triton tutorial: one multiply fewer per score.

Backward (FA2): ``_bwd_preprocess_kernel`` computes ``delta = rowsum(dO ∘ O)``; ``_bwd_dkdv_kernel``
owns a K/V block and streams Q/dO blocks, recomputing ``P = exp(S - lse)``; ``_bwd_dq_kernel`` owns a
Q block and streams K/V blocks. Two kernels instead of atomics: deterministic, and no fp32 dq buffer.

Inputs: q ``[B, H, Sq, D]``, k ``[B, H, Skv, D]``, v ``[B, H, Skv, Dv]`` with arbitrary strides
(transposed views of ``[B, S, H, D]`` projections are read in place); head dims up to 128, padded to
a power of two (at least 16, ``tl.dot``'s minimum) with masked loads. The mask is additive,
4-D and broadcastable to ``[B, H, Sq, Skv]``; broadcast dimensions are read with stride 0, so a
``[B, 1, 1, Skv]`` padding mask is never expanded in memory. ``-inf`` entries are fine (the
running max of a row that has seen only ``-inf`` is treated as 0 so no ``inf - inf`` appears).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_kernels.backends.triton import _device

Tensor = torch.Tensor

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x·log2(e))
LN2 = 0.6931471805599453  # ln(2): converts the log2-domain logsumexp back to natural log
# The same for use inside @triton.jit functions (globals there must be tl.constexpr).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
MAX_HEAD_DIM = 128
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16

# Fixed launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen per padded head
# dim like the Triton tutorial's best configs on A100/H100. No autotuning: the interpreter (CI)
# and the first GPU call stay fast and deterministic.
FWD_CONFIG_SMALL_D = (128, 64, 4, 3)  # padded head dim <= 64
FWD_CONFIG_LARGE_D = (128, 32, 8, 3)  # padded head dim 128
FWD_CONFIG_FP32 = (64, 32, 4, 2)  # fp32 tiles take twice the shared memory
BWD_DKDV_BLOCKS = (32, 64)  # (BLOCK_M streamed query rows, BLOCK_N owned key rows)
BWD_DQ_BLOCKS = (64, 32)  # (BLOCK_M owned query rows, BLOCK_N streamed key rows)
BWD_NUM_WARPS = 4  # 8 for a padded head dim of 128: the fp32 dK/dV accumulators need the registers
BWD_NUM_STAGES = 2
PREPROCESS_BLOCK_M = 64


# ------------------------------------------------------------------------------- shared helpers
@triton.jit
def _load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, row_valid, col_valid, TRANSPOSED: tl.constexpr):
    """Additive mask tile in fp32, scaled to the log2 domain; ``[rows, cols]`` or transposed."""
    if TRANSPOSED:
        ptrs = mask_base + rows[None, :] * stride_mm + cols[:, None] * stride_mn
        valid = row_valid[None, :] & col_valid[:, None]
    else:
        ptrs = mask_base + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        valid = row_valid[:, None] & col_valid[None, :]
    return tl.load(ptrs, mask=valid, other=0.0).to(tl.float32) * _LOG2E


@triton.jit
def _head_offset(bh, num_heads, stride_b, stride_h):
    # int64: batch·stride overflows 32 bits for long sequences / big batches.
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    return b * stride_b + h * stride_h


# --------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(
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
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = rows < seq_q
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    q_base = Q + _head_offset(bh, num_heads, stride_qb, stride_qh)
    k_base = K + _head_offset(bh, num_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, num_heads, stride_vb, stride_vh)
    mask_base = Mask + _head_offset(bh, num_heads, stride_mb, stride_mh)

    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, seq_kv, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < seq_kv
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            s += _load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, row_valid, col_valid, False)
        s = tl.where(col_valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has only seen -inf so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_valid[:, None] & dv_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i == 0 only for a fully masked row (not allowed by the contract): give 0 and lse = -inf, no NaN.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    out_base = Out + _head_offset(bh, num_heads, stride_ob, stride_oh)
    tl.store(out_base + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    tl.store(Lse + bh.to(tl.int64) * seq_q + rows, lse, mask=row_valid)


# -------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, seq_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``delta[i] = Σ_d dO[i, d]·O[i, d]`` (= Σ_j P[i, j]·dP[i, j]), fp32."""
    bh = tl.program_id(0)  # batch·heads on axis 0: no 65,535 limit there
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    valid = (rows < seq_q)[:, None] & (offs_dv < head_dim_v)[None, :]
    o = tl.load(Out + _head_offset(bh, num_heads, stride_ob, stride_oh)
                + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=valid, other=0.0)
    do = tl.load(DO + _head_offset(bh, num_heads, stride_dob, stride_doh)
                 + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask=valid, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _load_lse_log2(Lse, bh, rows, row_valid, seq_q):
    """Row logsumexp in the log2 domain; +inf for padded / fully masked rows so that P = 0 there."""
    lse = tl.load(Lse + bh.to(tl.int64) * seq_q + rows, mask=row_valid, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_q, seq_kv, head_dim, head_dim_v, qk_scale, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one key block: stream all query blocks, working on transposed scores Sᵀ [N, M]."""
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_valid = cols < seq_kv
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    q_base = Q + _head_offset(bh, num_heads, stride_qb, stride_qh)
    do_base = DO + _head_offset(bh, num_heads, stride_dob, stride_doh)
    mask_base = Mask + _head_offset(bh, num_heads, stride_mb, stride_mh)
    k = tl.load(K + _head_offset(bh, num_heads, stride_kb, stride_kh)
                + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    v = tl.load(V + _head_offset(bh, num_heads, stride_vb, stride_vh)
                + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_valid[:, None] & dv_valid[None, :], other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, seq_q, BLOCK_M):
        rows = start_m + offs_m
        row_valid = rows < seq_q
        q_t = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                      mask=row_valid[None, :] & d_valid[:, None], other=0.0)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            s_t += _load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, row_valid, col_valid, True)
        lse = _load_lse_log2(Lse, bh, rows, row_valid, seq_q)
        p_t = tl.math.exp2(s_t - lse[None, :])  # padded query rows have lse = +inf -> P = 0

        do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=row_valid[:, None] & dv_valid[None, :], other=0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = tl.load(Delta + bh.to(tl.int64) * seq_q + rows, mask=row_valid, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)

    dk *= scale  # S = scale·q·kᵀ: the chain rule's factor, applied once at the end
    tl.store(DK + _head_offset(bh, num_heads, stride_dkb, stride_dkh)
             + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_valid[:, None] & d_valid[None, :])
    tl.store(DV + _head_offset(bh, num_heads, stride_dvb, stride_dvh)
             + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_valid[:, None] & dv_valid[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, seq_q, seq_kv, head_dim, head_dim_v, qk_scale, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one query block: stream all key/value blocks."""
    bh = tl.program_id(0)  # batch·heads on axis 0: no 65,535 limit there
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = rows < seq_q
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < head_dim_v

    k_base = K + _head_offset(bh, num_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, num_heads, stride_vb, stride_vh)
    mask_base = Mask + _head_offset(bh, num_heads, stride_mb, stride_mh)
    q = tl.load(Q + _head_offset(bh, num_heads, stride_qb, stride_qh)
                + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    do = tl.load(DO + _head_offset(bh, num_heads, stride_dob, stride_doh)
                 + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_valid[:, None] & dv_valid[None, :], other=0.0)
    lse = _load_lse_log2(Lse, bh, rows, row_valid, seq_q)
    delta = tl.load(Delta + bh.to(tl.int64) * seq_q + rows, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seq_kv, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < seq_kv
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                      mask=col_valid[None, :] & dv_valid[:, None], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            s += _load_mask_tile(mask_base, rows, cols, stride_mm, stride_mn, row_valid, col_valid, False)
        s = tl.where(col_valid[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

    dq *= scale
    tl.store(DQ + _head_offset(bh, num_heads, stride_dqb, stride_dqh)
             + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


# -------------------------------------------------------------------------------------- wrappers
def head_block(dim: int) -> int:
    """Head dim padded to a power of two, at least tl.dot's minimum of 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(dim))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 inputs follow PyTorch's matmul TF32 switch (off by default,
    so fp32 attention is exact fp32 like SDPA's); for fp16/bf16 operands it has no effect."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def mask_strides(attn_mask: Tensor | None, full_shape: tuple[int, int, int, int]) -> tuple[Tensor | None, tuple]:
    """The mask's 4 strides with 0 for broadcast dimensions (no expanded copy is ever made)."""
    if attn_mask is None:
        return None, (0, 0, 0, 0)
    if attn_mask.dim() != 4:
        raise ValueError(f"attention: the Triton kernels take a 4-D additive mask, got shape {tuple(attn_mask.shape)}")
    strides = tuple(
        0 if size == 1 and full != 1 else attn_mask.stride(i)
        for i, (size, full) in enumerate(zip(attn_mask.shape, full_shape))
    )
    return attn_mask, strides


def out_like_sdpa(q: Tensor, head_dim_v: int) -> Tensor:
    """``[B, H, Sq, Dv]`` stored as ``[B, Sq, H, Dv]``: the layout the ops layer returns, so no copy."""
    batch, heads, seq_q, _ = q.shape
    return q.new_empty((batch, seq_q, heads, head_dim_v)).transpose(1, 2)


def _fwd_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if dtype == torch.float32:
        return FWD_CONFIG_FP32
    return FWD_CONFIG_SMALL_D if block_d <= 64 else FWD_CONFIG_LARGE_D


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Sq, Dv] in q.dtype, lse float32 [B, H, Sq])``."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv, head_dim_v = k.shape[2], v.shape[3]
    mask, m_strides = mask_strides(attn_mask, (batch, heads, seq_q, seq_kv))
    out = out_like_sdpa(q, head_dim_v)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    block_d, block_dv = head_block(head_dim), head_block(head_dim_v)
    block_m, block_n, num_warps, num_stages = _fwd_config(max(block_d, block_dv), q.dtype)
    grid = (batch * heads, triton.cdiv(seq_q, block_m))
    with _device.device_guard(q):
        _fwd_kernel[grid](
            q, k, v, mask if mask is not None else q, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            heads, seq_q, seq_kv, head_dim, head_dim_v, scale * LOG2E,
            HAS_MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def flash_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` with the shapes, dtypes and (dense) strides of ``q, k, v``."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv, head_dim_v = k.shape[2], v.shape[3]
    mask, m_strides = mask_strides(attn_mask, (batch, heads, seq_q, seq_kv))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if seq_q == 0 or seq_kv == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.expand_as(out)
    lse = lse.float().contiguous()
    block_d, block_dv = head_block(head_dim), head_block(head_dim_v)
    bh = batch * heads
    precision = dot_precision(q.dtype)
    mask_arg = mask if mask is not None else q

    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    with _device.device_guard(q):
        _bwd_preprocess_kernel[(bh, triton.cdiv(seq_q, PREPROCESS_BLOCK_M))](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_q, head_dim_v,
            BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=block_dv,
        )
        common = (heads, seq_q, seq_kv, head_dim, head_dim_v, scale * LOG2E, scale)
        meta = dict(HAS_MASK=mask is not None, BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PRECISION=precision,
                    num_warps=BWD_NUM_WARPS if max(block_d, block_dv) <= 64 else 2 * BWD_NUM_WARPS,
                    num_stages=BWD_NUM_STAGES)

        block_m, block_n = BWD_DKDV_BLOCKS
        _bwd_dkdv_kernel[(bh, triton.cdiv(seq_kv, block_n))](
            q, k, v, mask_arg, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *common, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
        )
        block_m, block_n = BWD_DQ_BLOCKS
        _bwd_dq_kernel[(bh, triton.cdiv(seq_q, block_m))](
            q, k, v, mask_arg, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *grad_out.stride(), *dq.stride(),
            *common, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
        )
    return dq, dk, dv


def not_supported_reasons(q: Tensor | None = None, k: Tensor | None = None, v: Tensor | None = None,
                          attn_mask: Tensor | None = None, *_ignored: Tensor | None) -> list[str]:
    """Op-specific reasons shared by flash and cross attention (dtype/device checks: package ``__init__``)."""
    reasons = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dim() != 4:
            reasons.append(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    for name, t in (("q/k", q), ("v", v)):
        if t is not None and t.dim() == 4 and t.shape[-1] > MAX_HEAD_DIM:
            reasons.append(f"{name} head dim {t.shape[-1]} > {MAX_HEAD_DIM}")
    # Boolean or lower-rank masks are fine: the ops layer makes them additive and 4-D before the
    # kernels see them (``flash_attention_forward`` itself takes only the additive 4-D form).
    if attn_mask is not None and attn_mask.dim() > 4:
        reasons.append(f"attn_mask must have at most 4 dims, got shape {tuple(attn_mask.shape)}")
    return reasons
