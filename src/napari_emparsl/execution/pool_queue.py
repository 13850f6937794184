"""A multiprocessing queue whose readers wait without holding its lock (the worker pool's).

In a multiprocessing ``Queue`` the readers share one lock, and ``get`` holds it for as long as it
waits for an item. Parsl's worker pool hands tasks to its workers through such a queue, so an idle
worker killed (by a user, or the system) while it waits dies holding the lock, and the pool's
other workers — and the ones started in its place — can never take a task again: the run hangs.
Here a reader waits for the pipe to become readable first, and takes the lock only to read an item
that is there, so a worker is almost never killed holding it.

The writers share a lock too: a worker's result goes out through a thread that holds the queue's
write lock while it sends, and a worker killed in that moment left every other worker's result
waiting behind it for ever (the run stalled). Both locks here are therefore file locks
(``flock``), which the system lets go of when their holder dies, however it dies.

A writer killed in the middle of sending an item larger than a pipe's atomic write (4 KB on
Linux; a block's result is ~350 bytes, a failed block's long traceback can be more) left the part
it had sent in the pipe, and the pool then read the next worker's result as the rest of it:
garbage, and a reader waiting for bytes that never come. Items that large go through a file
instead (written whole before the queue hears of it); the pipe carries only a short note of the
file, which a pipe writes whole or not at all.
"""

from __future__ import annotations

import fcntl
import multiprocessing.queues
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

__all__ = ["LockFreeWaitQueue", "ProcessDeathSafeLock"]

# An item whose pickle is longer than this goes through a file: with the queue's 4-byte header it
# stays within one atomic pipe write (PIPE_BUF, 4096 bytes on Linux; POSIX's minimum is 512, but
# the systems this runs on have 4096 or more).
_ATOMIC = 4000


def _remove_in(path: str, pid: int) -> None:
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


class ProcessDeathSafeLock:
    """A lock shared by processes (handed to them pickled, as a queue's locks are) that is let
    go of when its holder dies: an ``flock`` on a file of its own, opened once in each process,
    with a thread lock for the threads of one process (they share the open file)."""

    def __init__(self, path: str | None = None) -> None:
        if path is None:
            fd, path = tempfile.mkstemp(prefix="emparsl-queue-", suffix=".lock")
            os.close(fd)
            # removed with the lock in the process that made it (the pool), not in the others
            weakref.finalize(self, _remove_in, path, os.getpid())
        self._path = path
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"path": self._path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self._path, self._pid = state["path"], None

    def _here(self) -> tuple[int, threading.Lock]:
        if self._pid != os.getpid():  # a new process (also forked): its own file and lock
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._threads = threading.Lock()
            self._pid = os.getpid()
        return self._fd, self._threads

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        fd, threads = self._here()
        deadline = None if not block or timeout is None else time.monotonic() + timeout
        if not threads.acquire(block, -1 if deadline is None else max(0.0, timeout or 0.0)):
            return False
        try:
            if block and deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return True
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if deadline is None or time.monotonic() >= deadline:
                        threads.release()
                        return False
                    time.sleep(0.001)
        except BaseException:
            threads.release()
            raise

    def release(self) -> None:
        fd, threads = self._here()
        fcntl.flock(fd, fcntl.LOCK_UN)
        threads.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _remove_folder_in(path: str, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


class _InFile:
    """The note a large item's writer sends instead of the item: the file that holds it."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_InFile, (self.path,))


class LockFreeWaitQueue(multiprocessing.queues.Queue):
    """``multiprocessing.Queue`` whose blocking ``get`` waits without holding the reader lock,
    whose reader and writer locks are let go of when their holder dies, and whose items larger
    than an atomic pipe write go through files (a writer killed while sending one cannot leave
    half of it in the pipe)."""

    def __init__(self, maxsize: int = 0, *, ctx) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._rlock = ProcessDeathSafeLock()
        self._wlock = ProcessDeathSafeLock()
        self._files = tempfile.mkdtemp(prefix="emparsl-queue-")
        # removed (with the items nobody read) in the process that made it, not in the others
        weakref.finalize(self, _remove_folder_in, self._files, os.getpid())

    def __getstate__(self):
        return (*super().__getstate__(), self._files)

    def __setstate__(self, state) -> None:
        super().__setstate__(state[:-1])
        self._files = state[-1]

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        data = ForkingPickler.dumps(obj)
        if len(data) > _ATOMIC:
            fd, path = tempfile.mkstemp(dir=self._files, suffix=".item")
            with open(fd, "wb") as file:
                file.write(data)
            obj = _InFile(path)  # the file is whole before the queue hears of it
        try:
            super().put(obj, block, timeout)
        except BaseException:  # closed, or full: nobody will read the file
            if isinstance(obj, _InFile):
                os.unlink(obj.path)
            raise

    def get(self, block: bool = True, timeout: float | None = None):
        item = self._get(block, timeout)
        if isinstance(item, _InFile):
            with open(item.path, "rb") as file:
                data = file.read()
            os.unlink(item.path)
            item = ForkingPickler.loads(data)
        return item

    def _get(self, block: bool, timeout: float | None):
        if not block:
            return super().get(False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not wait([self._reader], left):  # no lock held while waiting
                raise queue.Empty
            try:
                return super().get(False)  # the lock only to read the item that is there
            except queue.Empty:  # another reader took it first, or is reading it right now
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(0.001)
