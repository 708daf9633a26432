"""The dependency versions CI tests, and a warning for an installed one outside them.

The oldest of each range is pyproject.toml's floor (CI's floors job installs exactly those, with
torch 2.13.0); the newest is what CI's newest-torch job installed when the range was last written
(``.ci/run``). ``python -m npu_kernels`` prints the installed versions and warns outside a range.
"""
from __future__ import annotations

import importlib.metadata

from packaging.version import Version

# distribution -> (oldest tested, newest tested)
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.13.0", "2.14.1"),
    "diffusers": ("0.30.0", "0.42.1"),
    "peft": ("0.12.0", "0.21.2"),
    "transformers": ("4.40.0", "5.24.0"),
    "accelerate": ("0.30.0", "1.16.0"),
    "datasets": ("2.20.0", "5.2.0"),
}


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def untested(distribution: str, version: str) -> str | None:
    """A one-line warning when ``version`` lies outside the tested range of ``distribution``, else
    ``None``. A local build tag does not count: ``2.13.0+cpu`` is ``2.13.0``."""
    oldest, newest = (Version(v) for v in TESTED[distribution])
    found = Version(Version(version).public)
    if not oldest <= found <= newest:
        return f"{distribution} {version} is outside the tested range {oldest} ... {newest}: it may work, CI does not run it"
    return None


def report_lines() -> list[str]:
    """``  name  version`` for each tested distribution, and a warning line for each outside its range."""
    lines, warnings = [], []
    for distribution in TESTED:
        version = installed(distribution)
        lines.append(f"  {distribution:<12} {version or 'not installed'}")
        if version is not None and (warning := untested(distribution, version)) is not None:
            warnings.append(f"  WARNING: {warning}")
    return lines + warnings
