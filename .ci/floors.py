"""Print ``name==floor`` for each dependency CI's floors job pins, read from pyproject.toml's ``>=``
floors so the job cannot drift from what we declare. Run by .ci/job_floors; tests/test_versions.py
checks it against npu_kernels/versions.py."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# The dependencies whose oldest release the code must support (the rest carry no version-specific code).
PINNED = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets")

dependencies = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
floors = dict(m.groups() for r in dependencies if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r.replace(" ", ""))))
missing = [name for name in PINNED if name not in floors]
if missing:
    sys.exit(f"pyproject.toml declares no plain '>=' floor for {', '.join(missing)}")
print("\n".join(f"{name}=={floors[name]}" for name in PINNED))
