"""Where a command writes: checked before any work starts, and left clean afterwards.

Every command that writes calls :func:`check_output` on its ``--out`` first, so a
path that is empty, an existing file where a directory is wanted (or the reverse),
under a file, in a read-only directory or on a full disk is refused with one line
before an epoch is trained or an entry measured. :func:`remove_stale_temporaries`
deletes the ``.NAME.tmp<pid>`` files an atomic write leaves when its process was
killed (``kill -9``) between writing and renaming.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from hwslim.core.errors import HwslimError

# below this many free bytes the disk counts as full: no checkpoint or table would fit
MIN_FREE_BYTES = 1 << 20
# temporaries of atomic writes: .NAME.tmp<pid> (config, checkpoint) and .NAME.export<pid>[.onnx] (export)
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|export)(\d+)(?:\.onnx)?$")


class OutputError(HwslimError):
    """An output location nothing can be written to."""


def check_output(path: str | os.PathLike | None, *, kind: str, flag: str = "--out") -> Path:
    """Refuse (OutputError, one line) an output ``path`` that cannot be written; return it as a Path.

    ``kind`` is ``"dir"`` (a directory the command fills) or ``"file"`` (one file).
    Nothing is created: the nearest existing ancestor must be a writable directory on
    a disk with room.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    want = "a directory" if kind == "dir" else "a file path"
    if path is None or not str(path).strip():
        raise OutputError(f"{flag} is empty; give {want}")
    if "\0" in str(path):
        raise OutputError(f"{flag} {str(path)!r} contains a NUL character; give {want}")
    p = Path(path)
    if kind == "dir":
        if p.exists() and not p.is_dir():
            raise OutputError(f"{flag} {p} is a file, not a directory; give a directory")
        folder = p
    else:
        if p.is_dir():
            raise OutputError(f"{flag} {p} is a directory; give a file path (e.g. {p / 'model.onnx'})")
        folder = p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {p} is under {existing}, which is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {p}: {existing} is not writable; give a writable location")
    if kind == "file" and p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{flag} {p} is read-only")
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    if free is not None and free < MIN_FREE_BYTES:
        raise OutputError(f"{flag} {p}: the disk holding {existing} is full ({free:,} bytes free); free some space "
                          "or give another location")
    return p


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing yet: whatever it left is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries of atomic writes in ``folder`` whose process is gone; return them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m and not _alive(int(m.group(1))) and (p.is_file() or p.is_symlink()):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
