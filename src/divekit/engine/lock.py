"""One writer per run directory: an exclusive lock that a killed process cannot leave behind.

``train``, ``--resume`` and ``finetune`` hold ``RUN_DIR/run.lock`` for their whole life
(:func:`divekit.engine.run.train`); under data parallelism only rank 0, the process that writes,
takes it. Readers (``evaluate``, ``predict``, ``generate``, ``translate``) never do: checkpoints
are renamed into place whole (:mod:`divekit.engine.checkpoint`), so a reader sees the old one or
the new one.

The lock is the kernel's ``flock`` on the file (``msvcrt.locking`` on Windows), not the file's
existence: the kernel drops it when its process dies, however it dies (``kill -9`` included), so
there is no stale lock to clean up by hand. The file also holds the owner's ``pid host time``,
for the message a second writer gets, and is emptied on a clean release; a file that still names
an owner when its lock is free was left by a process that died, and the next writer says so
through the ``divekit`` logger as it takes over.

The file is never deleted: deleting a lock file races with a process that has it open (the two
would lock different files under one name).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from divekit.errors import DivekitError

LOCK_FILE = "run.lock"
_MAX_OWNER = 256  # bytes of the owner line read back (the file is small unless tampered with)
# Windows: lock one byte past the owner line, so that other processes can still read the line
_WIN_OFFSET = 4096

log = logging.getLogger("divekit")


class RunLocked(DivekitError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir):`` — the exclusive right to write ``run_dir``.

    :meth:`acquire` never waits: a held lock is a :class:`RunLocked` error naming the holder's
    process id and host. ``previous_owner`` is the owner line a dead holder left, if any.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.previous_owner: str | None = None
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise DivekitError(f"{self.path} is a symbolic link; a run's lock file must be a "
                               "plain file (remove it)")
        try:
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
            f = os.fdopen(os.open(self.path, flags, 0o644), "r+b")  # held for the lock's life
        except OSError as e:
            raise DivekitError(f"cannot open the run lock {self.path}: {e.strerror}") from None
        try:
            locked = _try_lock(f)
        except OSError as e:
            f.close()
            raise DivekitError(f"cannot lock {self.path}: {e.strerror}") from None
        if not locked:
            owner = _read_owner(f)
            f.close()
            raise RunLocked(f"{self.run_dir} is being written by {_describe(owner)}; wait for it "
                            f"to finish or choose another --out (lock file {self.path})")
        self.previous_owner = _read_owner(f) or None
        _write_owner(f, f"{os.getpid()} {socket.gethostname()} {int(time.time())}\n")
        self._file = f
        if self.previous_owner:
            log.warning("%s: taking over the lock left by %s, which is gone (killed?)",
                        self.run_dir, _describe(self.previous_owner))
        return self

    def release(self) -> None:
        """Empty the owner line (a clean exit leaves no owner behind), then unlock."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            _write_owner(f, "")
        finally:
            _unlock(f)
            f.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _describe(owner: str) -> str:
    """``"1234 host 1700000000"`` → ``process 1234 on host``."""
    parts = owner.split()
    if len(parts) >= 2 and parts[0].isdigit():
        return f"process {parts[0]} on {parts[1]}"
    return "another process" + (f" ({owner[:60]!r})" if owner else "")


def _read_owner(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read(_MAX_OWNER).decode("utf-8", "replace").strip()


def _write_owner(f: IO[bytes], line: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(line.encode())
    f.flush()
    os.fsync(f.fileno())


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(f: IO[bytes]) -> bool:
        f.seek(_WIN_OFFSET)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        f.seek(_WIN_OFFSET)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(f: IO[bytes]) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
