"""The versions we declare are the versions we test (issue 23): what broke on the newest torch and
on the declared floors stays fixed, and the tested ranges, pyproject's floors and CI agree."""
from __future__ import annotations

import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from diffusers.models.activations import GEGLU
from packaging.requirements import Requirement
from peft import LoraConfig, inject_adapter_in_model

import npu_kernels
from npu_kernels import peft_lora, versions
from tests import reference
from tests.tiny_unet import tiny_sdxl_inputs, tiny_sdxl_unet

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- graph mode
def test_every_instance_forward_optimize_sets_is_a_plain_bound_function():
    """torch 2.14's dynamo reads ``__name__`` of a module's bound forward: a ``functools.partial``
    (the GEGLU forward before) has none and failed the first compiled step."""
    unet = tiny_sdxl_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    npu_kernels.optimize(unet, recompute_geglu_projection=True)
    patched = [(name, m.__dict__["forward"]) for name, m in unet.named_modules() if "forward" in m.__dict__]
    assert any(name.endswith("ff.net.0") for name, _ in patched)  # the GEGLUs are among them
    for name, forward in patched:
        assert isinstance(forward, types.MethodType), name
        assert type(forward.__func__) is types.FunctionType and forward.__func__.__name__, name


@pytest.mark.parametrize("recompute_projection", [False, True])
def test_optimized_geglu_module_compiles_whole_on_this_torch(recompute_projection):
    """``torch.compile(module)`` as the trainer does it (the module object, fullgraph) on the running
    torch, forward and backward against float64 maths."""
    torch.manual_seed(0)
    module = GEGLU(6, 5).requires_grad_(not recompute_projection)
    npu_kernels.optimize(module, recompute_geglu_projection=recompute_projection)
    x = torch.randn(2, 7, 6, dtype=torch.float64).float().requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False)
    out = compiled(x)
    expected = reference.geglu(torch.nn.functional.linear(x.double(), module.proj.weight.double(), module.proj.bias.double()))
    reference.assert_close(out, expected, torch.float32, "compiled GEGLU")
    grad = torch.randn_like(out)
    (x_grad,) = torch.autograd.grad(out, x, grad)
    (expected_grad,) = torch.autograd.grad(expected, x, grad.double())
    reference.assert_close(x_grad, expected_grad, torch.float32, "compiled GEGLU input gradient")


def test_compiled_frozen_conv_backward_traces_without_dynamos_lru_cache_warning():
    """torch 2.14's dynamo warns at every compiled run that traces a ``functools.lru_cache`` call (the
    frozen Conv2d backward's shape placeholder); traced, the plain function runs instead."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    (expected,) = torch.autograd.grad(conv(x).square().sum(), x)
    npu_kernels.optimize(conv)
    torch._dynamo.reset()
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_fusing_norm_out_keeps_a_silu_shared_with_the_rest_of_the_unet():
    """diffusers before 0.31 (``get_activation``) hands ONE ``nn.SiLU`` instance to ``conv_act``, the time
    embedding and every resnet: fusing ``conv_norm_out`` + ``conv_act`` patched that instance to the identity,
    which removed SiLU from the whole UNet on the floor release (here the sharing is built by hand)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    shared = unet.conv_act
    unet.time_embedding.act = shared
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            module.nonlinearity = shared
    inputs = tiny_sdxl_inputs()
    with torch.no_grad():
        expected = unet(**inputs).sample
        assert npu_kernels.optimize(unet, frozen_weights=False).norm_out_pairs == 1
        actual = unet(**inputs).sample
    reference.assert_close(actual, expected, torch.float32, "UNet output with a shared SiLU")
    npu_kernels.restore(unet)
    assert unet.conv_act is shared and unet.time_embedding.act is shared


# ----------------------------------------------------------------------------- PEFT releases
def _lora_linear(use_dora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 5))
    inject_adapter_in_model(LoraConfig(r=3, target_modules=["0"], use_dora=use_dora), model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # LoRA matters
    return model


def test_lora_layer_of_a_peft_without_lora_variant_runs_the_fast_path_exactly():
    """PEFT < 0.16 has no ``lora_variant`` (DoRA was ``use_dora``) and < 0.14 no ``lora_bias``: the
    floor's default trainer run failed on it. Plain LoRA there is still exactly lora_linear."""
    model = _lora_linear()
    x = torch.randn(4, 9)
    expected = model(x)
    layer = model[0]
    layer.__dict__.pop("lora_variant", None)
    layer.__dict__.pop("lora_bias", None)
    report = npu_kernels.optimize(model)
    assert report.lora_layers == 1 and report.lora_fallbacks == []
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_dora_on_a_peft_without_lora_variant_runs_dora_linear_exactly():
    """PEFT < 0.16 flags DoRA in ``use_dora`` (the floor's layout): still recognised, and dora_linear
    computes what the layer computed."""
    model = _lora_linear(use_dora=True)
    x = torch.randn(4, 9)
    expected = model(x)
    model[0].__dict__.pop("lora_variant", None)
    report = npu_kernels.optimize(model)
    assert report.lora_layers == 1 and report.lora_fallbacks == []
    assert peft_lora._state(model[0]) == (None, "default", True)  # recognised as DoRA, on the fast path
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_layer_lacking_every_variant_flag_falls_back_with_the_reason():
    """A PEFT release that has neither attribute: we cannot tell plain LoRA, so PEFT's forward runs."""
    model = _lora_linear()
    layer = model[0]
    layer.__dict__.pop("lora_variant", None)
    layer.__dict__.pop("use_dora")
    report = npu_kernels.optimize(model)
    assert report.lora_fallbacks == ["0: this PEFT's lora.Linear has neither lora_variant nor use_dora: cannot tell plain LoRA"]


# ----------------------------------------------------------------------------- declared = tested
def _pyproject_floors() -> dict[str, str]:
    """Distribution -> the version of its ``>=`` floor in pyproject.toml's dependencies."""
    floors = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        floors.update((requirement.name, spec.version) for spec in requirement.specifier if spec.operator == ">=")
    return floors


def test_tested_oldest_versions_are_pyprojects_floors():
    floors = _pyproject_floors()
    assert {name: oldest for name, (oldest, _) in versions.TESTED.items()} == {name: floors[name] for name in versions.TESTED}


def test_ci_floors_job_installs_exactly_pyprojects_floors():
    """``.ci/floors.py`` is what CI's floors job pins; it must read pyproject.toml, not a copy."""
    pins = subprocess.run([sys.executable, str(ROOT / ".ci" / "floors.py")], check=True, capture_output=True, text=True).stdout.split()
    floors = _pyproject_floors()
    assert sorted(pins) == sorted(f"{name}=={version}" for name, version in floors.items() if name in versions.TESTED)


@pytest.mark.parametrize(
    ("version", "warns"), [("2.12.1", True), ("2.13.0", False), ("2.13.0+cpu", False), ("2.14.1", False), ("2.15.0", True)]
)
def test_untested_torch_versions_warn(version, warns):
    warning = versions.untested("torch", version)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"torch {version} is outside the tested range 2.13.0 ... 2.14.1")


def test_report_lists_every_tested_distribution_and_warns_outside_its_range(monkeypatch):
    monkeypatch.setitem(versions.TESTED, "torch", ("0.1", "0.2"))
    lines = versions.report_lines()
    assert [line.split()[0] for line in lines[: len(versions.TESTED)]] == list(versions.TESTED)
    assert f"  WARNING: {versions.untested('torch', versions.installed('torch'))}" in lines
