"""Every flag the trainer accepts has a tested effect; the embedded pipeline only when asked for; fp16
non-finite steps skipped; summary.json says what actually ran.

Short in-process runs of the embedded pipeline (2 steps) where a whole run is needed, unit tests of the
function a flag drives elsewhere. CPU only: flags that need a library or device this machine lacks are
tested for their one-line refusal, and the device switches against stand-in ``torch.npu`` modules.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.trainer.runs import REPO, trainer_env
from trainer import distributed, guards, loop, metrics, models, optim, sampling
from trainer.args import EMBEDDED, parse_args
from trainer.embedded_default import EMBEDDED_OVERRIDES
from trainer.errors import EXIT_INPUT_ERROR, NonFiniteLossError
from trainer.hooks import TrainingHooks


# ----------------------------------------------------------------------------- helpers
def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def _clean_run() -> Iterator[None]:
    threads = torch.get_num_threads()  # the embedded run pins 1 thread; give later tests theirs back
    _reset_accelerate()
    try:
        yield
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``trainer.sdxl_lora.cli(argv)`` in-process: (exit status, stdout, stderr)."""
    from trainer.sdxl_lora import cli

    out, err = io.StringIO(), io.StringIO()
    with _clean_run(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli(argv)
    return status, out.getvalue(), err.getvalue()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Square images read from named files (what --debug_loss needs; square: --cache_latents accepts them)."""
    from tests.trainer.test_data import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("folder") / "train", rows=8)


# ----------------------------------------------------------------------------- 16.1 embedded only when asked for
@pytest.mark.parametrize("flag", ["--dataset_name", "--train_data_dir"])
def test_dataset_without_model_exits_2_naming_the_missing_flag(flag: str, tmp_path: Path, imagefolder: Path) -> None:
    out = tmp_path / "out"
    status, _, stderr = run_cli([flag, str(imagefolder), "--output_dir", str(out)])
    assert status == EXIT_INPUT_ERROR, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith(f"error: --pretrained_model_name_or_path is required with {flag} {imagefolder}"), errors[0]
    assert not out.exists()  # nothing written


def test_model_without_dataset_and_empty_flags_are_refused(tmp_path: Path, assets: Any) -> None:
    out = tmp_path / "out"
    status, _, stderr = run_cli(["--pretrained_model_name_or_path", str(assets.model_dir), "--output_dir", str(out)])
    assert status == EXIT_INPUT_ERROR
    assert _error_lines(stderr)[0].startswith("error: --dataset_name or --train_data_dir is required with --pretrained_model_name_or_path")
    # What a launch script passes for an empty --model_name=: never a silent fallback to the tiny pipeline.
    status, _, stderr = run_cli(["--pretrained_model_name_or_path=", "--dataset_name", "x", "--output_dir", str(out)])
    assert status == EXIT_INPUT_ERROR
    assert _error_lines(stderr) == ["error: --pretrained_model_name_or_path is empty: give a path or hub id (or leave the flag out)"]
    assert not out.exists()


def test_embedded_assets_by_name() -> None:
    nothing = parse_args([])
    assert nothing.embedded_model and nothing.embedded_dataset
    own_data = parse_args(["--pretrained_model_name_or_path", EMBEDDED, "--dataset_name", "/data/mine"])
    assert own_data.embedded_model and not own_data.embedded_dataset
    assert own_data.resolution == EMBEDDED_OVERRIDES["resolution"]  # the tiny model's sizes, as documented
    forgot_model = parse_args(["--dataset_name", "/data/mine"])
    assert not forgot_model.embedded_model and forgot_model.pretrained_model_name_or_path is None
    assert forgot_model.resolution == 1024  # diffusers' defaults untouched
    real_on_shapes = parse_args(["--pretrained_model_name_or_path", "/m", "--dataset_name", EMBEDDED])
    assert real_on_shapes.embedded_dataset and not real_on_shapes.embedded_model


def test_launch_script_with_empty_model_name_and_a_dataset_fails(tmp_path: Path, assets_cache: Path, imagefolder: Path) -> None:
    """Ascend's 1p script drops an empty --model_name=; with a dataset the trainer then refuses to start."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "trainer" / "scripts" / "train_1p_text_to_image_sdxl_lora.sh"), "--model_name=", "--vae_name=",
         f"--dataset_name={imagefolder}", f"--output_dir={out}", "--max_train_steps=1"],
        cwd=tmp_path, env=trainer_env(assets_cache, PYTHON=sys.executable), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    log = (out / "train_0.log").read_text()
    assert "error: --pretrained_model_name_or_path is required with --dataset_name" in log
    assert not (out / "summary.json").exists()


# ----------------------------------------------------------------------------- 16.4 flags, through short runs
@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory: pytest.TempPathFactory, assets: Any, imagefolder: Path) -> dict[bool, dict[str, Any]]:
    """Two-step runs of the embedded pipeline on named image files, with and without --cache_latents:
    --debug_loss, --scale_lr, --allow_tf32, --prediction_type, --noise_offset; what was logged and printed."""
    import accelerate

    runs: dict[bool, dict[str, Any]] = {}
    for cache_latents in (False, True):
        out = tmp_path_factory.mktemp("debug")
        argv = [
            "--pretrained_model_name_or_path", EMBEDDED, "--train_data_dir", str(imagefolder), "--center_crop",
            "--train_batch_size", "2", "--max_train_steps", "2", "--num_validation_images", "0", "--report_to", "none",
            "--output_dir", str(out), "--debug_loss", "--scale_lr", "--allow_tf32", "--prediction_type", "v_prediction",
            "--noise_offset", "0.1",
        ] + (["--cache_latents"] if cache_latents else [])  # fmt: skip
        logged: list[dict[str, Any]] = []
        original_log = accelerate.Accelerator.log

        def record(
            self: Any, values: dict[str, Any], step: int | None = None, log_kwargs: Any = None, logged: list = logged, original_log: Any = original_log
        ) -> None:
            logged.append(dict(values))
            original_log(self, values, step=step)

        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("trainer").addHandler(handler)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(accelerate.Accelerator, "log", record)
                status, stdout, stderr = run_cli(argv)
        finally:
            logging.getLogger("trainer").removeHandler(handler)
        assert status == 0, stderr[-3000:]
        import json

        summary = json.loads((out / "summary.json").read_text())
        runs[cache_latents] = {"summary": summary, "logged": logged, "stdout": stdout, "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING]}
    return runs


@pytest.mark.parametrize("cache_latents", [False, True], ids=["pixels", "cache_latents"])
def test_debug_loss_logs_one_loss_per_image_file(debug_runs: dict, cache_latents: bool, imagefolder: Path) -> None:
    logged = debug_runs[cache_latents]["logged"]
    names = {key.removeprefix("loss_for_") for values in logged for key in values if key.startswith("loss_for_")}
    files = {p.name for p in imagefolder.glob("*.png")}
    assert len(names) == 4 and names <= files  # 2 steps x batch 2, each image once
    step_keys = [values for values in logged if "train_loss" in values]
    assert len(step_keys) == 2 and all({"lr", "images_per_sec", "skipped_steps"} <= set(v) for v in step_keys)


def test_scale_lr_allow_tf32_prediction_type_reach_the_run(debug_runs: dict) -> None:
    run = debug_runs[False]
    summary = run["summary"]
    assert summary["learning_rate"] == pytest.approx(EMBEDDED_OVERRIDES["learning_rate"] * 2)  # x batch 2 x 1 process x 1 step
    assert all(step_lr == pytest.approx(summary["learning_rate"]) for step_lr in [v["lr"] for v in run["logged"] if "lr" in v])
    assert summary["prediction_type"] == "v_prediction" and summary["allow_tf32"]
    tf32 = [w for w in run["warnings"] if "--allow_tf32" in w]
    assert tf32 == ["--allow_tf32 has no effect on cpu: TF32 (CUDA) / HF32 (Ascend NPU) only exist there."]
    assert summary["optimizer"] == "AdamW (fused)"  # torch's fused AdamW on the CPU


def test_summary_counts_the_backend_each_op_was_served_by(debug_runs: dict) -> None:
    """Counted from the dispatch decisions while training (on this CPU: the torch backend, SDPA for
    attention), per forward call."""
    summary = debug_runs[False]["summary"]
    kernels = summary["kernels"]
    steps = summary["steps"]
    served = summary["backends"]
    assert served["geglu"] == {"torch": kernels["geglu"] * steps}
    assert served["group_norm_silu"] == {"torch": (2 * kernels["resnet_blocks"] + kernels["norm_out_pairs"]) * steps}
    attention = sum(served.get(op, {}).get("sdpa", 0) for op in ("flash_attention", "cross_attention"))
    assert attention == kernels["attention_processors"] * steps
    assert summary["kernels_left_alone"] == []
    assert "backends: cross_attention=sdpa x" in debug_runs[False]["stdout"]


def test_embedded_pipeline_is_said_plainly(debug_runs: dict) -> None:
    run = debug_runs[True]
    assert run["summary"]["embedded_pipeline"] is True and run["summary"]["embedded_dataset"] is False
    assert "model: the EMBEDDED TINY PIPELINE" in run["stdout"]
    assert any("Training the EMBEDDED TINY PIPELINE" in w and "on your dataset" in w for w in run["warnings"])


def test_count_selections_records_what_dispatch_chose() -> None:
    import npu_kernels
    from npu_kernels import backends

    x = torch.randn(3, 8)
    with backends.count_selections() as counts:
        npu_kernels.geglu(x)
        npu_kernels.geglu(x)
        with backends.use_backend("triton"):
            npu_kernels.geglu(x)
    npu_kernels.geglu(x)  # outside the block: not counted
    assert counts == {("geglu", "torch"): 2, ("geglu", "triton"): 1}
    assert metrics.backends_served(counts) == {"geglu": {"torch": 2, "triton": 1}}
    assert metrics.format_backends({"geglu": {"torch": 2, "triton": 1}}) == "geglu=torch x2+triton x1"


# ----------------------------------------------------------------------------- 16.4 flags that need what is absent here
def _absent(module: str) -> bool:
    return importlib.util.find_spec(module) is None


REFUSALS = [
    ("--use_8bit_adam", "bitsandbytes", "error: --use_8bit_adam needs the bitsandbytes library: pip install bitsandbytes"),
    ("--enable_xformers_memory_efficient_attention", "xformers",  # off CUDA the device is named first
     "error: --enable_xformers_memory_efficient_attention needs a CUDA GPU (xformers' attention is GPU-only); this run trains on the cpu"),
    ("--enable_npu_flash_attention", None, "error: --enable_npu_flash_attention needs an Ascend NPU (torch_npu); this run trains on the cpu"),
    ("--use_npu_fused_adamw", None, "error: --use_npu_fused_adamw needs an Ascend NPU (torch_npu); this run trains on the cpu"),
]  # fmt: skip


@pytest.mark.parametrize("flag,library,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_flags_needing_an_absent_library_or_device_are_one_line_errors(flag: str, library: str | None, message: str, tmp_path: Path) -> None:
    if library is not None and not _absent(library):
        pytest.skip(f"{library} is installed here: its effect is tested by the optimizer/processor tests")
    out = tmp_path / "out"
    status, _, stderr = run_cli([flag, "--output_dir", str(out)])
    assert status == EXIT_INPUT_ERROR
    assert _error_lines(stderr) == [message]
    assert not out.exists()


def _optimizer_args(*flags: str) -> Any:
    return parse_args(["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d", *flags])


def test_optimizer_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert optim.optimizer_class(_optimizer_args()) is torch.optim.AdamW
    adamw = optim.build_optimizer(_optimizer_args(), [torch.nn.Parameter(torch.zeros(2))], 0.25)
    assert adamw.param_groups[0]["fused"] and optim.describe(adamw) == "AdamW (fused)"
    meta = optim.build_optimizer(_optimizer_args(), [torch.nn.Parameter(torch.zeros(2, device="meta"))], 0.25)
    assert not meta.param_groups[0]["fused"] and optim.describe(meta) == "AdamW"  # no fused kernel there

    class NpuFusedAdamW(torch.optim.AdamW):
        pass

    fake = types.ModuleType("torch_npu")
    fake.optim = types.SimpleNamespace(NpuFusedAdamW=NpuFusedAdamW)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    assert optim.optimizer_class(_optimizer_args("--use_npu_fused_adamw")) is NpuFusedAdamW
    params = [torch.nn.Parameter(torch.zeros(2))]
    built = optim.build_optimizer(_optimizer_args("--use_npu_fused_adamw", "--adam_beta1", "0.8"), params, 0.25)
    assert isinstance(built, NpuFusedAdamW) and built.defaults["lr"] == 0.25 and built.defaults["betas"] == (0.8, 0.999)
    if _absent("bitsandbytes"):
        with pytest.raises(Exception, match="--use_8bit_adam needs the bitsandbytes library"):
            optim.optimizer_class(_optimizer_args("--use_8bit_adam"))
    else:
        import bitsandbytes as bnb

        assert optim.optimizer_class(_optimizer_args("--use_8bit_adam")) is bnb.optim.AdamW8bit


def test_scaled_learning_rate() -> None:
    args = _optimizer_args("--learning_rate", "1e-4", "--train_batch_size", "3", "--gradient_accumulation_steps", "2")
    assert optim.scaled_learning_rate(args, num_processes=8) == 1e-4
    args.scale_lr = True
    assert optim.scaled_learning_rate(args, num_processes=8) == pytest.approx(1e-4 * 3 * 2 * 8)


def test_npu_flash_attention_processors_are_set_and_left_alone_by_the_kernels(assets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--enable_npu_flash_attention installs diffusers' AttnProcessorNPU; optimize() leaves those alone and
    the summary lists them. (On this CPU the processor cannot run, only be installed: torch_npu is faked.)"""
    from diffusers import UNet2DConditionModel
    from diffusers.models import attention_processor

    monkeypatch.setattr(attention_processor, "is_torch_npu_available", lambda: True)
    unet = UNet2DConditionModel.from_pretrained(str(assets.model_dir), subfolder="unet")
    models.enable_attention_backends(unet, _optimizer_args("--enable_npu_flash_attention"))
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessorNPU"}
    report = models.apply_kernels(unet, True)
    assert report["attention_processors"] == 0
    assert len(report["skipped"]) == len(unet.attn_processors)
    assert all("attention processor AttnProcessorNPU" in entry for entry in report["skipped"])


@pytest.mark.skipif(_absent("xformers"), reason="xformers is not installed here (its refusal is tested above)")
def test_xformers_processors_are_set(assets: Any) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(assets.model_dir), subfolder="unet")
    models.enable_attention_backends(unet, _optimizer_args("--enable_xformers_memory_efficient_attention"))
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"XFormersAttnProcessor"}


# ----------------------------------------------------------------------------- 16.4 loss target and noise, by hand
class _ZeroUNet(torch.nn.Module):
    """Predicts zeros: the loss is then the mean square of the target itself."""

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        return (torch.zeros_like(sample),)


def _hand_context(prediction_type: str, noise_offset: float) -> loop.StepContext:
    from diffusers import DDPMScheduler

    # Two timesteps with betas 0.2 and 0.5: alphas_cumprod 0.8 and 0.4.
    scheduler = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.2, 0.5], prediction_type=prediction_type)
    return loop.StepContext(
        unet=_ZeroUNet(), vae=types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=0.5)), text_encoders=[],
        noise_scheduler=scheduler, weight_dtype=torch.float32, separate_vae=False, resolution=64,
        noise_offset=noise_offset, snr_gamma=None, device=torch.device("cpu"),
    )  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_offset", [0.0, 0.3])
def test_loss_target_and_noise_offset_by_hand(prediction_type: str, noise_offset: float) -> None:
    """--prediction_type picks the regression target, --noise_offset adds a per-channel constant to the
    noise: the loss of a zero prediction equals the mean square of the hand-built target."""
    batch_size, channels = 3, 4
    # Cached-latent batch: mean 1..., log-variance -2 (so sampling draws from torch's generator).
    mean = torch.randn(batch_size, channels, 4, 4)
    parameters = torch.cat([mean, torch.full_like(mean, -2.0)], dim=1)
    batch = {
        "latent_parameters": parameters, "prompt_embeds": torch.zeros(batch_size, 77, 8), "pooled_prompt_embeds": torch.zeros(batch_size, 8),
        "original_sizes": [(64, 64)] * batch_size, "crop_top_lefts": [(0, 0)] * batch_size,
    }  # fmt: skip
    torch.manual_seed(11)
    loss = loop.training_loss(_hand_context(prediction_type, noise_offset), batch)

    # The same draws, in the step's order: latent sample, noise, offset, timesteps.
    torch.manual_seed(11)
    latents = (mean + torch.exp(torch.tensor(-1.0)) * torch.randn_like(mean)) * 0.5
    noise = torch.randn_like(latents)
    if noise_offset:  # drawn only with the flag, so the timesteps below come next either way
        noise = noise + noise_offset * torch.randn(batch_size, channels, 1, 1)
    timesteps = torch.randint(0, 2, (batch_size,))
    alphas_cumprod = torch.tensor([0.8, 0.4])[timesteps].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
        target = alphas_cumprod.sqrt() * noise - (1 - alphas_cumprod).sqrt() * latents
    torch.testing.assert_close(loss, target.square().mean(), rtol=1e-5, atol=1e-6)


def test_prediction_type_flag_sets_the_scheduler() -> None:
    from diffusers import DDPMScheduler

    from trainer.sdxl_lora import _with_prediction_type

    assert _with_prediction_type(DDPMScheduler(), "v_prediction").config.prediction_type == "v_prediction"
    assert _with_prediction_type(DDPMScheduler(), None).config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------- 15.4 device switches
def test_allow_tf32_switches_per_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert distributed.allow_reduced_precision_matmul("cpu") == []
    assert [r.getMessage() for r in caplog.records] == ["--allow_tf32 has no effect on cpu: TF32 (CUDA) / HF32 (Ascend NPU) only exist there."]

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        assert distributed.allow_reduced_precision_matmul("cuda") == ["torch.backends.cuda.matmul.allow_tf32"]
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before

    npu = types.SimpleNamespace(matmul=types.SimpleNamespace(allow_hf32=False), conv=types.SimpleNamespace(allow_hf32=False))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    assert distributed.allow_reduced_precision_matmul("npu") == ["torch.npu.matmul.allow_hf32", "torch.npu.conv.allow_hf32"]
    assert npu.matmul.allow_hf32 is True and npu.conv.allow_hf32 is True


class _FakeNpuModule:
    """``torch.npu`` as far as the RNG fork uses it: per-device generator states."""

    def __init__(self, count: int) -> None:
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.count = count

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def get_rng_state(self, device: Any = "npu") -> torch.Tensor:
        return self.states[_index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: Any = "npu") -> None:
        self.states[_index(device)] = state.clone()


def _index(device: Any) -> int:
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def test_validation_forks_the_npu_generators_as_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation draws inside isolated_global_rngs must not move the NPU generators training draws from."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: its generators are the ones forked")
    fake = _FakeNpuModule(2)
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    assert sampling.accelerator_rng_devices() == (fake, [0, 1])
    with sampling.isolated_global_rngs():
        fake.set_rng_state(torch.tensor([99], dtype=torch.uint8), 1)  # a validation draw on device 1
        torch.rand(3)
    assert fake.states[1].tolist() == [1] and fake.states[0].tolist() == [0]


# ----------------------------------------------------------------------------- 16.2 non-finite losses
def test_non_finite_policy() -> None:
    strict = guards.NonFiniteLossPolicy(scaler_skips=False)
    assert strict.check(0.5, 1, 0)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        strict.check(float("nan"), 2, 0)
    fp16 = guards.NonFiniteLossPolicy(scaler_skips=True, max_consecutive=3)
    assert [fp16.check(v, s, 0) for s, v in enumerate([float("inf"), float("nan"), 1.0, float("nan"), float("nan")], 1)] == [False, False, True, False, False]
    with pytest.raises(NonFiniteLossError, match="in 3 consecutive steps up to step 6"):
        fp16.check(float("nan"), 6, 0)
    assert fp16.total == 5


class _NanAt(TrainingHooks):
    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.steps else loss


class _Bar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...


def _tiny_loop(monkeypatch: pytest.MonkeyPatch, scaler: bool, nan_steps: set[int], max_nonfinite: int, steps: int = 6) -> tuple[Any, list, list, list]:
    """train_loop on a Linear model, optionally with a gradient scaler (what accelerate uses for fp16; on
    this CPU accelerate refuses fp16 itself, so the scaler is installed by hand): (history or error,
    weights after each step, logged values, per-step skipped flags)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    if scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler("constant", optimizer=optimizer)
    batches = [{"x": torch.randn(2, 4)} for _ in range(steps)]
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    monkeypatch.setattr(loop, "training_loss", lambda ctx, batch: model(batch["x"]).square().mean())
    weights: list[torch.Tensor] = []
    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(accelerator, "log", lambda values, step=None: logged.append(dict(values)))

    class Recorder(_NanAt):
        def on_batch(self, step: int, batch: dict[str, Any]) -> None:
            weights.append(model.weight.detach().clone())  # the weights after step - 1

    config = loop.LoopConfig(
        max_train_steps=steps, num_train_epochs=1, first_epoch=0, initial_global_step=0,
        train_batch_size=2, max_grad_norm=1.0, checkpointing_steps=0, max_nonfinite_steps=max_nonfinite,
    )  # fmt: skip
    try:
        outcome: Any = loop.train_loop(accelerator, config, None, [model], optimizer, scheduler, batches, list(model.parameters()), _Bar(), hooks=Recorder(nan_steps))
    except NonFiniteLossError as error:
        outcome = error
    weights.append(model.weight.detach().clone())
    _reset_accelerate()
    return outcome, weights, logged, getattr(outcome, "records", [])


def test_fp16_scaler_skips_non_finite_steps_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    history, weights, logged, records = _tiny_loop(monkeypatch, scaler=True, nan_steps={2, 3}, max_nonfinite=3)
    assert not isinstance(history, Exception)
    assert len(records) == 6 and [r.skipped for r in records][1:3] == [True, True]
    assert history.nonfinite_loss_steps == 2 and history.skipped_steps >= 2
    # weights[k] = after step k: steps 2 and 3 changed nothing, steps 1, 4, 5, 6 did.
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[3], weights[4]) and not torch.equal(weights[0], weights[1])
    assert [v["skipped_steps"] for v in logged][:4] == [0, 1, 2, 2]  # the TensorBoard scalar
    summary = metrics.build_summary(history, global_batch=2, num_devices=1, peak_memory=[0], memory_kind="x", backends={})
    assert summary["skipped_steps"] == history.skipped_steps and summary["nonfinite_loss_steps"] == 2
    assert summary["final_train_loss"] == records[-1].loss  # finite; the skipped steps' NaN is not averaged in


def test_fp16_stops_after_max_nonfinite_steps_in_a_row_with_the_state_before_them(monkeypatch: pytest.MonkeyPatch) -> None:
    error, weights, _, _ = _tiny_loop(monkeypatch, scaler=True, nan_steps={2, 3, 4}, max_nonfinite=3)
    assert isinstance(error, NonFiniteLossError) and error.step == 4 and error.consecutive == 3
    assert torch.equal(weights[-1], weights[1])  # the weights of step 1, untouched by the 3 bad steps


def test_without_scaler_the_first_non_finite_loss_stops_before_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    error, weights, _, _ = _tiny_loop(monkeypatch, scaler=False, nan_steps={2}, max_nonfinite=5)
    assert isinstance(error, NonFiniteLossError) and error.step == 2 and error.consecutive == 1
    assert torch.equal(weights[-1], weights[1])


# ----------------------------------------------------------------------------- 15.5 --geglu_approximate
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_approximate_reaches_the_fused_geglu(assets: Any, approximate: str) -> None:
    """--geglu_approximate tanh reproduces stock diffusers on NPU (npu_geglu approximate=1); none is erf."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    assert parse_args([]).geglu_approximate == "none"
    assert parse_args(["--geglu_approximate", approximate]).geglu_approximate == approximate
    unet = UNet2DConditionModel.from_pretrained(str(assets.model_dir), subfolder="unet")
    report = models.apply_kernels(unet, True, approximate)
    assert report["geglu_approximate"] == approximate and report["geglu"] > 0
    geglu = next(m for m in unet.modules() if isinstance(m, GEGLU))
    x = torch.randn(2, 5, geglu.proj.in_features, dtype=torch.float64)
    geglu.double()
    with torch.no_grad():
        value, gate = geglu.proj(x).chunk(2, dim=-1)
        expected = value * torch.nn.functional.gelu(gate, approximate=approximate)
        other = value * torch.nn.functional.gelu(gate, approximate="tanh" if approximate == "none" else "none")
        got = geglu(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - other).abs().max() > 1e-6  # the two approximations differ measurably here


def test_recompute_geglu_projection_keeps_the_narrow_input(assets: Any) -> None:
    """--recompute geglu_projection: the feed-forward GEGLUs save their projection's input, not its output."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    assert parse_args([]).recompute == "none"
    assert parse_args(["--recompute", "geglu_projection"]).recompute == "geglu_projection"
    unet = UNet2DConditionModel.from_pretrained(str(assets.model_dir), subfolder="unet").requires_grad_(False)
    report = models.apply_kernels(unet, True, "none", "geglu_projection")
    assert report["recompute"] == "geglu_projection" and report["geglu"] > 0
    geglu = next(m for m in unet.modules() if isinstance(m, GEGLU))
    x = torch.randn(2, 5, geglu.proj.in_features, requires_grad=True)
    out = geglu(x)
    assert type(out.grad_fn).__name__ == "_EagerGegluProjectionBackward"
    assert [tuple(t.shape) for t in out.grad_fn.saved_tensors[:1]] == [tuple(x.shape)]
