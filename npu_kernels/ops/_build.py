"""From an op's spec (:class:`npu_kernels.registry.OpSpec`), everything that runs it:

* the dispatch prologue (:meth:`BuiltOp.__call__`): validate, under ``torch.compile`` maybe the
  plain maths, pick the backend, use its autograd-complete function if it has one, else its kernels;
* the ``torch.library`` custom op ``npu_kernels::<op>`` with its fake impl and autograd, and
  ``npu_kernels::<op>_backward`` (what ``torch.compile``/``torch.export`` see);
* the eager path: the same kernels, saved tensors and backward through a plain
  ``torch.autograd.Function`` (the custom-op dispatch costs more host time per call than many
  GPU kernels at SDXL's batch 1 take: benchmarks/test_bench_host_time.py), or the forward kernel alone where
  autograd would record nothing.

Both autograd paths share one forward finish, one list of saved tensors and one backward call, so
they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Sequence

import torch

from npu_kernels import backends, registry
from npu_kernels.ops import _recompute
from npu_kernels.registry import OpSpec

Tensor = torch.Tensor
_LIB = torch.library.Library("npu_kernels", "FRAGMENT")  # every op of this package; kept alive here


def tracing() -> bool:
    """True under ``torch.compile``/``torch.export``: the ops then go through their custom ops (or
    plain maths), opaque to the tracer and described by fake impls; eager calls do not."""
    return torch.compiler.is_compiling()


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record a call on these inputs. When it would not (inference, no_grad,
    frozen inputs) the ops run the forward kernel alone: an autograd Function costs host time
    even when it records nothing."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(<generator>): this runs at every call
            if t is not None and t.requires_grad:
                return True
    return False


def autocast_operands(x: Tensor, *params: Tensor | None) -> Sequence:
    """The operands as autocast would hand them to a GEMM/convolution (unchanged outside autocast).

    Casting before the op rather than inside ``F.linear`` lets a backward save (and recompute with)
    the operands the forward actually multiplied, instead of casting them a second time. float64
    stays float64, as autocast leaves it.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *params)
    dtype = torch.get_autocast_dtype(x.device.type)
    kept = (dtype, torch.float64)
    # A list comprehension (a list, not a tuple): cheaper than tuple(<generator>) at every call.
    cast = [t if t is None or t.dtype in kept or not t.is_floating_point() else t.to(dtype) for t in (x, *params)]
    if cast[0] is not x and not tracing() and _recompute.recipe_of(x) is not None:  # x's backward rebuilds it: its cast too
        _recompute.rebuildable(cast[0], _recompute.cast_to(dtype), x)
    return cast


def _getter(positions: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``lambda seq: tuple(seq[i] for i in positions)``, in C (``itemgetter``) where it can be.
    Not for code dynamo traces (it cannot trace an itemgetter): see :func:`_traceable_getter`."""
    if not positions:
        return lambda _seq: ()
    if len(positions) == 1:
        (i,) = positions
        return lambda seq: (seq[i],)
    return operator.itemgetter(*positions)


def _traceable_getter(positions: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """:func:`_getter` that dynamo can trace (the op's tensors, read before ``torch.compile``'s routing)."""
    match positions:
        case (a,):
            return lambda seq: (seq[a],)
        case (a, b, c):
            return lambda seq: (seq[a], seq[b], seq[c])
        case (a, b, c, d):
            return lambda seq: (seq[a], seq[b], seq[c], seq[d])
    return lambda seq: tuple([seq[i] for i in positions])


def _schema_args(schema: str) -> list[tuple[str, str]]:
    """``[(type, name), ...]`` of a schema's arguments."""
    arguments = schema.split("->")[0].strip()[1:-1]
    return [tuple(part.strip().rsplit(" ", 1)) for part in arguments.split(",") if part.strip()]


class BuiltOp:
    """One op, generated from its spec; call it with the op's arguments in schema order."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec
        arg_names, outputs = registry.schema_names(spec.schema)
        tensor_args = [f.name for f in dataclasses.fields(spec.inputs)]
        backward_args, backward_outputs = registry.schema_names(spec.backward_schema)
        non_tensor = [i for i, (kind, _n) in enumerate(_schema_args(spec.schema)) if not kind.startswith("Tensor")]
        self._n_args, self._n_outputs, self._single = len(arg_names), len(outputs), len(outputs) == 1
        self._tensors = _traceable_getter(tuple(arg_names.index(n) for n in tensor_args))
        # Gradients: the backward returns ``grad_<arg>`` for these forward arguments, in this order.
        self._grad_positions = tuple(arg_names.index(n.removeprefix("grad_")) for n in backward_outputs)
        self._differentiable = _getter(self._grad_positions)
        self._state = _getter(tuple(non_tensor))  # non-tensor arguments the backward may need
        kernel_returns = spec.kernel_returns or outputs
        self._saves = _getter(tuple((*arg_names, *kernel_returns).index(n) for n in spec.saves))
        custom_saves = spec.custom_op_saves or spec.saves
        self._custom_saves = _getter(tuple((*arg_names, *outputs).index(n) for n in custom_saves))
        # The backward kernel's arguments, looked up in (grad_out, *saved, *state[, needs_input_grad]).
        pool = ("grad_out", *spec.saves, *(arg_names[i] for i in non_tensor), "needs_input_grad")
        self._backward_args = _getter(tuple(pool.index(n) for n in backward_args))
        self._reads_needs_input_grad = "needs_input_grad" in backward_args
        nones = (None,) * (self._n_args - len(self._grad_positions))
        if self._grad_positions == tuple(range(len(self._grad_positions))):  # the usual case: no loop
            self._input_grads = (lambda g: (g, *nones)) if len(self._grad_positions) == 1 else (lambda g: (*g, *nones))
        self._fixed = spec.fixed_backend
        self.custom_op = self._define_custom_ops(arg_names, outputs)
        self._eager = self._eager_function()

    # ------------------------------------------------------------------------- shared pieces
    def _forward(self, args: tuple, backend: str) -> tuple:
        """The backend's forward kernel, its results as the fake impl describes them, as a tuple. (Runs on
        real tensors only, never traced: the custom op's fake impl stands for it under torch.compile.)"""
        out = backends.op_kernels(backend, self.spec)[1](*args)
        out = (out,) if self._single else out
        return out if self.spec.finish is None else self.spec.finish(out, args, backend)

    def _save(self, ctx, args: tuple, outputs: tuple, saves: Callable, backend: str) -> None:
        # Tensors a recompute level marked as rebuildable are saved as their sources (ops/_recompute.py).
        to_save, ctx.rebuild = _recompute.pack(saves((*args, *outputs)))
        ctx.save_for_backward(*to_save)
        ctx.state, ctx.backend = self._state(args), backend
        if not self._single:  # the extra outputs (statistics, logsumexp) get no gradient
            ctx.mark_non_differentiable(*outputs[1:self._n_outputs])
            ctx.set_materialize_grads(False)  # so theirs is None, not a zeros tensor

    def _kernel_backward_args(self, ctx, grad_out: Tensor) -> tuple:
        saved = _recompute.unpack(ctx.saved_tensors, ctx.rebuild)
        if self._reads_needs_input_grad:
            return self._backward_args((grad_out, *saved, *ctx.state, ctx.needs_input_grad))
        return self._backward_args((grad_out, *saved, *ctx.state))

    def _input_grads(self, grads) -> tuple:
        """The backward's gradients placed at their forward arguments (``None`` elsewhere)."""
        full = [None] * self._n_args
        for position, grad in zip(self._grad_positions, (grads,) if len(self._grad_positions) == 1 else grads):
            full[position] = grad
        return tuple(full)

    # ---------------------------------------------------------------------------- eager path
    def _eager_function(self) -> type:
        built = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args_and_backend):
                # ctx-style forward: a separate setup_context makes apply() bind arguments with inspect.
                args, backend = args_and_backend[:-1], args_and_backend[-1]
                outputs = built._forward(args, backend)
                built._save(ctx, args, outputs, built._saves, backend)
                return outputs[0] if built._single else outputs[:built._n_outputs]

            @staticmethod
            def backward(ctx, grad_out, *_extra_output_grads):
                if grad_out is None:  # unmaterialised: the output did not reach the loss
                    return (None,) * (built._n_args + 1)
                grads = backends.op_kernels(ctx.backend, built.spec)[2](*built._kernel_backward_args(ctx, grad_out))
                return (*built._input_grads(grads), None)

        Eager.__name__ = Eager.__qualname__ = f"Eager_{self.spec.name}"
        return Eager

    # ----------------------------------------------------------------------------- custom op
    def _define_custom_ops(self, arg_names: tuple[str, ...], outputs: tuple[str, ...]) -> Callable:
        spec, name = self.spec, self.spec.name
        backend_arg = "" if self._fixed else ", str backend"
        args_schema, returns = spec.schema.split("->")
        _LIB.define(f"{name}{args_schema.strip()[:-1]}{backend_arg}) -> {returns.strip()}")
        qualname = f"npu_kernels::{name}"

        def forward_impl(*args):
            args, backend = (args, self._fixed) if self._fixed else (args[:-1], args[-1])
            result = self._forward(args, backend)[:self._n_outputs]
            return result[0] if self._single else result

        _LIB.impl(name, forward_impl, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, spec.fake, lib=_LIB)
        backward_op = self._define_backward_op() if spec.backward_is_custom_op else None

        def setup_context(ctx, inputs, output) -> None:
            args, backend = (tuple(inputs), self._fixed) if self._fixed else (tuple(inputs[:-1]), inputs[-1])
            self._save(ctx, args, (output,) if self._single else tuple(output), self._custom_saves, backend)

        def backward(ctx, grad_out, *_extra_output_grads):
            kernel_args = self._kernel_backward_args(ctx, grad_out)
            if backward_op is None:  # plain ATen ops: traced as they are, the compiler may fuse around them
                grads = backends.kernel(ctx.backend, spec.backward_kernel)(*kernel_args)
            else:
                grads = backward_op(*kernel_args, *(() if self._fixed else (ctx.backend,)))
            # Custom ops cannot return None: an empty tensor stood for "no such input".
            full = [g if need else None for g, need in zip(self._input_grads(grads), ctx.needs_input_grad)]
            return (*full, *(() if self._fixed else (None,)))

        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
        return getattr(torch.ops.npu_kernels, name).default

    def _define_backward_op(self) -> Callable:
        """``npu_kernels::<op>_backward``: the backward kernel, each gradient in the layout of its
        input (a custom op's outputs must match its fake impl, which says ``empty_like(input)``)."""
        spec, name = self.spec, f"{self.spec.name}_backward"
        arg_names, grad_names = registry.schema_names(spec.backward_schema)
        like = tuple(arg_names.index(g.removeprefix("grad_")) for g in grad_names)  # the input of each gradient
        args_schema, returns = spec.backward_schema.split("->")
        _LIB.define(f"{name}{args_schema.strip()[:-1]}{'' if self._fixed else ', str backend'}) -> {returns.strip()}")

        def split(args):
            return (args, self._fixed) if self._fixed else (args[:-1], args[-1])

        def impl(*args):
            args, backend = split(args)
            grads = backends.kernel(backend, spec.backward_kernel)(*args)
            grads = (grads,) if len(like) == 1 else grads
            fresh = []
            for grad, i in zip(grads, like):
                t = args[i]
                if t is None or grad is None:
                    fresh.append(args[0].new_empty(0))
                else:
                    fresh.append(grad if grad.stride() == t.stride() else torch.empty_like(t).copy_(grad))
            return fresh[0] if len(like) == 1 else tuple(fresh)

        def fake(*args):
            args, _backend = split(args)
            fresh = tuple(args[0].new_empty(0) if args[i] is None else torch.empty_like(args[i]) for i in like)
            return fresh[0] if len(like) == 1 else fresh

        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"npu_kernels::{name}", fake, lib=_LIB)
        return getattr(torch.ops.npu_kernels, name).default

    # -------------------------------------------------------------------------- the prologue
    def __call__(self, *args):
        """Run the op: the custom op under tracing, else the eager path (see the module docstring)."""
        spec = self.spec
        args = spec.validate(*args)
        compiling = tracing()
        if self._fixed is not None:  # no backend to choose
            return self._run_kernels(args, self._fixed, compiling)
        tensors = self._tensors(args)
        if compiling and spec.plain_maths is not None:
            device_type = tensors[0].device.type
            if backends.compiled_choice(spec.name, device_type, backends.select(spec.name, *tensors)) == "decompose":
                return spec.plain_maths(*args)  # inductor fuses plain maths with its neighbours
        backend = backends.select(spec.name, *tensors)
        # e.g. torch_npu's npu_fusion_attention, autograd included
        fused = backends.provided(backend, spec.name) if compiling else backends.op_kernels(backend, spec)[0]
        if fused is not None:
            if _recompute.any_marked(tensors) and needs_grad(*tensors):
                with _recompute.saving_sources():  # its own autograd saves: rebuildable inputs as their sources
                    return fused(*args)
            return fused(*args)
        if spec.kernel_args is not None:
            args = spec.kernel_args(args)
        return self._run_kernels(args, backend, compiling)

    def _run_kernels(self, args: tuple, backend: str, compiling: bool):
        if compiling:
            out = self.custom_op(*args) if self._fixed else self.custom_op(*args, backend)
            return out if self._single else out[0]
        if not needs_grad(*self._differentiable(args)):
            if self._single and self.spec.finish is None:
                return backends.op_kernels(backend, self.spec)[1](*args)
            return self._forward(args, backend)[0]
        out = self._eager.apply(*args, backend)
        return out if self._single else out[0]


def build(spec: OpSpec) -> BuiltOp:
    """Register ``spec`` in :data:`npu_kernels.registry.OPS` and generate its op."""
    return BuiltOp(registry.register(spec))
