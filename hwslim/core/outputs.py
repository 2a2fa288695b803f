"""Where a command writes: checked before any work starts, and left clean afterwards.

Every command that writes calls :func:`check_output` on its ``--out`` first, so a
path that is empty, an existing file where a directory is wanted (or the reverse),
under a file, in a read-only directory or on a full disk is refused with one line
before an epoch is trained or an entry measured. :func:`remove_stale_temporaries`
deletes the ``.NAME.tmp<pid>`` files an atomic write leaves when its process was
killed (``kill -9``) between writing and renaming; :func:`temporary_path` names them.

An output is owned by one run at a time: :func:`owned` takes an exclusive lock on it
(``fcntl.flock``, released by the kernel even after ``kill -9``) and a second run is
refused with one line naming the first one's pid, before it touches anything.
:func:`describe_os_error` turns an OSError on a path into the one line the CLI prints.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hwslim.core.errors import HwslimError

# below this many free bytes the disk counts as full: no checkpoint or table would fit
MIN_FREE_BYTES = 1 << 20
# temporaries of atomic writes (temporary_path): .NAME.tmp<pid> (config, checkpoint, table) and
# .NAME.export<pid>[.onnx|.xml|.bin] (export); NAME is a hash for names too long to carry
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|export)(?P<pid>\d+)(?:\.onnx|\.xml|\.bin)?$")


class OutputError(HwslimError):
    """An output location nothing can be written to."""


class OutputBusyError(OutputError):
    """An output another run is writing right now."""


# a temporary's name beyond this many bytes is hashed: NAME_MAX is 255 on every common filesystem
_MAX_NAME = 255


def temporary_path(path: str | os.PathLike, kind: str = "tmp", suffix: str = "") -> Path:
    """Where an atomic write of ``path`` goes first: ``.NAME.<kind><pid><suffix>`` beside it.

    A name too long for that (a legal 250-byte output name) gets a short hashed one, so
    the temporary never makes a legal output name fail.
    """
    path = Path(path)
    name = f".{path.name}.{kind}{os.getpid()}{suffix}"
    if len(os.fsencode(name)) > _MAX_NAME:
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
        name = f".{digest}.{kind}{os.getpid()}{suffix}"
    return path.with_name(name)


def refuse_directory(path: str | os.PathLike, flag: str | None = None, want: str = "a file") -> None:
    """OutputError when ``path`` is a directory where ``want`` is expected (named, never a temporary)."""
    if Path(path).is_dir():
        raise OutputError(f"{(flag + ' ') if flag else ''}{path} is a directory, not {want}")


# errno -> what to do, after the system's own words
_HINT = {
    errno.ENOSPC: "the disk is full; free some space or give another location",
    errno.EDQUOT: "the disk quota is exhausted; free some space or give another location",
    errno.EROFS: "not writable: a read-only filesystem; give a writable location",
    errno.EACCES: "not writable; give a writable location",
    errno.EPERM: "not writable; give a writable location",
    errno.EISDIR: "a directory where a file is expected",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ELOOP: "a symlink loop",
    errno.ENAMETOOLONG: "a name too long for the filesystem",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError on a path: which path (never a temporary: the file it stood for),
    the system's words, and what to do."""
    names = [os.fsdecode(n) for n in (e.filename2, e.filename) if n is not None]  # os.replace(tmp, dest)
    name = next((n for n in names if not _TEMPORARY.match(Path(n).name)), None)
    if name is None and names:  # only a temporary was named: the file it stood for
        tmp = Path(names[0])
        name = str(tmp.with_name(_TEMPORARY.match(tmp.name).group("name")))
    what = e.strerror or str(e)
    hint = _HINT.get(e.errno)
    return (f"{what}{f': {name}' if name else ''}{f' ({hint})' if hint else ''}; "
            "files written before it are intact")


def _lock_file(path: Path) -> Path:
    """The lock of ``path``: in a private folder under the temp dir, keyed by the real path, so
    taking it writes nothing beside the output (a refused run touches nothing)."""
    key = os.path.realpath(path)
    folder = Path(tempfile.gettempdir()) / f"hwslim-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / (hashlib.sha256(os.fsencode(key)).hexdigest()[:32] + ".lock")


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _worker_rank() -> int:
    """This process's rank in a distributed run: its process group's when one is joined (torch is
    then imported already), else torchrun's ``RANK``; 0 outside one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


@contextmanager
def owned(path: str | os.PathLike, *, flag: str = "--out") -> Iterator[Path]:
    """Within the block this process owns the output ``path`` (a folder or a file); ``flag`` names
    it in the refusal (the option that gave it, or words such as ``"the table"``).

    A second run (another process) is refused with :class:`OutputBusyError` naming the
    first one's pid, before it writes anything. Re-entrant within a process; workers of a
    distributed run (rank > 0) share their rank 0's ownership and take nothing.
    """
    if _worker_rank() > 0:
        yield Path(path)
        return
    lock = _lock_file(Path(path))
    if lock in _held:
        _held[lock] += 1
        try:
            yield Path(path)
        finally:
            _held[lock] -= 1
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            other = f" or give another {flag}" if flag.startswith("--") else ""
            raise OutputBusyError(f"{flag} {path} is being written by another hwslim run ({who}); wait for it "
                                  f"to finish{other}") from None
        try:  # the previous owner may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[lock] = 1
    try:
        yield Path(path)
    finally:
        del _held[lock]
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


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
        pseudo = os.statvfs(existing).f_blocks == 0  # /proc, /sys: a kernel interface, not a disk
        free = shutil.disk_usage(existing).free
    except OSError:
        pseudo, free = False, None
    if pseudo:
        raise OutputError(f"{flag} {p}: {existing} is not writable (a special filesystem such as /proc or /sys, "
                          "which holds no files); give a location on a disk")
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
        if m and not _alive(int(m.group("pid"))) and (p.is_file() or p.is_symlink()):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
