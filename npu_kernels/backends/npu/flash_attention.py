"""Attention on Ascend: ``torch_npu.npu_fusion_attention`` (autograd registered by torch_npu),
with SDPA's mask conventions translated to torch_npu's, and the float32 capability probe."""
from __future__ import annotations

import os

import torch
import torch_npu

from npu_kernels.backends.npu._common import chip_reasons, dtype_reasons

Tensor = torch.Tensor

# npu_fusion_attention's documented ranges. The current page allows D up to 768; earlier
# releases' limit was 512, which is what we accept (SDXL uses 64). Nq 1..256, S 1..1M, B 1..2M.
MAX_HEAD_DIM = 512
MAX_HEADS = 256
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 2 << 20

#: ``1``/``0`` forces float32 attention on/off instead of probing the installed release once.
FP32_ATTENTION_ENV = "NPU_KERNELS_NPU_FP32_ATTENTION"

_fp32_attention_problems: dict[str, str | None] = {}


def _as_4d(mask: Tensor) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _atten_mask_for_kernel(masked_out: Tensor, full: tuple[int, int, int, int]) -> Tensor:
    """A boolean True = masked-out tensor in one of the shapes torch_npu takes: B1SS/11SS or BNSS."""
    batch, heads, seq_q, seq_kv = full
    if masked_out.shape[1] == 1:
        shape = (batch if masked_out.shape[0] != 1 else 1, 1, seq_q, seq_kv)
    else:
        shape = full  # 1NSS is not an accepted atten_mask shape: expand the batch too
    return masked_out.expand(shape).contiguous()


def _pse_for_kernel(mask: Tensor, dtype: torch.dtype, full: tuple[int, int, int, int], scale: float) -> Tensor:
    """An additive SDPA mask as torch_npu's ``pse``: divided by ``scale`` (torch_npu computes
    ``scale * (pse + q kᵀ)``), in the query dtype, shaped 1NSS (same for every batch) or BNSS.
    Infinities are clamped to the dtype's range: they still underflow to zero probability."""
    if scale == 0:
        raise ValueError(
            "npu attention: scale=0 with an additive mask cannot be passed as torch_npu's pse (pse/scale); "
            "use a non-zero scale or NPU_KERNELS_BACKEND=torch"
        )
    limits = torch.finfo(dtype)
    pse = (mask.to(torch.float32) / scale).clamp(limits.min, limits.max).to(dtype)
    batch, heads, seq_q, seq_kv = full
    shape = (1, heads, seq_q, seq_kv) if pse.shape[0] == 1 else full
    return pse.expand(shape).contiguous()


def _masks_for_kernel(
    attn_mask: Tensor | None, q: Tensor, full: tuple[int, int, int, int], scale: float
) -> tuple[Tensor | None, Tensor | None]:
    """SDPA's ``attn_mask`` -> torch_npu's ``(atten_mask, pse)``."""
    if attn_mask is None:
        return None, None
    mask = _as_4d(attn_mask)
    if mask.dtype == torch.bool:
        return _atten_mask_for_kernel(~mask, full), None  # SDPA True = attend; torch_npu True = masked
    if not mask.requires_grad:
        neg_inf = torch.isneginf(mask)
        if bool((neg_inf | (mask == 0)).all()):  # one host sync, only for float masks
            return _atten_mask_for_kernel(neg_inf, full), None
    return None, _pse_for_kernel(mask, q.dtype, full, scale)


def _layout_for_kernel(q: Tensor, k: Tensor, v: Tensor) -> tuple[str, tuple[Tensor, Tensor, Tensor]]:
    """``BNSD`` for [B, H, S, D]-contiguous inputs. Inputs that are [B, S, H, D] memory viewed as
    [B, H, S, D] (what diffusers' ``view(B, S, H, D).transpose(1, 2)`` gives) go in as ``BSND``
    instead: the same data read in place, where ``BNSD`` would need three copies."""
    if not q.is_contiguous() and q.transpose(1, 2).is_contiguous():
        return "BSND", tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    return "BNSD", (q.contiguous(), k.contiguous(), v.contiguous())


def _fully_masked_rows(attn_mask: Tensor | None, atten_mask: Tensor | None) -> Tensor | None:
    """``[., ., Sq, 1]`` True where a query row may attend to nothing (None without a mask).

    Such a row's result is defined as zeros with zero gradients, what the PyTorch path (ATen's
    flash kernel) and the Triton kernels give; npu_fusion_attention's is not documented (a
    "select" to a large negative value would average v uniformly), so the adapter zeroes it.
    """
    if atten_mask is not None:
        return atten_mask.all(dim=-1, keepdim=True)
    if attn_mask is not None:
        return torch.isneginf(_as_4d(attn_mask.detach())).all(dim=-1, keepdim=True)
    return None


def fusion_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    batch, heads, seq_q, _ = q.shape
    full = (batch, heads, seq_q, k.shape[2])
    atten_mask, pse = _masks_for_kernel(attn_mask, q, full, float(scale))
    layout, (qk, kk, vk) = _layout_for_kernel(q, k, v)
    out = torch_npu.npu_fusion_attention(
        qk, kk, vk, heads, layout, pse=pse, atten_mask=atten_mask, scale=float(scale), keep_prob=1.0
    )[0]
    out = out if layout == "BNSD" else out.transpose(1, 2)
    dead = _fully_masked_rows(attn_mask, atten_mask)
    return out if dead is None else out.masked_fill(dead, 0.0)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v`` for ``q [B,H,Sq,D]``, ``k/v [B,H,Skv,D]`` -> ``[B,H,Sq,D]``.

    ``attn_mask`` follows SDPA (None, boolean True = attend, or additive float), broadcastable to
    ``[B,H,Sq,Skv]``. Autograd by torch_npu (``npu_fusion_attention_grad``); an additive mask that
    requires grad gets one through ``pse``.
    """
    return fusion_attention(q, k, v, attn_mask, scale)


def _probe_float32_attention(device: torch.device) -> str | None:
    """Run a tiny float32 forward+backward once; the error text if the installed release refuses."""
    try:
        with torch.enable_grad():
            q, k, v = (torch.zeros(1, 1, 2, 16, dtype=torch.float32, device=device, requires_grad=True) for _ in "qkv")
            out = torch_npu.npu_fusion_attention(q, k, v, 1, "BNSD", scale=0.25, keep_prob=1.0)[0]
            out.sum().backward()
            if device.type == "npu":
                getattr(torch, "npu", torch_npu.npu).synchronize()
    except Exception as exc:  # noqa: BLE001 - the op's dtype check (RuntimeError), or anything the runtime raises
        return f"{type(exc).__name__}: {exc}"
    return None


def float32_attention_problem(device: torch.device) -> str | None:
    """Why float32 attention cannot run on ``device`` (None when it can).

    float32 is documented for ``npu_fusion_attention`` from the 6.0.RC3 API reference on, not in
    the earlier (CANN 7.0 era) pages. Which release is installed is told by trying it: a tiny
    float32 forward and backward, once per device. ``NPU_KERNELS_NPU_FP32_ATTENTION=1``/``0``
    decides without probing.
    """
    forced = os.environ.get(FP32_ATTENTION_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return None
    if forced in ("0", "false", "no", "off"):
        return f"float32 attention disabled by {FP32_ATTENTION_ENV}={forced}"
    if device.type == "meta":
        return None  # nothing to run a probe on (e.g. a report without the device): assume a current release
    key = str(device)
    if key not in _fp32_attention_problems:
        if _tracing():
            return None  # fake tensors would always "pass": probe later, in eager mode
        _fp32_attention_problems[key] = _probe_float32_attention(device)
    return _fp32_attention_problems[key]


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._guards.detect_fake_mode() is not None  # noqa: SLF001 - no public way to see a fake mode
    except Exception:  # noqa: BLE001 - private API: if it moves, behave as eager
        return False


def reset_capability_cache() -> None:
    """Forget probe results (tests; or after changing the environment)."""
    _fp32_attention_problems.clear()


def not_supported_reasons(q: Tensor, k: Tensor | None, v: Tensor | None, mask: Tensor | None) -> list[str]:
    qkv = [t for t in (q, k, v) if t is not None]
    reasons = dtype_reasons("attention q/k/v", qkv[:1]) + chip_reasons("npu_fusion_attention", q)
    if len({t.dtype for t in qkv}) > 1:
        reasons.append("q, k, v dtypes differ")
    if any(t.dim() != 4 for t in qkv):
        return reasons + ["attention needs 4-D [B, H, S, D] q, k, v"]
    if q.dtype == torch.float32:
        problem = float32_attention_problem(q.device)
        if problem is not None:
            reasons.append(
                f"float32 attention is not supported by the installed torch_npu/CANN ({problem}); "
                "use float16 or bfloat16"
            )
    batch, heads, seq_q, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} outside npu_fusion_attention's 1..{MAX_HEAD_DIM}")
    if not 1 <= heads <= MAX_HEADS:
        reasons.append(f"{heads} heads outside npu_fusion_attention's 1..{MAX_HEADS}")
    if not 1 <= batch <= MAX_BATCH:
        reasons.append(f"batch {batch} outside npu_fusion_attention's 1..{MAX_BATCH}")
    for name, t in (("q", q), ("k", k)):
        if t is not None and not 1 <= t.shape[2] <= MAX_SEQ_LEN:
            reasons.append(f"{name} sequence length {t.shape[2]} outside npu_fusion_attention's 1..{MAX_SEQ_LEN}")
    if k is not None and k.shape[-1] != head_dim:
        reasons.append(f"npu_fusion_attention needs Dq == Dk, got {head_dim} and {k.shape[-1]}")
    if k is not None and v is not None and k.shape != v.shape:
        # The op's page: "key and value shapes must be the same" (so Dv == Dk, Skv of k == Skv of v).
        reasons.append(f"npu_fusion_attention needs key and value of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            reasons.append(f"attn_mask dtype {mask.dtype}: only bool or additive float masks are supported")
        if mask.dim() > 4:
            reasons.append(f"attn_mask must have at most 4 dims, got {mask.dim()}")
    return reasons
