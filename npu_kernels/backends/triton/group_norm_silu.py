"""GroupNorm fused with SiLU in Triton: ``silu(group_norm(x, G, weight, bias, eps))``.

Layout. ``x`` is ``[N, C, *spatial]``; the kernels address element ``(n, c, s)`` (``s`` the
flattened spatial index) through three strides, so the same kernels serve a contiguous tensor
(``stride_c = S, stride_s = 1``) and a channels-last one (``stride_c = 1, stride_s = C``: loads
coalesce along the group's channels) in place, and every output is written in ``x``'s memory format.
Any other layout is copied once to contiguous (the kernels need one of the two stride patterns above;
PyTorch's own GroupNorm copies such inputs too).

Launches (the count is part of the contract; ``tests/backends/test_triton.py`` counts them):

forward, group fits one program (``fits_one_program``: the group's padded tile has at most
``FIT_MAX_ELEMENTS`` elements) -- ONE launch
    ``_fwd_fused_kernel``: one program per (sample, group) loads the group once into registers,
    computes the fp32 mean, then the variance of the centred values (two passes over registers:
    no ``E[x²] - E[x]²`` cancellation), and writes ``silu(x̂·w + b)``, mean and rstd. Both
    statistics are taken about the group's first element, so a large common offset (mean 1000,
    std 0.1) costs no digits in the sum.
forward, larger groups -- TWO launches on a ``(N·G, chunks)`` grid, chunks chosen so that a batch-1
call runs at least ``PROGRAMS_PER_SM`` programs per SM
    1. ``_fwd_stats_kernel``: per chunk, Welford partials (count, mean, M2) into a small fp32
       workspace; tiles inside a chunk are merged with Chan et al.'s formula;
    2. ``_fwd_apply_kernel``: every program merges its group's partials (Chan's parallel merge in a
       fixed order), normalises its chunk and stores; chunk 0 also writes mean and rstd.
backward -- TWO launches on the same kind of grid, from the saved mean/rstd (x̂, y, SiLU recomputed)
    1. ``_bwd_reduce_kernel``: per chunk and channel, ``Σ dy·x̂`` and ``Σ dy`` with
       ``dy = grad·silu'(y)`` (the weight/bias gradient partials), and from them the chunk's share of
       the group sums ``Σ dx̂`` and ``Σ dx̂·x̂`` (``dx̂ = dy·w``);
    2. ``_bwd_apply_kernel``: merges the group sums and writes the input gradient; the programs of
       sample 0, chunk 0 also reduce the per-channel partials over batch and chunks and write the
       weight/bias gradients in the parameters' dtype.

No atomics anywhere: every sum has a fixed order for a given shape, so results are bitwise identical
run to run. All statistics and sums are fp32 whatever the storage dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from npu_kernels.backends.triton import _device

Tensor = torch.Tensor

# A group whose padded [next_pow2(C/G), next_pow2(S)] tile has at most this many elements is
# normalised by one program holding it in registers (fp32): one launch, one read of x. Larger groups
# take the split path. Tests lower it to force the split path on small shapes.
FIT_MAX_ELEMENTS = 32768
# Register elements per thread in the one-program path (sets num_warps, 4..32).
FIT_ELEMENTS_PER_THREAD = 32
# Split path: elements per tile (a program loops over the tiles of its chunk); tiles shrink down to
# MIN_TILE_ELEMENTS when a group has too few tiles to give every program one.
TILE_ELEMENTS = 4096
MIN_TILE_ELEMENTS = 512
# Channels-last tiles span the group's channels (the contiguous axis) up to this many at once.
MAX_BLOCK_C = 128
# Per-tile cost, in element equivalents, when choosing a tile shape for contiguous input (a few
# padded lanes are cheaper than twice as many loop iterations).
TILE_OVERHEAD = 256
# Split path: aim for this many programs per SM so that batch-1 shapes fill the GPU.
PROGRAMS_PER_SM = 2
# Overrides the program target (None: PROGRAMS_PER_SM x the device's SMs). Tests set it small.
TARGET_PROGRAMS: int | None = None
SPLIT_NUM_WARPS = 8  # the most; smaller tiles get fewer
# Partials merged per vector step in the apply kernels; parameter-gradient reduction block.
MAX_BLOCK_CHUNKS = 1024
MAX_BLOCK_PARAM = 64
# CUDA's limit on grid axes 1 and 2 (axis 0, batch·groups, allows 2**31 - 1).
MAX_GRID_AXIS_1 = 65535
# In-sample offsets are int32 (the sample base is int64): C*S must stay below this.
MAX_SAMPLE_ELEMENTS = 2**31 - 1


# ---------------------------------------------------------------------------------- launch plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call is cut into programs (``fused``: the one-program forward)."""

    fused: bool
    block_c: int
    block_s: int
    num_c_blocks: int
    s_chunks: int
    s_blocks_per_chunk: int
    num_warps: int

    @property
    def chunks(self) -> int:
        """Programs per (sample, group) on the split path's grid axis 1."""
        return self.num_c_blocks * self.s_chunks


def fits_one_program(cpg: int, spatial: int) -> bool:
    """Whether a group of ``cpg`` channels x ``spatial`` positions takes the one-launch forward."""
    return triton.next_power_of_2(cpg) * triton.next_power_of_2(spatial) <= FIT_MAX_ELEMENTS


def _split_tile(cpg: int, spatial: int, channels_inner: bool, tile: int | None = None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)`` of a split-path tile of at most ``tile`` (default TILE_ELEMENTS) elements."""
    tile = TILE_ELEMENTS if tile is None else tile
    max_c, max_s = triton.next_power_of_2(cpg), triton.next_power_of_2(spatial)
    if channels_inner:  # span the group's contiguous channel run, then as many positions as fit
        block_c = min(max_c, MAX_BLOCK_C)
        return block_c, max(1, min(tile // block_c, max_s))
    # Contiguous: positions are the contiguous axis. Pick the tile with the least padded work:
    # e.g. 10 channels x 4096 positions -> [2, 2048] tiles (no padding), 3 x 35 -> [4, 64].
    best = None
    block_s = min(max_s, tile)
    while block_s >= 1:
        block_c = min(max_c, max(1, tile // block_s))
        tiles = triton.cdiv(cpg, block_c) * triton.cdiv(spatial, block_s)
        cost = tiles * (block_c * block_s + TILE_OVERHEAD)
        if best is None or cost < best[0]:
            best = (cost, block_c, block_s)
        block_s //= 2
    return best[1], best[2]


def launch_plan(
    batch: int, channels: int, num_groups: int, spatial: int, channels_inner: bool,
    device: torch.device, forward: bool = True,
) -> Plan:
    """The grid and tiles of one call (the backward always takes the split plan). Worked out once
    per shape: a UNet calls the op with a few dozen shapes, thousands of times."""
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else PROGRAMS_PER_SM * _device.sm_count(device)
    tunables = (FIT_MAX_ELEMENTS, TILE_ELEMENTS, MIN_TILE_ELEMENTS, MAX_BLOCK_C)  # in the key: tests lower them
    return _launch_plan(batch, channels, num_groups, spatial, channels_inner, target, forward, tunables)


@functools.lru_cache(maxsize=1024)
def _launch_plan(
    batch: int, channels: int, num_groups: int, spatial: int, channels_inner: bool, target: int, forward: bool,
    _tunables: tuple[int, ...],
) -> Plan:
    cpg = channels // num_groups
    if forward and fits_one_program(cpg, spatial):
        block_c, block_s = triton.next_power_of_2(cpg), triton.next_power_of_2(spatial)
        warps = min(32, max(4, triton.next_power_of_2(block_c * block_s // (32 * FIT_ELEMENTS_PER_THREAD))))
        return Plan(True, block_c, block_s, 1, 1, 1, warps)
    per_group = triton.cdiv(target, max(batch * num_groups, 1))
    # Smaller tiles when the group has fewer than per_group of them (e.g. 20 x 1024 at batch 1).
    tile = TILE_ELEMENTS
    while tile > MIN_TILE_ELEMENTS and tile * per_group > cpg * spatial:
        tile //= 2
    block_c, block_s = _split_tile(cpg, spatial, channels_inner, tile)
    num_c_blocks, num_s_blocks = triton.cdiv(cpg, block_c), triton.cdiv(spatial, block_s)
    wanted_s_chunks = max(1, triton.cdiv(per_group, num_c_blocks))
    s_blocks_per_chunk = max(1, num_s_blocks // wanted_s_chunks)  # round down: at least the target
    s_chunks = triton.cdiv(num_s_blocks, s_blocks_per_chunk)  # no empty chunk
    if num_c_blocks * s_chunks > MAX_GRID_AXIS_1:  # only for absurd C/G: fewer, longer chunks
        s_blocks_per_chunk, s_chunks = num_s_blocks, 1
        if num_c_blocks > MAX_GRID_AXIS_1:
            raise ValueError(f"group_norm_silu: {cpg} channels per group need {num_c_blocks} channel blocks, "
                             f"more than the {MAX_GRID_AXIS_1} programs grid axis 1 allows")
    warps = min(SPLIT_NUM_WARPS, max(2, block_c * block_s // 512))  # 16 elements per thread at most
    return Plan(False, block_c, block_s, num_c_blocks, s_chunks, s_blocks_per_chunk, warps)


# --------------------------------------------------------------------------------- shared pieces
@triton.jit
def _group_base(pid_ng, num_groups, CPG: tl.constexpr, stride_n, stride_c):
    """int64 offset of group ``pid_ng % G`` of sample ``pid_ng // G``, and the group index."""
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    return n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c, g


@triton.jit
def _tile(c_start, s_start, CPG: tl.constexpr, S, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channels (within the group), their mask, the tile mask and in-group offsets of one tile."""
    c = c_start + tl.arange(0, BLOCK_C)
    s = s_start + tl.arange(0, BLOCK_S)
    c_mask = c < CPG
    mask = c_mask[:, None] & (s < S)[None, :]
    return c, c_mask, mask, c[:, None] * stride_c + s[None, :] * stride_s


@triton.jit
def _affine(x_hat, channels, c_mask, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = x̂·w + b`` (fp32) and the per-channel weight (1 when there is none)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full(channels.shape, 1.0, tl.float32)
    y = x_hat * w[:, None]
    if HAS_BIAS:
        b = tl.load(b_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
        y = y + b[:, None]
    return y, w


@triton.jit
def _sum2d(t):
    return tl.sum(tl.sum(t, axis=1), axis=0)


# --------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_fused_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
    num_groups, CPG: tl.constexpr, S, inv_count, eps,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program = one whole group, loaded once (out shares x's strides)."""
    pid_ng = tl.program_id(0)
    base, g = _group_base(pid_ng, num_groups, CPG, stride_n, stride_c)
    c, c_mask, mask, offs = _tile(0, 0, CPG, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(x_ptr + base).to(tl.float32)

    # Statistics of x - shift (shift: the group's first element): a large common offset then costs
    # no digits in the mean; padding lanes stay 0 and add nothing to either sum.
    shifted = tl.where(mask, x - shift, 0.0)
    mean_rel = _sum2d(shifted) * inv_count
    diff = tl.where(mask, shifted - mean_rel, 0.0)
    rstd = 1.0 / tl.sqrt(_sum2d(diff * diff) * inv_count + eps)
    y, _ = _affine(diff * rstd, g * CPG + c, c_mask, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    tl.store(out_ptr + base + offs, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid_ng, shift + mean_rel)
    tl.store(rstd_ptr + pid_ng, rstd)


@triton.jit
def _fwd_stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    num_groups, CPG: tl.constexpr, S, s_chunks, s_blocks_per_chunk,
    stride_n, stride_c, stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Welford partials (count, mean, M2) of one chunk: BLOCK_C channels x a run of spatial tiles.
    Means are relative to the group's first element (as in the one-program kernel)."""
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    base, _g = _group_base(pid_ng, num_groups, CPG, stride_n, stride_c)
    c_start = (chunk // s_chunks) * BLOCK_C
    first_s = (chunk % s_chunks) * s_blocks_per_chunk * BLOCK_S
    shift = tl.load(x_ptr + base).to(tl.float32)

    acc_count = 0.0
    acc_mean = 0.0
    acc_m2 = 0.0
    for i in range(0, s_blocks_per_chunk):
        _c, _c_mask, mask, offs = _tile(c_start, first_s + i * BLOCK_S, CPG, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.where(mask, tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        count = _sum2d(mask.to(tl.float32))
        mean = _sum2d(x) / tl.maximum(count, 1.0)
        diff = tl.where(mask, x - mean, 0.0)
        m2 = _sum2d(diff * diff)
        # Chan et al.: merge (count, mean, M2) of the tile into the running partial.
        total = acc_count + count
        delta = mean - acc_mean
        frac = count / tl.maximum(total, 1.0)
        acc_mean = acc_mean + delta * frac
        acc_m2 = acc_m2 + m2 + delta * delta * acc_count * frac
        acc_count = total

    idx = pid_ng * tl.num_programs(1) + chunk
    tl.store(count_ptr + idx, acc_count)
    tl.store(mean_ptr + idx, acc_mean)
    tl.store(m2_ptr + idx, acc_m2)


@triton.jit
def _merge_stats(count_ptr, mean_ptr, m2_ptr, first, num_chunks, BLOCK_CHUNKS: tl.constexpr):
    """Chan's parallel merge of a group's partials, in a fixed order:
    ``mean = Σ nᵢ·meanᵢ / n``, ``M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ - mean)²``; returns (mean, M2 / n)."""
    total = tl.zeros([BLOCK_CHUNKS], tl.float32)
    weighted = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for start in range(0, num_chunks, BLOCK_CHUNKS):
        idx = start + tl.arange(0, BLOCK_CHUNKS)
        valid = idx < num_chunks
        count = tl.load(count_ptr + first + idx, mask=valid, other=0.0)
        total += count
        weighted += count * tl.load(mean_ptr + first + idx, mask=valid, other=0.0)
    n_total = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / n_total
    m2 = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for start in range(0, num_chunks, BLOCK_CHUNKS):
        idx = start + tl.arange(0, BLOCK_CHUNKS)
        valid = idx < num_chunks
        count = tl.load(count_ptr + first + idx, mask=valid, other=0.0)
        delta = tl.load(mean_ptr + first + idx, mask=valid, other=0.0) - mean
        m2 += tl.load(m2_ptr + first + idx, mask=valid, other=0.0) + count * delta * delta
    return mean, tl.sum(m2, axis=0) / n_total


@triton.jit
def _fwd_apply_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, count_ptr, part_mean_ptr, m2_ptr, mean_ptr, rstd_ptr,
    num_groups, CPG: tl.constexpr, S, s_chunks, s_blocks_per_chunk, eps,
    stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    """Merge the group's partials, then normalise + SiLU the chunk (out shares x's strides)."""
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    mean_rel, var = _merge_stats(count_ptr, part_mean_ptr, m2_ptr, pid_ng * num_chunks, num_chunks, BLOCK_CHUNKS)
    rstd = 1.0 / tl.sqrt(var + eps)
    base, g = _group_base(pid_ng, num_groups, CPG, stride_n, stride_c)
    shift = tl.load(x_ptr + base).to(tl.float32)
    if chunk == 0:
        tl.store(mean_ptr + pid_ng, shift + mean_rel)
        tl.store(rstd_ptr + pid_ng, rstd)

    c_start = (chunk // s_chunks) * BLOCK_C
    first_s = (chunk % s_chunks) * s_blocks_per_chunk * BLOCK_S
    for i in range(0, s_blocks_per_chunk):
        c, c_mask, mask, offs = _tile(c_start, first_s + i * BLOCK_S, CPG, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        # Padding lanes (loaded as 0) would normalise to large values: zero them (no exp overflow).
        x_hat = tl.where(mask, ((x - shift) - mean_rel) * rstd, 0.0)
        y, _ = _affine(x_hat, g * CPG + c, c_mask, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
        tl.store(out_ptr + base + offs, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- backward
@triton.jit
def _recompute(
    x_ptr, go_ptr, w_ptr, b_ptr, x_base, go_base, g, c_start, s_start, mean, rstd,
    CPG: tl.constexpr, S, stride_c, stride_s, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One tile's x̂, ``dy = grad·silu'(y)`` and per-channel weight (fp32), its mask and x offsets."""
    c, c_mask, mask, offs = _tile(c_start, s_start, CPG, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
    _, _, _, go_offs = _tile(c_start, s_start, CPG, S, stride_go_c, stride_go_s, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(tl.float32)
    grad_out = tl.load(go_ptr + go_base + go_offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)  # padding lanes: 0, not a large value
    y, w = _affine(x_hat, g * CPG + c, c_mask, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    sig = tl.sigmoid(y)
    dy = tl.where(mask, grad_out * sig * (1.0 + y * (1.0 - sig)), 0.0)  # silu' = σ(y)(1 + y(1 - σ(y)))
    return x_hat, dy, w, c, c_mask, mask, offs


@triton.jit
def _bwd_reduce_kernel(
    x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    sum_dxhat_ptr, sum_dxhat_xhat_ptr, dw_part_ptr, db_part_ptr,
    C, num_groups, CPG: tl.constexpr, S, s_chunks, s_blocks_per_chunk,
    stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per chunk: per-channel ``Σ dy·x̂`` and ``Σ dy`` ([N, C, s_chunks] partials) and the chunk's
    ``Σ dx̂ = Σ_c w_c·Σ dy`` and ``Σ dx̂·x̂ = Σ_c w_c·Σ dy·x̂``."""
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid_ng // num_groups
    x_base, g = _group_base(pid_ng, num_groups, CPG, stride_n, stride_c)
    go_base, _go_g = _group_base(pid_ng, num_groups, CPG, stride_go_n, stride_go_c)
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    c_start = (chunk // s_chunks) * BLOCK_C
    s_chunk = chunk % s_chunks
    first_s = s_chunk * s_blocks_per_chunk * BLOCK_S

    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < CPG
    if HAS_WEIGHT:
        w = tl.load(w_ptr + g * CPG + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_C], tl.float32)
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, s_blocks_per_chunk):
        x_hat, dy, _w, _c, _c_mask, _mask, _offs = _recompute(
            x_ptr, go_ptr, w_ptr, b_ptr, x_base, go_base, g, c_start, first_s + i * BLOCK_S, mean, rstd,
            CPG, S, stride_c, stride_s, stride_go_c, stride_go_s, HAS_WEIGHT, HAS_BIAS, BLOCK_C, BLOCK_S,
        )
        sum_dy_xhat += tl.sum(dy * x_hat, axis=1)
        sum_dy += tl.sum(dy, axis=1)

    idx = pid_ng * tl.num_programs(1) + chunk
    tl.store(sum_dxhat_ptr + idx, tl.sum(w * sum_dy, axis=0))
    tl.store(sum_dxhat_xhat_ptr + idx, tl.sum(w * sum_dy_xhat, axis=0))
    param_idx = (n.to(tl.int64) * C + g * CPG + c) * s_chunks + s_chunk
    if HAS_WEIGHT:
        tl.store(dw_part_ptr + param_idx, sum_dy_xhat, mask=c_mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + param_idx, sum_dy, mask=c_mask)


@triton.jit
def _reduce_param_grads(
    dw_part_ptr, db_part_ptr, gw_ptr, gb_ptr, g, C, CPG: tl.constexpr, s_chunks, num_partials,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weight/bias gradients of group ``g``'s channels: sum the [N, C, s_chunks] partials over
    batch and chunks (fixed order) and store in the parameters' dtype."""
    for c0 in range(0, CPG, BLOCK_P):
        channels = g * CPG + c0 + tl.arange(0, BLOCK_P)
        c_mask = (c0 + tl.arange(0, BLOCK_P)) < CPG
        acc_w = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        for k0 in range(0, num_partials, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # k = n·s_chunks + s_chunk
            idx = ((k // s_chunks).to(tl.int64)[None, :] * C + channels[:, None]) * s_chunks + (k % s_chunks)[None, :]
            valid = c_mask[:, None] & (k < num_partials)[None, :]
            if HAS_WEIGHT:
                acc_w += tl.load(dw_part_ptr + idx, mask=valid, other=0.0)
            if HAS_BIAS:
                acc_b += tl.load(db_part_ptr + idx, mask=valid, other=0.0)
        if HAS_WEIGHT:
            tl.store(gw_ptr + channels, tl.sum(acc_w, axis=1).to(gw_ptr.dtype.element_ty), mask=c_mask)
        if HAS_BIAS:
            tl.store(gb_ptr + channels, tl.sum(acc_b, axis=1).to(gb_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bwd_apply_kernel(
    x_ptr, go_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    sum_dxhat_ptr, sum_dxhat_xhat_ptr, dw_part_ptr, db_part_ptr, gx_ptr, gw_ptr, gb_ptr,
    C, num_groups, CPG: tl.constexpr, S, s_chunks, s_blocks_per_chunk, num_partials, inv_count,
    stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dx = rstd·(dx̂ - mean(dx̂) - x̂·mean(dx̂·x̂))`` over the chunk (gx shares x's strides);
    sample 0's chunk-0 programs also write the weight/bias gradients of their group."""
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    first = pid_ng * num_chunks
    acc_a = tl.zeros([BLOCK_CHUNKS], tl.float32)
    acc_b = tl.zeros([BLOCK_CHUNKS], tl.float32)
    for start in range(0, num_chunks, BLOCK_CHUNKS):
        idx = start + tl.arange(0, BLOCK_CHUNKS)
        valid = idx < num_chunks
        acc_a += tl.load(sum_dxhat_ptr + first + idx, mask=valid, other=0.0)
        acc_b += tl.load(sum_dxhat_xhat_ptr + first + idx, mask=valid, other=0.0)
    mean_dxhat = tl.sum(acc_a, axis=0) * inv_count
    mean_dxhat_xhat = tl.sum(acc_b, axis=0) * inv_count

    x_base, g = _group_base(pid_ng, num_groups, CPG, stride_n, stride_c)
    go_base, _go_g = _group_base(pid_ng, num_groups, CPG, stride_go_n, stride_go_c)
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    c_start = (chunk // s_chunks) * BLOCK_C
    first_s = (chunk % s_chunks) * s_blocks_per_chunk * BLOCK_S
    for i in range(0, s_blocks_per_chunk):
        x_hat, dy, w, _c, _c_mask, mask, offs = _recompute(
            x_ptr, go_ptr, w_ptr, b_ptr, x_base, go_base, g, c_start, first_s + i * BLOCK_S, mean, rstd,
            CPG, S, stride_c, stride_s, stride_go_c, stride_go_s, HAS_WEIGHT, HAS_BIAS, BLOCK_C, BLOCK_S,
        )
        grad_x = (dy * w[:, None] - mean_dxhat - x_hat * mean_dxhat_xhat) * rstd
        tl.store(gx_ptr + x_base + offs, grad_x.to(gx_ptr.dtype.element_ty), mask=mask)

    if HAS_WEIGHT or HAS_BIAS:
        if (pid_ng < num_groups) & (chunk == 0):
            _reduce_param_grads(dw_part_ptr, db_part_ptr, gw_ptr, gb_ptr, g, C, CPG, s_chunks, num_partials,
                                HAS_WEIGHT, HAS_BIAS, BLOCK_P, BLOCK_K)


# -------------------------------------------------------------------------------------- wrappers
def _layout(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``(t, stride_n, stride_c, stride_s)`` addressing ``t`` as ``[N, C, S]``.

    Contiguous and channels-last-like tensors (channels innermost, any number of spatial dims) are
    read in place; any other layout is copied to contiguous, because the kernels address a sample
    with one channel stride and one spatial stride.
    """
    c = t.shape[1]
    s = math.prod(t.shape[2:])
    if t.is_contiguous():
        return t, c * s, s, 1
    if t.dim() > 2 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return t, s * c, 1, c
    return _layout(t.contiguous())


def _param(p: Tensor | None, fallback: Tensor) -> Tensor:
    """A parameter as the kernels read it (contiguous), or a dummy pointer when absent."""
    return p.contiguous() if p is not None else fallback


def _check(x: Tensor, num_groups: int) -> None:
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels are not divisible by {num_groups} groups")
    if x.numel() // max(x.shape[0], 1) > MAX_SAMPLE_ELEMENTS:
        raise ValueError(f"group_norm_silu: a sample of {x.numel() // x.shape[0]} elements overflows int32 offsets")


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(silu(group_norm(x)), mean, rstd)``; output in ``x``'s memory format, stats fp32 ``[N, G]``.

    One launch where the group fits one program (:func:`fits_one_program`), two otherwise.
    """
    _check(x, num_groups)
    batch, channels = x.shape[0], x.shape[1]
    x, stride_n, stride_c, stride_s = _layout(x)
    spatial = math.prod(x.shape[2:])
    cpg = channels // num_groups
    out = torch.empty_like(x)  # preserve_format keeps contiguous / channels_last strides
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan"))

    w_arg, b_arg = _param(weight, x), _param(bias, x)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    plan = launch_plan(batch, channels, num_groups, spatial, stride_c == 1 and cpg > 1, x.device)
    with _device.device_guard(x):
        if plan.fused:
            _fwd_fused_kernel[(batch * num_groups,)](
                x, w_arg, b_arg, out, mean, rstd,
                num_groups, cpg, spatial, 1.0 / (cpg * spatial), float(eps), stride_n, stride_c, stride_s,
                BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps, **flags,
            )
            return out, mean, rstd
        grid = (batch * num_groups, plan.chunks)
        partial = torch.empty((3, batch * num_groups * plan.chunks), dtype=torch.float32, device=x.device)
        _fwd_stats_kernel[grid](
            x, partial[0], partial[1], partial[2],
            num_groups, cpg, spatial, plan.s_chunks, plan.s_blocks_per_chunk, stride_n, stride_c, stride_s,
            BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps,
        )
        _fwd_apply_kernel[grid](
            x, w_arg, b_arg, out, partial[0], partial[1], partial[2], mean, rstd,
            num_groups, cpg, spatial, plan.s_chunks, plan.s_blocks_per_chunk, float(eps),
            stride_n, stride_c, stride_s,
            BLOCK_C=plan.block_c, BLOCK_S=plan.block_s,
            BLOCK_CHUNKS=min(triton.next_power_of_2(plan.chunks), MAX_BLOCK_CHUNKS),
            num_warps=plan.num_warps, **flags,
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
    """``(grad_x, grad_weight, grad_bias)`` from the saved statistics (x̂, y and SiLU recomputed).

    Two launches; ``grad_x`` in ``x``'s memory format, parameter gradients in the parameters' dtype.
    """
    _check(x, num_groups)
    batch, channels = x.shape[0], x.shape[1]
    x, stride_n, stride_c, stride_s = _layout(x)
    grad_out, stride_go_n, stride_go_c, stride_go_s = _layout(grad_out.expand_as(x))
    spatial = math.prod(x.shape[2:])
    cpg = channels // num_groups
    grad_x = torch.empty_like(x)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else None
    grad_b = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else None
    if x.numel() == 0:
        return grad_x, grad_w.zero_() if grad_w is not None else None, grad_b.zero_() if grad_b is not None else None
    mean = mean.reshape(batch * num_groups).float().contiguous()
    rstd = rstd.reshape(batch * num_groups).float().contiguous()

    plan = launch_plan(batch, channels, num_groups, spatial, stride_c == 1 and cpg > 1, x.device, forward=False)
    chunks = plan.chunks
    group_partial = torch.empty((2, batch * num_groups * chunks), dtype=torch.float32, device=x.device)
    param_partial = torch.empty(
        (int(weight is not None) + int(bias is not None), batch * channels * plan.s_chunks),
        dtype=torch.float32, device=x.device,
    )
    dw_part = param_partial[0] if weight is not None else group_partial[0]
    db_part = param_partial[-1] if bias is not None else group_partial[0]
    w_arg, b_arg = _param(weight, x), _param(bias, x)
    meta = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    grid = (batch * num_groups, chunks)
    num_partials = batch * plan.s_chunks
    with _device.device_guard(x):
        _bwd_reduce_kernel[grid](
            x, grad_out, w_arg, b_arg, mean, rstd, group_partial[0], group_partial[1], dw_part, db_part,
            channels, num_groups, cpg, spatial, plan.s_chunks, plan.s_blocks_per_chunk,
            stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s, **meta,
        )
        _bwd_apply_kernel[grid](
            x, grad_out, w_arg, b_arg, mean, rstd, group_partial[0], group_partial[1], dw_part, db_part,
            grad_x, grad_w if grad_w is not None else x, grad_b if grad_b is not None else x,
            channels, num_groups, cpg, spatial, plan.s_chunks, plan.s_blocks_per_chunk, num_partials,
            1.0 / (cpg * spatial),
            stride_n, stride_c, stride_s, stride_go_n, stride_go_c, stride_go_s,
            BLOCK_CHUNKS=min(triton.next_power_of_2(chunks), MAX_BLOCK_CHUNKS),
            BLOCK_P=min(triton.next_power_of_2(cpg), MAX_BLOCK_PARAM),
            BLOCK_K=min(triton.next_power_of_2(num_partials), MAX_BLOCK_PARAM), **meta,
        )
    return grad_x, grad_w, grad_b


def not_supported_reasons(x: Tensor | None = None, *_params: Tensor | None) -> list[str]:
    """Op-specific reasons (dtype and device checks live in the package ``__init__``)."""
    if x is None:
        return []
    if x.dim() < 2:
        return [f"group_norm_silu needs x of shape [N, C, *spatial], got {tuple(x.shape)}"]
    if x.shape[0] and x.numel() // x.shape[0] > MAX_SAMPLE_ELEMENTS:
        return [f"group_norm_silu: a sample of {x.numel() // x.shape[0]} elements overflows the kernels' int32 offsets"]
    return []
