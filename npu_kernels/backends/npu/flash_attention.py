"""Attention on Ascend: the torch_npu op the shipped docs name for the call (training, compiled
training, inference), with SDPA's boolean masks translated to torch_npu's, and the float32 probe.

Which op (from the ops' blocks in torch_npu's ``_op_plugin_docs.py``, 2.5.1.post1 .. 2.14.0):

* **training, eager** -> ``npu_fusion_attention``: "该接口仅在训练场景下使用" (training only) and
  "该接口暂不支持图模式, 不支持aclgraph" (no graph mode, 2.7.1+ blocks); torch_npu registers its
  backward (``npu_fusion_attention_grad``).
* **training under torch.compile** -> ``npu_fusion_attention_v3``, "torch_npu.npu_fusion_attention
  支持图模式的版本" (its graph-mode version; aclgraph with BNSD, so BNSD is passed), in 2.7.1+; its
  backward is called explicitly (``npu_fusion_attention_grad_v3``) by :class:`_FusionAttentionV3`.
  Releases without it give a reason, so compiled calls take the PyTorch path.
* **inference** (no gradient needed) -> ``npu_fused_infer_attention_score``, "该接口支持推理场景下使用.
  该接口支持图模式" (inference, graph mode). Where its documented limits exclude the call (float32,
  a per-head mask, head dim > 512, a chip it does not list) the call runs the PyTorch path
  (:func:`_pytorch_path`) instead of the training-only op.

Masks reach torch_npu as boolean ``atten_mask`` only (True = masked out, so SDPA's True = attend is
inverted); an additive mask made only of 0 and -inf becomes one (one host sync; under torch.compile,
where values are unknown, float masks get a reason instead). Any other additive mask runs the
PyTorch path, never ``pse``: ``npu_fusion_attention``'s formula adds ``pse`` inside the scale
(``scale * (pse + q kᵀ)``) while its 2.7.1+ ``pse`` example computes ``softmax(scale · q kᵀ + pse)``,
and the inference op's formula does not place ``pse_shift``; which one the kernel does is a device
check (docs/ascend_npu.md). A query row the mask removes entirely asks
for the docs' invalid-row computation (``inner_precise=2``: "避免在计算过程中存在整行mask进而导致精度有
损失") and is then zeroed (zero gradients too), the result every backend gives: the docs do not say
what the kernel returns for such a row.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torch_npu

from npu_kernels.backends.npu._common import chip_reasons, dtype_reasons

Tensor = torch.Tensor

# npu_fusion_attention's (and _v3's) documented ranges, the same in every release 2.5.1..2.14.0:
# D 1..768 ("Head Dim必须满足Dq=Dk和Dk≥Dv，取值范围1~768"), Nq 1..256, S 1..1M, B 1..2M.
MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 2 << 20
# npu_fused_infer_attention_score: "支持N轴小于等于256, 支持D轴小于等于512", float16/bfloat16 inputs.
INFER_MAX_HEAD_DIM = 512
INFER_DTYPES = (torch.float16, torch.bfloat16)
#: "2为使能无效行计算" (npu_fusion_attention, _v3); "inner_precise为2时, 代表开启高精度模式, 且做行无效修正"
#: (npu_fused_infer_attention_score).
INVALID_ROW_PRECISE = 2

#: ``1``/``0`` forces float32 attention on/off instead of probing the installed release once.
FP32_ATTENTION_ENV = "NPU_KERNELS_NPU_FP32_ATTENTION"

_fp32_attention_problems: dict[str, str | None] = {}


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _as_boolean(attn_mask: Tensor) -> Tensor | None:
    """SDPA's mask as a boolean one (True = attend); None for an additive mask that is not only 0
    and -inf (or that requires grad): such a mask is not a mask torch_npu takes."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if attn_mask.requires_grad:
        return None
    neg_inf = torch.isneginf(attn_mask)
    return ~neg_inf if bool((neg_inf | (attn_mask == 0)).all()) else None  # one host sync


def _pytorch_path(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """SDPA, with a fully masked query row's result and gradients zero (as on every backend)."""
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    dead = (~attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask.detach())).all(dim=-1, keepdim=True)
    # A dead row attends to everything instead (finite values), then its output is zeroed.
    live_mask = attn_mask | dead if attn_mask.dtype == torch.bool else attn_mask.masked_fill(dead, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=live_mask, scale=scale).masked_fill(dead, 0.0)


def _atten_mask_for_kernel(attend: Tensor, full: tuple[int, int, int, int]) -> Tensor:
    """SDPA's boolean mask (True = attend) as torch_npu's ``atten_mask`` (True = masked out), in one
    of the shapes every attention op takes: B1SS or 11SS (BNSS when it varies per head)."""
    masked_out = ~attend
    while masked_out.dim() < 4:
        masked_out = masked_out.unsqueeze(0)
    batch, heads, seq_q, seq_kv = full
    if masked_out.shape[1] == 1:
        shape = (batch if masked_out.shape[0] != 1 else 1, 1, seq_q, seq_kv)
    else:
        shape = full  # 1NSS is not an accepted atten_mask shape: expand the batch too
    return masked_out.expand(shape).contiguous()


def _layout_for_kernel(q: Tensor, k: Tensor, v: Tensor, graph: bool) -> tuple[str, tuple[Tensor, Tensor, Tensor]]:
    """``BNSD`` for [B, H, S, D]-contiguous inputs. Inputs that are [B, S, H, D] memory viewed as
    [B, H, S, D] (what diffusers' ``view(B, S, H, D).transpose(1, 2)`` gives) go in as ``BSND``
    instead: the same data read in place, where ``BNSD`` would need three copies. Under
    torch.compile always ``BNSD``: the layout the _v3 doc names for aclgraph."""
    if not graph and not q.is_contiguous() and q.transpose(1, 2).is_contiguous():
        return "BSND", tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    return "BNSD", (q.contiguous(), k.contiguous(), v.contiguous())


class _FusionAttentionV3(torch.autograd.Function):
    """``npu_fusion_attention_v3`` with its backward ``npu_fusion_attention_grad_v3`` called
    explicitly, fed the forward's results (softmax statistics, output, seed, offset)."""

    @staticmethod
    def forward(ctx, q, k, v, atten_mask, heads, scale, inner_precise):
        results = torch_npu.npu_fusion_attention_v3(
            q, k, v, heads, "BNSD", atten_mask=atten_mask, scale=scale, keep_prob=1.0, inner_precise=inner_precise
        )
        out, softmax_max, softmax_sum, softmax_out, seed, offset = results
        ctx.save_for_backward(q, k, v, atten_mask, softmax_max, softmax_sum, softmax_out, out, seed, offset)
        ctx.attrs = (heads, scale, inner_precise)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, atten_mask, softmax_max, softmax_sum, softmax_out, out, seed, offset = ctx.saved_tensors
        heads, scale, inner_precise = ctx.attrs
        grads = torch_npu.npu_fusion_attention_grad_v3(
            q, k, v, grad_out.contiguous(), heads, "BNSD", atten_mask=atten_mask, softmax_max=softmax_max,
            softmax_sum=softmax_sum, softmax_in=softmax_out, attention_in=out, scale_value=scale, keep_prob=1.0,
            inner_precise=inner_precise, seed=seed, offset=offset,
        )
        return grads[0], grads[1], grads[2], None, None, None, None


def _inference_problem(q: Tensor, k: Tensor, attn_mask: Tensor | None) -> str | None:
    """Why ``npu_fused_infer_attention_score`` cannot serve this call by its docs (None when it can)."""
    if q.dtype not in INFER_DTYPES:
        return f"dtype {q.dtype} (float16/bfloat16 only)"
    if q.shape[-1] > INFER_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {INFER_MAX_HEAD_DIM}"
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] != 1:
        return "a per-head mask (its atten_mask takes B1SS/11SS/1SS/SS)"
    reasons = chip_reasons("npu_fused_infer_attention_score", q)
    return reasons[0] if reasons else None


def fusion_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """Route the call to the op the docs name for it (module docstring); ``[B, H, Sq, D]`` out."""
    batch, heads, seq_q, _ = q.shape
    full = (batch, heads, seq_q, k.shape[2])
    scale = float(scale)
    training, graph = _needs_grad(q, k, v), torch.compiler.is_compiling()
    attend = None if attn_mask is None else _as_boolean(attn_mask)
    if (attn_mask is not None and attend is None) or (not training and _inference_problem(q, k, attn_mask) is not None):
        return _pytorch_path(q, k, v, attn_mask, scale)
    atten_mask = None if attend is None else _atten_mask_for_kernel(attend, full)
    dead = None if atten_mask is None else atten_mask.all(dim=-1, keepdim=True)
    # One host sync, only with a mask (SDXL passes none); under torch.compile the data is unknown.
    precise = INVALID_ROW_PRECISE if dead is not None and (graph or bool(dead.any())) else 0
    layout, (qk, kk, vk) = _layout_for_kernel(q, k, v, graph)
    if not training:
        out = torch_npu.npu_fused_infer_attention_score(
            qk, kk, vk, atten_mask=atten_mask, num_heads=heads, scale=scale, input_layout=layout, inner_precise=precise
        )[0]
    elif graph:
        out = _FusionAttentionV3.apply(qk, kk, vk, atten_mask, heads, scale, precise)
    else:
        out = torch_npu.npu_fusion_attention(
            qk, kk, vk, heads, layout, atten_mask=atten_mask, scale=scale, keep_prob=1.0, inner_precise=precise
        )[0]
    out = out if layout == "BNSD" else out.transpose(1, 2)
    return out if dead is None else out.masked_fill(dead, 0.0)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v`` for ``q [B,H,Sq,D]``, ``k/v [B,H,Skv,D]`` -> ``[B,H,Sq,D]``.

    ``attn_mask`` follows SDPA (None, boolean True = attend, or additive float), broadcastable to
    ``[B,H,Sq,Skv]``. Autograd by torch_npu (eager) or by ``npu_fusion_attention_grad_v3``
    (compiled); see the module docstring for which op runs.
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
    """Reasons from the training op's docs (eager: ``npu_fusion_attention``; under torch.compile:
    ``npu_fusion_attention_v3``). Inference calls the adapter routes itself (see the module)."""
    qkv = [t for t in (q, k, v) if t is not None]
    graph = torch.compiler.is_compiling()
    op = "npu_fusion_attention_v3" if graph else "npu_fusion_attention"
    reasons = dtype_reasons("attention q/k/v", qkv[:1]) + chip_reasons(op, q)
    if graph and not hasattr(torch_npu, "npu_fusion_attention_v3"):
        reasons.append(
            "under torch.compile npu_fusion_attention is not documented (\"暂不支持图模式\") and this torch_npu "
            "has no npu_fusion_attention_v3 (2.7.1+)"
        )
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
        reasons.append(f"head dim {head_dim} outside {op}'s 1..{MAX_HEAD_DIM}")
    if not 1 <= heads <= MAX_HEADS:
        reasons.append(f"{heads} heads outside {op}'s 1..{MAX_HEADS}")
    if not 1 <= batch <= MAX_BATCH:
        reasons.append(f"batch {batch} outside {op}'s 1..{MAX_BATCH}")
    for name, t in (("q", q), ("k", k)):
        if t is not None and not 1 <= t.shape[2] <= MAX_SEQ_LEN:
            reasons.append(f"{name} sequence length {t.shape[2]} outside {op}'s 1..{MAX_SEQ_LEN}")
    if k is not None and k.shape[-1] != head_dim:
        reasons.append(f"{op} needs Dq == Dk, got {head_dim} and {k.shape[-1]}")
    if k is not None and v is not None and k.shape != v.shape:
        # The op's docs: "输入key和value的shape必须一致" (so Dv == Dk, Skv of k == Skv of v).
        reasons.append(f"{op} needs key and value of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            reasons.append(f"attn_mask dtype {mask.dtype}: only bool or additive float masks are supported")
        elif mask.dtype != torch.bool and graph:
            reasons.append(
                "under torch.compile only boolean masks go to torch_npu (a float mask's values are unknown "
                "there, and where torch_npu adds pse, inside or outside the scale, is a device check)"
            )
        if mask.dim() > 4:
            reasons.append(f"attn_mask must have at most 4 dims, got {mask.dim()}")
    return reasons
