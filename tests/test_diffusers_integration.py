"""npu_kernels.optimize / FusedAttnProcessor on diffusers models vs stock diffusers."""
from __future__ import annotations

import copy
import inspect
import weakref

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig

import npu_kernels
from tests import reference
from tests.tiny_unet import tiny_sdxl_inputs, tiny_sdxl_unet

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_unet() -> torch.nn.Module:
    """Tiny SDXL UNet with PEFT LoRA as the recipe sets it, lora_B randomised so LoRA matters."""
    unet = tiny_sdxl_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    unet.train()
    return unet


def forward_backward(unet: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for param in unet.parameters():
        param.requires_grad_(True)
        param.grad = None
    out = unet(**tiny_sdxl_inputs()).sample
    loss = (out.float() ** 2).mean()
    loss.backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in unet.named_parameters()}


def assert_same_run(actual, expected, k: float = 2e-4) -> None:
    """fp32 runs: output and every gradient, per element, within ``1e-5·|expected| + k·RMS(expected)``
    (the same maths in another order; ``k`` is ~10x the worst this needed).

    A gradient that is zero in exact maths (the bias of a convolution that a GroupNorm follows: the
    norm removes any constant) is rounding noise of the many terms that cancel, of any sign: one
    whose RMS is below 1% of the median gradient's must stay below 1% of that median.
    """
    out, grads = actual
    ref_out, ref_grads = expected
    reference.assert_close(out, ref_out, torch.float32, "output", rtol=1e-5, k=k)
    assert grads.keys() == ref_grads.keys()
    typical = torch.tensor([g.double().square().mean().sqrt().item() for g in ref_grads.values()]).median().item()
    for name, grad in grads.items():
        rms = ref_grads[name].double().square().mean().sqrt().item()
        if rms < 1e-2 * typical:
            reference.assert_close(grad, ref_grads[name], torch.float32, f"gradient of {name}", rtol=0, k=1e-2, scale=typical)
        else:
            reference.assert_close(grad, ref_grads[name], torch.float32, f"gradient of {name}", rtol=1e-5, k=k)


@pytest.fixture(scope="module")
def stock_run():
    unet = lora_unet()
    return unet, forward_backward(unet)


def test_optimize_matches_stock_then_restore(stock_run):
    stock_unet, expected = stock_run
    unet = copy.deepcopy(stock_unet)
    keys_before = {k: v.clone() for k, v in unet.state_dict().items()}

    report = npu_kernels.optimize(unet)
    n_attention = sum(isinstance(m, Attention) for m in unet.modules())
    n_resnets = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
    assert report.attention_processors == n_attention > 0
    assert report.resnet_blocks == n_resnets > 0
    assert report.norm_out_pairs == 1
    assert report.geglu == sum(1 for n, _ in unet.named_modules() if n.endswith("ff.net.0")) > 0
    assert not report.skipped
    assert all(type(p) is npu_kernels.FusedAttnProcessor for p in unet.attn_processors.values())
    # Parameters, names and values are untouched: checkpoints and LoRA files keep loading.
    state = unet.state_dict()
    assert state.keys() == keys_before.keys()
    assert all(torch.equal(state[k], keys_before[k]) for k in state)
    assert npu_kernels.optimize(unet).as_dict()["attention_processors"] == 0  # idempotent

    assert_same_run(forward_backward(unet), expected)

    npu_kernels.restore(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert_same_run(forward_backward(unet), expected, k=1e-6)


def test_set_attn_processor_alone_matches_stock(stock_run):
    stock_unet, expected = stock_run
    unet = copy.deepcopy(stock_unet)
    unet.set_attn_processor(npu_kernels.FusedAttnProcessor())
    assert_same_run(forward_backward(unet), expected)


def test_lora_added_after_optimize_still_applies():
    unet = tiny_sdxl_unet()
    npu_kernels.optimize(unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    with torch.no_grad():
        base = unet(**tiny_sdxl_inputs(batch=1)).sample
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        assert not torch.allclose(unet(**tiny_sdxl_inputs(batch=1)).sample, base, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        dict(residual_connection=True, rescale_output_factor=2.0, norm_num_groups=8),
        dict(cross_attention_dim=24, cross_attention_norm="layer_norm", heads=3, dim_head=8),
        dict(spatial_norm_dim=5, residual_connection=True),
    ],
    ids=["residual+group_norm", "norm_cross", "spatial_norm"],
)
def test_processor_matches_attn_processor_2_0(options):
    query_dim = 32
    attn = Attention(query_dim, **{"heads": 4, "dim_head": 8, **options})
    is_cross = "cross_attention_dim" in options
    spatial = "spatial_norm_dim" in options
    hidden = torch.randn(2, query_dim, 5, 7) if spatial or "norm_num_groups" in options else torch.randn(2, 35, query_dim)
    encoder = torch.randn(2, 11, options["cross_attention_dim"]) if is_cross else None
    kwargs = {"temb": torch.randn(2, 5, 3, 3)} if spatial else {}
    if is_cross:
        kwargs["attention_mask"] = (torch.rand(2, 11) > 0.3).float().mul(-10000.0)  # additive, as the UNet builds it
    expected = attn(hidden, encoder_hidden_states=encoder, **kwargs)
    attn.set_processor(npu_kernels.FusedAttnProcessor())
    actual = attn(hidden, encoder_hidden_states=encoder, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_time_embedding_path_keeps_its_silu():
    block = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=16, groups=32)
    x, temb = torch.randn(1, 32, 6, 6), torch.randn(1, 16)
    expected = block(x, temb)
    seen = []
    block.nonlinearity.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    npu_kernels.optimize(block)
    torch.testing.assert_close(block(x, temb), expected, atol=1e-5, rtol=1e-5)
    assert seen == [temb.shape]  # the nonlinearity now runs on the time embedding only


def test_compiled_optimized_unet_matches_eager(stock_run):
    """The whole optimized UNet traces as one graph (no breaks in our ops), forward and backward."""
    stock_unet, expected = stock_run
    unet = copy.deepcopy(stock_unet)
    npu_kernels.optimize(unet)
    torch._dynamo.reset()
    unet.forward = torch.compile(unet.forward, backend="aot_eager", fullgraph=True)
    assert_same_run(forward_backward(unet), expected)


def _frozen_lora_step(unet, weight_dtype):
    """The recipe's situation: frozen base in ``weight_dtype``, trainable LoRA in fp32, autocast for bf16."""
    unet.to(weight_dtype)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
        param.grad = None
        if "lora_" in name:
            param.data = param.data.float()
    inputs = tiny_sdxl_inputs()
    inputs["sample"].requires_grad_(True)  # the input gradient flows through every frozen layer
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16):
        out = unet(**inputs).sample
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    grads["sample"] = inputs["sample"].grad
    return out.detach().float(), grads


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_frozen_base_lora_step_matches_stock(stock_run, weight_dtype):
    stock_unet, _ = stock_run
    unet = copy.deepcopy(stock_unet)
    report = npu_kernels.optimize(unet)
    assert report.frozen_layers > 0
    expected = _frozen_lora_step(copy.deepcopy(stock_unet), weight_dtype)
    actual = _frozen_lora_step(unet, weight_dtype)
    if weight_dtype == torch.float32:
        assert_same_run(actual, expected)
        return
    # bf16: both runs round, differently; the fp32 run is the exact one both are judged against.
    exact = _frozen_lora_step(copy.deepcopy(stock_unet), torch.float32)
    as_dict = lambda run: {"output": run[0], **run[1]}  # noqa: E731
    reference.assert_as_accurate_as_stock(as_dict(actual), as_dict(expected), as_dict(exact))


def test_frozen_layers_keep_no_input_for_backward():
    from benchmarks.memory import saved_bytes

    layer = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    stock = saved_bytes(lambda: layer(x * 2), exclude=list(layer.parameters()))
    npu_kernels.optimize(layer)
    assert saved_bytes(lambda: layer(x * 2), exclude=list(layer.parameters())) < stock
    layer.weight.requires_grad_(True)  # unfrozen: the stock path again, with a weight gradient
    layer(x).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (2, 3, 7, 12)], ids=str)
def test_a_frozen_linear_keeps_no_input_in_stock_pytorch_and_is_left_alone(shape, weight_dtype):
    """Why optimize() swaps no nn.Linear: autograd saves a Linear's input only for a weight that needs a
    gradient (the recipe's precisions: fp32, and bf16 weights under bf16 autocast)."""
    from benchmarks.memory import saved_bytes

    layer = torch.nn.Linear(12, 10).to(weight_dtype).requires_grad_(False)
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16):
        assert saved_bytes(lambda: layer(x * 2), exclude=list(layer.parameters())) == 0
    assert npu_kernels.optimize(layer).frozen_layers == 0 and "forward" not in layer.__dict__


# ----------------------------------------------------------------------------- PEFT LoRA layers
def _lora_block(**config) -> torch.nn.Module:
    """Two Linear layers with PEFT LoRA (B random so that LoRA matters), base frozen."""
    from peft import inject_adapter_in_model

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 8, bias=False))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], **config), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            param.data.normal_(std=0.2)
    return model


@pytest.fixture
def lora_calls(monkeypatch):
    """How many times the optimized LoRA layers ran npu_kernels.lora_linear."""
    from npu_kernels import peft_lora

    calls = []
    original = peft_lora.lora_linear
    monkeypatch.setattr(peft_lora, "lora_linear", lambda *a: calls.append(1) or original(*a))
    return calls


def _run(model, x):
    for param in model.parameters():
        param.grad = None
    out = model(x)
    if out.requires_grad:  # disabled adapters freeze their weights too
        out.backward(torch.ones_like(out))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_layers_run_lora_linear_and_match_peft(lora_calls):
    stock = _lora_block()
    model = copy.deepcopy(stock)
    report = npu_kernels.optimize(model)
    assert report.lora_layers == 2 and not report.lora_fallbacks
    x = torch.randn(3, 5, 16)
    actual, expected = _run(model, x), _run(stock, x)
    assert len(lora_calls) == 2
    reference.assert_close(actual[0], expected[0], torch.float32, "output")
    assert actual[1].keys() == expected[1].keys() and actual[1]
    for name in expected[1]:
        reference.assert_close(actual[1][name], expected[1][name], torch.float32, name)
    npu_kernels.restore(model)
    _run(model, x)
    assert len(lora_calls) == 2  # restored: PEFT's forward again


def _add_second_adapter(layer) -> None:
    """A second LoRA adapter on a PEFT layer, through the ``update_layer`` signature of the installed PEFT
    (newer releases take a ``config``, older ones, as at the floor, separate arguments)."""
    if "config" in inspect.signature(layer.update_layer).parameters:
        layer.update_layer("second", r=2, lora_alpha=2, config=LoraConfig(r=2, lora_alpha=2))
    else:
        layer.update_layer("second", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True, use_rslora=False)


@pytest.mark.parametrize(
    "make_state, reason",
    [
        (lambda m: (_lora_block(lora_dropout=0.1), None), "dropout"),
        (lambda m: (m, m[0].merge()), "merged"),
        (lambda m: (m, [layer.enable_adapters(False) for layer in m]), "disabled"),
        (lambda m: (m, None), "two adapters"),
    ],
    ids=["dropout", "merged", "disabled", "two-adapters"],  # DoRA runs dora_linear: tests/ops/test_dora_linear.py
)
def test_lora_fallbacks_keep_peft_forward(make_state, reason, lora_calls):
    """Anything lora_linear does not compute exactly runs PEFT's own forward, also when the state
    changes after optimize(); the report names the layers and why at optimize() time."""
    from peft.tuners.lora import Linear as PeftLinear

    model, _ = make_state(_lora_block())
    if reason == "two adapters":
        for layer in model:
            _add_second_adapter(layer)
            layer.set_adapter(["default", "second"])
    stock = copy.deepcopy(model)
    report = npu_kernels.optimize(model)
    if reason != "merged":
        assert report.lora_fallbacks and all(r.split(": ", 1)[1] for r in report.lora_fallbacks)
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    actual = _run(model, x)
    torch.manual_seed(0)
    expected = _run(stock, x)
    patched_layers = [m for m in model.modules() if isinstance(m, PeftLinear)]
    calls_expected = 1 if reason == "merged" else 0  # only layer 0 was merged
    assert len(lora_calls) == calls_expected, (reason, len(patched_layers))
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)
    if reason == "dropout":  # eval mode makes dropout the identity: the fused path runs
        model.eval()
        model(x)
        assert len(lora_calls) == 2


def test_lora_state_changes_after_optimize_are_followed(lora_calls):
    model = _lora_block()
    npu_kernels.optimize(model)
    x = torch.randn(2, 16)
    before = model(x).detach()
    assert len(lora_calls) == 2
    model[0].merge()  # merged: base weight holds the update, PEFT's forward runs
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    assert len(lora_calls) == 3
    model[0].unmerge()
    for layer in model:
        layer.enable_adapters(False)
    disabled = model(x).detach()
    assert len(lora_calls) == 3 and not torch.allclose(disabled, before)
    for layer in model:
        layer.enable_adapters(True)
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    assert len(lora_calls) == 5


class _Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.parametrize("where", ["base_layer", "lora_A"])
def test_lora_weight_parametrized_after_optimize_runs_peft_forward(where, lora_calls):
    """The fast path reads a layer's weights from its nn.Linear parameter dicts (no nn.Module.__getattr__
    per read): a weight parametrized after optimize() is no parameter there any more, so PEFT's forward
    runs, with the parametrization, and the fall-back names the reason. (Without the check the fast
    path would fail or read the raw weight.)"""
    from torch.nn.utils import parametrize

    from npu_kernels import peft_lora

    model = _lora_block()
    stock = copy.deepcopy(model)
    npu_kernels.optimize(model)
    for m in (model, stock):
        target = m[0].base_layer if where == "base_layer" else m[0].lora_A["default"]
        parametrize.register_parametrization(target, "weight", _Doubled())
    x = torch.randn(3, 16)
    actual, expected = _run(model, x), _run(stock, x)
    assert len(lora_calls) == 1  # the second layer only
    assert "not all nn.Linear" in peft_lora.fallback_reason(model[0])
    reference.assert_close(actual[0], expected[0], torch.float32, "output")
    assert actual[1].keys() == expected[1].keys() and actual[1]
    for name in expected[1]:
        reference.assert_close(actual[1][name], expected[1][name], torch.float32, name)


def test_lora_fast_path_reads_the_weights_functional_call_swaps_in(lora_calls):
    """``torch.func.functional_call`` swaps tensors into the layers' parameter dicts: the fast path
    computes with those, as PEFT's forward does."""
    model = _lora_block()
    stock = copy.deepcopy(model)
    npu_kernels.optimize(model)
    swapped = {"0.lora_A.default.weight": torch.randn(4, 16), "0.base_layer.weight": torch.randn(12, 16)}
    x = torch.randn(3, 16)
    actual = torch.func.functional_call(model, swapped, (x,))
    expected = torch.func.functional_call(stock, swapped, (x,))
    assert len(lora_calls) == 2
    reference.assert_close(actual, expected, torch.float32, "output")
    assert not torch.allclose(actual, stock(x)), "the swapped weights should change the output"


def test_lora_keys_values_and_peft_state_dict_untouched(stock_run):
    from peft.utils import get_peft_model_state_dict

    stock_unet, _ = stock_run
    unet = copy.deepcopy(stock_unet)
    before = get_peft_model_state_dict(unet)
    report = npu_kernels.optimize(unet)
    assert report.lora_layers == 4 * report.attention_processors > 0
    forward_backward(unet)  # a training step's forward/backward with the kernels on
    after = get_peft_model_state_dict(unet)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_geglu_approximate_tanh():
    from diffusers.models.activations import GEGLU

    module = GEGLU(8, 6)
    x = torch.randn(2, 3, 8)
    expected = reference.geglu(module.proj(x).double(), "tanh")
    npu_kernels.optimize(module, geglu_approximate="tanh")
    reference.assert_close(module(x), expected, torch.float32, "tanh GEGLU")
    with pytest.raises(ValueError, match="geglu_approximate"):
        npu_kernels.optimize(GEGLU(8, 6), geglu_approximate="sigmoid")


def test_recompute_geglu_projection_saves_the_narrow_input_with_the_same_gradients():
    """A frozen FeedForward (GEGLU): same output and input gradient as optimize() without the option
    (bitwise), and the projection's 2·inner-wide output is no longer kept for the backward."""
    from diffusers.models.attention import FeedForward

    from benchmarks.memory import saved_bytes

    def run(**options):
        torch.manual_seed(0)
        ff = FeedForward(16, activation_fn="geglu").requires_grad_(False)
        npu_kernels.optimize(ff, **options)
        x = torch.randn(2, 9, 16, requires_grad=True)
        out = ff(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        return out, grad, saved_bytes(lambda: ff(x), exclude=[x, *ff.parameters()])

    out, grad, saved = run()
    out_r, grad_r, saved_r = run(recompute_geglu_projection=True)
    assert torch.equal(out_r, out) and torch.equal(grad_r, grad)
    inner = 4 * 16
    assert saved == 2 * 9 * 2 * inner * 4  # the [2, 9, 2·inner] fp32 projection output...
    assert saved_r == 0  # ...no longer kept: x (the caller's) and the resident weights are all
    # A hook on the projection keeps the module call (and the hook firing).
    ff = FeedForward(16, activation_fn="geglu").requires_grad_(False)
    npu_kernels.optimize(ff, recompute_geglu_projection=True)
    calls = []
    ff.net[0].proj.register_forward_hook(lambda *args: calls.append(1))
    ff(torch.randn(1, 3, 16, requires_grad=True))
    assert calls == [1]


def _layer_norm_into_lora(weight_dtype: torch.dtype) -> torch.nn.Module:
    """A LayerNorm (float32 parameters) feeding a PEFT LoRA Linear (frozen base in ``weight_dtype``, LoRA fp32)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(24), torch.nn.Linear(24, 24).to(weight_dtype)).requires_grad_(False)
    torch.nn.init.normal_(model[0].weight)  # not the identity affine: a wrong rebuild would show
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["1"]), model)
    for name, param in model.named_parameters():
        if "lora" in name:
            param.data = torch.randn_like(param, dtype=torch.float32)
    return model


@pytest.mark.parametrize("autocast_upcasts", [False, True], ids=["layer_norm_in_input_dtype", "layer_norm_in_fp32"])
def test_the_default_keeps_a_layer_norms_input_not_also_its_output(autocast_upcasts, monkeypatch):
    """At the default level the LoRA projection after a LayerNorm keeps the LayerNorm's input (which the
    LayerNorm keeps anyway), not its output: one copy where stock keeps two, same values and gradients
    bit for bit. Under an autocast that runs LayerNorm in float32 (CUDA's policy, forced here on the
    CPU, whose autocast leaves LayerNorm alone) the float32 copy the LayerNorm saves is that one copy."""
    from benchmarks.memory import saved_bytes
    from npu_kernels import diffusers_integration

    monkeypatch.setattr(diffusers_integration, "_autocast_upcasts_layer_norm", lambda *_: autocast_upcasts)
    dtype = torch.bfloat16 if autocast_upcasts else torch.float32
    ours, keeping = _layer_norm_into_lora(dtype), _layer_norm_into_lora(dtype)
    npu_kernels.optimize(ours)
    npu_kernels.optimize(keeping)
    del keeping[0].forward  # the reference: the same fused LoRA after a stock LayerNorm, whose output it keeps
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
    # What autocast does where it runs LayerNorm in float32: the float32 copy, then the LayerNorm.
    stock_input = (lambda t: t.float()) if autocast_upcasts else (lambda t: t)

    def run(model, prepare):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_upcasts):
            out = model(prepare(x))
            kept = saved_bytes(lambda: model(prepare(x)), exclude=list(model.parameters()))  # x counts too
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out.float().square().sum(), [x, *params]), kept

    out, grads, kept = run(ours, lambda t: t)
    stock_out, stock_grads, stock_kept = run(keeping, stock_input)
    assert torch.equal(out, stock_out) and all(torch.equal(g, s) for g, s in zip(grads, stock_grads))
    # Exactly the LayerNorm's output (as the LoRA multiplies it) fewer; x itself counts too, so a rebuild from the
    # bf16 x rather than from the LayerNorm's float32 copy would keep one more tensor and fail this.
    layer_norm_output = 3 * 7 * 24 * (2 if autocast_upcasts else 4)
    assert stock_kept == kept + layer_norm_output, (kept, stock_kept)


def test_attention_forward_skips_the_signature_inspection_and_falls_back(caplog):
    """optimize() calls our processor straight from Attention.forward; extra kwargs, another processor
    or restore() give diffusers' own forward back (and its warning for unexpected kwargs)."""
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16)
    x, text = torch.randn(1, 6, 32), torch.randn(1, 7, 24)
    expected = attn(x, encoder_hidden_states=text)
    npu_kernels.optimize(attn)
    assert "forward" in attn.__dict__ and isinstance(attn.processor, npu_kernels.FusedAttnProcessor)
    torch.testing.assert_close(attn(x, encoder_hidden_states=text), expected)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(attn(x, encoder_hidden_states=text, not_a_kwarg=1), expected)
    assert "not_a_kwarg" in caplog.text  # diffusers' forward ran: it warns and drops the kwarg
    attn.set_processor(AttnProcessor2_0())  # the user swaps the processor: diffusers' path again
    torch.testing.assert_close(attn(x, encoder_hidden_states=text), expected)
    npu_kernels.optimize(attn)  # and optimize() takes it over again
    assert isinstance(attn.processor, npu_kernels.FusedAttnProcessor)
    npu_kernels.restore(attn)
    assert "forward" not in attn.__dict__ and type(attn.processor) is AttnProcessor2_0

    class OwnForward(Attention):
        def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return super().forward(hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    subclass = OwnForward(32, heads=2, dim_head=16)
    npu_kernels.optimize(subclass)
    assert "forward" not in subclass.__dict__ and isinstance(subclass.processor, npu_kernels.FusedAttnProcessor)


def _lora_attention(seed: int, *args, **kwargs) -> Attention:
    """A frozen diffusers Attention with LoRA r4 on q/k/v/out, lora_B drawn (as after some training)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    attn = Attention(*args, **kwargs).requires_grad_(False)
    attn = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), attn)
    with torch.no_grad():
        for name, param in attn.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return attn


def test_self_attention_qkv_share_one_node_and_hooks_opt_out(monkeypatch):
    """Self-attention's LoRA q/k/v run as one node (x saved once) and match stock; a hook on a
    projection keeps the per-layer calls so that the hook still fires."""
    from npu_kernels import peft_lora

    attn = _lora_attention(5, 32, heads=4, dim_head=8)
    stock = copy.deepcopy(attn)
    npu_kernels.optimize(attn)
    shared = []
    original = peft_lora.lora_linear_shared_input
    monkeypatch.setattr(peft_lora, "lora_linear_shared_input", lambda *a: shared.append(1) or original(*a))
    x = torch.randn(2, 9, 32)
    actual, expected = _run(attn, x), _run(stock, x)
    assert len(shared) == 1
    reference.assert_close(actual[0], expected[0], torch.float32, "output")
    for name in expected[1]:
        reference.assert_close(actual[1][name], expected[1][name], torch.float32, name)
    seen = []
    attn.to_k.register_forward_hook(lambda *a: seen.append(1))
    _run(attn, x)
    assert len(shared) == 1 and seen == [1]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast-fp32-weights"])
@pytest.mark.parametrize("layer", ["conv", "conv-strided-groups"])
def test_frozen_layers_match_stock_and_dispatch_no_more(layer, autocast):
    from benchmarks.dispatch_counts import count_dispatches

    torch.manual_seed(2)
    stock = {
        "conv": lambda: torch.nn.Conv2d(8, 6, 3, padding=1),
        "conv-strided-groups": lambda: torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2),
    }[layer]().requires_grad_(False)
    ours = copy.deepcopy(stock)
    npu_kernels.optimize(ours)
    x = torch.randn(1, 8, 7, 9)

    def run(module):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(leaf * 1.0)  # a non-leaf input, as inside a network
        out.backward(torch.ones_like(out))
        return out.detach(), leaf.grad

    (out, grad), (ref_out, ref_grad) = run(ours), run(stock)
    assert out.dtype == ref_out.dtype and grad.dtype == ref_grad.dtype
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    ours_counts, stock_counts = count_dispatches(lambda: run(ours)), count_dispatches(lambda: run(stock))
    # One more op at most: the detach autograd makes of the input it hands our saved-tensor hook (a view, no kernel).
    assert ours_counts.dispatched <= stock_counts.dispatched + 1
    assert ours_counts.by_op["~detach"] <= stock_counts.by_op["~detach"] + 1
    assert ours_counts.launching <= stock_counts.launching


def test_frozen_conv_runs_autograds_own_node_and_falls_back_where_saved_tensor_hooks_are_off():
    """Eager: the convolution stays autograd's C++ node (no Python Function per call), its input kept
    as a shape only; where saved-tensor hooks are disabled (torch.func) the layer runs as stock does."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    npu_kernels.optimize(conv)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"
    hidden = x * 2.0  # an activation: nothing but the graph could keep it alive after the forward
    alive = weakref.ref(hidden)
    kept = conv(hidden)
    del hidden
    assert alive() is None and kept.grad_fn is not None  # not kept by the node nor by its saved-tensor hooks
    with torch.autograd.graph.disable_saved_tensors_hooks("off in this block"):
        out = conv(x)
    out.sum().backward()
    expected = torch.nn.grad.conv2d_input(x.shape, conv.weight, torch.ones_like(out), padding=1)
    torch.testing.assert_close(x.grad, expected)


def test_cross_attention_casts_text_states_once_under_autocast(monkeypatch):
    """Under autocast the fp32 text states are cast once for to_k and to_v (LoRA or not): same
    values as stock, fewer launches, one saved copy instead of two."""
    from benchmarks.dispatch_counts import count_dispatches
    from benchmarks.memory import saved_bytes
    from npu_kernels import diffusers_integration

    attn = _lora_attention(6, 32, cross_attention_dim=16, heads=4, dim_head=8)
    for name, param in attn.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()  # the recipe: frozen base in bf16, LoRA in fp32
    stock = copy.deepcopy(attn)
    npu_kernels.optimize(attn)
    x, text = torch.randn(2, 9, 32), torch.randn(2, 7, 16)

    def run(module):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x * 1.0, encoder_hidden_states=text)

    reference.assert_close(run(attn), run(stock).double(), torch.bfloat16, "cross-attention output")
    params = list(attn.parameters()) + list(stock.parameters())
    once_bytes, once_launching = saved_bytes(lambda: run(attn), exclude=params), count_dispatches(lambda: run(attn)).launching
    assert once_bytes < saved_bytes(lambda: run(stock), exclude=params)
    monkeypatch.setattr(diffusers_integration, "_cast_once_for_autocast", lambda attn, states, rebuild=False: states)
    assert once_bytes < saved_bytes(lambda: run(attn), exclude=params)  # one text copy saved, not two
    assert once_launching < count_dispatches(lambda: run(attn)).launching


# ----------------------------------------------------------------------------- recompute levels
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_every_recompute_level_gives_stock_gradients_and_saves_less(stock_run, weight_dtype):
    """The recipe's LoRA step at every level: the same output and gradients as the default, bitwise
    (the backward rebuilds exactly what the forward computed), hence stock's within tolerance; each
    level keeps less for the backward than the one before."""
    from benchmarks.memory import saved_bytes

    stock_unet, _ = stock_run

    def saved(unet):
        inputs = tiny_sdxl_inputs()
        inputs["sample"].requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16):
            return saved_bytes(lambda: unet(**inputs).sample, exclude=[*unet.parameters(), inputs["sample"]])

    runs, kept = {}, {}
    for level in ("stock", *npu_kernels.RECOMPUTE_LEVELS):
        unet = copy.deepcopy(stock_unet)
        if level != "stock":
            npu_kernels.optimize(unet, recompute=level)
        runs[level] = _frozen_lora_step(unet, weight_dtype)
        kept[level] = saved(unet)
    default = runs["none"]
    for level in npu_kernels.RECOMPUTE_LEVELS[1:]:
        assert torch.equal(runs[level][0], default[0]), level
        assert all(torch.equal(runs[level][1][n], g) for n, g in default[1].items()), level
    if weight_dtype == torch.float32:
        assert_same_run(default, runs["stock"])
    else:
        exact = _frozen_lora_step(copy.deepcopy(stock_unet), torch.float32)
        as_dict = lambda run: {"output": run[0], **run[1]}  # noqa: E731
        reference.assert_as_accurate_as_stock(as_dict(default), as_dict(runs["stock"]), as_dict(exact))
    ordered = [kept[level] for level in ("stock", *npu_kernels.RECOMPUTE_LEVELS)]
    assert ordered == sorted(ordered, reverse=True) and len(set(ordered)) == len(ordered), kept
    # The first recompute level's bound on this tiny UNet; benchmarks/test_bench_launch_counts.py holds the 0.55x target.
    assert kept["norms_and_text"] <= 0.6 * kept["stock"], kept


def _aten_counts(fn) -> dict[str, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_recompute_stands_down_inside_gradient_checkpointing(stock_run, reentrant, monkeypatch):
    """With diffusers' gradient checkpointing, the most frugal level recomputes nothing twice: inside
    a checkpointed block it rebuilds nothing (checkpointing reruns the forward there anyway), so the
    step runs no more LayerNorms and GEMMs than the default with checkpointing; same gradients."""
    import functools
    import inspect

    stock_unet, _ = stock_run
    frugal = npu_kernels.RECOMPUTE_LEVELS[-1]
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=reentrant)
    # diffusers before 0.32 takes no checkpoint function: its blocks checkpoint non-reentrantly.
    choose = "gradient_checkpointing_func" in inspect.signature(stock_unet.enable_gradient_checkpointing).parameters
    if not choose and reentrant:
        pytest.skip("this diffusers checkpoints only non-reentrantly (no gradient_checkpointing_func)")
    runs, counts = {}, {}
    for level in ("none", frugal):
        unet = copy.deepcopy(stock_unet)
        if choose:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        else:
            unet.enable_gradient_checkpointing()
        npu_kernels.optimize(unet, recompute=level)
        counts[level] = _aten_counts(lambda: _frozen_lora_step(unet, torch.float32))  # noqa: B023
        runs[level] = _frozen_lora_step(unet, torch.float32)
    assert torch.equal(runs[frugal][0], runs["none"][0])
    assert all(torch.equal(runs[frugal][1][n], g) for n, g in runs["none"][1].items())
    for op in ("native_layer_norm", "mm", "addmm"):
        assert counts[frugal].get(op, 0) == counts["none"].get(op, 0) > 0, (op, counts[frugal].get(op), counts["none"].get(op))
    if reentrant:  # the count can fail: rebuilding inside the rerun forward adds LayerNorms and GEMMs
        from npu_kernels.ops import _recompute

        monkeypatch.setattr(_recompute, "standing_down", lambda: False)
        twice = _aten_counts(lambda: _frozen_lora_step(unet, torch.float32))  # noqa: B023
        assert twice["native_layer_norm"] > counts[frugal]["native_layer_norm"]
        assert twice["mm"] + twice.get("addmm", 0) > counts[frugal]["mm"] + counts[frugal].get("addmm", 0)


def test_recompute_level_errors_and_alias():
    with pytest.raises(ValueError, match="recompute must be one of"):
        npu_kernels.optimize(lora_unet(), recompute="everything")
    from npu_kernels.diffusers_integration import resolve_recompute

    assert resolve_recompute("none", recompute_geglu_projection=True) == "geglu_projection"
    assert npu_kernels.RECOMPUTE_LEVELS[0] == "none"
