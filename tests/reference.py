"""Float64 reference maths for the ops and THE per-element tolerance check against it.

Every float64-referenced comparison in the tests goes through :func:`assert_close`:

    |got - ref| <= rtol * |ref| + k * RMS(ref)        for every element,

with ``rtol`` and ``k`` per dtype (:data:`TOLERANCES`). The relative term covers the rounding of each
value; the absolute term, scaled to the reference tensor's root mean square, covers the
cancellation in sums (attention's dot products, GroupNorm's statistics and gradients), whose error
scales with the size of the terms rather than of the result. A wrong element, even a small one,
fails: unlike a bound relative to the tensor's largest value, one element cannot hide behind
another's magnitude. NaN and inf never pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``(rtol, k)`` per dtype, for ``|got - ref| <= rtol * |ref| + k * RMS(ref)``. The reference is
#: computed on the same (rounded) inputs, so these bound the kernels' own arithmetic: rtol is a few
#: units of rounding of the dtype (fp16 2^-11, bf16 2^-8 at half an ulp); k is about twice the worst
#: k the op tests needed on the PyTorch, Triton-interpreter and NPU stand-in backends (attention
#: gradients and GroupNorm's input gradient set it). A 1% error in one element of typical size fails
#: in fp32 and fp16; in bf16 that is about one rounding step, which no test can tell from rounding.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 4e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def geglu(x, approximate="none"):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def attention(q, k, v, attn_mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask.to(scores.device), float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.device, scores.dtype)
    return torch.softmax(scores, dim=-1) @ v


def run_with_grads(fn, inputs, grad_out_seed=1234):
    """Run ``fn`` and backpropagate a fixed random cotangent; return (output, grads of float inputs).

    The cotangent is drawn in float64 on the CPU, then cast: the same values for a kernel on any
    device and dtype and for its float64 reference.
    """
    out = fn(*inputs)
    generator = torch.Generator().manual_seed(grad_out_seed)
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, differentiable, cotangent)
    return out, grads


def as_float64_leaves(tensors):
    """Detached float64 copies on the CPU that require grad (bool masks and None pass through)."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(t.detach().cpu().double().requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    what: str = "",
    *,
    rtol: float | None = None,
    k: float | None = None,
    scale: float | None = None,
) -> None:
    """Per element, ``|actual - expected| <= rtol * |expected| + k * RMS(expected)``.

    Args:
        actual: the kernel's result (any device and dtype).
        expected: the reference, normally float64 maths on the same rounded inputs.
        dtype: the dtype whose :data:`TOLERANCES` apply (default ``actual.dtype``): the precision the
            kernel computed in, which for float32 statistics of fp16 inputs is the input's.
        what: names the tensor in the failure message.
        rtol, k: override the dtype's values (only where a test says why).
        scale: the magnitude ``k`` multiplies instead of ``RMS(expected)``, for a result that
            cancels to almost nothing in exact maths (e.g. GroupNorm's input gradient over groups of
            two values): the rounding of its terms, not the result, then sets the error.
    """
    dtype = actual.dtype if dtype is None else dtype
    default_rtol, default_k = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    k = default_k if k is None else k
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    got = actual.detach().cpu().double()
    ref = expected.detach().cpu().double()
    assert torch.isfinite(ref).all(), f"{what}: the reference itself is not finite"
    bad = ~torch.isfinite(got)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {index}: {got[index].item()}")
    if ref.numel() == 0:
        return
    rms = ref.square().mean().sqrt().item() if scale is None else scale
    atol = k * max(rms, torch.finfo(torch.float32).tiny)
    error = (got - ref).abs()
    bound = rtol * ref.abs() + atol
    ratio = (error / bound).reshape(-1)
    worst = int(ratio.argmax())
    if ratio[worst] > 1:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
        raise AssertionError(
            f"{what}: {int((ratio > 1).sum())} of {ref.numel()} elements out of tolerance; worst at {index}: "
            f"got {got[index].item():.6g}, expected {ref[index].item():.6g}, error {error[index].item():.3g} > "
            f"{rtol:g} x |expected| + {k:g} x RMS {rms:.3g} = {bound[index].item():.3g}"
        )


def check_against_reference(op, reference, inputs, dtype, what="", *, rtol=None, k=None):
    """Forward and backward of ``op`` on ``inputs`` vs ``reference`` in float64 on the same values,
    each output and gradient judged by :func:`assert_close` (``rtol``/``k`` override the dtype's)."""
    out, grads = run_with_grads(op, inputs)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype} != {dtype}"
    ref_out, ref_grads = run_with_grads(reference, as_float64_leaves(inputs))
    assert_close(out, ref_out, dtype, f"{what} forward", rtol=rtol, k=k)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_close(g, rg, dtype, f"{what} grad {i}", rtol=rtol, k=k)


def _relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.double() - exact.double()).norm() / exact.double().norm()).item()


def assert_as_accurate_as_stock(ours: dict, stock: dict, exact: dict) -> None:
    """Two low-precision runs (bf16; or fp32, deep enough that summation order shows), judged against a more
    exact run ``exact`` (fp32; float64) by stock's own error there (tensor name -> tensor). Tensors are
    grouped (lora_A, lora_B, the rest); ``r`` is stock's pooled relative error over the tensor's group:

    * per group: ours' pooled relative error at most 1.25x stock's + 4e-3, as tests/test_cuda.py bounds each
      tensor on a GPU; pooled, the per-tensor chance that either run rounds luckier averages out (measured:
      ours 0.98x-1.11x stock's, a 10% error in every lora_A gradient 2.4x);
    * per tensor: a relative error at most 4x stock's, or 4x ``r`` where stock's was luckier than its group's,
      + 1e-2 (a whole layer off);
    * per element: ``|ours - exact| <= |stock - exact| + 16·RMS(stock - exact) + 4·r·|exact|``: no element may be
      off by much more than stock's typical rounding error of that tensor (bf16 errors are heavy-tailed: the
      worst element of a correct run reached ~11x that RMS), nor by much more than the group's typical
      relative error of its own size.

    Why the group's error: a LoRA gradient's error is mostly the error of the gradient flowing into the layer,
    one factor per rank row, so a row's elements are off together; across a UNet's 1120 LoRA tensors in bf16 the
    unluckiest row of one run is some 10% off while the other run's is 1% (measured both ways round on an AMD
    EPYC: 60x and 19x stock's per-tensor error RMS), and judging one tensor by the other run's luck alone
    fails a correct run. A layer whose gradient is wrong (scaled, zeroed) is still off by far more than 4x
    its group's error, and a systematic error shows in the pooled bound.
    """
    assert ours.keys() == stock.keys() == exact.keys() and ours
    groups: dict[str, list[str]] = {}
    for name in exact:
        groups.setdefault("lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "other", []).append(name)
    for group, names in groups.items():
        norm = sum(exact[n].double().square().sum() for n in names).sqrt()
        ours_rel = (sum((ours[n].double() - exact[n].double()).square().sum() for n in names).sqrt() / norm).item()
        stock_rel = (sum((stock[n].double() - exact[n].double()).square().sum() for n in names).sqrt() / norm).item()
        for name in names:
            _assert_tensor_as_accurate(name, ours[name], stock[name], exact[name], group_rel=stock_rel)
        assert ours_rel <= 1.25 * stock_rel + 4e-3, f"{group}: pooled relative error {ours_rel:.3g} vs stock's {stock_rel:.3g}"


def _assert_tensor_as_accurate(name: str, ours: torch.Tensor, stock: torch.Tensor, exact: torch.Tensor,
                               group_rel: float) -> None:
    """The per-element and per-tensor bounds of :func:`assert_as_accurate_as_stock` for one tensor."""
    ours_t, stock_t, exact_t = ours.double(), stock.double(), exact.double()
    assert torch.isfinite(ours_t).all(), f"{name}: non-finite values"
    stock_error = (stock_t - exact_t).abs()
    bound = stock_error + 16 * stock_error.square().mean().sqrt() + 4 * group_rel * exact_t.abs()
    error = (ours_t - exact_t).abs()
    assert (error <= bound).all(), (
        f"{name}: {int((error > bound).sum())} elements beyond stock's error; worst "
        f"{(error - bound).max().item():.3g} over the bound"
    )
    ours_rel, stock_rel = _relative_error(ours_t, exact_t), _relative_error(stock_t, exact_t)
    assert ours_rel <= 4 * max(stock_rel, group_rel) + 1e-2, f"{name}: relative error {ours_rel:.3g} vs stock's {stock_rel:.3g}"
