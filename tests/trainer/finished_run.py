"""One finished tiny run that several test modules read (a session fixture, registered in conftest.py):
the fuzz cases refuse to touch it, the kohya tests load its LoRA files, the upload test reads its end.

5 images in batches of 2 for 4 steps, a checkpoint every 2 (``RUN``), plus ``--output_kohya_format``
and ``--push_to_hub`` to a local stand-in Hub that refuses the upload (``tests/trainer/fake_hub.py``):
the run trains, saves, fails to upload and exits 3 with everything on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.trainer.fake_hub import fake_hub
from tests.trainer.runs import run_trainer
from trainer.embedded_default import ensure_assets

# 5 images in batches of 2: every epoch ends with a partial batch of 1 (steps 3 and 6).
RUN = ["--max_train_samples", "5", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
       "--num_validation_images", "0", "--report_to", "none"]  # fmt: skip
HUB_REPO = "tester/tiny-lora"
EXTRA = ["--output_kohya_format", "--push_to_hub", "--hub_model_id", HUB_REPO]


@dataclass
class FinishedRun:
    dir: Path
    returncode: int
    stderr: str
    hub_requests: list[str] = field(default_factory=list)  # what the stand-in Hub was asked, in order


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, assets_cache: Path) -> FinishedRun:
    out = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        ensure_assets()  # generated here, not raced for by a later subprocess
    with fake_hub() as hub:
        # HF_TOKEN: a token for preflight's whoami; HF_ENDPOINT: huggingface_hub reads it when imported.
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
        result = run_trainer([*RUN, *EXTRA, "--output_dir", str(out)], assets_cache, **hub_env)
        requests = list(hub.requests)
    return FinishedRun(dir=out, returncode=result.returncode, stderr=result.stderr, hub_requests=requests)
