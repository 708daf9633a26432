"""Deterministic data order, so that a resumed run sees exactly the batches the interrupted one would have.

Two things make diffusers' ``DataLoader(shuffle=True)`` impossible to resume exactly:

* the shuffle order of an epoch comes from the global torch RNG at the moment the iterator is created;
* the random augmentations (flip, random crop, caption choice) draw from the global RNGs too,
  interleaved with the noise and timesteps of the training step, and one batch ahead (the
  dataloader prefetches), so the RNG state a checkpoint stores already contains the next batch's draws.

Here both depend only on ``(data seed, epoch, sample index)``:

* :class:`EpochShuffleSampler` draws epoch ``e``'s permutation from a generator seeded with
  ``(seed, e)`` and yields ``(epoch, index)`` keys;
* :class:`SeededSampleDataset` fetches each sample with Python's, NumPy's and torch's global RNGs
  temporarily seeded from ``(seed, epoch, index)`` and then restored. The transform code itself is
  unchanged (diffusers' ``random.random() < 0.5`` flip, ``RandomCrop.get_params``' ``torch.randint``), it
  just draws from a per-sample stream; the training step's RNG stream is never touched by data loading.

So epoch ``e`` is the same sequence of the same augmented samples whatever happened before: a fresh
run, a resume in the middle of the epoch (the consumed batches are skipped), 0 or 8 dataloader workers.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch

from trainer.interrupts import WorkerSignals

SampleKey = tuple[int, int]  # (epoch, index in the dataset)


def derive_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence: nearby inputs, unrelated outputs)."""
    state = np.random.SeedSequence([int(x) & 0xFFFFFFFFFFFFFFFF for x in entropy]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's legacy RNG and torch's CPU generator; restore them on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def isolated_global_rngs() -> Iterator[None]:
    """Run a block (validation, caching) without changing the global RNG streams training draws from:
    Python's, NumPy's, torch's CPU generator and the accelerator's (CUDA or Ascend NPU) generators."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    module, devices = accelerator_rng_devices()
    # What torch.random.fork_rng does, by hand: fork_rng looks the device module up by device-type name,
    # and "npu" is only a device type once torch_npu has renamed PrivateUse1.
    device_states = [module.get_rng_state(index) for index in devices] if module is not None else []
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        for index, state in zip(devices, device_states):
            module.set_rng_state(state, index)


def accelerator_rng_devices() -> tuple[Any, list[int]]:
    """(``torch.cuda`` or ``torch.npu``, device indices) whose generators :func:`isolated_global_rngs` forks.

    Training draws its noise and timesteps on the accelerator; a validation pipeline may draw from the
    same generator, so it is saved and restored on NPU as on CUDA (``torch.npu`` is torch_npu's module,
    with CUDA's ``get_rng_state``/``set_rng_state`` API). (None, []) on a CPU-only machine.
    """
    for device_type in ("cuda", "npu"):
        module = getattr(torch, device_type, None)
        if module is not None and module.is_available():
            return module, list(range(module.device_count()))
    return None, []


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Shuffles ``range(num_samples)`` with a permutation that depends only on ``(seed, epoch)``.

    Yields ``(epoch, index)`` so that the dataset knows which per-sample RNG stream to use, also in
    worker processes. Accelerate shards the batches of this sampler across processes; every process
    computes the same permutation from the same seed, so no RNG synchronisation is needed.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        return iter([(epoch, index) for index in self.permutation(epoch)])

    def __len__(self) -> int:
        return self.num_samples


class SeededSampleDataset(torch.utils.data.Dataset):
    """``dataset[index]`` computed under RNGs seeded from ``(seed, epoch, index)``; keys are ``(epoch, index)``."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        epoch, index = key
        with seeded_global_rngs(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]


def build_dataloader(
    dataset: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    collate_fn: Callable[[list[Any]], Any],
    drop_last: bool = False,
    batch_sampler: Any = None,
) -> tuple[torch.utils.data.DataLoader, Any]:
    """The training dataloader (shuffled, seeded, resumable) and its sampler (call ``set_epoch``).

    ``drop_last``: leave out an epoch's partial last batch (``--compile``: one batch shape for the run).
    ``batch_sampler``: batches of ``(epoch, index)`` keys made elsewhere (``trainer.buckets``) instead of
    :class:`EpochShuffleSampler`'s order cut into ``batch_size`` batches; it is the sampler returned.
    """
    sampler = batch_sampler if batch_sampler is not None else EpochShuffleSampler(len(dataset), seed)
    batching: dict[str, Any] = (
        {"batch_sampler": sampler} if batch_sampler is not None else {"sampler": sampler, "batch_size": batch_size, "drop_last": drop_last}
    )
    # Its own generator: creating an iterator draws the workers' base seed from it instead of from the
    # global torch RNG, which would shift the training step's noise after a resume.
    generator = torch.Generator().manual_seed(derive_seed(seed, 2**31))
    loader = torch.utils.data.DataLoader(
        SeededSampleDataset(dataset, seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=generator,
        **batching,
        # Workers survive a Ctrl-C / SLURM SIGTERM long enough for the main process to stop gracefully.
        worker_init_fn=WorkerSignals() if num_workers > 0 else None,
    )
    return loader, sampler
