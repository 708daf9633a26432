"""The 1p/8p launch scripts export the host settings of Ascend's own SDXL recipes, each overridable
from the environment. Checked without an NPU: ``PYTHON`` points the scripts at a fake interpreter
that records the environment the launch would get and exits."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "trainer" / "scripts"
SETTINGS = {
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "ACLNN_CACHE_LIMIT": "100000",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "COMBINED_ENABLE": "1",
    "OMP_NUM_THREADS": "1",
}
FAKE_PYTHON = """#!/usr/bin/env bash
# Records the launch's environment (the call with -m accelerate.commands.launch); ignores the rest.
if [ "$2" = "accelerate.commands.launch" ]; then env > "$ENV_DUMP"; fi
exit 0
"""


def _run(script: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    dump = tmp_path / "env.txt"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PYTHON=str(fake), ENV_DUMP=str(dump), **overrides)
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), f"--output_dir={tmp_path / 'out'}", "--max_train_steps=1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


@pytest.mark.parametrize("script", ["train_1p_text_to_image_sdxl_lora.sh", "train_8p_text_to_image_sdxl_lora.sh"])
def test_scripts_export_ascend_host_settings(script, tmp_path):
    launched = _run(script, tmp_path)
    for name, value in SETTINGS.items():
        assert launched.get(name) == value, (name, launched.get(name))


def test_each_setting_is_overridable(tmp_path):
    overrides = {name: f"{value}-mine" for name, value in SETTINGS.items()}
    launched = _run("train_1p_text_to_image_sdxl_lora.sh", tmp_path, **overrides)
    for name, value in overrides.items():
        assert launched.get(name) == value, name
