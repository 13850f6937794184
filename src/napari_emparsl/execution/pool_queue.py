"""A multiprocessing queue whose readers wait without holding its lock (the worker pool's).

In a multiprocessing ``Queue`` the readers share one lock, and ``get`` holds it for as long as it
waits for an item. Parsl's worker pool hands tasks to its workers through such a queue, so an idle
worker killed (by a user, or the system) while it waits dies holding the lock, and the pool's
other workers — and the ones started in its place — can never take a task again: the run hangs.
Here a reader waits for the pipe to become readable first, and takes the lock only to read an item
that is there, so a worker is almost never killed holding it.
"""

from __future__ import annotations

import multiprocessing.queues
import queue
import time
from multiprocessing.connection import wait

__all__ = ["LockFreeWaitQueue"]


class LockFreeWaitQueue(multiprocessing.queues.Queue):
    """``multiprocessing.Queue`` whose blocking ``get`` waits without holding the reader lock."""

    def get(self, block: bool = True, timeout: float | None = None):
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
