"""The dispatch point (``npu_kernels.backends``): forcing and restoring a backend (per thread and
task), the reasons a backend gives for refusing inputs, ``auto``'s choices per device, the registry
every lister reads, and ``python -m npu_kernels``."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import threading

import pytest
import torch

import npu_kernels
from npu_kernels import backends, registry
from npu_kernels.registry import AttentionInputs, GegluInputs, GroupNormSiluInputs


def test_use_backend_forces_and_restores():
    assert backends.forced_backend() == "auto"
    with npu_kernels.use_backend("torch"):
        assert backends.forced_backend() == "torch"
        assert backends.select("geglu", torch.randn(2, 4)) == "torch"
    assert backends.forced_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with npu_kernels.use_backend("torch"):
            raise RuntimeError("inside")
    assert backends.forced_backend() == "auto"


def test_a_forced_backend_belongs_to_its_thread():
    """``use_backend`` in one thread neither leaks into another nor is undone by it."""
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def forcing() -> None:
        with npu_kernels.use_backend("torch"):
            inside.set()
            release.wait(10)
            seen["forcing thread"] = backends.forced_backend()
        seen["forcing thread after"] = backends.forced_backend()

    def watching() -> None:
        inside.wait(10)
        seen["other thread"] = backends.forced_backend()
        release.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=watching)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"forcing thread": "torch", "other thread": "auto", "forcing thread after": "auto"}
    assert backends.forced_backend() == "auto"


def test_a_forced_backend_belongs_to_its_task():
    async def forced_in(name: str | None, started: asyncio.Event, go_on: asyncio.Event) -> str:
        if name is None:
            await started.wait()
            go_on.set()
            return backends.forced_backend()
        with npu_kernels.use_backend(name), backends.use_compiled("custom_op"):
            started.set()
            await go_on.wait()
            return f"{backends.forced_backend()}/{backends.forced_compiled()}"

    async def both() -> list[str]:
        started, go_on = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(forced_in("torch", started, go_on), forced_in(None, started, go_on))

    assert asyncio.run(both()) == ["torch/custom_op", "auto"]


def test_the_registry_lists_every_op_once_and_the_listers_read_it():
    assert sorted(registry.OPS) == ["cross_attention", "dora_linear", "flash_attention", "geglu", "group_norm_silu", "lora_linear"]
    assert set(registry.backend_ops()) == set(registry.OPS) - {"lora_linear", "dora_linear"}  # ATen GEMMs: no backend choice
    assert registry.decomposable_ops() == registry.backend_ops()  # plain maths for every op a backend serves
    assert list(npu_kernels.backend_report("cpu")) == list(registry.OPS)
    for name, spec in registry.OPS.items():
        op = getattr(torch.ops.npu_kernels, name).default  # each spec generated its custom op
        assert [a.name for a in op._schema.arguments][: len(spec.arg_names)] == list(spec.arg_names)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.OPS["geglu"])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown npu_kernels backend 'cudnn'"):
        with npu_kernels.use_backend("cudnn"):
            pass


def test_forcing_a_backend_that_cannot_load_names_the_reason(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "npu", "npu_kernels_missing_module_for_test")
    backends.reset_cache()
    try:
        with pytest.raises(npu_kernels.BackendUnavailableError, match="'npu' cannot load: ModuleNotFoundError"):
            with npu_kernels.use_backend("npu"):
                pass
    finally:
        monkeypatch.undo()
        backends.reset_cache()


def test_forced_backend_that_cannot_serve_the_inputs_says_why():
    with npu_kernels.use_backend("torch"):
        with pytest.raises(npu_kernels.BackendUnavailableError, match="'torch' \\(forced\\) cannot run geglu: dtype torch.int64"):
            backends.select("geglu", torch.ones(2, 4, dtype=torch.int64))


def test_cpu_auto_uses_the_pytorch_path_and_sdpa_for_attention():
    # SDPA runs ATen's CPU flash kernel like our PyTorch path, with its backward in C++.
    assert npu_kernels.backend_report("cpu") == {
        "geglu": "torch", "group_norm_silu": "torch", "flash_attention": "sdpa", "cross_attention": "sdpa",
        "lora_linear": "torch", "dora_linear": "torch",
    }


def test_cuda_auto_routes_attention_to_sdpa_and_the_rest_to_triton():
    # On an H100 our Triton attention did not beat SDPA per call (benchmarks): auto keeps SDPA.
    assert backends.auto_candidates("cuda", "flash_attention")[0] == "sdpa"
    assert backends.auto_candidates("cuda", "cross_attention")[0] == "sdpa"
    assert backends.auto_candidates("cuda", "geglu")[0] == "triton"
    assert npu_kernels.backend_report("cuda") == {
        "geglu": "triton", "group_norm_silu": "triton", "flash_attention": "sdpa", "cross_attention": "sdpa",
        "lora_linear": "torch", "dora_linear": "torch",  # ATen GEMMs on every device
    }


def test_npu_auto_prefers_the_npu_backend():
    assert backends.auto_candidates("npu", "geglu") == ("npu", "torch")


def test_environment_variable_forces_backend():
    code = "import npu_kernels.backends as b; print(b.forced_backend())"
    env = {**os.environ, "NPU_KERNELS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["NPU_KERNELS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown npu_kernels backend 'bogus'" in bad.stderr


def test_python_m_npu_kernels_prints_report():
    out = subprocess.run([sys.executable, "-m", "npu_kernels"], capture_output=True, text=True, check=True).stdout
    for word in ("torch", "diffusers", "triton", "torch_npu", "devices seen", "group_norm_silu", "cross_attention"):
        assert word in out


# ------------------------------------------------------------------------ the Triton backend's reasons
def test_triton_not_supported_reasons():
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")
    import npu_kernels.backends.triton as tk

    device = "cuda" if torch.cuda.is_available() and not tk.interpreting() else "cpu"
    x = torch.empty(2, 8, device=device)
    assert tk.not_supported_reasons("geglu", GegluInputs(x)) == []
    assert any("even" in r for r in tk.not_supported_reasons("geglu", GegluInputs(torch.empty(2, 7, device=device))))
    assert any("float64" in r for r in tk.not_supported_reasons("geglu", GegluInputs(x.double())))
    assert tk.not_supported_reasons("group_norm_silu", GroupNormSiluInputs(torch.empty(1, 4, 3, 3, device=device))) == []

    q = torch.empty(1, 1, 4, 64, dtype=torch.float16, device=device)
    k = v = torch.empty(1, 1, 300, 64, dtype=torch.float16, device=device)
    assert tk.not_supported_reasons("flash_attention", AttentionInputs(q, k, v)) == []
    assert any("Skv 300 > 256" in r for r in tk.not_supported_reasons("cross_attention", AttentionInputs(q, k, v)))
    big = torch.empty(1, 1, 4, 256, device=device)
    assert any("head dim 256 > 128" in r for r in tk.not_supported_reasons("flash_attention", AttentionInputs(big, big, big)))
    # Boolean / 2-D masks are served: the ops layer makes them additive and 4-D first.
    bool_mask = torch.ones(4, 300, dtype=torch.bool, device=device)
    assert tk.not_supported_reasons("flash_attention", AttentionInputs(q, k, v, bool_mask)) == []
    # Parameters only need the device: a float64 weight with float32 data is served.
    weight64 = torch.ones(4, dtype=torch.float64, device=device)
    assert tk.not_supported_reasons("group_norm_silu", GroupNormSiluInputs(torch.empty(1, 4, 3, device=device), weight64)) == []
    # ...but a float64 x is not: which tensor is data comes from the inputs type, not from its position.
    assert any("float64" in r for r in tk.not_supported_reasons("group_norm_silu", GroupNormSiluInputs(x.double().view(2, 8, 1))))
    assert tk.not_supported_reasons("no_such_op", GegluInputs(q))
    if tk.interpreting():
        bf16 = torch.empty(2, 8, dtype=torch.bfloat16)
        assert any("interpreter" in r for r in tk.not_supported_reasons("geglu", GegluInputs(bf16)))


# ------------------------------------------------------------------- counting what dispatch chose
def test_count_selections_counts_eager_calls_and_never_forces_a_recompile():
    x = torch.randn(3, 2 * 5)
    with backends.count_selections() as counts:
        npu_kernels.geglu(x)
        npu_kernels.geglu(x)
    assert counts == {("geglu", "torch"): 2}

    # Counting while dynamo traces would change state it guards on: every call would recompile.
    # (config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry for good.)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: npu_kernels.geglu(t) * 2, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), backends.count_selections() as counts:
        for _ in range(3):
            torch.testing.assert_close(compiled(x), npu_kernels.geglu(x) * 2)
    assert counts == {("geglu", "torch"): 3}  # the eager reference calls only
    torch._dynamo.reset()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_auto_decides_once_per_input_kind(monkeypatch):
    """``auto`` walks the priority list once per (op, device, dtype, shape) and reuses the answer."""
    asked = []
    real = backends.not_supported_reasons

    def counting(name, op, inputs):
        assert isinstance(inputs, GegluInputs)
        asked.append(name)
        return real(name, op, inputs)

    # Give the CPU a choice to make: Triton (interpreter: float32/float16, even last dim) first.
    monkeypatch.setitem(backends._AUTO_PRIORITY, "cpu", {"geglu": ("triton", "torch")})
    monkeypatch.setattr(backends, "not_supported_reasons", counting)
    backends.forget_decisions()
    try:
        x = torch.randn(3, 8)
        with backends.count_selections() as counts:
            assert [backends.select("geglu", x) for _ in range(5)] == ["triton"] * 5
        assert asked == ["triton"] and counts[("geglu", "triton")] == 5  # decided once, counted every call
        assert backends.select("geglu", torch.randn(3, 8, dtype=torch.bfloat16)) == "torch"  # no bf16 in the interpreter
        assert backends.select("geglu", torch.randn(5, 8)) == "triton"  # a new shape is a new kind
        assert len(asked) == 3
        backends.forget_decisions()
        assert backends.select("geglu", x) == "triton" and len(asked) == 4
    finally:
        backends.forget_decisions()  # decisions made under the patched priority list must not outlive it


def test_decisions_are_forgotten_with_the_backends():
    backends._decisions[("geglu", None)] = "triton"
    backends.reset_cache()
    assert not backends._decisions


def test_an_ops_kernels_are_looked_up_once_and_again_after_reset_cache(monkeypatch):
    """Eager calls read an op's kernels from ``backends.op_kernels`` (one lookup per process and backend);
    ``reset_cache()`` makes them look again, so a replaced kernel (a stand-in backend, the mutation check)
    is what runs."""
    from npu_kernels.backends import pytorch

    x = torch.randn(2, 6, requires_grad=True)
    npu_kernels.geglu(x)
    assert backends.op_kernels("torch", registry.OPS["geglu"])[1] is pytorch.geglu_forward
    calls = []
    real = pytorch.geglu_forward
    monkeypatch.setattr(pytorch, "geglu_forward", lambda *a: calls.append(1) or real(*a))
    npu_kernels.geglu(x)
    assert not calls  # the kernel found at the first call still serves
    backends.reset_cache()
    try:
        npu_kernels.geglu(x).sum().backward()
        assert calls == [1]
    finally:
        monkeypatch.undo()
        backends.reset_cache()
    assert backends.op_kernels("torch", registry.OPS["geglu"])[1] is pytorch.geglu_forward
