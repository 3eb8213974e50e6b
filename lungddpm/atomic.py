"""Atomic writes: a file or a whole folder appears complete or not at all, with the mode a plain ``open()`` or
``mkdir`` would give it; a full disk is said as such. Every output of the workflow is written through here."""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LungDDPMError
from .faults import kill_point

log = logging.getLogger(__name__)


class DiskFullError(LungDDPMError):
    """A write that ran out of space (ENOSPC / EDQUOT); the previous file is left as it was."""


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and "No space left on device" in str(exc)  # SimpleITK's report


@contextlib.contextmanager
def _disk_full_said(target: Path, left: str) -> Iterator[None]:
    """Running out of space in the block raised as :class:`DiskFullError` naming ``target``; ``left``: what is left."""
    try:
        yield
    except (OSError, RuntimeError, DiskFullError) as exc:
        if isinstance(exc, DiskFullError) or _disk_full(exc):  # a file's write inside a folder's: said as the folder
            cause = exc.__cause__ if isinstance(exc, DiskFullError) and exc.__cause__ is not None else exc
            raise DiskFullError(f"{target}: no space left on device while writing it ({cause}); {left} — free "
                                f"space on {target.parent} (df -h) and rerun") from cause  # fmt: skip
        raise


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries of ``path`` left by a killed :func:`atomic_path` write; returns what was removed."""
    target = Path(path)
    stale = sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk, so that a rename onto it survives a power loss with
    its content; a filesystem that cannot sync a folder (EINVAL, e.g. some network mounts), or a folder that may be
    written but not read (mode -wx), is left to its own."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """:func:`_fsync` every file and folder under ``folder``, the folder last."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
    _fsync(folder)


STALE_AFTER_S = 3600.0  # a write's temporaries older than this are a killed write's, not one in progress


def remove_stale_folders(parent: Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete what :func:`atomic_folder` writes (``replace=False``) killed more than ``min_age_s`` ago left in
    ``parent``: hidden temporary folders, and the empty folders they had claimed for their rename; returns them.
    The age spares a write that another process is making now."""
    if not parent.is_dir():
        return []
    now, stale = time.time(), []
    for p in sorted(parent.iterdir()):
        try:  # another process may clean up or claim the same entries now: what it took first is skipped
            if p.is_symlink() or not p.is_dir() or now - p.stat().st_mtime < min_age_s:
                continue
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p)
                stale.append(p)
            elif not p.name.startswith(".") and not any(p.iterdir()):
                p.rmdir()
                stale.append(p)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
    if stale:
        log.warning("%s: removed %d folder(s) that killed writes left: %s", parent, len(stale), [q.name for q in stale])
    return stale


def _remove_killed_swaps(target: Path) -> None:
    """After ``target`` was replaced whole: delete the earlier folders that a kill between the two renames of an
    :func:`atomic_folder` swap left hidden beside it (``.<name>.old-*``), and its killed writes' temporary folders
    older than :data:`STALE_AFTER_S` (a younger one may be another process's write)."""
    now, name = time.time(), glob.escape(target.name)
    left = [p for p in target.parent.glob(f".{name}.old-*") if p.is_dir() and not p.is_symlink()]
    for p in target.parent.glob(f".{name}.*.tmp"):
        try:
            if p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime >= STALE_AFTER_S:
                left.append(p)
        except FileNotFoundError:
            continue
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    if left:
        log.warning(
            "%s: removed %d folder(s) that a killed write left: %s", target, len(left), sorted(p.name for p in left)
        )


_OPEN_MODE = 0o666  # what open() asks for a new file; the umask takes its bits away


def process_umask() -> int:
    """The process umask, read from ``/proc/self/status`` (Linux; setting it to read it, elsewhere, leaves a moment
    in which another thread's new file would get the mode without it)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def new_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0o666 less the process umask."""
    return _OPEN_MODE & ~process_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it onto ``path`` only on success. The file
    gets the mode a plain ``open()`` would give it (mkstemp's 0600 would make it private to its owner).

    A failed or interrupted write leaves ``path`` as it was (a kill -9 may leave a hidden ``.<name>.*.tmp*``
    file, which :func:`remove_stale_temps` clears); running out of space raises :class:`DiskFullError`.
    """
    target = Path(path)
    if target.is_dir():  # os.replace would fail after the work, with IsADirectoryError
        raise LungDDPMError(f"{target}: is a folder, not a file; give the path of the file to write (e.g. --out)")
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, new_file_mode())  # writers open it in place (truncating), so the mode carries over
        with _disk_full_said(target, "the previous version of the file, if any, is untouched"):
            yield tmp
            _fsync(tmp)  # the content on disk before the name: a power loss leaves the old file or the new one
        kill_point("rename")
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class FolderWrite:
    """A folder that :func:`atomic_folder` is writing: files go into ``tmp``; ``path`` is the name it gets."""

    tmp: Path
    path: Path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], *, replace: bool) -> Iterator[FolderWrite]:
    """Yield a hidden temporary folder beside ``path`` to write into; on success it becomes the folder ``path``
    whole, with a plain mkdir's mode (mkdtemp's is 0700). ``replace``: an earlier ``path`` is swapped out and
    removed. Otherwise nothing is written onto: the first free name of ``path``, ``path-2``, ``path-3``, ... is
    claimed by an exclusive mkdir (another process's too), the folder is renamed onto it, and ``FolderWrite.path``
    says which. A failed write leaves nothing; running out of space raises :class:`DiskFullError`."""
    target = Path(path)
    if replace and (target.is_symlink() or (target.exists() and not target.is_dir())):
        raise LungDDPMError(f"{target}: is a file or link, not a folder; move it away, or give a folder's path")
    target.parent.mkdir(parents=True, exist_ok=True)
    job = FolderWrite(Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)), target)
    try:
        with _disk_full_said(target, "nothing was written there"):
            yield job
            _fsync_tree(job.tmp)
        os.chmod(job.tmp, 0o777 & ~process_umask())
        if replace:
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            had = target.exists()
            if had:
                os.replace(target, old)
                kill_point("swap")
            try:
                os.replace(job.tmp, target)
            except BaseException:
                if had:
                    try:
                        os.replace(old, target)  # the earlier folder back where it was
                    except OSError as exc:
                        log.error("%s: the earlier folder could not be put back (%s); it is %s", target, exc, old)
                raise
            _fsync(target.parent)
            if had:
                shutil.rmtree(old, ignore_errors=True)
            _remove_killed_swaps(target)
            return
        for n in itertools.count(1):
            job.path = target if n == 1 else target.with_name(f"{target.name}-{n}")
            try:
                job.path.mkdir()
                break
            except FileExistsError:
                continue
        try:
            os.replace(job.tmp, job.path)  # onto the empty folder claimed: the files appear all at once
        except OSError:
            job.path.rmdir()
            raise
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(job.tmp, ignore_errors=True)
        raise
