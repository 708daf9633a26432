"""Training semantics against diffusers itself: prompt encoding, time ids, Min-SNR, dtypes, LoRA,
gradient checkpointing, kernels with LoRA in either order. Embedded tiny pipeline, CPU."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from trainer import loop, models
from trainer.args import parse_args
from trainer.embedded_default import build_samples, ensure_assets


@pytest.fixture(scope="module")
def model_dir(assets_cache: Path) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        yield str(ensure_assets().model_dir)


def _args(model_dir: str, *extra: str) -> argparse.Namespace:
    return parse_args(["--pretrained_model_name_or_path", model_dir, "--resolution", "64", *extra])


@pytest.fixture(scope="module")
def pipeline(model_dir: str) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir)


def test_encode_prompt_matches_the_sdxl_pipeline(pipeline: Any) -> None:
    """Penultimate hidden states of both encoders concatenated; pooled embedding of the second."""
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    ids = [pipeline.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids,
           pipeline.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids]  # fmt: skip
    embeds, pooled = models.encode_prompt([pipeline.text_encoder, pipeline.text_encoder_2], ids)
    expected, _, expected_pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_time_ids_match_the_sdxl_pipeline(pipeline: Any) -> None:
    ids = loop.compute_time_ids([(80, 64), (64, 96)], [(8, 0), (0, 16)], 64, torch.device("cpu"), torch.float32)
    expected = pipeline._get_add_time_ids((80, 64), (8, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(ids[:1], expected)
    assert ids[1].tolist() == [64, 96, 0, 16, 64, 64]


@pytest.mark.parametrize(
    "prediction_type,expected",
    [
        # SNR = alpha_bar / (1 - alpha_bar) = 4 and 2/3; weights min(SNR, 1) / SNR = 1/4 and 1
        # (epsilon), min(SNR, 1) / (SNR + 1) = 1/5 and 2/5 (v-prediction); per-sample MSE 4 and 1.
        ("epsilon", (4 * 0.25 + 1 * 1.0) / 2),  # 1.0
        ("v_prediction", (4 * 0.2 + 1 * 0.4) / 2),  # 0.6
    ],
)
def test_min_snr_weighting_by_hand(prediction_type: str, expected: float) -> None:
    """Two timesteps with betas 0.2 and 0.5 (alpha_bar 0.8 and 0.4), gamma 1: every number by hand."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.2, 0.5], prediction_type=prediction_type)
    timesteps = torch.tensor([0, 1])
    pred = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    target = torch.stack([torch.full((4, 8, 8), 2.0), torch.full((4, 8, 8), 1.0)])  # MSE 4 and 1
    loss = loop.diffusion_loss(pred, target, timesteps, scheduler, 1.0)
    assert loss.dtype == torch.float32  # MSE in fp32 whatever the prediction dtype
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loop.diffusion_loss(pred, target, timesteps, scheduler, None).item() == pytest.approx(2.5)  # (4 + 1) / 2
    # gamma above both SNRs: epsilon weights SNR / SNR = 1, i.e. the plain MSE.
    if prediction_type == "epsilon":
        assert loop.diffusion_loss(pred, target, timesteps, scheduler, 10.0).item() == pytest.approx(2.5)


def test_mixed_precision_dtypes_and_lora_config(model_dir: str) -> None:
    args = _args(model_dir, "--mixed_precision", "bf16", "--rank", "6")
    components = models.load_components(args, torch.device("cpu"), "bf16")
    assert components.unet.dtype == components.text_encoder_one.dtype == components.text_encoder_two.dtype == torch.bfloat16
    assert components.vae.dtype == torch.float32  # the model's own VAE stays fp32
    assert all(not p.requires_grad for m in (components.unet, components.vae, *components.text_encoders) for p in m.parameters())
    assert components.noise_scheduler.__class__.__name__ == "DDPMScheduler"

    models.add_lora(components, args.rank, train_text_encoder=False)
    models.upcast_trainable_params([components.unet], "bf16")
    config = components.unet.peft_config["default"]
    assert config.r == config.lora_alpha == 6
    assert set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert config.init_lora_weights == "gaussian"
    trainable = models.trainable_parameters([components.unet])
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(("lora_A" in n or "lora_B" in n) for n, p in components.unet.named_parameters() if p.requires_grad)

    separate = _args(model_dir, "--mixed_precision", "bf16", "--vae_name", str(Path(model_dir) / "vae"))
    assert models.load_components(separate, torch.device("cpu"), "bf16").vae.dtype == torch.bfloat16


def _step_context(components: models.SDXLComponents) -> loop.StepContext:
    return loop.StepContext(
        unet=components.unet,
        vae=components.vae,
        text_encoders=components.text_encoders,
        noise_scheduler=components.noise_scheduler,
        weight_dtype=torch.float32,
        separate_vae=False,
        resolution=64,
        noise_offset=0.0,
        snr_gamma=None,
        device=torch.device("cpu"),
    )


def _batch(components: models.SDXLComponents) -> dict[str, Any]:
    from trainer.data import SDXLPreprocessor, collate_fn

    samples = build_samples(2)
    pre = SDXLPreprocessor(components.tokenizer_one, components.tokenizer_two, "image", "text", resolution=64)
    out = pre({"image": [s[0] for s in samples], "text": [s[1] for s in samples]})
    return collate_fn([{k: out[k][i] for k in out} for i in range(2)])


@pytest.mark.parametrize("kernels", ["off", "on"])
def test_gradient_checkpointing_is_actually_applied(model_dir: str, kernels: str) -> None:
    """With --gradient_checkpointing the UNet's blocks run their forward again during backward."""
    args = _args(model_dir, "--gradient_checkpointing")
    components = models.load_components(args, torch.device("cpu"), "no")
    models.add_lora(components, 4, train_text_encoder=False)
    models.apply_kernels(components.unet, kernels == "on")
    batch = _batch(components)
    resnet = components.unet.up_blocks[0].resnets[0]  # after attention layers: its input requires grad
    calls = []
    forward = resnet.forward  # count forward runs (module hooks do not fire during recomputation)

    def counting_forward(*inputs: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*inputs, **kwargs)

    resnet.forward = counting_forward

    def forward_backward() -> list[torch.Tensor]:
        calls.clear()
        torch.manual_seed(0)
        loop.training_loss(_step_context(components), batch).backward()
        grads = [p.grad.clone() for p in models.trainable_parameters([components.unet])]
        components.unet.zero_grad(set_to_none=True)
        return grads

    plain = forward_backward()
    assert len(calls) == 1
    models.enable_gradient_checkpointing(components, train_text_encoder=False)
    components.unet.train()
    checkpointed = forward_backward()
    assert len(calls) == 2  # recomputed in backward
    assert any(g.abs().max() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kernels_and_lora_work_in_either_order(model_dir: str) -> None:
    """optimize() after add_adapter and before it give the stock LoRA UNet's output."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    import npu_kernels

    def unet() -> torch.nn.Module:
        model = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        model.requires_grad_(False)
        return model

    def add_lora(model: torch.nn.Module) -> None:
        torch.manual_seed(3)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=models.UNET_LORA_TARGETS))
        with torch.no_grad():  # gaussian init leaves B at zero: make the LoRA path count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)

    stock, lora_then_kernels, kernels_then_lora = unet(), unet(), unet()
    add_lora(stock)
    add_lora(lora_then_kernels)
    npu_kernels.optimize(lora_then_kernels)
    npu_kernels.optimize(kernels_then_lora)
    add_lora(kernels_then_lora)

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context, cond = torch.randn(2, 77, 64), {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        reference = stock(x, t, context, added_cond_kwargs=cond).sample
        for model in (lora_then_kernels, kernels_then_lora):
            assert any(type(p).__name__ == "FusedAttnProcessor" for p in model.attn_processors.values())
            torch.testing.assert_close(model(x, t, context, added_cond_kwargs=cond).sample, reference, rtol=1e-4, atol=1e-4)


def test_kernels_on_and_off_give_the_same_raw_lora_gradients(model_dir: str) -> None:
    """One step's LoRA gradients, before any optimizer (Adam's normalisation would hide a scale error):
    the fused kernels against stock diffusers modules, per element, same weights, batch and noise."""
    def gradients(kernels: bool) -> dict[str, torch.Tensor]:
        components = models.load_components(_args(model_dir), torch.device("cpu"), "no")
        torch.manual_seed(5)
        models.add_lora(components, 4, train_text_encoder=False)
        with torch.no_grad():  # gaussian init leaves B at zero, so A would get no gradient: randomise B
            for name, p in components.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        models.apply_kernels(components.unet, kernels)
        components.unet.train()
        torch.manual_seed(0)
        loop.training_loss(_step_context(components), _batch(components)).backward()
        return {n: p.grad for n, p in components.unet.named_parameters() if p.requires_grad}

    stock, fused = gradients(False), gradients(True)
    assert stock.keys() == fused.keys() and len(stock) > 0
    for name in stock:
        assert stock[name].abs().max() > 0, f"{name}: no gradient, nothing compared"
        # Per element: float32 maths on both sides, summed in a different order: |fused - stock| <=
        # 1e-3 |stock| + 1e-3 RMS(stock). A scale error or a wrong element fails; rounding does not.
        ref, got = stock[name].double(), fused[name].double()
        assert torch.isfinite(got).all(), name
        bound = 1e-3 * ref.abs() + 1e-3 * ref.square().mean().sqrt()
        excess = (got - ref).abs() / bound
        assert excess.max() <= 1, f"{name}: {int((excess > 1).sum())} of {ref.numel()} elements out of tolerance (worst x{excess.max():.2f})"
