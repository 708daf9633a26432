"""Mutation check: would the tests notice a small error in one op? ``python -m tests.mutation_check``.

For each op, its forward output and each of its gradients in turn get a 1% error in ONE element: the
element whose magnitude is nearest the tensor's RMS (a typical element, neither the largest nor a
zero), put into what the op's kernel returns, only in calls whose inputs have the dtype under study
(fp32, then bf16). The op's tests then run in this process (``pytest.main``) and the row says whether
at least one failed, and which. A last row puts a 10% error into every ``lora_A`` gradient of the
optimized UNet and runs the bf16 whole-UNet check. ``--baseline`` first runs every selection without
an error (it must pass).

The error is injected from outside the shipped code, in one place: :func:`kernel_owner` says where the
ops look kernel ``name`` of ``backend`` up at call time, and :func:`perturbed_kernel` replaces it there
for the duration of one run. Only the ``torch`` backend is mutated: it runs every dtype on the CPU.

Options: ``--ops geglu,lora_linear`` (default all), ``--dtypes fp32,bf16``, ``--skip-unet``, ``-v``
(pytest's own output instead of a log file).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import time
from types import ModuleType
from typing import Iterator

import pytest
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONE_ELEMENT_ERROR = 0.01
LORA_A_ERROR = 0.10
# bf16 has 8 significant bits: 1% is one to three of its rounding steps, within what a correct kernel's
# several roundings may differ from exact maths. Rows that do not see 1% in bf16 try these, to say
# how large an error in that one element the bf16 tests do see.
LARGER_BF16_ERRORS = (0.02, 0.04, 0.08)
# Not the Triton interpreter (minutes, and it has no bf16), nor CUDA-only tests, nor the tests that
# count ATen dispatches: the injection itself adds ops, which they would report instead of the error.
NOT_SLOW = "not triton and not cuda and not dispatch"


# ------------------------------------------------------------------------------ the injection point
def kernel_owner(backend: str, name: str) -> ModuleType:
    """The module the ops read kernel ``name`` of ``backend`` from (``backends.kernel_module``).

    Adapt this function (only this one) when the ops look their kernels up elsewhere.
    """
    from npu_kernels import backends

    return backends.kernel_module(backend)


def _forget_looked_up_kernels() -> None:
    from npu_kernels import backends

    backends.reset_cache()  # backends.provided() caches what it looked up


def one_element_off(t: torch.Tensor, relative: float) -> torch.Tensor:
    """A copy of ``t`` with the element nearest ``t``'s RMS in magnitude multiplied by ``1 + relative``."""
    flat = t.detach().reshape(-1).double()
    rms = flat.square().mean().sqrt()
    index = tuple(int(i) for i in torch.unravel_index(torch.argmin((flat.abs() - rms).abs()), t.shape))
    out = t.clone()
    with torch.no_grad():
        out[index] = (t[index].double() * (1 + relative)).to(t.dtype)
    return out


@contextlib.contextmanager
def perturbed_kernel(backend: str, name: str, output: int | None, dtype: torch.dtype, relative: float) -> Iterator[None]:
    """Inside the block, kernel ``name`` of ``backend`` returns result ``output`` (``None``: its only
    result) with one element off by ``relative``, in calls whose first tensor argument is ``dtype``."""
    module = kernel_owner(backend, name)
    original = getattr(module, name)

    def mutated(*args, **kwargs):
        result = original(*args, **kwargs)
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if first.dtype != dtype:
            return result
        if output is None:
            return one_element_off(result, relative)
        if result[output] is None:  # e.g. no weight gradient without a weight: nothing to get wrong
            return result
        result = list(result)
        result[output] = one_element_off(result[output], relative)
        return tuple(result)

    setattr(module, name, mutated)
    _forget_looked_up_kernels()
    try:
        yield
    finally:
        setattr(module, name, original)
        _forget_looked_up_kernels()


@contextlib.contextmanager
def lora_A_gradients_off(relative: float) -> Iterator[None]:
    """Every ``lora_A`` gradient of a model passed through ``npu_kernels.optimize`` scaled by ``1 + relative``
    (a gradient hook added after optimize(); the stock model the tests compare with is untouched)."""
    import npu_kernels

    original = npu_kernels.optimize

    def optimize(model, *args, **kwargs):
        report = original(model, *args, **kwargs)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.register_hook(lambda grad: grad * (1 + relative))
        return report

    npu_kernels.optimize = optimize
    try:
        yield
    finally:
        npu_kernels.optimize = original


# ------------------------------------------------------------------------------ what is mutated
@dataclasses.dataclass(frozen=True)
class Mutation:
    op: str
    what: str  # "forward" or "grad <input>"
    kernel: str  # the kernel function's name in the torch backend
    output: int | None  # which of the kernel's results; None: its only one
    tests: tuple[str, ...]  # pytest arguments: files and -k selection

    @property
    def backend(self) -> str:
        return "torch"  # lora_linear's GEMMs live in the torch backend too (its spec's fixed backend)


def _op_tests(path: str, extra: str = "") -> tuple[str, ...]:
    return (path, "-k", f"{NOT_SLOW}{' and ' + extra if extra else ''}")


GEGLU = _op_tests("tests/ops/test_geglu.py", "not projection")
PROJECTION = _op_tests("tests/ops/test_geglu.py", "projection")
GROUP_NORM = _op_tests("tests/ops/test_group_norm_silu.py")
FLASH = _op_tests("tests/ops/test_flash_attention.py")
CROSS = _op_tests("tests/ops/test_cross_attention.py")
LORA = _op_tests("tests/ops/test_lora_linear.py")
DORA = _op_tests("tests/ops/test_dora_linear.py")

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("geglu", "forward", "geglu_forward", None, GEGLU),
    Mutation("geglu", "grad x", "geglu_backward", None, GEGLU),
    # geglu_projection runs geglu's kernels on its projection; its input gradient is grad_projection·W.
    Mutation("geglu_projection", "forward", "geglu_forward", None, PROJECTION),
    Mutation("geglu_projection", "grad x (via grad of the projection)", "geglu_backward", None, PROJECTION),
    Mutation("group_norm_silu", "forward", "group_norm_silu_forward", 0, GROUP_NORM),
    Mutation("group_norm_silu", "grad x", "group_norm_silu_backward", 0, GROUP_NORM),
    Mutation("group_norm_silu", "grad weight", "group_norm_silu_backward", 1, GROUP_NORM),
    Mutation("group_norm_silu", "grad bias", "group_norm_silu_backward", 2, GROUP_NORM),
    *(
        Mutation(op, what, f"{op}_{kind}", index, tests)
        for op, tests in (("flash_attention", FLASH), ("cross_attention", CROSS))
        for what, kind, index in (("forward", "forward", 0), ("grad q", "backward", 0), ("grad k", "backward", 1), ("grad v", "backward", 2))
    ),
    Mutation("lora_linear", "forward", "lora_linear_forward", 0, LORA),
    Mutation("lora_linear", "grad x", "lora_linear_backward", 0, LORA),
    Mutation("lora_linear", "grad lora_A", "lora_linear_backward", 3, LORA),
    Mutation("lora_linear", "grad lora_B", "lora_linear_backward", 4, LORA),
    Mutation("dora_linear", "forward", "dora_linear_forward", 0, DORA),
    *(
        Mutation("dora_linear", f"grad {name}", "dora_linear_backward", index, DORA)
        for name, index in (("x", 0), ("lora_A", 3), ("lora_B", 4), ("magnitude", 5))
    ),
)
UNET_TESTS = ("tests/test_diffusers_integration.py", "-k", "frozen_base_lora_step_matches_stock and bf16")


# ------------------------------------------------------------------------------ running the tests
class _Failures:
    """pytest plugin: the node ids of the tests that failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failed.append(report.nodeid)


def run_tests(args: tuple[str, ...], verbose: bool, stop_at_first_failure: bool = True) -> tuple[int, list[str]]:
    """pytest on ``args`` in this process: (exit code, failed test ids)."""
    failures = _Failures()
    argv = [*args, "-q", "-p", "no:cacheprovider", "--benchmark-disable", "-W", "ignore"]
    if stop_at_first_failure:
        argv.append("-x")
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        code = int(pytest.main(argv, plugins=[failures]))
    return code, failures.failed


def _verdict(code: int, failed: list[str]) -> str:
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        return "NO TESTS"
    if failed:
        return f"fails: {failed[0].split('::', 1)[-1]}"
    return "passes" if code == pytest.ExitCode.OK else f"pytest exit {code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation_check", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join(dict.fromkeys(m.op for m in MUTATIONS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="first run each selection unmutated (must pass)")
    parser.add_argument("-v", "--verbose", action="store_true")
    options = parser.parse_args(argv)
    ops, dtypes = options.ops.split(","), [DTYPES[d] for d in options.dtypes.split(",")]
    rows: list[tuple[str, ...]] = []
    started = time.perf_counter()
    ok = True

    def record(row: tuple[str, ...], code: int, failed: list[str], must_fail: bool = True, note: str = "") -> None:
        nonlocal ok
        verdict = _verdict(code, failed) + note
        rows.append((*row, verdict))
        print(" | ".join(rows[-1]), flush=True)
        ok &= bool(failed) == must_fail

    if options.baseline:
        selections = dict.fromkeys(m.tests for m in MUTATIONS if m.op in ops)
        if not options.skip_unet:
            selections[UNET_TESTS] = None
        for tests in selections:
            code, failed = run_tests(tests, options.verbose, stop_at_first_failure=False)
            record(("baseline", " ".join(tests), "-"), code, failed, must_fail=False)
    for mutation in (m for m in MUTATIONS if m.op in ops):
        for dtype in dtypes:
            short = next(k for k, v in DTYPES.items() if v == dtype)
            with perturbed_kernel(mutation.backend, mutation.kernel, mutation.output, dtype, ONE_ELEMENT_ERROR):
                code, failed = run_tests(mutation.tests, options.verbose)
            if failed or dtype != torch.bfloat16:
                record((mutation.op, mutation.what, short), code, failed)
                continue
            # bf16: how large an error in that one element has to be before a test sees it.
            for relative in LARGER_BF16_ERRORS:
                with perturbed_kernel(mutation.backend, mutation.kernel, mutation.output, dtype, relative):
                    larger_code, larger_failed = run_tests(mutation.tests, options.verbose)
                if larger_failed:
                    break
            seen = f"; {relative:.0%}: {_verdict(larger_code, larger_failed)}"
            record((mutation.op, mutation.what, short), code, failed, must_fail=False, note=seen)
    if not options.skip_unet:
        with lora_A_gradients_off(LORA_A_ERROR):
            code, failed = run_tests(UNET_TESTS, options.verbose)
        record(("UNet (optimize)", f"every lora_A grad +{LORA_A_ERROR:.0%}", "bf16 autocast"), code, failed)

    print("\n| op | error in | dtype | tests |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
