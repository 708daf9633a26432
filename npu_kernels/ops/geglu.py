"""GEGLU: ``x[..., :H] * gelu(x[..., H:])``, the layout and erf GELU of diffusers' ``GEGLU``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_kernels import backends
from npu_kernels.backends import pytorch
from npu_kernels.ops import _recompute
from npu_kernels.ops._build import autocast_operands, build, needs_grad, tracing
from npu_kernels.registry import GegluInputs, OpSpec

Tensor = torch.Tensor
_APPROXIMATIONS = ("none", "tanh")


def _validate(x: Tensor, approximate: str) -> tuple:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension must be even (2*H), got shape {tuple(x.shape)}")
    return x, approximate


_GEGLU = build(OpSpec(
    name="geglu",
    inputs=GegluInputs,
    schema="(Tensor x, str approximate) -> Tensor out",
    forward_kernel="geglu_forward",
    backward_kernel="geglu_backward",
    backward_schema="(Tensor grad_out, Tensor x, str approximate) -> Tensor grad_x",
    saves=("x",),  # the input is all the backward needs: GELU is recomputed
    validate=_validate,
    fake=lambda x, approximate, backend: x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,)),
    plain_maths=pytorch.geglu_forward,  # the PyTorch kernel is plain differentiable maths already
))


def geglu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gated GELU of a projection output ``x[..., 2H]``: ``x[..., :H] * gelu(x[..., H:])``.

    Args:
        x: ``[..., 2H]`` floating tensor, e.g. the output of diffusers' ``GEGLU.proj``.
        approximate: ``"none"`` (erf GELU, what diffusers uses) or ``"tanh"``.

    Returns:
        ``[..., H]`` tensor of ``x``'s dtype.
    """
    return _GEGLU(x, approximate)


# ------------------------------------------------------------------- with its frozen projection
class _EagerGegluProjection(torch.autograd.Function):
    """``geglu(x Wᵀ + b)`` with W, b frozen, saving ``x`` instead of the projection output.

    The projection output is 2·inner wide (8x the model width in diffusers' FeedForward): the
    largest activation of a transformer block. The backward recomputes it with the same GEMM on the
    same (autocast-cast) operands, so the values match the saving path exactly. With ``keep_gate``
    the gate half is kept (a copy, so that the whole projection is freed) and only the hidden half
    is recomputed: half the saving for half the GEMM.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, approximate: str, keep_gate: bool):
        ctx.input_dtype = x.dtype
        x, weight, bias = autocast_operands(x, weight, bias)
        projection = F.linear(x, weight, bias)
        ctx.backend = backends.select("geglu", projection)
        fused = backends.provided(ctx.backend, "geglu")  # e.g. torch_npu's npu_geglu (grad mode is off in here)
        out = fused(projection, approximate) if fused is not None else backends.kernel(ctx.backend, "geglu_forward")(projection, approximate)
        ctx.approximate = approximate
        # clone, not contiguous(): a view that counts as contiguous (one row) would keep the whole projection
        gate = projection[..., projection.shape[-1] // 2:].clone(memory_format=torch.contiguous_format) if keep_gate else None
        to_save, ctx.rebuild = _recompute.pack((x, weight, bias))  # x: a LayerNorm output is saved as its input
        ctx.save_for_backward(*to_save, gate)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, gate = ctx.saved_tensors
        x, weight, bias = _recompute.unpack(tuple(saved), ctx.rebuild)
        if gate is None:
            projection = F.linear(x, weight, bias)  # the forward's GEMM again
        else:  # the hidden half's rows of the same GEMM (the same values on the backends we test: tests/ops/test_geglu.py)
            hidden = gate.shape[-1]
            projection = torch.cat((F.linear(x, weight[:hidden], None if bias is None else bias[:hidden]), gate), dim=-1)
        grad_projection = backends.kernel(ctx.backend, "geglu_backward")(grad_out, projection, ctx.approximate)
        grad_x = torch.matmul(grad_projection, weight)
        return (grad_x if grad_x.dtype == ctx.input_dtype else grad_x.to(ctx.input_dtype)), None, None, None, None


def geglu_projection(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none", keep_gate: bool = False
) -> Tensor:
    """``geglu(F.linear(x, weight, bias), approximate)`` that keeps ``x`` for the backward instead of
    the projection output, and recomputes the projection there (one more GEMM per backward).
    With ``keep_gate`` it keeps the gate half too and recomputes only the hidden half (half the
    bytes saved, half the extra GEMM).

    For diffusers' ``GEGLU`` with a frozen ``proj`` (LoRA training): its output, ``[..., 2·inner]``,
    is the largest tensor a transformer block saves; ``x`` is 8x narrower in SDXL. Where the
    projection is trainable, autograd records nothing, or ``torch.compile`` traces (its own memory
    planning decides there), this is exactly ``geglu(F.linear(x, weight, bias), approximate)``.

    Args:
        x: ``[..., in]``.
        weight: ``[2·H, in]``; bias: ``[2·H]`` or ``None``.
        approximate: ``"none"`` (erf GELU, diffusers) or ``"tanh"``.
        keep_gate: keep the gate half ``[..., H]`` and recompute only ``x @ weight[:H]ᵀ``.

    Returns:
        ``[..., H]``.
    """
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"geglu_projection: approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    if weight.dim() != 2 or weight.shape[0] % 2 or x.shape[-1:] != weight.shape[1:]:
        raise ValueError(
            f"geglu_projection: need x [..., in] and weight [2*H, in], got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if tracing() or not frozen or not needs_grad(x):
        return geglu(F.linear(x, weight, bias), approximate)
    return _EagerGegluProjection.apply(x, weight, bias, approximate, keep_gate)
