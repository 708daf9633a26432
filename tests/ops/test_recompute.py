"""ops/_recompute.py: marked tensors saved as their sources and rebuilt exactly in the backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.memory import saved_bytes
from npu_kernels.ops import _recompute


def _layer_norm_then(x: torch.Tensor, consume, calls: list) -> torch.Tensor:
    """A LayerNorm whose output is marked rebuildable, fed to ``consume`` (``calls`` counts rebuilds)."""
    y = F.layer_norm(x, x.shape[-1:])

    def again(t):
        calls.append(1)
        return F.layer_norm(t, t.shape[-1:])

    _recompute.rebuildable(y, again, x)
    return consume(y)


class _SavesItsInput(torch.autograd.Function):
    """``x * 3`` saving ``x`` through pack/unpack (as our ops save), checking it got x's values back."""

    @staticmethod
    def forward(ctx, x):
        to_save, ctx.rebuild = _recompute.pack((x,))
        ctx.save_for_backward(*to_save)
        ctx.expected = x.detach().clone()
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = _recompute.unpack(ctx.saved_tensors, ctx.rebuild)
        assert torch.equal(x, ctx.expected)
        return grad * 3 + x * 0


def test_a_marked_view_is_saved_as_the_source_and_rebuilt_once():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    calls: list = []
    # The op saves a non-contiguous view of the marked tensor: rebuilt through the same view.
    consume = lambda y: _SavesItsInput.apply(y.transpose(0, 1)[1:])  # noqa: E731
    kept = saved_bytes(lambda: _layer_norm_then(x * 1, consume, calls), exclude=[x])
    plain = saved_bytes(lambda: _SavesItsInput.apply(F.layer_norm(x * 1, (7,)).transpose(0, 1)[1:]), exclude=[x])
    assert kept < plain  # one copy (the LayerNorm's input), not two
    out = _layer_norm_then(x, consume, calls)
    (grad,) = torch.autograd.grad(out.sum(), x)
    y = F.layer_norm(x, (7,))
    (expected,) = torch.autograd.grad((_SavesItsInput.apply(y.transpose(0, 1)[1:])).sum(), x)
    assert torch.equal(grad, expected) and len(calls) == 1


def test_autograd_complete_ops_save_sources_through_outer_hooks():
    """saving_sources() around an op we call (SDPA): marked inputs saved as sources, every save still
    going through the hooks outside (here a counter), values identical."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 8, requires_grad=True)
    calls: list = []

    def attend(q):
        with _recompute.saving_sources():
            return F.scaled_dot_product_attention(q, q, q)

    out = _layer_norm_then(x, attend, calls)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    y = F.layer_norm(x, (8,))
    (expected,) = torch.autograd.grad(F.scaled_dot_product_attention(y, y, y).square().sum(), x)
    assert torch.equal(grad, expected) and len(calls) == 1
    with_sources = saved_bytes(lambda: _layer_norm_then(x * 1, attend, []), exclude=[x])
    stock = saved_bytes(lambda: F.scaled_dot_product_attention(*(F.layer_norm(x * 1, (8,)),) * 3), exclude=[x])
    assert 0 < with_sources < stock


def test_nothing_is_marked_inside_a_backward():
    """A forward running inside a backward (gradient checkpointing's rerun) marks nothing."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            y = torch.ones(2)
            _recompute.rebuildable(y, torch.ones_like, y)
            seen.append(_recompute.recipe_of(y))
            return grad

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [None]
    y = torch.ones(2)
    _recompute.rebuildable(y, torch.ones_like, y)
    assert _recompute.recipe_of(y) is not None


def test_a_rebuild_replays_the_forwards_autocast_state_whatever_the_backwards():
    """The recipe runs under the autocast state of the forward: re-entered where the backward's differs
    (autocast on in one, off in the other), as is where they are the same. _SavesItsInput checks the
    rebuilt tensor against the forward's, value and dtype."""
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    for forward_autocast, backward_autocast in ((True, False), (False, True), (True, True), (False, False)):
        x = torch.randn(4, 6, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
            y = torch.mm(x, w)
            _recompute.rebuildable(y, lambda t: torch.mm(t, w), x)
            out = _SavesItsInput.apply(y)
        assert y.dtype == (torch.bfloat16 if forward_autocast else torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_autocast):
            (grad,) = torch.autograd.grad(out.float().sum(), x)  # _SavesItsInput asserts the rebuilt y
        assert torch.isfinite(grad).all()
