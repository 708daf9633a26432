"""npu_kernels.optimize / FusedAttnProcessor on diffusers models vs stock diffusers."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig

import npu_kernels
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


def assert_same_run(actual, expected, tol: float = 1e-4) -> None:
    out, grads = actual
    ref_out, ref_grads = expected
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref = ref_grads[name]
        scale = max(ref.abs().max().item(), 1e-3)
        assert torch.isfinite(grad).all(), name
        assert (grad - ref).abs().max().item() <= tol * scale * 10, f"gradient of {name} differs"


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
    assert_same_run(forward_backward(unet), expected, tol=1e-6)


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
    reference_unet, unet = copy.deepcopy(stock_unet), copy.deepcopy(stock_unet)
    report = npu_kernels.optimize(unet)
    assert report.frozen_layers > 0
    expected = _frozen_lora_step(reference_unet, weight_dtype)
    actual = _frozen_lora_step(unet, weight_dtype)
    assert_same_run(actual, expected, tol=1e-4 if weight_dtype == torch.float32 else 3e-2)


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
