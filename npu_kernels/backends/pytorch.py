"""The PyTorch backend (``torch``): every op's forward and backward kernel in plain PyTorch.

It runs on any device and any floating dtype (float64 included), and is the fall-back for any
kernel another backend lacks. (The float64 maths the tests judge every backend against is a
separate, deliberately naive module: ``tests/reference.py``.) Every backend module exports this
same contract, the kernel names and arguments each op's spec (``npu_kernels/ops/<op>.py``) declares:

* ``geglu_forward(x, approximate) -> out`` / ``geglu_backward(grad_out, x, approximate) -> grad_x``
* ``group_norm_silu_forward(x, num_groups, weight, bias, eps) -> (out, mean, rstd)`` with
  ``mean``/``rstd`` of shape ``[N, num_groups]`` in float32, or in the dtype a backend's
  ``group_norm_silu_stat_dtype(x, weight, bias)`` names (its backward's dtype), and
  ``group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, num_groups) -> (gx, gw, gb)``
* ``flash_attention_forward(q, k, v, attn_mask, scale) -> (out, lse)`` with float32 ``lse`` ``[B, H, Sq]``
  and ``flash_attention_backward(grad_out, q, k, v, out, lse, attn_mask, scale) -> (dq, dk, dv)``; the
  mask is ``None`` or additive, 4-D and broadcastable to ``[B, H, Sq, Skv]``;
  ``cross_attention_forward`` / ``cross_attention_backward`` the same for short key/value sequences.
* ``not_supported_reasons(op, inputs) -> list[str]``, ``inputs`` the op's typed inputs object
  (:mod:`npu_kernels.registry`: ``inputs.x``, ``inputs.q``, ...).

A backend may instead export an op under its own name (``geglu``, ``flash_attention``, ...) as an
autograd-complete function with the op's arguments; the op then calls it directly (torch_npu's
fused attention, whose backward torch_npu registers itself).

``lora_linear_forward`` / ``lora_linear_backward`` live here only: ATen's GEMMs serve that op on
every device, so no backend is chosen for it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_kernels import registry

Tensor = torch.Tensor


def not_supported_reasons(op: str, inputs: registry.Inputs) -> list[str]:
    """The PyTorch path serves every op on every device and floating dtype (bool attention masks too)."""
    return [
        f"dtype {t.dtype} is not a floating point type"
        for t in (*inputs.data, *inputs.others)
        if not (t.is_floating_point() or t.dtype == torch.bool)
    ]


# ----------------------------------------------------------------------------------------- GEGLU
def geglu_forward(x: Tensor, approximate: str) -> Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def geglu_backward(grad_out: Tensor, x: Tensor, approximate: str) -> Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    grad_hidden = grad_out * F.gelu(gate, approximate=approximate)
    grad_gate = torch.ops.aten.gelu_backward(grad_out * hidden, gate, approximate=approximate)
    return torch.cat([grad_hidden, grad_gate], dim=-1)


# ------------------------------------------------------------------------------ GroupNorm + SiLU
_HALF = (torch.float16, torch.bfloat16)


def group_norm_silu_stat_dtype(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> torch.dtype:
    """The dtype of the mean/rstd :func:`group_norm_silu_forward` returns, which is the dtype its
    backward needs them in.

    On the CPU, half-precision input goes through ATen's "mixed type" path (float32 affine
    parameters), which keeps the statistics in float32: precise, and what stock ``F.group_norm``
    does there under autocast. Elsewhere they are in ``x``'s dtype, as ATen's GroupNorm returns
    them: CUDA's backward kernel and aclnnGroupNormBackward (mean/rstd "same dtype as gradOut")
    refuse float32 statistics with a half-precision gradient.
    """
    return torch.float32 if x.device.type == "cpu" and x.dtype in _HALF else x.dtype


def _native_param(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return param if param is None or param.dtype == dtype else param.to(dtype)


def _group_norm_sizes(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x.numel() // max(n * c, 1)


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # ATen's vectorised GroupNorm (any memory format), then SiLU in place on its fresh output: the
    # two ATen ops of stock F.silu(F.group_norm(...)).
    dtype = group_norm_silu_stat_dtype(x)
    weight, bias = _native_param(weight, dtype), _native_param(bias, dtype)
    if dtype != x.dtype and weight is None and bias is None:
        # ATen takes the mixed-type path only with a float32 parameter present: one small [C] tensor.
        weight = torch.ones(x.shape[1], dtype=dtype, device=x.device)
    out, mean, rstd = torch.native_group_norm(_as_4d(x), weight, bias, *_group_norm_sizes(x), num_groups, eps)
    return _like(F.silu(out, inplace=True), x), mean, rstd


def _pre_activation(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, num_groups: int) -> Tensor:
    """``y = (x - mean)·rstd·w + b``, the GroupNorm output SiLU saw, recomputed from the saved
    statistics (the one recompute: stock autograd keeps this full-size tensor for SiLU's backward).

    Three ATen ops: ``x - mean`` (centred first: folding the mean into a shift cancels badly when
    |mean|·rstd is large), ``rstd·w`` on an ``[N, G, C/G]`` block, and one ``addcmul``/``mul``.
    Grouped views stand in for ``repeat_interleave``: ``x`` as ``[N, G, C/G, *spatial]``.
    """
    n, c = x.shape[:2]
    spatial = (1,) * (x.dim() - 2)
    stat_shape, param_shape = (n, num_groups, 1, *spatial), (num_groups, c // num_groups, *spatial)
    centred = x.view(n, num_groups, c // num_groups, *x.shape[2:]) - mean.view(stat_shape)
    scale = rstd.view(stat_shape) if weight is None else rstd.view(stat_shape) * weight.view(param_shape)
    y = centred.mul_(scale) if bias is None else torch.addcmul(bias.view(param_shape), centred, scale)
    return y.flatten(1, 2)


def group_norm_silu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward from the saved statistics: recompute y = (x - mean)·rstd·w + b, never the mean/rstd.

    The statistics go to ATen's backward as given, in the dtype :func:`group_norm_silu_forward`
    returns them (:func:`group_norm_silu_stat_dtype`).
    """
    return group_norm_silu_backward_in(
        group_norm_silu_stat_dtype(x), grad_out, x, weight, bias, mean, rstd, num_groups
    )


def group_norm_silu_backward_in(
    param_dtype: torch.dtype,
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`group_norm_silu_backward` with ATen's ``gamma`` in ``param_dtype``, the dtype of
    ``mean``/``rstd``: float32 on the CPU's mixed-type path; the gradient's dtype for a device whose
    backward wants every operand in it (CUDA; aclnnGroupNormBackward on Ascend)."""
    x_in, x = x, _as_4d(x)
    if grad_out.dim() != 4:
        grad_out = grad_out.reshape(x.shape)
    y = _pre_activation(x, weight, bias, mean, rstd, num_groups)
    if y.dtype != x.dtype:  # mixed dtypes made y float32; SiLU's backward must give dY in x's dtype
        y = y.to(x.dtype)
    # ATen's GroupNorm backward wants the gradient in the input's memory format.
    grad_y = torch.ops.aten.silu_backward(grad_out, y)
    if not grad_y.is_contiguous(memory_format=_memory_format(x)):
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    gamma = _native_param(weight, param_dtype)
    if gamma is None and bias is not None:  # ATen allocates the bias gradient like gamma: it needs one
        gamma = torch.ones(x.shape[1], dtype=param_dtype, device=x.device)
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
        grad_y, x, mean, rstd, gamma, *_group_norm_sizes(x), num_groups, [True, weight is not None, bias is not None]
    )
    return (
        _like(grad_x, x_in),
        grad_weight if weight is None or grad_weight.dtype == weight.dtype else grad_weight.to(weight.dtype),
        grad_bias if bias is None or grad_bias.dtype == bias.dtype else grad_bias.to(bias.dtype),
    )


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _as_4d(x: Tensor) -> Tensor:
    """``x`` as ``[N, C, S, 1]`` (a view for contiguous and channels-innermost inputs of any rank),
    in a layout ATen's GroupNorm takes: contiguous or channels_last. Channels-innermost 3-D/5-D
    inputs thereby keep their layout (ATen's kernel takes channels_last in 4-D only); any other
    layout is copied once, as stock ``F.group_norm`` does."""
    if x.dim() == 4:
        x4 = x
    elif _channels_innermost(x):
        n, c = x.shape[:2]
        spatial = x.numel() // max(n * c, 1)
        x4 = x.as_strided((n, c, spatial, 1), (spatial * c, 1, c, c))  # same memory, canonical strides
    else:
        x4 = x.reshape(x.shape[0], x.shape[1], -1, 1)
    # ATen's kernel reads the layout from every stride, size-1 dimensions included, and a size-1 dimension
    # may carry any stride (a batch of one after a transpose and reshape: the VAE attention's output).
    n, c, h, w = x4.shape
    if _memory_format(x4) == torch.channels_last:
        # Not channels-last to ATen unless canonical: stock F.group_norm then copies it to contiguous, as here.
        return x4 if x4.stride() == (h * w * c, 1, w * c, c) else x4.contiguous()
    if not x4.is_contiguous():
        return x4.contiguous()
    strides = (c * h * w, h * w, w, 1)
    return x4 if x4.stride() == strides else x4.as_strided(x4.shape, strides)  # same memory, canonical strides


def _like(t4: Tensor, x: Tensor) -> Tensor:
    """A result of :func:`_as_4d`'s shape back in ``x``'s shape (and strides, where they match)."""
    if x.dim() == 4:
        return t4
    if _channels_innermost(x) and t4.is_contiguous(memory_format=torch.channels_last):
        return t4.as_strided(x.shape, x.stride())
    return t4.view(x.shape)


def _channels_innermost(x: Tensor) -> bool:
    """Dense with the channels innermost (channels_last of any rank), checked on strides alone."""
    if x.dim() < 3 or x.stride(1) != 1:
        return False
    expected = x.shape[1]
    for d in range(x.dim() - 1, 1, -1):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return x.shape[0] == 1 or x.stride(0) == expected


# ------------------------------------------------------------------------------------- attention
def _use_cpu_flash(q: Tensor, v: Tensor) -> bool:
    """ATen's CPU flash-attention kernel returns (out, logsumexp): exactly our forward contract.
    It needs v's head dim equal to q's; the math path below takes any."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and q.shape[-1] == v.shape[-1]
    )


def _scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    return scores


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    if _use_cpu_flash(q, v):
        # ATen's own CPU flash kernel: the one ATen op that returns (out, logsumexp) on the CPU.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(  # noqa: SLF001
            q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
        )
        # float32 logsumexp (float64 for float64 inputs); a plain conditional, because
        # torch.promote_types is itself a dispatched ATen op.
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    # Math path for other devices: materialises one [B, H, Sq, Skv] score block, saves nothing.
    scores = _scores(q, k, attn_mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    # A fully masked row has lse = -inf: subtracting 0 instead gives it zero probabilities, so its
    # output and gradients are zeros (the CPU flash kernel's and the Triton kernels' convention).
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
    return out, lse


def flash_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _use_cpu_flash(q, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(  # noqa: SLF001
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=attn_mask, scale=scale
        )
    # FlashAttention's backward in matrix form: recompute P from the saved logsumexp.
    acc = torch.promote_types(q.dtype, torch.float32)
    probs = torch.exp(_scores(q, k, attn_mask, scale) - lse.to(acc).nan_to_num(neginf=0.0).unsqueeze(-1))
    grad_out_acc = grad_out.to(acc)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out_acc)
    grad_probs = torch.matmul(grad_out_acc, v.to(acc).transpose(-1, -2))
    delta = (grad_out_acc * out.to(acc)).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = torch.matmul(grad_scores, k.to(acc))
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.to(acc))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


# Short key/value sequences need no special kernel in PyTorch: the same maths serves them.
cross_attention_forward = flash_attention_forward
cross_attention_backward = flash_attention_backward


# ---------------------------------------------------------------------------------- LoRA linear
def _as_2d(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def lora_linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, x Aᵀ, x as 2-D)``: three GEMMs, the LoRA update accumulated into the base output in
    place through ``addmm_``'s ``alpha``. The 2-D ``x`` (a view of ``x`` unless flattening copied
    it) is what the eager backward saves: it spares the backward a reshape."""
    x2d = _as_2d(x)
    out = torch.addmm(bias, x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
    xa = torch.mm(x2d, lora_A.t())
    out.addmm_(xa, lora_B.t(), alpha=scale)
    return (out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])), xa, x2d


def lora_linear_backward(
    grad_out: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
    needs_input_grad: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for (x, weight, bias, lora_A, lora_B); ``None`` where ``needs_input_grad`` says no.
    ``x`` may be the forward's input or its 2-D form; ``grad x`` has ``grad_out``'s leading shape.

    With ``u = grad · B``: grad x = grad·W + scale·u·A, grad A = scale·uᵀ·x, grad B = scale·gradᵀ·(x Aᵀ).
    ``addmm`` with ``beta=0`` ignores its first argument (any tensor of the output's shape), which
    folds the scale into the GEMM without a separate multiply.
    """
    need_x, need_w, need_b, need_a, need_bb = needs_input_grad[:5]
    x2d, g2d = _as_2d(x), _as_2d(grad_out)
    grad_x = grad_w = grad_b = grad_a = grad_bb = None
    if need_x or need_a:
        u = torch.mm(g2d, lora_B)
        if need_x:
            grad_x = torch.mm(g2d, weight).addmm_(u, lora_A, alpha=scale)
            grad_x = grad_x if grad_out.dim() == 2 else grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        if need_a:
            grad_a = torch.addmm(lora_A, u.t(), x2d, beta=0, alpha=scale)
    if need_bb:
        grad_bb = torch.addmm(lora_B, g2d.t(), xa, beta=0, alpha=scale)
    if need_w:  # an unfrozen base weight (not the LoRA recipe, but the op stays correct)
        grad_w = torch.mm(g2d.t(), x2d)
    if need_b:  # needs_input_grad is False for an absent bias
        grad_b = g2d.sum(0)
    return grad_x, grad_w, grad_b, grad_a, grad_bb


# ---------------------------------------------------------------------------------- DoRA linear
# Here only, as lora_linear's kernels: ATen's GEMMs serve it on every device.
def dora_linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
    weight_norm: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, x Aᵀ, y, x as 2-D)`` with ``y = x Wᵀ + scale·(x Aᵀ) Bᵀ`` (lora_linear's GEMMs, without
    the bias) and ``out = b + (magnitude / weight_norm)·y``, the scale per output feature. ``y`` is
    what the magnitude's gradient reads."""
    y, xa, x2d = lora_linear_forward(x, weight, None, lora_A, lora_B, scale)
    column_scale = (magnitude / weight_norm).to(y.dtype)
    out = torch.addcmul(bias, y, column_scale) if bias is not None else y * column_scale
    return out, xa, y, x2d


def dora_linear_backward(
    grad_out: Tensor, x: Tensor, xa: Tensor, y: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
    magnitude: Tensor, weight_norm: Tensor, scale: float, needs_input_grad: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients for (x, weight, bias, lora_A, lora_B, magnitude); ``weight_norm`` is a constant
    (PEFT detaches it, as the DoRA paper's section 4.3 says). The gradient reaching ``y`` is
    ``grad·(magnitude / weight_norm)``, from which lora_linear's backward gives x, W, A and B;
    grad magnitude = Σ_rows grad·y / weight_norm, summed in float32 at least."""
    need_b, need_m = needs_input_grad[2], needs_input_grad[5]
    column_scale = (magnitude / weight_norm).to(grad_out.dtype)
    grad_y = grad_out * column_scale
    grad_x, grad_w, _, grad_a, grad_bb = lora_linear_backward(
        grad_y, x, xa, weight, lora_A, lora_B, scale, (*needs_input_grad[:2], False, *needs_input_grad[3:5])
    )
    g2d = _as_2d(grad_out)
    grad_b = g2d.sum(0) if need_b else None
    grad_m = None
    if need_m:
        acc = torch.promote_types(weight_norm.dtype, torch.float32)
        grad_m = ((g2d * _as_2d(y)).sum(0, dtype=acc) / weight_norm).to(magnitude.dtype)
    return grad_x, grad_w, grad_b, grad_a, grad_bb, grad_m
