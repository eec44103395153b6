"""Files that survive kills, full disks and a second process: atomic writes, folder swaps and folder locks.

Every file the project commits goes through `atomic_write` (or, for a folder of files,
`atomic_folder`): it is written under a temporary name in its own folder, flushed to disk, renamed
over the final name, and the folder is flushed too. A reader therefore sees the old file or the
complete new one, a kill leaves at most a temporary that names its dead writer (removed by the
next run), and a full disk is one line that names the folder and the bytes it needed. Writing in
the same folder matters: a rename across filesystems is a copy, which a kill or a full disk cuts
short under the final name.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from clipsearch.errors import UserError

logger = logging.getLogger(__name__)

# Bytes handed to the operating system at a time: small enough that a kill or a full disk can land
# between two of them (the crash tests count on it), large enough to cost nothing.
WRITE_CHUNK = 1 << 20
_HOST = socket.gethostname()
# Temporaries carry their writer's pid and (a digest of) its host, so a later run can tell a dead
# writer's leftovers from a live writer's work in progress.
_HOST_TAG = hashlib.sha1(_HOST.encode("utf-8", "surrogateescape")).hexdigest()[:8]
TEMPORARY_PATTERN = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.[0-9a-f]{6}\.(?P<kind>tmp|old)$")
LOCK_SUFFIX = ".lock"

Content = bytes | bytearray | memoryview | str | Callable[[BinaryIO], object]


class DiskFullError(UserError):
    """A write found no space left; the message names the folder and what the write needed."""


class FolderLockedError(UserError):
    """Another live process holds the lock; the message names it."""


# ---------------------------------------------------------------------------------------------
# Crash points: the crash-consistency tests stop a process at each of them in turn
# ---------------------------------------------------------------------------------------------

_crash_hook: Callable[[str], None] | None = None


def set_crash_hook(hook: Callable[[str], None] | None) -> None:
    """Call `hook(label)` at every step of every durable write (tests kill the process there)."""
    global _crash_hook
    _crash_hook = hook


def crash_point(label: str) -> None:
    if _crash_hook is not None:
        _crash_hook(label)


# ---------------------------------------------------------------------------------------------
# Sizes and full disks
# ---------------------------------------------------------------------------------------------


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(folder: str | os.PathLike, name: str, needed: int | None, written: int = 0) -> DiskFullError:
    """The one line a full disk gets: which folder, what was being written, and how much it needed."""
    free = free_bytes(folder)
    if needed is not None:
        need = f"needs {format_bytes(needed)}"
    else:
        need = f"needs more than the {format_bytes(written)} written before the disk filled"
    have = f", {format_bytes(free)} free" if free is not None else ""
    return DiskFullError(
        f"no space left in {folder}: writing {name} {need}{have}. Free space there (or give another folder) and "
        "run the same command again; what was finished is kept"
    )


def is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Stream(io.RawIOBase):
    """A write-only file over a descriptor that writes in chunks, counts bytes and remembers a full disk.

    Not a real file object on purpose: numpy, pyarrow and faiss then write through `write`, so every
    byte passes the crash points and an ENOSPC is seen here whatever library wraps it afterwards.
    """

    def __init__(self, descriptor: int):
        self.descriptor = descriptor
        self.written = 0
        self.full = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            crash_point("write")
            chunk = view[start : start + WRITE_CHUNK]
            try:
                while len(chunk):
                    count = os.write(self.descriptor, chunk)
                    chunk = chunk[count:]
                    self.written += count
            except OSError as error:
                self.full = error.errno in (errno.ENOSPC, errno.EDQUOT)
                raise
        return len(view)

    def tell(self) -> int:
        return self.written


# ---------------------------------------------------------------------------------------------
# Temporaries
# ---------------------------------------------------------------------------------------------


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    """A name beside `path` that no other writer uses, naming this process (see TEMPORARY_PATTERN)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{_HOST_TAG}.{secrets.token_hex(3)}.{kind}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete temporaries (files or folders) in `folder` whose writer on this machine has died.

    Only names this module makes are touched, and only when their process is gone, so it is safe
    while other processes write beside them; `target` limits it to the temporaries of one name.
    """
    stale = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return stale
    for entry in entries:
        match = TEMPORARY_PATTERN.match(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if match["host"] != _HOST_TAG or process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        stale.append(entry)
    return stale


def remove_stale_locks(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the lock files in `folder` (or only `name`'s) that no live process holds: their holders were killed.

    Each is locked before it is removed, as its release would remove it; a process opening it at
    the same moment finds the name gone and makes a new one (see FolderLock.acquire).
    """
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    for path in Path(folder).glob(f"{name or '*'}{LOCK_SUFFIX}"):
        try:
            descriptor = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                path.unlink()
                removed.append(path)
        except OSError:  # held by a live process, or already gone
            pass
        finally:
            os.close(descriptor)
    return removed


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rename is then as durable as they allow
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------
# Atomic files and folders
# ---------------------------------------------------------------------------------------------


def write_durably(path: Path, content: Content, size_hint: int | None = None, name: str | None = None) -> None:
    """Write `content` to a new file `path` (which must not exist) and flush it to disk.

    `content` is bytes or text (the disk is checked for room first), or `write(stream)` for data
    streamed as it is made; `size_hint` then says how much it will be, for the full-disk message,
    which calls the file `name` (default: its own).
    """
    name = name or path.name
    data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
    needed = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else size_hint
    if isinstance(data, (bytes, bytearray, memoryview)):
        free = free_bytes(path.parent)
        if free is not None and free < len(data):
            raise disk_full(path.parent, name, len(data))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    stream = _Stream(descriptor)
    try:
        if callable(data):
            data(stream)
        else:
            stream.write(data)
        crash_point("fsync")
        os.fsync(descriptor)
    except BaseException as error:
        os.close(descriptor)
        path.unlink(missing_ok=True)  # before the message counts what is free
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and (stream.full or is_disk_full(error)):
            # (a DiskFullError is already the line of a file written inside this one's writer)
            raise disk_full(path.parent, name, needed, stream.written) from None
        raise
    os.close(descriptor)


def atomic_write(path: str | os.PathLike, content: Content, size_hint: int | None = None) -> Path:
    """Replace `path` with `content` so that readers see the old file or the complete new one.

    Written to a temporary in the same folder, flushed, renamed over `path`, and the folder
    flushed: a kill or a power cut leaves the old file or the new one, never a part; a full disk
    raises DiskFullError and leaves the old file. See `write_durably` for `content`.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        write_durably(temporary, content, size_hint, path.name)
        crash_point("rename")
        os.replace(temporary, path)
        crash_point("renamed")
        fsync_folder(path.parent)
    finally:
        if os.path.lexists(temporary):
            temporary.unlink()
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty folder to fill; on success it replaces `target` whole, on failure it goes.

    The new folder is made beside `target` (same filesystem), its files are flushed, then the old
    folder is renamed aside, the new one into place, and the old one removed. A kill leaves
    `target` as it was (or, between the two renames, absent) and temporaries that the next call's
    `remove_stale_temporaries` deletes. Only call it on a folder this project made: the old one is
    deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = temporary_path(target)
    building.mkdir()
    try:
        yield building
        for folder, _, files in os.walk(building):
            for name in files:
                descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            fsync_folder(folder)
        aside = None
        if os.path.lexists(target):
            aside = temporary_path(target, "old")
            crash_point("rename aside")
            os.rename(target, aside)
        crash_point("rename into place")
        os.rename(building, target)
        crash_point("renamed")
        fsync_folder(target.parent)
        if aside is not None:
            shutil.rmtree(aside)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Folder locks
# ---------------------------------------------------------------------------------------------


def _describe_holder(holder: dict) -> str:
    command = holder.get("command") or "?"
    started = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({command[:160]}{since})"


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": _HOST, "command": " ".join([sys.executable, *sys.argv]), "started": time.time()}


class FolderLock:
    """An exclusive lock on one use of a folder (`<folder>/<name>.lock`), naming its holder.

    A second process is refused in one line that says which process holds it (pid, host,
    command, since when), or with `wait` queues behind it. The lock is the operating system's
    (flock), so it dies with its process: a lock file a killed process left is taken over, and
    said so. Where flock is missing, a lock whose pid is dead on this host is taken over instead.
    The file goes when the lock is released.
    """

    def __init__(self, folder: str | os.PathLike, name: str, purpose: str, wait: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / f"{name}{LOCK_SUFFIX}"
        self.purpose = purpose
        self.wait = wait
        self.descriptor: int | None = None

    def refusal(self, holder: dict) -> FolderLockedError:
        return FolderLockedError(
            f"{self.folder} is in use: {self.purpose} by {_describe_holder(holder)} holds {self.path.name}; "
            "wait for it to finish or stop it, then run this again"
        )

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no flock on this system
            return self._acquire_by_pid()
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(self.path)
                    if self._being_removed(descriptor, holder):
                        os.close(descriptor)
                        time.sleep(0.01)
                        continue
                    if not self.wait:
                        raise self.refusal(holder) from None
                    logger.warning("%s: waiting for %s, %s", self.folder, _describe_holder(_read_holder(self.path)),
                                   self.purpose)
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
            except FolderLockedError:
                os.close(descriptor)
                raise
            except OSError as error:  # a filesystem without flock (some network mounts)
                os.close(descriptor)
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_by_pid()
                raise
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # not a file its last holder removed while we waited for it
                break
            os.close(descriptor)
        left = _read_holder(self.path)
        if left:
            logger.warning("%s: taking over the lock left by %s, which is no longer running", self.folder,
                           _describe_holder(left))
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(_this_process()).encode("utf-8", "surrogateescape"))
        self.descriptor = descriptor
        # Whatever a killed process left in this folder is garbage now; live ones' files are spared.
        remove_stale_temporaries(self.folder)
        remove_stale_locks(self.folder)
        return self

    def _being_removed(self, descriptor: int, holder: dict) -> bool:
        """Whether the lock we could not take is a dead holder's, held for a moment by `remove_stale_locks`."""
        try:
            if os.fstat(descriptor).st_ino != os.stat(self.path).st_ino:
                return True
        except FileNotFoundError:
            return True
        pid = holder.get("pid")
        return holder.get("host") == _HOST and isinstance(pid, int) and not process_alive(pid)

    def _acquire_by_pid(self) -> FolderLock:
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                dead = holder.get("host") == _HOST and isinstance(holder.get("pid"), int) and not process_alive(holder["pid"])
                if dead:
                    logger.warning("%s: taking over the lock left by %s, which is no longer running", self.folder,
                                   _describe_holder(holder))
                    self.path.unlink(missing_ok=True)
                    continue
                if self.wait:
                    time.sleep(0.5)
                    continue
                raise self.refusal(holder) from None
            os.write(descriptor, json.dumps(_this_process()).encode("utf-8", "surrogateescape"))
            self.descriptor = descriptor
            remove_stale_temporaries(self.folder)
            return self

    def release(self) -> None:
        if self.descriptor is None:
            return
        # Removed while still held, so whoever opens the name next makes a new file and locks that.
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
