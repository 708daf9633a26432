"""The memory plan (trainer.memory_plan, --memory_plan): accurate against a real step, following the flags,
and stopping a run that will not fit, with the flags that would make it fit."""
from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.memory_plan_accuracy import measure
from trainer import memory_plan, sdxl_configs
from trainer.args import RECOMPUTE_LEVELS, parse_args
from trainer.errors import InputError
from trainer.sdxl_lora import cli

# The embedded pipeline at a size where activations outweigh the weights, batch 2.
BASE = ["--resolution", "128", "--train_batch_size", "2"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub requests: huggingface_hub reads HF_HUB_OFFLINE once, at import (earlier tests imported it), so
    the constant is patched too; without it an unknown hub id retries the network for tens of seconds."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "flags",
    [
        ["--kernels", "off"],
        ["--mixed_precision", "bf16", "--gradient_checkpointing"],
        ["--recompute", "geglu_projection", "--cache_latents", "--cache_text_embeddings"],
    ],
    ids=["stock", "kernels-bf16-checkpointing", "kernels-recompute-cached"],
)
def test_plan_is_within_10_percent_of_the_real_step(assets: object, flags: list[str]) -> None:
    """Planned (fake tensors) vs the same step on real random-init models, tracked storage by storage."""
    result = measure(parse_args(BASE + flags), torch.device("cpu"))
    assert result["measured"] > 0
    assert abs(result["planned"] / result["measured"] - 1) <= 0.10, result


def _plan(*flags: str) -> memory_plan.MemoryPlan:
    return memory_plan.make_plan(parse_args(BASE + list(flags)), "cpu")


def _item(plan: memory_plan.MemoryPlan, start: str) -> int:
    return sum(value for name, value in plan.items if name.startswith(start))


def test_plan_follows_the_flags(assets: object) -> None:
    default = _plan()
    assert default.total == sum(value for _, value in default.items) > 0
    activations = _item(default, "activations")
    bigger = _plan("--train_batch_size", "4")
    assert _item(bigger, "activations") > 1.5 * activations  # twice the images
    assert _item(_plan("--gradient_checkpointing"), "activations") < activations
    bf16 = _plan("--mixed_precision", "bf16")
    assert _item(bf16, "UNet: frozen weights (bf16)") == pytest.approx(_item(default, "UNet: frozen weights (fp32)") / 2, rel=0.01)
    assert _item(bf16, "LoRA parameters (fp32)") == _item(default, "LoRA parameters (fp32)")  # LoRA trains in fp32


def test_memory_plan_flag_prints_the_plan_and_exits_0_without_writing(assets: object, tmp_path, capsys) -> None:
    output_dir = tmp_path / "out"
    assert cli(["--memory_plan", "--output_dir", str(output_dir), *BASE]) == 0
    out = capsys.readouterr().out
    assert "Memory plan (128 px, batch 2, fp32, kernels on" in out
    for item in ("UNet: frozen weights", "LoRA parameters", "AdamW states", "activations and temporaries", "planned peak"):
        assert item in out
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "flags",
    [["--resolution", "100"], ["--train_text_encoder", "--cache_text_embeddings"], ["--pretrained_model_name_or_path", "/no/such/model"]],
    ids=["parsing", "flag-rule", "model-folder"],
)
def test_memory_plan_with_a_bad_flag_fails_as_preflight_does(flags: list[str], tmp_path, capsys) -> None:
    """Exit 2 and the same one line as the run without --memory_plan, before anything is planned or written."""
    output_dir = tmp_path / "out"
    assert cli([*flags, "--output_dir", str(output_dir)]) == 2
    without_plan = capsys.readouterr().err.strip()
    assert cli([*flags, "--output_dir", str(output_dir), "--memory_plan"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == without_plan and without_plan.startswith("error: ") and "\n" not in without_plan
    assert "Memory plan" not in captured.out and not output_dir.exists()


def test_each_recompute_level_lowers_the_planned_activations(assets: object) -> None:
    """The levels change the traced step (the tracker installs no module hook, which would send the fused
    layers down their unfused path), and the fits-or-stops list offers each of them."""
    activations = [_item(_plan("--kernels", "on", "--recompute", level), "activations") for level in RECOMPUTE_LEVELS]
    # Every level plans less than none and each its own peak; the peak need not fall level after level: a
    # level's recompute runs in the backward, and its temporaries can set the peak of a small model.
    assert all(level < activations[0] for level in activations[1:]), activations
    assert len(set(activations)) == len(activations), activations
    offered = [flags for flags, _ in memory_plan.MEMORY_SAVING_FLAGS]
    assert all(f"--recompute {level}" in offered for level in RECOMPUTE_LEVELS[1:])


def test_a_run_that_will_not_fit_stops_naming_the_flags_that_fit(assets: object) -> None:
    # Every memory-saving flag but one already given: the verdict has one alternative to plan.
    flags = ["--recompute", RECOMPUTE_LEVELS[-1], "--cache_latents", "--cache_text_embeddings", "--mixed_precision", "bf16"]
    args = parse_args(BASE + flags)
    plan = memory_plan.make_plan(args, "cuda")  # traced on the CPU here; CUDA's allocator slack included
    assert any("resident but idle" in name for name, _ in plan.items)  # caching: VAE and encoders stay, idle
    checkpointed = memory_plan.make_plan(parse_args(BASE + flags + ["--gradient_checkpointing"]), "cuda")
    assert checkpointed.total < plan.total
    free = (checkpointed.total + plan.total) // 2
    printed: list[str] = []
    with pytest.raises(InputError) as raised:
        memory_plan.check(args, "cuda", free_memory=lambda device, rank: free, print_fn=printed.append)
    message = str(raised.value)
    assert "\n" not in message and memory_plan.format_bytes(plan.total) in message
    assert f"fits with --gradient_checkpointing ({memory_plan.format_bytes(checkpointed.total)})" in message
    assert "--ignore_memory_plan" in message
    assert printed and "planned peak" in printed[0]  # the plan is printed before the verdict

    # Enough memory, or --ignore_memory_plan: the run goes on.
    assert memory_plan.check(args, "cuda", free_memory=lambda device, rank: plan.total, print_fn=printed.append) is False
    ignoring = argparse.Namespace(**{**vars(args), "ignore_memory_plan": True})
    assert memory_plan.check(ignoring, "cuda", free_memory=lambda device, rank: 1, print_fn=printed.append) is False


def test_when_nothing_fits_the_message_says_what_all_flags_together_would_need() -> None:
    plan = memory_plan.MemoryPlan("test", [("activations and temporaries of one step", 3 * 2**30)])
    message = memory_plan.does_not_fit_message(plan, 2**30, "cuda", [("--gradient_checkpointing --mixed_precision bf16", 2 * 2**30)])
    assert message == (
        "memory plan: this run needs 3.00 GiB at its peak and the cuda device has 1.00 GiB free; even"
        " --gradient_checkpointing --mixed_precision bf16 plans 2.00 GiB: lower --train_batch_size or --resolution;"
        " --ignore_memory_plan runs anyway"
    )


def test_sdxl_hub_names_plan_from_the_built_in_configs(offline: None) -> None:
    args = parse_args(["--pretrained_model_name_or_path", sdxl_configs.SDXL_BASE, "--dataset_name", "embedded",
                       "--vae_name", sdxl_configs.SDXL_VAE_FP16_FIX])  # fmt: skip
    configs = memory_plan.model_configs(args)
    assert configs.unet["block_out_channels"] == (320, 640, 1280)
    assert [config.num_hidden_layers for _, config in configs.text_encoders] == [12, 32]
    assert configs.vae["block_out_channels"] == (128, 256, 512, 512)


def test_an_unknown_model_without_configs_warns_and_trains_but_memory_plan_fails(offline: None) -> None:
    args = parse_args(["--pretrained_model_name_or_path", "someone/unknown-sdxl", "--dataset_name", "embedded"])
    assert memory_plan.check(args, "cuda", free_memory=lambda device, rank: 1) is False
    args.memory_plan = True
    with pytest.raises(InputError, match="memory plan: cannot read the model configs of someone/unknown-sdxl"):
        memory_plan.check(args, "cpu")


def test_cpu_runs_plan_only_when_asked(assets: object) -> None:
    """Host memory is not what runs out on a CPU and a plan costs seconds: only --memory_plan plans there."""
    printed: list[str] = []
    assert memory_plan.check(parse_args(BASE), "cpu", free_memory=lambda device, rank: 1, print_fn=printed.append) is False
    assert printed == []
