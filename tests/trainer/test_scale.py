"""The trainer at scale, on CPU with the tiny embedded pipeline: several processes over gloo (through the
8-device launch script), the 1-device script, latent/text caching, checkpoints, resume, data order."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.runs import LORA_FILE, REPO, TINY, lora_bytes, run_main, summary, trainer_env
from trainer import caching, checkpointing, distributed, sampling
from trainer.ownership import LOCK_FILE
from trainer.preflight import InputError

SCRIPTS = REPO / "trainer" / "scripts"


def _script(name: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = trainer_env(cache, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPTS / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- launch scripts, processes
def test_two_processes_over_gloo_keep_identical_weights_and_count_both(tmp_path: Path, assets_cache: Path, assets: object) -> None:
    """The 8-device script with 2 processes on a CPU-only machine: accelerate launch -> DDP over gloo
    (the trainer sets ACCELERATE_USE_CPU itself), same LoRA weights on both ranks, images/s of both.
    With both caches on, which the processes compute a share of each and exchange."""
    out = tmp_path / "out"
    result = _script(
        "train_8p_text_to_image_sdxl_lora.sh",
        ["--model_name=", "--vae_name=", "--dataset_name=", "--num_processes=2", "--resolution=64", "--batch_size=2",
         "--max_train_steps=3", f"--output_dir={out}", "--checkpointing_steps=3", "--report_to=none", "--num_validation_images=0",
         "--center_crop", "--cache_latents", "--cache_text_embeddings"],
        tmp_path, assets_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + (out / "train_0.log").read_text()[-4000:]
    run = summary(out)
    assert run["num_devices"] == 2 and run["global_batch"] == 4
    assert run["cache"]["images"] == run["cache"]["captions"] == 48  # each process holds the whole cache
    digests = run["lora_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept both ranks bit-identical
    # images/s counts the images of both processes: 4 per step.
    assert run["images_measured"] == 4 * run["steps_measured"]
    assert run["fps"] == pytest.approx(run["images_measured"] / run["seconds_measured"])
    assert f"Final Performance images/sec : {run['fps']:.2f}" in result.stdout
    # Every process stored its RNG state in the checkpoint.
    assert not checkpointing.missing_files(out / "checkpoint-3")
    assert (out / "checkpoint-3" / "random_states_1.pkl").is_file()
    assert "DistributedType.MULTI_CPU" in (out / "train_0.log").read_text()


def test_1p_script_runs_with_a_tiny_override(tmp_path: Path, assets_cache: Path, assets: object) -> None:
    """Ascend's 1-device script on the embedded assets by path (model, fp16-fix-style separate VAE, dataset)."""
    model, dataset = assets.model_dir, assets.dataset_dir
    result = _script(
        "train_1p_text_to_image_sdxl_lora.sh",
        [f"--model_name={model}", f"--vae_name={model / 'vae'}", f"--dataset_name={dataset}", "--resolution=64",
         "--batch_size=2", "--max_train_steps=3", "--report_to=none", "--num_validation_images=0"],
        tmp_path, assets_cache,
    )  # fmt: skip
    out = tmp_path / "test" / "output" / "0"  # Ascend's layout, relative to where the script runs
    assert result.returncode == 0, result.stderr + (out / "train_0.log").read_text()[-4000:]
    run = summary(out)
    for line in (f"Final Performance images/sec : {run['fps']:.2f}", f"Final Train Loss : {run['final_train_loss']:.6f}", "E2E Training Duration sec"):
        assert line in result.stdout
    case = (out / "text_to_image_sdxl_lora_bs2_1p_perf.log").read_text()
    assert "RankSize = 1" in case and f"ActualLoss = {run['final_train_loss']:.6f}" in case
    assert len((out / "train_text_to_image_sdxl_lora_bs2_1p_perf_loss.txt").read_text().split()) == 3
    assert (out / LORA_FILE).is_file()
    assert run["num_devices"] == 1 and run["steps"] == 3
    assert run["pretrained_model_name_or_path"] == str(model)


def test_several_processes_without_accelerator_use_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(distributed, "accelerator_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.prepare_launch_environment() and "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.prepare_launch_environment() and os.environ["ACCELERATE_USE_CPU"] == "true"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(distributed, "accelerator_available", lambda: True)  # GPUs/NPUs: accelerate decides
    assert not distributed.prepare_launch_environment() and "ACCELERATE_USE_CPU" not in os.environ


def test_npu_device_is_configured_for_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls = []
    fake = types.ModuleType("npu_kernels.backends.npu")
    fake.configure_npu_for_training = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "npu_kernels.backends.npu", fake)
    distributed.configure_device(torch.device("cpu"))
    assert calls == []
    distributed.configure_device(types.SimpleNamespace(type="npu"))
    assert calls == [1]


# ----------------------------------------------------------------------------- caching
def _explicit_model_run(assets: object, out: Path, *extra: str) -> dict:
    """The embedded model named explicitly, so no embedded defaults (random flip) apply: no augmentation."""
    argv = [
        "--pretrained_model_name_or_path", str(assets.model_dir), "--dataset_name", str(assets.dataset_dir),
        "--resolution", "64", "--center_crop", "--train_batch_size", "2", "--max_train_samples", "8",
        "--max_train_steps", "4", "--learning_rate", "5e-3", "--seed", "7", "--report_to", "none",
        "--output_dir", str(out), *extra,
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the embedded run does: tiny ops, a thread pool only adds stalls
    try:
        return run_main(argv)[0]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("augmentation", [[], ["--random_flip"]], ids=["no-augmentation", "random-flip"])
def test_caching_gives_the_losses_of_an_uncached_run(tmp_path: Path, assets: object, augmentation: list[str]) -> None:
    plain = _explicit_model_run(assets, tmp_path / "plain", *augmentation)
    cached = _explicit_model_run(assets, tmp_path / "cached", *augmentation, "--cache_latents", "--cache_text_embeddings")
    assert cached["cache"]["latents"] and cached["cache"]["text_embeddings"] and not plain["cache"]["latents"]
    assert cached["cache"]["images"] == 8 and cached["cache"]["orientations"] == (2 if augmentation else 1)
    np.testing.assert_allclose(cached["loss_history"], plain["loss_history"], rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / LORA_FILE), load_file(tmp_path / "cached" / LORA_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_cache_latents_refuses_random_crops(tmp_path: Path, assets: object) -> None:
    """The embedded images are not square: without --center_crop every epoch would crop them anew."""
    argv = ["--cache_latents", "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path)]
    with pytest.raises(InputError, match=r"random cropping.*--center_crop"):
        run_main(argv)


def test_cache_text_embeddings_refuses_trained_text_encoders() -> None:
    from trainer.args import parse_args

    with pytest.raises(InputError, match="--train_text_encoder"):
        caching.check_flags(parse_args(["--cache_text_embeddings", "--train_text_encoder"]))


# ----------------------------------------------------------------------------- checkpoints and resume
@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run: Path, assets: object) -> Path:
    """6 steps, a checkpoint every 2, at most 2 kept (shared with test_faults: tests/trainer/conftest.py)."""
    return uninterrupted_run


def test_checkpoints_total_limit_keeps_the_newest(uninterrupted: Path) -> None:
    assert checkpointing.list_checkpoints(uninterrupted) == ["checkpoint-4", "checkpoint-6"]
    # No temporary leftovers (the run lock stays, released and empty: trainer.ownership).
    assert not [p.name for p in uninterrupted.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path: Path, uninterrupted: Path) -> None:
    """Stopped after 3 steps (checkpoint-2 is the last), resumed from it in the middle of epoch 0: the data
    order, augmentations, noise and optimizer state continue exactly, through the epoch boundary."""
    out = tmp_path / "resumed"
    run_main([*TINY, "--max_train_steps", "3", "--checkpointing_steps", "2", "--output_dir", str(out)])
    resumed, _, _ = run_main([*TINY, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", "--output_dir", str(out)])
    reference = summary(uninterrupted)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["first_step"] == 2
    assert resumed["loss_history"] == reference["loss_history"][2:]
    assert lora_bytes(out) == lora_bytes(uninterrupted)


def test_dataloader_workers_do_not_change_the_run(tmp_path: Path, uninterrupted: Path) -> None:
    """Augmentations draw from per-sample seeds: 2 worker processes train on exactly what 0 do (the
    uninterrupted run's first 3 steps: checkpoints and a longer run change no step before them)."""
    workers, _, _ = run_main([*TINY, "--max_train_steps", "3", "--dataloader_num_workers", "2", "--output_dir", str(tmp_path / "w2")])
    assert workers["loss_history"] == summary(uninterrupted)["loss_history"][:3]


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    sampler = sampling.EpochShuffleSampler(10, seed=5)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert [epoch for epoch, _ in keys] == [3] * 10 and sorted(i for _, i in keys) == list(range(10))
    other = sampling.EpochShuffleSampler(10, seed=5)
    other.set_epoch(0)
    list(other)
    other.set_epoch(3)
    assert list(other) == keys
    other.set_epoch(4)
    assert list(other) != keys


def test_per_sample_seeding_leaves_the_global_rngs_alone() -> None:
    import random

    class Draws:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> tuple[float, float]:
            return random.random(), float(torch.rand(()))

    dataset = sampling.SeededSampleDataset(Draws(), seed=1)
    torch.manual_seed(0)
    random.seed(0)
    first = dataset[(2, 1)]
    assert dataset[(2, 1)] == first and dataset[(3, 1)] != first  # a function of (seed, epoch, index)
    after = (random.random(), float(torch.rand(())))
    torch.manual_seed(0)
    random.seed(0)
    assert (random.random(), float(torch.rand(()))) == after  # the training streams did not move
