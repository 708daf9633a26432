"""DoRA projection: ``b + (m / ‖W + s·B A‖_row) · (x Wᵀ + s·(x Aᵀ) Bᵀ)`` as one autograd node.

PEFT's DoRA (``LoraConfig(use_dora=True)``, ``peft/tuners/lora/dora.py``) builds ``B A`` from an
identity matrix, materialises ``W + s·B A`` ([out, in], the size of the base weight) at every call to
take its row norms, and runs the base linear, the LoRA GEMMs and half a dozen elementwise ops as
separate autograd nodes. With the base weight frozen the row norms need far less:

    ‖W_i + s(B A)_i‖² = ‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ

that is the cached ``‖W_i‖²``, one rank-r GEMM (``W Aᵀ``) and r×r algebra (:func:`dora_weight_norm`).
The projection itself is lora_linear's three GEMMs plus one scale per output feature.

PEFT's semantics are kept: the norm is detached (a constant in the backward, the DoRA paper's section
4.3), the magnitude vector gets a gradient, the bias is not scaled. PEFT writes the output as
``base + (m/n - 1)·(base - b) + (m/n)·s·lora``, which equals ``b + (m/n)·(x Wᵀ + s·lora)`` when the
base and LoRA branches see the same ``x``; with LoRA dropout active in training they do not, and
``npu_kernels.peft_lora`` then runs PEFT's own forward.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from npu_kernels.ops._build import autocast_operands, build, tracing
from npu_kernels.ops.lora_linear import _check
from npu_kernels.registry import DoraLinearInputs, OpSpec

Tensor = torch.Tensor

# weight -> (what it was computed from, ‖W_i‖²). Keyed by the tensor's identity and checked against
# its version counter and storage, so an optimizer step, load_state_dict or a replaced ``.data``
# invalidates the entry (an in-place write through ``weight.data`` bypasses the version counter and
# is not seen: PEFT and diffusers replace ``.data`` rather than write into it).
_SQUARED_ROW_NORMS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _norm_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 where an operand is float64: the norm never computes in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _squared_row_norms(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``‖W_i‖²`` per output row in ``dtype``, computed once per weight value."""
    if tracing() or weight.is_inference():  # no version counter to key on: compute it
        return torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
    key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, weight.shape, dtype)  # noqa: SLF001
    cached = _SQUARED_ROW_NORMS.get(weight)
    if cached is not None and cached[0] == key:
        return cached[1]
    squared = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
    _SQUARED_ROW_NORMS[weight] = (key, squared)
    return squared


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``‖W_i + scale·(B A)_i‖`` for every output row ``i``, detached, in float32 (float64 for float64
    operands), without forming ``B A``: the cached ``‖W_i‖²``, ``W Aᵀ`` (in the weight's dtype, one
    rank-r GEMM) and r×r algebra, outside autocast."""
    dtype = _norm_dtype(weight, lora_A, lora_B)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        weight_a = torch.mm(weight, lora_A.to(weight.dtype).t()).to(dtype)  # W Aᵀ [out, r]
        # t = 2·W Aᵀ + s·B (A Aᵀ), so that ‖W_i + s(BA)_i‖² = ‖W_i‖² + s·t_i·B_i
        t = torch.addmm(weight_a, lora_B, torch.mm(lora_A, lora_A.t()), beta=2, alpha=scale)
        squared = torch.add(_squared_row_norms(weight, dtype), torch.linalg.vecdot(t, lora_B), alpha=scale)
        return squared.clamp_min_(0).sqrt_()  # rounding may leave a zero row's square slightly negative


def _validate(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale) -> tuple:
    # The norm from the parameters as stored (PEFT computes it from them in lora_A's dtype, not in
    # autocast's); then every GEMM operand is cast as lora_linear casts them. The magnitude keeps its
    # dtype: the per-feature scale is computed in float32 and its gradient returned in its dtype.
    raw = (weight, lora_A, lora_B)
    x, weight, bias, lora_A, lora_B = autocast_operands(x, weight, bias, lora_A, lora_B)
    try:
        _check(x, weight, bias, lora_A, lora_B)
    except ValueError as error:  # lora_linear's checks, named after this op
        raise ValueError(str(error).replace("lora_linear:", "dora_linear:", 1)) from None
    if magnitude.shape != (weight.shape[0],) or not magnitude.is_floating_point() or magnitude.device != x.device:
        raise ValueError(
            f"dora_linear: magnitude must be a floating [out] vector on {x.device}; got {tuple(magnitude.shape)} "
            f"{magnitude.dtype} on {magnitude.device} for weight {tuple(weight.shape)}"
        )
    if weight_norm is None:
        weight_norm = dora_weight_norm(*raw, scale)
    return x, weight, bias, lora_A, lora_B, magnitude, weight_norm, float(scale)


def _fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(out_shape), x.new_empty((rows, lora_A.shape[0])), x.new_empty(out_shape)


_DORA_LINEAR = build(OpSpec(
    name="dora_linear",
    inputs=DoraLinearInputs,
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude,"
        " Tensor weight_norm, float scale) -> (Tensor out, Tensor xa, Tensor y)"
    ),
    forward_kernel="dora_linear_forward",
    backward_kernel="dora_linear_backward",
    backward_schema=(
        "(Tensor grad_out, Tensor x_2d, Tensor xa, Tensor y, Tensor weight, Tensor lora_A, Tensor lora_B,"
        " Tensor magnitude, Tensor weight_norm, float scale, bool[] needs_input_grad) -> (Tensor grad_x,"
        " Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_A, Tensor grad_lora_B, Tensor grad_magnitude)"
    ),
    # lora_linear's x and rank-r x·Aᵀ, plus y = x Wᵀ + s·x Aᵀ Bᵀ for the magnitude's gradient
    # (recomputing it would cost a full-size GEMM); the weights and vectors are resident anyway.
    saves=("x_2d", "xa", "y", "weight", "lora_A", "lora_B", "magnitude", "weight_norm"),
    kernel_returns=("out", "xa", "y", "x_2d"),
    custom_op_saves=("x", "xa", "y", "weight", "lora_A", "lora_B", "magnitude", "weight_norm"),
    validate=_validate,
    fake=_fake,
    fixed_backend="torch",  # ATen's GEMMs on every device, as lora_linear
    backward_is_custom_op=False,
))
# The custom op (what torch.compile sees), for opcheck.
_dora_linear = _DORA_LINEAR.custom_op


def dora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scale: float
) -> Tensor:
    """PEFT's DoRA linear layer, ``b + (m / ‖W + s·B A‖_row)·(x Wᵀ + s·(x Aᵀ) Bᵀ)``, as one autograd node.

    Args:
        x: ``[..., in]``.
        weight: ``[out, in]``, the frozen base weight (it gets a gradient only if it requires one).
        bias: ``[out]`` or ``None`` (never scaled).
        lora_A: ``[r, in]``; lora_B: ``[out, r]`` (PEFT's ``lora_A``/``lora_B`` ``.weight``).
        magnitude: ``[out]``, PEFT's ``lora_magnitude_vector[name].weight``.
        scale: PEFT's ``scaling`` (``lora_alpha / r``).

    Returns:
        ``[..., out]``. The row norms are detached (no gradient flows through them, as in PEFT)
        and computed in float32 without forming ``B A`` (:func:`dora_weight_norm`; ``‖W_i‖²`` is
        cached per weight value). Under autocast the GEMM operands are cast to the autocast dtype as
        :func:`npu_kernels.lora_linear` casts them; otherwise they must share one dtype. The backward
        keeps ``x``, the rank-r ``x Aᵀ`` and the pre-scale output.
    """
    return _DORA_LINEAR(x, weight, bias, lora_A, lora_B, magnitude, None, scale)
