"""Kernel-level contract of the Triton backend (``npu_kernels.backends.triton``).

GroupNorm+SiLU: both forward paths (one program per group; the split reduction) and the backward
against float64 maths, launch counts per call, no work outside the kernels, determinism without
atomics, and the launch heuristics at SDXL shapes. All kernels: launches under a device guard, and
batch·heads (or batch·groups) on grid axis 0, the one without the 65,535 limit.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``): fp32 and fp16, small awkward shapes.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

import npu_kernels.backends.triton as tk  # noqa: E402
from npu_kernels.backends.triton import _device  # noqa: E402
from npu_kernels.backends.triton import cross_attention as tk_cross  # noqa: E402
from npu_kernels.backends.triton import flash_attention as tk_flash  # noqa: E402
from npu_kernels.backends.triton import geglu as tk_geglu  # noqa: E402
from npu_kernels.backends.triton import group_norm_silu as gns  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not tk.interpreting() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Per element: |got - ref| <= RTOL·|ref| + ATOL·rms(ref) (storage rounding of inputs is in the ref).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# Weight/bias gradients are sums over N·S terms of dtype-rounded values (grad_out in fp16).
SUM_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float], what: str,
                 scale: float | None = None) -> None:
    """Per-element check against a float64 reference: ``|got - ref| <= rtol·|ref| + atol·scale``,
    ``scale`` the reference's RMS unless given. NaN/inf never pass."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got64 = got.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    rtol, atol = tol
    if scale is None:
        scale = ref64.pow(2).mean().sqrt().item() if ref64.numel() else 0.0
    bound = rtol * ref64.abs() + atol * max(scale, 1e-30)
    error = (got64 - ref64).abs()
    bad = error > bound
    if bad.any():
        i = int(torch.argmax((error / bound).flatten()))
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst "
                             f"got {got64.flatten()[i]:.6g} expected {ref64.flatten()[i]:.6g}")


def _randn(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + offset).to(device=DEVICE, dtype=dtype)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels innermost in memory, any number of spatial dims."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


# ============================================================================ GroupNorm + SiLU
@pytest.fixture
def split_path(monkeypatch):
    """Force the split (two-launch) forward with several chunks per group and several tiles per
    chunk, on small shapes."""
    monkeypatch.setattr(gns, "FIT_MAX_ELEMENTS", 0)
    monkeypatch.setattr(gns, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(gns, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(gns, "TARGET_PROGRAMS", 12)


def _gn_reference(x, groups, weight, bias, eps, grad_out):
    """float64 forward, statistics and gradients."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    # ATen's group_norm backward fails on (weight None, bias given): a constant weight of ones.
    weight64 = leaves[1] if leaves[1] is not None or bias is None else torch.ones(x.shape[1], dtype=torch.float64)
    out = F.silu(F.group_norm(leaves[0], groups, weight64, leaves[2], eps))
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.double().cpu())
    x64 = leaves[0].detach().unflatten(1, (groups, -1)).flatten(2)
    var, mean = torch.var_mean(x64, dim=-1, unbiased=False)
    return out.detach(), grads, mean, torch.rsqrt(var + eps)


def _gn_backward_from_stats(grad_out, x, weight, bias, mean, rstd, groups):
    """float64 grad_x of the kernel contract: x̂ from the *saved* fp32 mean/rstd."""
    n, c = x.shape[:2]
    x64 = x.detach().double().cpu().reshape(n, groups, -1)
    x_hat = (x64 - mean.double().cpu()[..., None]) * rstd.double().cpu()[..., None]
    per_channel = lambda p, fill: (p.double().cpu() if p is not None else torch.full((c,), fill, dtype=torch.float64))  # noqa: E731
    w = per_channel(weight, 1.0).reshape(1, groups, -1, 1)
    y = (x_hat.reshape(n, groups, c // groups, -1) * w + per_channel(bias, 0.0).reshape(1, groups, -1, 1))
    sig = torch.sigmoid(y)
    dy = grad_out.double().cpu().reshape(y.shape) * sig * (1 + y * (1 - sig))
    dx_hat = (dy * w).reshape(n, groups, -1)
    dx = rstd.double().cpu()[..., None] * (dx_hat - dx_hat.mean(-1, keepdim=True)
                                          - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True))
    return dx.reshape(x.shape)


def _check_gn(x, groups, weight, bias, eps=1e-5, grad_out=None):
    dtype = x.dtype
    grad_out = _randn(*x.shape, dtype=dtype) if grad_out is None else grad_out
    out, mean, rstd = tk.group_norm_silu_forward(x, groups, weight, bias, eps)
    ref_out, ref_grads, ref_mean, ref_rstd = _gn_reference(x, groups, weight, bias, eps, grad_out)
    assert out.dtype == dtype and out.stride() == x.stride(), "output keeps x's dtype and memory format"
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (x.shape[0], groups)
    assert_close(out, ref_out, TOL[dtype], "forward")
    # The mean's error scales with the data (fp32 sums of |x|), not with the mean itself.
    assert_close(mean, ref_mean, (1e-6, 1e-6), "mean", scale=x.detach().abs().max().item())
    assert_close(rstd, ref_rstd, (1e-5, 0.0), "rstd")

    grad_x, grad_w, grad_b = tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, groups)
    assert grad_x.dtype == dtype and grad_x.stride() == x.stride()
    ref_grads = list(ref_grads)
    assert_close(grad_x, ref_grads.pop(0), TOL[dtype], "grad_x")
    for name, param, grad in (("grad_weight", weight, grad_w), ("grad_bias", bias, grad_b)):
        if param is None:
            assert grad is None, f"{name} must be None without the parameter"
        else:
            assert grad.dtype == param.dtype and grad.shape == param.shape
            assert_close(grad, ref_grads.pop(0), SUM_TOL[dtype], name)


GN_CASES = [
    # (shape, groups, affine)           why
    ((2, 6, 5, 7), 3, "both"),          # N > 1, 2 channels per group, odd spatial
    ((1, 15, 9, 4), 3, "weight"),       # 5 channels per group (not a power of two), weight only
    ((3, 7, 13), 7, "bias"),            # one channel per group, odd channel count, 1-D spatial
    ((2, 12, 3, 2, 5), 4, "none"),      # 3-D spatial, no affine parameters
    ((2, 9), 3, "both"),                # no spatial dims at all: S = 1
]
GN_IDS = [f"{'x'.join(map(str, s))}-G{g}-{a}" for s, g, a in GN_CASES]
SPLIT_CASES = [  # with the split_path fixture's small tiles:
    ((2, 24, 5, 7), 2, "both"),         # several channel blocks per group
    ((1, 4, 20, 20), 2, "both"),        # several chunks per group AND several tiles per chunk
]
SPLIT_IDS = [f"{'x'.join(map(str, s))}-G{g}-{a}" for s, g, a in SPLIT_CASES]


def _gn_inputs(shape, affine, dtype, layout):
    x = _randn(*shape, dtype=dtype, scale=2.0, offset=3.0)  # an offset: catches E[x²] - E[x]²
    if layout == "channels_last":
        x = _channels_last(x)
    weight = _randn(shape[1], dtype=dtype) if affine in ("both", "weight") else None
    bias = _randn(shape[1], dtype=dtype) if affine in ("both", "bias") else None
    return x, weight, bias


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,affine", GN_CASES, ids=GN_IDS)
def test_group_norm_silu_one_program_path(shape, groups, affine, dtype, layout):
    assert gns.fits_one_program(shape[1] // groups, torch.Size(shape[2:]).numel())
    x, weight, bias = _gn_inputs(shape, affine, dtype, layout)
    _check_gn(x, groups, weight, bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,affine", GN_CASES + SPLIT_CASES, ids=GN_IDS + SPLIT_IDS)
def test_group_norm_silu_split_path(split_path, shape, groups, affine, dtype, layout):
    x, weight, bias = _gn_inputs(shape, affine, dtype, layout)
    plan = gns.launch_plan(shape[0], shape[1], groups, x[0, 0].numel(), layout == "channels_last", x.device)
    assert not plan.fused
    _check_gn(x, groups, weight, bias)


def test_group_norm_silu_split_plan_covers_chunks_and_tiles(split_path):
    """The forced split path really has several chunks per group and several tiles per chunk."""
    for channels_inner in (False, True):
        plan = gns.launch_plan(1, 4, 2, 400, channels_inner, torch.device("cpu"))
        assert plan.s_chunks > 1 and plan.s_blocks_per_chunk > 1, plan
        plan = gns.launch_plan(2, 24, 2, 35, channels_inner, torch.device("cpu"))
        assert plan.num_c_blocks > 1, plan


@pytest.mark.parametrize("path", ["one_program", "split"])
def test_group_norm_silu_large_mean_small_variance(path, request):
    """Mean 1000, std 0.1 in fp32: the statistics are taken about a shift, so no digit is lost."""
    if path == "split":
        request.getfixturevalue("split_path")
    x, weight, bias = _randn(2, 4, 9, 10, scale=0.1, offset=1000.0), _randn(4), _randn(4)
    out, mean, rstd = tk.group_norm_silu_forward(x, 2, weight, bias, 1e-5)
    grad_out = _randn(*x.shape)
    ref_out, _, ref_mean, ref_rstd = _gn_reference(x, 2, weight, bias, 1e-5, grad_out)
    assert_close(out, ref_out, TOL[torch.float32], "forward")
    assert_close(mean, ref_mean, (1e-7, 0.0), "mean")  # within fp32 rounding of the exact mean
    assert_close(rstd, ref_rstd, (1e-5, 0.0), "rstd")
    # The backward's x̂ comes from the saved fp32 mean (the contract): |x̂| error ~ ulp(1000)·rstd. It is
    # exact maths given those statistics.
    grad_x, _, _ = tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, 2)
    ref_gx = _gn_backward_from_stats(grad_out, x, weight, bias, mean, rstd, 2)
    assert_close(grad_x, ref_gx, TOL[torch.float32], "grad_x from the saved statistics")


def test_group_norm_silu_mixed_layouts_and_param_dtype(split_path):
    """fp16 x (channels_last) with fp32 parameters and a contiguous grad_out: each read in place."""
    x = _channels_last(_randn(2, 8, 6, 5, dtype=torch.float16))
    _check_gn(x, 4, _randn(8), _randn(8), eps=1e-6, grad_out=_randn(2, 8, 6, 5, dtype=torch.float16))


def test_group_norm_silu_other_layouts_are_copied():
    """Neither contiguous nor channels-last (a strided slice): copied once, result still right."""
    x = _randn(2, 6, 8, 14)[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out, mean, rstd = tk.group_norm_silu_forward(x, 3, None, None, 1e-5)
    assert_close(out, F.silu(F.group_norm(x.double(), 3, eps=1e-5)), TOL[torch.float32], "strided forward")
    grad_out = _randn(2, 6, 8, 7)
    grad_x, _, _ = tk.group_norm_silu_backward(grad_out, x, None, None, mean, rstd, 3)
    _, (ref_gx,), _, _ = _gn_reference(x, 3, None, None, 1e-5, grad_out)
    assert_close(grad_x, ref_gx, TOL[torch.float32], "strided grad_x")


def test_group_norm_silu_non_contiguous_parameters():
    """A strided weight view is made contiguous before the kernels read it."""
    weight = _randn(12)[::2]
    assert not weight.is_contiguous()
    _check_gn(_randn(2, 6, 3, 5), 2, weight, _randn(6))


# ---------------------------------------------------------------------------- launches per call
class _LaunchLog:
    """Replaces every ``*_kernel`` of a module with a recorder of ``kernel[grid](...)`` launches.
    The kernel itself runs with Python dispatch modes off (the interpreter's own tensor copies are
    not the wrapper's work)."""

    def __init__(self, monkeypatch, *modules, on_launch=None):
        self.launches: list[tuple[str, tuple]] = []
        self.on_launch = on_launch
        for module in modules:
            for name, kernel in list(vars(module).items()):
                if name.endswith("_kernel") and hasattr(kernel, "__getitem__"):
                    monkeypatch.setattr(module, name, self._recorder(name, kernel))

    def _recorder(self, name, kernel):
        log, on_launch = self.launches, self.on_launch

        class Recorder:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    log.append((name, tuple(grid)))
                    if on_launch is not None:
                        on_launch(name)
                    with _disable_current_modes():
                        return launch(*args, **kwargs)
                return run
        return Recorder()

    def names(self) -> list[str]:
        return [name for name, _ in self.launches]


class _AtenLog(TorchDispatchMode):
    """The ATen ops a wrapper runs itself (outside its kernel launches)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Allocation and views only: any of these is free on a GPU (no kernel launch).
_NO_LAUNCH_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
                  "reshape", "select", "slice", "expand", "permute", "as_strided", "alias", "detach", "t",
                  "transpose", "unsqueeze", "squeeze", "_reshape_alias", "lift_fresh"}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["one_program", "split"])
def test_group_norm_silu_launch_counts(monkeypatch, request, path, layout):
    """Forward: 1 launch where the group fits one program, 2 otherwise; backward: 2. Nothing else
    launches (the wrapper only allocates and views)."""
    if path == "split":
        request.getfixturevalue("split_path")
    x, weight, bias = _gn_inputs((2, 6, 5, 7), "both", torch.float32, layout)
    grad_out = _randn(2, 6, 5, 7)
    log = _LaunchLog(monkeypatch, gns)
    aten = _AtenLog()
    with aten:
        out, mean, rstd = tk.group_norm_silu_forward(x, 3, weight, bias, 1e-5)
    expected = ["_fwd_fused_kernel"] if path == "one_program" else ["_fwd_stats_kernel", "_fwd_apply_kernel"]
    assert log.names() == expected
    assert all(grid[0] == 2 * 3 for _, grid in log.launches), "batch·groups on grid axis 0"
    log.launches.clear()
    with aten:
        tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, 3)
    assert log.names() == ["_bwd_reduce_kernel", "_bwd_apply_kernel"]
    assert aten.ops <= _NO_LAUNCH_OPS, f"work outside the kernels: {sorted(aten.ops - _NO_LAUNCH_OPS)}"


def test_group_norm_silu_public_op_adds_no_launches(monkeypatch):
    """Through ``npu_kernels.group_norm_silu`` on the Triton backend (custom op + autograd), a
    forward+backward still launches 1 + 2 kernels and nothing else: the per-call cost a user pays."""
    import npu_kernels

    x = _randn(2, 6, 5, 7).requires_grad_()
    weight, bias = _randn(6).requires_grad_(), _randn(6).requires_grad_()
    grad_out = _randn(2, 6, 5, 7)
    log = _LaunchLog(monkeypatch, gns)
    aten = _AtenLog()
    with npu_kernels.use_backend("triton"), aten:
        out = npu_kernels.group_norm_silu(x, 3, weight, bias)
        out.backward(grad_out)
    assert log.names() == ["_fwd_fused_kernel", "_bwd_reduce_kernel", "_bwd_apply_kernel"]
    assert aten.ops <= _NO_LAUNCH_OPS, f"work outside the kernels: {sorted(aten.ops - _NO_LAUNCH_OPS)}"
    assert x.grad is not None and weight.grad is not None and bias.grad is not None


def test_group_norm_silu_deterministic_without_atomics(split_path):
    """No atomics in the kernels, and two runs give bitwise identical results."""
    source = inspect.getsource(gns)
    assert "tl.atomic" not in source and "atomic_add" not in source
    x, weight, bias = _gn_inputs((2, 6, 9, 11), "both", torch.float32, "contiguous")
    grad_out = _randn(2, 6, 9, 11)
    runs = []
    for _ in range(2):
        out, mean, rstd = tk.group_norm_silu_forward(x, 3, weight, bias, 1e-5)
        runs.append((out, mean, rstd) + tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, 3))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- launch heuristics (SDXL)
SDXL_SHAPES = {  # (C, H·W) of the UNet's GroupNorm+SiLU inputs, 32 groups
    "512px": [(320, 64 * 64), (640, 32 * 32), (1280, 16 * 16)],
    "1024px": [(320, 128 * 128), (640, 64 * 64), (1280, 32 * 32)],
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_silu_plan_fills_an_h100_at_batch_1(layout):
    """Split plans run >= PROGRAMS_PER_SM programs per SM at batch 1 (132 SMs); groups up to
    FIT_MAX_ELEMENTS padded elements take the one-launch path."""
    h100 = torch.device("cpu")  # off CUDA the plan assumes DEFAULT_SM_COUNT (an H100 / H200: 132)
    sms = _device.DEFAULT_SM_COUNT
    fused = []
    for channels, spatial in SDXL_SHAPES["512px"] + SDXL_SHAPES["1024px"]:
        plan = gns.launch_plan(1, channels, 32, spatial, layout == "channels_last", h100)
        if plan.fused:
            fused.append((channels, spatial))
            assert plan.block_c * plan.block_s <= gns.FIT_MAX_ELEMENTS and 4 <= plan.num_warps <= 32
        else:
            assert 32 * plan.chunks >= gns.PROGRAMS_PER_SM * sms, (channels, spatial, plan)
            assert plan.block_c * plan.block_s <= gns.TILE_ELEMENTS
        backward = gns.launch_plan(1, channels, 32, spatial, layout == "channels_last", h100, forward=False)
        assert not backward.fused and 32 * backward.chunks >= gns.PROGRAMS_PER_SM * sms
    assert fused == [(640, 32 * 32), (1280, 16 * 16)]  # 20 x 1024 and 40 x 256 per group


def test_group_norm_silu_contiguous_tiles_avoid_channel_padding():
    """10 channels x 4096 positions per group: tiles of a power-of-two divisor of 10 channels."""
    block_c, block_s = gns._split_tile(10, 4096, channels_inner=False)
    assert 10 % block_c == 0 and block_c * block_s == gns.TILE_ELEMENTS
    assert gns._split_tile(10, 4096, channels_inner=True)[0] == 16  # the whole 10-channel run


# ====================================================================== device guard, grid axes
def test_device_guard_selects_the_tensors_device():
    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = _device.device_guard(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_device.device_guard(torch.empty(1)), contextlib.nullcontext)


def _attention_inputs(batch, heads, seq_q, seq_kv, dim=16):
    q = _randn(batch, seq_q, heads, dim).transpose(1, 2)
    k = _randn(batch, seq_kv, heads, dim).transpose(1, 2)
    v = _randn(batch, seq_kv, heads, dim).transpose(1, 2)
    return q, k, v


def _every_contract_call():
    """``(name, first tensor, call)`` for every forward/backward contract function, tiny shapes."""
    x = _randn(2, 4, 3, 3)
    gn_out, mean, rstd = tk.group_norm_silu_forward(x, 2, None, None, 1e-5)
    g = _randn(3, 8)
    q, k, v = _attention_inputs(1, 3, 5, 7)
    scale = 0.25
    out, lse = tk.flash_attention_forward(q, k, v, None, scale)
    cout, clse = tk.cross_attention_forward(q, k, v, None, scale)
    return [
        ("group_norm_silu_forward", x, lambda: tk.group_norm_silu_forward(x, 2, None, None, 1e-5)),
        ("group_norm_silu_backward", x, lambda: tk.group_norm_silu_backward(gn_out, x, None, None, mean, rstd, 2)),
        ("geglu_forward", g, lambda: tk.geglu_forward(g, "none")),
        ("geglu_backward", g, lambda: tk.geglu_backward(_randn(3, 4), g, "none")),
        ("flash_attention_forward", q, lambda: tk.flash_attention_forward(q, k, v, None, scale)),
        ("flash_attention_backward", q, lambda: tk.flash_attention_backward(out, q, k, v, out, lse, None, scale)),
        ("cross_attention_forward", q, lambda: tk.cross_attention_forward(q, k, v, None, scale)),
        ("cross_attention_backward", q, lambda: tk.cross_attention_backward(cout, q, k, v, cout, clse, None, scale)),
    ]


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Each contract function enters ``device_guard`` of its tensors before it launches."""
    state = {"inside": None, "guarded": []}

    @contextlib.contextmanager
    def recording_guard(t):
        state["guarded"].append(t)
        state["inside"] = t
        try:
            yield
        finally:
            state["inside"] = None

    calls = _every_contract_call()
    outside: list[str] = []

    def on_launch(name):
        if state["inside"] is None:
            outside.append(name)
    log = _LaunchLog(monkeypatch, gns, tk_geglu, tk_flash, tk_cross, on_launch=on_launch)
    monkeypatch.setattr(_device, "device_guard", recording_guard)
    for name, tensor, call in calls:
        state["guarded"].clear()
        call()
        assert state["guarded"] and state["guarded"][0].device == tensor.device, f"{name}: no device guard"
    assert not outside, f"launched outside the device guard: {outside}"
    assert len(log.launches) >= len(calls)


def test_attention_grids_put_batch_heads_on_axis_0(monkeypatch):
    """B·H goes on grid axis 0 (up to 2**31 - 1 programs), the sequence blocks on axis 1 (65,535)."""
    batch, heads = 2, 3
    q, k, v = _attention_inputs(batch, heads, 5, 7)
    out, lse = tk.flash_attention_forward(q, k, v, None, 0.25)
    cout, clse = tk.cross_attention_forward(q, k, v, None, 0.25)
    log = _LaunchLog(monkeypatch, tk_flash, tk_cross)
    tk.flash_attention_forward(q, k, v, None, 0.25)
    tk.flash_attention_backward(out, q, k, v, out, lse, None, 0.25)
    tk.cross_attention_forward(q, k, v, None, 0.25)
    tk.cross_attention_backward(cout, q, k, v, cout, clse, None, 0.25)
    assert len(log.launches) == 6
    for name, grid in log.launches:
        assert grid[0] == batch * heads, f"{name}: grid {grid}"


# ================================================================ sm_90 compile check (no GPU needed)
def test_group_norm_silu_kernels_compile_for_h100_without_spills():
    """Every GroupNorm+SiLU kernel, with the launch plan of each SDXL shape (512 and 1024 px, both
    layouts), compiles for sm_90a; ptxas reports no register spills (channels-last's one-program
    kernel: at most a few bytes), and contiguous input is read with 16-byte vector loads."""
    import json
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton wheel ships no {os.path.basename(ptxas)} to compile sm_90a code with")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-m", "tests.backends._sm90_compile"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 44, f"expected 44 kernel compiles, got {len(reports)}"
    for r in reports:
        where = f"{r['kernel']} {r['layout']} C={r['channels']} S={r['spatial']} ({r['num_warps']} warps)"
        if r["layout"] == "contiguous":
            assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} bytes spilled"
            assert r["widest_load_bytes"] == 16, f"{where}: widest load {r['widest_load_bytes']} bytes"
        else:  # loads along a group's channel run: 2·C/G bytes of bf16, aligned to that
            assert r["spill_bytes"] <= 16, f"{where}: {r['spill_bytes']} bytes spilled"
            assert r["widest_load_bytes"] >= 4, f"{where}: widest load {r['widest_load_bytes']} bytes"


def test_group_norm_silu_plan_respects_grid_axis_1_limit():
    """Grid axis 1 (chunks per group) stays <= 65,535; axis 0 holds batch·groups (no such limit)."""
    cpu = torch.device("cpu")
    for batch, channels, groups, spatial in [(1, 131072, 1, 1), (1, 8, 1, 2**24), (4096, 64, 32, 16)]:
        for channels_inner in (False, True):
            for forward in (True, False):
                plan = gns.launch_plan(batch, channels, groups, spatial, channels_inner, cpu, forward=forward)
                assert plan.chunks <= gns.MAX_GRID_AXIS_1, (batch, channels, spatial, plan)
    with pytest.raises(ValueError, match="grid axis 1"):
        gns.launch_plan(1, 3 * 200_000, 3, 4096, False, cpu, forward=False)
