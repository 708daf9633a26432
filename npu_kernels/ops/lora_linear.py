"""LoRA projection: ``x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` as one autograd node.

PEFT's ``lora.Linear`` runs the base linear, ``lora_A``, ``lora_B``, a multiply and an add as
separate autograd nodes (about five ops forward and nine backward, more under autocast), and keeps
``x`` once per linear that reads it. This op runs three GEMMs forward (the LoRA update lands in the
base output through ``addmm_``'s ``alpha``) and five backward (scales folded into ``alpha`` again),
and saves ``x`` once plus the rank-r ``x Aᵀ``.

There is no backend choice: ATen's GEMMs (cuBLAS, oneDNN, Ascend's matmul) serve every device, so
the op runs the PyTorch backend's ``lora_linear_forward``/``lora_linear_backward`` without any
per-call selection.
"""
from __future__ import annotations

import torch

from npu_kernels.backends.pytorch import _as_2d
from npu_kernels.ops import _recompute
from npu_kernels.ops._build import autocast_operands, build, needs_grad
from npu_kernels.registry import LoraLinearInputs, OpSpec

Tensor = torch.Tensor


def _validate(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float) -> tuple:
    # Under autocast every operand is cast first, outside the autograd node: the casts' backward
    # returns each gradient in its parameter's dtype.
    x, weight, bias, lora_A, lora_B = autocast_operands(x, weight, bias, lora_A, lora_B)
    _check(x, weight, bias, lora_A, lora_B)
    return x, weight, bias, lora_A, lora_B, float(scale)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor) -> None:
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            "lora_linear: need x [..., in], weight [out, in], lora_A [r, in], lora_B [out, r]; "
            f"got {_shapes(x, weight, bias, lora_A, lora_B)}"
        )
    out_features, in_features = weight.shape
    if (
        x.shape[-1] != in_features
        or lora_A.shape[1] != in_features
        or lora_B.shape != (out_features, lora_A.shape[0])
        or (bias is not None and bias.shape != (out_features,))
    ):
        raise ValueError(
            f"lora_linear: incompatible shapes {_shapes(x, weight, bias, lora_A, lora_B)} "
            "(need weight [out, in], lora_A [r, in], lora_B [out, r], bias [out])"
        )
    dtype, device = x.dtype, x.device
    # Plain comparisons, no generators: this runs at every call.
    if weight.dtype != dtype or lora_A.dtype != dtype or lora_B.dtype != dtype or (bias is not None and bias.dtype != dtype):
        tensors = (x, weight, lora_A, lora_B) + (() if bias is None else (bias,))
        raise ValueError(
            f"lora_linear: dtypes differ: {', '.join(str(t.dtype) for t in tensors)} (outside autocast all must match)"
        )
    if weight.device != device or lora_A.device != device or lora_B.device != device or (bias is not None and bias.device != device):
        tensors = (x, weight, lora_A, lora_B) + (() if bias is None else (bias,))
        raise ValueError(f"lora_linear: devices differ: {', '.join(str(t.device) for t in tensors)}")
    if not x.is_floating_point():
        raise ValueError(f"lora_linear: dtype {x.dtype} is not a floating point type")


def _shapes(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor) -> str:
    return (
        f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}, "
        f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
    )


def _fake(x, weight, bias, lora_A, lora_B, scale):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_A.shape[0]))


_LORA_LINEAR = build(OpSpec(
    name="lora_linear",
    inputs=LoraLinearInputs,
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale)"
        " -> (Tensor out, Tensor xa)"
    ),
    forward_kernel="lora_linear_forward",
    backward_kernel="lora_linear_backward",
    backward_schema=(
        "(Tensor grad_out, Tensor x_2d, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, float scale,"
        " bool[] needs_input_grad)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_A, Tensor grad_lora_B)"
    ),
    # x once (as the 2-D matrix the GEMMs read) and the rank-r x·Aᵀ; the weights are resident anyway.
    saves=("x_2d", "xa", "weight", "lora_A", "lora_B"),
    kernel_returns=("out", "xa", "x_2d"),
    custom_op_saves=("x", "xa", "weight", "lora_A", "lora_B"),  # a custom op's outputs cannot alias x
    validate=_validate,
    fake=_fake,
    fixed_backend="torch",
    backward_is_custom_op=False,  # plain ATen GEMMs: under torch.compile the compiler may fuse around them
))
# The custom op (what torch.compile sees), for opcheck.
_lora_linear = _LORA_LINEAR.custom_op


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float
) -> Tensor:
    """``x Wᵀ + b + scale · (x Aᵀ) Bᵀ``: a linear layer with a LoRA update, as one autograd node.

    Args:
        x: ``[..., in]``.
        weight: ``[out, in]`` (the frozen base weight; it gets a gradient only if it requires one).
        bias: ``[out]`` or ``None``.
        lora_A: ``[r, in]``; lora_B: ``[out, r]`` (PEFT's ``lora_A``/``lora_B`` ``.weight``).
        scale: PEFT's ``scaling`` (``lora_alpha / r``).

    Returns:
        ``[..., out]``. Under autocast every operand is cast to the autocast dtype first (as
        ``F.linear`` and PEFT's LoRA layers are); otherwise all dtypes must match. The backward
        keeps ``x`` and the rank-r ``x Aᵀ`` only.
    """
    return _LORA_LINEAR(x, weight, bias, lora_A, lora_B, scale)


# ------------------------------------------------------------- projections sharing one input
def _shared_input_forward(x: Tensor, scales: tuple[float, ...], layers) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor]:
    """Every layer's output, plus x as 2-D, ``x [A₁|A₂|...]ᵀ`` and the stacked ``A`` (the backward's)."""
    x2d = _as_2d(x)
    stacked_A = torch.cat([A for _w, _b, A, _B in layers])
    xa = torch.mm(x2d, stacked_A.t())
    outs, offset = [], 0
    for (weight, bias, lora_A, lora_B), scale in zip(layers, scales):
        out = torch.addmm(bias, x2d, weight.t()) if bias is not None else torch.mm(x2d, weight.t())
        rank = lora_A.shape[0]
        out.addmm_(xa[:, offset : offset + rank], lora_B.t(), alpha=scale)
        offset += rank
        outs.append(out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1]))
    return tuple(outs), x2d, xa, stacked_A


class _EagerSharedInputLora(torch.autograd.Function):
    """Several LoRA projections of one ``x`` (self-attention's to_q/to_k/to_v) as one node.

    One GEMM gives every ``x Aᵢᵀ`` (the ``Aᵢ`` stacked), ``x`` is saved once, and the input
    gradient accumulates in place in one buffer instead of being summed by autograd afterwards.
    Frozen base weights only (the caller checks).
    """

    @staticmethod
    def forward(ctx, x, scales, *params):
        layers = [params[i : i + 4] for i in range(0, len(params), 4)]  # (weight, bias, lora_A, lora_B)
        outs, x2d, xa, stacked_A = _shared_input_forward(x, scales, layers)
        ctx.scales, ctx.x_shape, ctx.n = scales, x.shape, len(layers)
        to_save, ctx.rebuild = _recompute.pack((x2d, xa, stacked_A, *[t for w, _b, A, B in layers for t in (w, A, B)]))
        ctx.save_for_backward(*to_save)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x2d, xa, stacked_A, *saved = _recompute.unpack(ctx.saved_tensors, ctx.rebuild)
        layers = [saved[i : i + 3] for i in range(0, len(saved), 3)]  # (weight, lora_A, lora_B)
        scales = ctx.scales
        g2ds = [_as_2d(g) for g in grads]
        # u = [g₁B₁ | g₂B₂ | ...]: one buffer, so that one GEMM serves every Aᵢ below.
        u = torch.cat([torch.mm(g2d, lora_B) for (_w, _A, lora_B), g2d in zip(layers, g2ds)], dim=1)
        blocks, offset = [], 0
        for _w, lora_A, _B in layers:
            blocks.append((offset, lora_A.shape[0]))
            offset += lora_A.shape[0]
        same_scale = all(s == scales[0] for s in scales)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2ds[0], layers[0][0])
            for (weight, _A, _B), g2d in zip(layers[1:], g2ds[1:]):
                grad_x.addmm_(g2d, weight)
            if same_scale:
                grad_x.addmm_(u, stacked_A, alpha=scales[0])
            else:
                for (_w, lora_A, _B), (start, rank), scale in zip(layers, blocks, scales):
                    grad_x.addmm_(u[:, start : start + rank], lora_A, alpha=scale)
            grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
        if same_scale:
            stacked_grad_A = torch.addmm(stacked_A, u.t(), x2d, beta=0, alpha=scales[0])
            grads_A = [stacked_grad_A[start : start + rank] for start, rank in blocks]
        else:
            grads_A = [
                torch.addmm(A, u[:, start : start + rank].t(), x2d, beta=0, alpha=scale)
                for (_w, A, _B), (start, rank), scale in zip(layers, blocks, scales)
            ]
        param_grads = []
        for (_w, _A, lora_B), g2d, (start, rank), scale, grad_A in zip(layers, g2ds, blocks, scales, grads_A):
            grad_B = torch.addmm(lora_B, g2d.t(), xa[:, start : start + rank], beta=0, alpha=scale)
            param_grads += [None, None, grad_A, grad_B]
        return grad_x, None, *param_grads


def lora_linear_shared_input(
    x: Tensor, layers: list[tuple[Tensor, Tensor | None, Tensor, Tensor, float]]
) -> tuple[Tensor, ...]:
    """``lora_linear(x, *layer)`` for each layer, as one autograd node (eager calls only).

    Every base weight and bias must be frozen (no gradient); under autocast the operands are cast
    as :func:`lora_linear` casts them. ``x`` is cast once and saved once.
    """
    if torch.is_autocast_enabled(x.device.type):
        flat = autocast_operands(x, *[t for w, b, A, B, _s in layers for t in (w, b, A, B)])
        x = flat[0]
        layers = [(*flat[1 + 4 * i : 5 + 4 * i], s) for i, (*_p, s) in enumerate(layers)]
    for weight, bias, lora_A, lora_B, _scale in layers:
        _check(x, weight, bias, lora_A, lora_B)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("lora_linear_shared_input: base weights and biases must be frozen")
    scales = tuple(float(s) for *_p, s in layers)
    params = [t for w, b, A, B, _s in layers for t in (w, b, A, B)]
    if not needs_grad(x, *params):
        return _shared_input_forward(x, scales, [p[:4] for p in layers])[0]
    return _EagerSharedInputLora.apply(x, scales, *params)
