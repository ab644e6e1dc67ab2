"""Atomic file writes: write to a temporary file in the same folder, then rename.

A run killed half-way never leaves a truncated image, CSV or checkpoint behind:
readers see either the old file or the complete new one.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix, so writers that pick a format from
    the extension (OpenCV, torch.save) behave as for the real path.
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{_owner()}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _owner() -> str:
    """``<host>-<pid>`` of this process, written into temporary names so a later run can tell
    a temporary file left by a killed process from one that a live process is still writing."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def remove_stale_temporaries(folder: PathLike) -> int:
    """Delete temporary files under ``folder`` left by killed processes of this host; returns how many.

    Only names made by :func:`atomic_path` on this host whose process is gone are removed, so
    runs sharing the folder (other processes, other hosts) are never disturbed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    host = socket.gethostname().replace(".", "_")
    removed = 0
    for tmp in folder.rglob(".*.tmp*"):
        match = re.match(rf"^\..*\.{re.escape(host)}-(\d+)\.[^.]*\.tmp", tmp.name)
        if match is None or not tmp.is_file() or _process_alive(int(match.group(1))):
            continue
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def ensure_writable(folder: PathLike, key: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any work.

    Raises ValueError naming the config ``key`` and the reason (a parent that is a file, a
    read-only file system, missing permissions).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{key}={folder} cannot be written ({type(exc).__name__}: {exc.strerror or exc}); "
                         f"choose another folder or fix its permissions") from None
