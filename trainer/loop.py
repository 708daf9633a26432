"""The SDXL LoRA training step and loop (diffusers' ``train_text_to_image_lora_sdxl.py`` semantics).

Per step: VAE-encode the pixels (``latent_dist.sample() * scaling_factor``), add DDPM noise at uniformly
drawn timesteps (plus ``--noise_offset``), condition the UNet on the concatenated penultimate hidden
states of both text encoders, the second encoder's pooled embedding and the time ids
``original_size + crop_top_left + target_size``, and regress the noise (or the velocity for
v-prediction) with an MSE computed in float32, optionally Min-SNR weighted.

With ``--cache_latents`` / ``--cache_text_embeddings`` (:mod:`trainer.caching`) a batch carries the VAE's
latent distribution and the prompt embeddings instead of pixels and token ids; the step then samples the
latents from the cached distribution, drawing the same random numbers as ``vae.encode(...).sample()``.

The loop adds, to diffusers' loop: a stop at the first non-finite loss, or with fp16 after
``--max_nonfinite_steps`` skipped steps in a row (:mod:`trainer.guards`), a graceful stop on SIGINT/SIGTERM at a step boundary (:mod:`trainer.interrupts`), and an exact
continuation of the data order after a resume (:mod:`trainer.sampling`, :mod:`trainer.checkpointing`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from trainer import distributed
from trainer.guards import DEFAULT_MAX_NONFINITE_STEPS, NonFiniteLossPolicy
from trainer.hooks import TrainingHooks
from trainer.metrics import StepRecord, TrainingHistory
from trainer.models import encode_prompt

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pieces of a step
def compute_time_ids(
    original_sizes: Sequence[Sequence[int]],
    crop_top_lefts: Sequence[Sequence[int]],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
    target_sizes: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per image: (orig_h, orig_w, crop_y, crop_x, target_h, target_w).

    The target is each image's trained size (``target_sizes``: its bucket with ``--enable_bucket``), else
    the ``resolution`` square."""
    targets = target_sizes or [(resolution, resolution)] * len(original_sizes)
    rows = [list(original) + list(crop) + list(target) for original, crop, target in zip(original_sizes, crop_top_lefts, targets)]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: Any,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE in float32; with ``snr_gamma``, Min-SNR weights min(snr, gamma) / snr for epsilon targets and
    min(snr, gamma) / (snr + 1) for v-prediction (https://arxiv.org/abs/2303.09556, section 3.4)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * weights
    return loss.mean()


@dataclass
class StepContext:
    """What a training step reads besides the batch."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: Sequence[torch.nn.Module]
    noise_scheduler: Any
    weight_dtype: torch.dtype
    separate_vae: bool
    resolution: int
    noise_offset: float
    snr_gamma: float | None
    device: torch.device


def training_loss(ctx: StepContext, batch: dict[str, Any]) -> torch.Tensor:
    """Forward pass of one batch to its (scalar) loss."""
    with torch.no_grad():
        if "latent_parameters" in batch:  # --cache_latents: the encoder ran once, sample its distribution
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            model_input = DiagonalGaussianDistribution(batch["latent_parameters"].to(ctx.device)).sample()
        else:
            # The model's own VAE runs in float32 (SDXL's overflows in fp16); a separate one in weight_dtype.
            dtype = ctx.weight_dtype if ctx.separate_vae else torch.float32
            pixel_values = batch["pixel_values"].to(ctx.device, dtype=dtype)
            model_input = ctx.vae.encode(pixel_values).latent_dist.sample()
    model_input = model_input * ctx.vae.config.scaling_factor
    # Contiguous: randn_like below follows the input's strides, and the VAE's output layout depends on the
    # conv algorithm (on CPU, channels_last for some batch sizes), so the noise would depend on it too;
    # cached latents (trainer.caching) must draw exactly the noise fresh ones do.
    model_input = model_input.to(ctx.weight_dtype).contiguous()

    noise = torch.randn_like(model_input)
    if ctx.noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += ctx.noise_offset * torch.randn((model_input.shape[0], model_input.shape[1], 1, 1), device=model_input.device)
    bsz = model_input.shape[0]
    timesteps = torch.randint(0, ctx.noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device).long()
    noisy_model_input = ctx.noise_scheduler.add_noise(model_input, noise, timesteps)

    add_time_ids = compute_time_ids(
        batch["original_sizes"], batch["crop_top_lefts"], ctx.resolution, ctx.device, ctx.weight_dtype, batch.get("target_sizes")
    )
    if "prompt_embeds" in batch:  # --cache_text_embeddings
        prompt_embeds = batch["prompt_embeds"].to(ctx.device)
        pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(ctx.device)
    else:
        prompt_embeds, pooled_prompt_embeds = encode_prompt(ctx.text_encoders, [batch["input_ids_one"], batch["input_ids_two"]])
    model_pred = ctx.unet(
        noisy_model_input,
        timesteps,
        prompt_embeds,
        added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds},
        return_dict=False,
    )[0]

    prediction_type = ctx.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = ctx.noise_scheduler.get_velocity(model_input, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {prediction_type}")
    return diffusion_loss(model_pred, target, timesteps, ctx.noise_scheduler, ctx.snr_gamma)


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    max_train_steps: int
    num_train_epochs: int
    first_epoch: int
    initial_global_step: int
    train_batch_size: int
    max_grad_norm: float
    checkpointing_steps: int
    debug_loss: bool = False
    skip_batches: int = 0  # batches of first_epoch a resumed run skips (the interrupted run used them)
    max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS  # with a gradient scaler (fp16) only
    logging_steps: int = 1  # read the loss on the host every N optimizer steps (see train_loop)

    def reads_loss(self, step: int) -> bool:
        """Whether optimizer step ``step`` reads the pending losses on the host (a device synchronisation)."""
        return (
            step % self.logging_steps == 0
            or step >= self.max_train_steps
            or bool(self.checkpointing_steps and step % self.checkpointing_steps == 0)  # weights checked before saving
        )


@dataclass
class LoopCallbacks:
    """What the loop calls back into the recipe (every one optional).

    ``on_epoch_end(epoch)`` runs validation; ``on_batch(batch)`` sees each batch first (it counts skipped
    bad images); ``save_checkpoint(step)`` runs on every process; ``stop_requested()`` says whether this
    process was asked to stop (a SIGINT/SIGTERM: :mod:`trainer.interrupts`); ``set_epoch(epoch)`` fixes the
    data order of each epoch.
    """

    on_epoch_end: Callable[[int], None] | None = None
    on_batch: Callable[[dict[str, Any]], None] | None = None
    save_checkpoint: Callable[[int], None] | None = None
    stop_requested: Callable[[], bool] | None = None
    set_epoch: Callable[[int], None] | None = None


def _timed(iterable: Iterable[Any]) -> Iterable[tuple[Any, float]]:
    """Yield (item, seconds spent producing it): the data-loading share of each step."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - start


def batch_images(batch: dict[str, Any]) -> int:
    """How many images ``batch`` holds (the first dimension of its first tensor): a partial last batch
    holds fewer than ``--train_batch_size``."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def train_loop(*args: Any, **kwargs: Any) -> TrainingHistory:
    """``TrainLoop(*args, **kwargs).run()``: run epochs ``first_epoch..num_train_epochs`` until
    ``max_train_steps`` optimizer steps (the arguments: :class:`TrainLoop`'s).

    Returns one :class:`StepRecord` per optimizer step. Called on every process: checkpoints every
    ``checkpointing_steps`` and when stopping early; a stop request (``callbacks.stop_requested()``) is
    agreed on by all processes after each optimizer step and ends the loop with ``history.stopped_early``.

    The loss of each optimizer step (averaged over processes and micro-steps) stays on the device until a
    step that reads it (``config.reads_loss``: every ``logging_steps``-th step, checkpoint steps, the last
    step), which reads all pending ones in one transfer, after backward was queued, and logs them (the
    progress bar, the trackers, ``history``). With ``logging_steps=1`` (default) that is every step.
    :class:`~trainer.guards.NonFiniteLossPolicy` judges each value: without a gradient scaler a non-finite
    one raises :class:`~trainer.errors.NonFiniteLossError` -- before the optimizer update when it is the
    reading step's own loss, else at the next reading step (the weights updated in between are never
    saved: checkpoints come after a read); with one (fp16) the scaler skips the step, counted in
    ``history.skipped_steps``. Between reads the host queues steps without waiting for the device (on
    several processes the stop-request agreement, a collective, also waits for reading steps).
    """
    return TrainLoop(*args, **kwargs).run()


class TrainLoop:
    """The state of one run of the training loop (:func:`train_loop`); each method is one named part of
    an optimizer step: :meth:`_micro_step`, :meth:`_finish_step`, :meth:`_maybe_checkpoint`, :meth:`_maybe_stop`."""

    def __init__(
        self,
        accelerator: Any,
        config: LoopConfig,
        step_ctx: StepContext,
        trainable_modules: Sequence[torch.nn.Module],
        optimizer: Any,
        lr_scheduler: Any,
        dataloader: Any,
        params_to_clip: list[torch.nn.Parameter],
        progress_bar: Any,
        callbacks: LoopCallbacks | None = None,
        hooks: TrainingHooks | None = None,
    ) -> None:
        callbacks, hooks = callbacks or LoopCallbacks(), hooks or TrainingHooks()
        self.dataloader = dataloader
        self.accelerator, self.config, self.step_ctx = accelerator, config, step_ctx
        self.trainable_modules, self.optimizer, self.lr_scheduler = trainable_modules, optimizer, lr_scheduler
        self.params_to_clip, self.progress_bar, self.callbacks, self.hooks = params_to_clip, progress_bar, callbacks, hooks
        self.stop_requested = callbacks.stop_requested or (lambda: False)
        self.policy = NonFiniteLossPolicy(
            scaler_skips=getattr(accelerator, "scaler", None) is not None, max_consecutive=config.max_nonfinite_steps
        )
        self.history = TrainingHistory()
        self.global_step = config.initial_global_step
        self.history.last_checkpoint_step = self.global_step  # the resumed-from checkpoint already holds this state
        self.pending: list[tuple[StepRecord, torch.Tensor, int]] = []  # (record, its loss on the device, epoch) until read
        self.unlogged: list[StepRecord] = []  # records read or not, not yet logged
        self._start_step()

    # ------------------------------------------------------------------ epochs
    def run(self) -> TrainingHistory:
        for epoch in range(self.config.first_epoch, self.config.num_train_epochs):
            for module in self.trainable_modules:
                module.train()
            for batch, waited in _timed(self._epoch_batches(self.dataloader, epoch)):
                self.data_time += waited
                if self._micro_step(batch, epoch):
                    self._finish_step()
                    if self._maybe_stop():
                        break
                if self.global_step >= self.config.max_train_steps:
                    break
            if self.history.stopped_early:
                break
            if self.callbacks.on_epoch_end is not None:
                self.callbacks.on_epoch_end(epoch)
            if self.global_step >= self.config.max_train_steps:
                break
        self._read_and_log_pending()  # the dataset ran out between reads
        return self.history

    def _epoch_batches(self, dataloader: Any, epoch: int) -> Any:
        if self.callbacks.set_epoch is not None:
            self.callbacks.set_epoch(epoch)
        batches = dataloader
        if epoch == self.config.first_epoch and self.config.skip_batches:
            # Resumed mid-epoch: the same epoch order (set_epoch), without the batches already trained on.
            batches = self.accelerator.skip_first_batches(dataloader, self.config.skip_batches)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)  # accelerate re-applies its own epoch counter on iteration
        self._start_step()
        return batches

    def _start_step(self) -> None:
        self.train_loss: torch.Tensor | None = None  # on the device: read once per optimizer step
        self.data_time = 0.0
        self.images = 0
        self.finite = True
        self.record: StepRecord | None = None
        self.step_start = time.perf_counter()

    # ------------------------------------------------------------------ one step
    def _micro_step(self, batch: dict[str, Any], epoch: int) -> bool:
        """Forward and backward of one batch, and the optimizer update when it ends an accumulation.
        Returns whether it did (``accelerator.sync_gradients``)."""
        accelerator, config = self.accelerator, self.config
        step = self.global_step + 1
        self.hooks.on_batch(step, batch)
        if self.callbacks.on_batch is not None:
            self.callbacks.on_batch(batch)
        # Every process trains a batch of the same size (accelerate's even_batches): count this one's.
        self.images += batch_images(batch) * accelerator.num_processes
        with accelerator.accumulate(self.trainable_modules[0]):
            loss = self.hooks.on_loss(step, training_loss(self.step_ctx, batch))
            if config.debug_loss and "filenames" in batch:
                for name in batch["filenames"]:
                    accelerator.log({"loss_for_" + name: loss}, step=self.global_step)
            # Gather the losses across all processes for logging (if we use distributed training).
            avg_loss = accelerator.gather(loss.detach().repeat(config.train_batch_size)).mean()
            share = avg_loss / accelerator.gradient_accumulation_steps
            self.train_loss = share if self.train_loss is None else self.train_loss + share
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self.record = StepRecord(step=step, loss=math.nan, lr=0.0, images=0, step_time=0.0, data_time=0.0)  # filled below
                self.pending.append((self.record, self.train_loss.detach(), epoch))
                if config.reads_loss(step):
                    # The host read (of this and earlier steps' losses), after backward was queued. Every
                    # process holds the same gathered values, so all decide alike, before this update.
                    self.finite = _read_losses(self.pending, self.policy)
                self.hooks.before_optimizer_step(step, self.stop_requested)
                accelerator.clip_grad_norm_(self.params_to_clip, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return bool(accelerator.sync_gradients)

    def _finish_step(self) -> None:
        """Record and log the optimizer step just made, then :meth:`_maybe_checkpoint`."""
        # On a reading step the read synchronised the device, so the wall clock covers the step's compute;
        # between reads a step's time is the host's, and the next read's step waits for the device: the
        # sum over steps is the run's time either way.
        now = time.perf_counter()
        self.global_step += 1
        record = self.record
        assert record is not None
        skipped = not self.finite or bool(getattr(self.optimizer, "step_was_skipped", False))
        self.history.skipped_steps += skipped
        record.lr = self.lr_scheduler.get_last_lr()[0]
        record.images = self.images
        record.step_time, record.data_time, record.skipped = now - self.step_start, self.data_time, skipped
        self.history.add(record)
        self.unlogged.append(record)
        self.progress_bar.update(1)
        if self.config.reads_loss(self.global_step):
            _log_read_steps(self.accelerator, self.progress_bar, self.history, self.policy, self.unlogged)
        self._maybe_checkpoint()

    def _maybe_checkpoint(self, stopping: bool = False) -> None:
        """Every ``checkpointing_steps`` steps, and when stopping (unless this step is saved already)."""
        step = self.global_step
        if self.callbacks.save_checkpoint is None or self.history.last_checkpoint_step == step and stopping:
            return
        every = self.config.checkpointing_steps
        if stopping or (every and step % every == 0):
            self.callbacks.save_checkpoint(step)  # every process: each stores its RNG state
            self.history.last_checkpoint_step = step

    def _maybe_stop(self) -> bool:
        """Whether any process was asked to stop: then the pending losses are read, a checkpoint saved, and
        the loop ends (``history.stopped_early``). Otherwise the next step's clock starts."""
        accelerator = self.accelerator
        agree_now = accelerator.num_processes == 1 or self.config.reads_loss(self.global_step)  # a collective: not every step
        if agree_now and distributed.any_process(accelerator, self.stop_requested()):
            self._read_and_log_pending()  # the losses of the steps since the last read, before anything is saved
            self._maybe_checkpoint(stopping=True)
            self.history.stopped_early = True
            return True
        self._start_step()  # checkpoint writes do not count as training time
        return False

    def _read_and_log_pending(self) -> None:
        if self.pending:
            _read_losses(self.pending, self.policy)
            _log_read_steps(self.accelerator, self.progress_bar, self.history, self.policy, self.unlogged)


def _read_losses(pending: list[tuple[StepRecord, torch.Tensor, int]], policy: NonFiniteLossPolicy) -> bool:
    """Read the pending steps' losses in one device-to-host transfer into their records; empties ``pending``.

    Each value is judged by ``policy`` in step order (raising for a non-finite loss as it says); returns
    whether the last one was finite.
    """
    values = torch.stack([loss for _, loss, _ in pending]).tolist()
    finite = True
    for (record, _, epoch), value in zip(pending, values):
        record.loss = float(value)
        finite = policy.check(record.loss, record.step, epoch)
    pending.clear()
    return finite


def _log_read_steps(
    accelerator: Any, progress_bar: Any, history: TrainingHistory, policy: NonFiniteLossPolicy, records: list[StepRecord]
) -> None:
    """Log the steps whose losses were just read (and empty ``records``): trackers per step, the bar's postfix once."""
    history.nonfinite_loss_steps = policy.total
    for record in records:
        accelerator.log(
            {
                "train_loss": record.loss,
                "lr": record.lr,
                "images_per_sec": record.images / max(record.step_time, 1e-9),
                "skipped_steps": history.skipped_steps,
            },
            step=record.step,
        )
    if records:
        last = records[-1]
        progress_bar.set_postfix(
            step_loss=f"{last.loss:.4f}", lr=last.lr, images_per_sec=f"{last.images / max(last.step_time, 1e-9):.2f}"
        )
    records.clear()


def num_update_steps(dataloader_len: int, gradient_accumulation_steps: int) -> int:
    return math.ceil(dataloader_len / gradient_accumulation_steps)
