"""Crash-safe outputs: write under a temporary name, then rename into place.

A rename within one filesystem is atomic, so a reader (or a resumed run) sees either the previous
file/directory or the complete new one, never a half-written one, whatever moment the writer is killed
at (SIGKILL, OOM killer, node failure). Files are fsync'ed before the rename so that the same holds
after a power loss on filesystems that honour fsync.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from trainer.errors import DiskFullError, TrainingAborted, one_line


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below ``root`` and the directories themselves (best effort on exotic filesystems)."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(directory, name))
        _fsync_path(directory)


def _fsync_path(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. directories on some network filesystems: the rename below is still atomic
    finally:
        os.close(fd)


def publish_directory(staging: Path, final: Path) -> None:
    """Move the fully written ``staging`` directory to ``final`` (same parent directory).

    An existing ``final`` (e.g. the same step saved by an earlier run) is first moved aside, so at every
    instant ``final`` is either absent or complete; the old copy is deleted afterwards.
    """
    fsync_tree(staging)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staging, final)
    _fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh hidden directory in ``parent`` (same filesystem as the destination), removed on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_files(directory: str | os.PathLike, write: Callable[[Path], None]) -> list[Path]:
    """Run ``write(tmp_dir)`` and move each file it created into ``directory`` with ``os.replace``.

    Used for ``pytorch_lora_weights.safetensors``: an existing LoRA file is replaced atomically, so a
    killed save leaves the previous file intact (plus, at worst, a hidden ``.tmp-*`` directory).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with staging_directory(directory, ".tmp-") as tmp:
        write(tmp)
        for source in sorted(tmp.iterdir()):
            if source.is_file():
                _fsync_path(source)
                target = directory / source.name
                os.replace(source, target)
                written.append(target)
        _fsync_path(directory)
    return written


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_stale(directory: str | os.PathLike, prefixes: tuple[str, ...]) -> list[str]:
    """Delete leftovers of killed writes (entries of ``directory`` starting with one of ``prefixes``)."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if name.startswith(prefixes):
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            removed.append(name)
    return removed


def file_damage(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is not a whole file of its format, or None (also for formats not checked).

    ``.safetensors``: the header parses and its tensors end where the file does. ``torch.save`` archives
    (``.bin``, ``.pkl``, ``.pt``): a zip whose central directory is present and whose members pass their
    CRC checks. Reads the file once, never unpickles it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_damage(path)
    if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        import zipfile

        if not zipfile.is_zipfile(path):
            return "not a complete torch.save archive: truncated or overwritten"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"unreadable archive: {error}"
        return f"checksum mismatch in {bad}" if bad else None
    return None


def _safetensors_damage(path: Path) -> str | None:
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            return "header runs past the end of the file: truncated"
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return "header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    if 8 + header_size + max(ends, default=0) > size:
        return f"tensor data runs past the end of the file ({size} bytes): truncated"
    return None


def write_failed(error: OSError, what: str, folder: Path) -> TrainingAborted:
    """The one-line error for ``what`` that could not be written into ``folder`` (its partial copy removed)."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    where = f"{folder} ({free / 2**20:.1f} MiB free)"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"No space left to write {what} in {where}: the partial write was removed and earlier checkpoints"
            " are kept; free some space and resume with --resume_from_checkpoint latest"
        )
    return TrainingAborted(f"Cannot write {what} in {where}: {one_line(error)}; the partial write was removed")
