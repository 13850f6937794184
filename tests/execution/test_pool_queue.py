"""The worker pool's queue: a process killed holding one of its locks does not stop the others."""

from __future__ import annotations

import os
import queue
import signal
import time
from multiprocessing.context import ForkServerContext

import pytest

from napari_emparsl.execution.pool_queue import LockFreeWaitQueue


def _hold(lock, ready) -> None:  # a worker killed while it sends (or reads) an item
    lock.acquire()
    ready.set()
    time.sleep(60)


def _put(q, item) -> None:  # another worker hands its result back
    q.put(item)
    time.sleep(60)


@pytest.mark.parametrize("held", ["_wlock", "_rlock"])
def test_a_process_killed_holding_a_lock_does_not_stop_the_queue(held):
    """A worker killed while its result thread held the queue's write lock left every other
    worker's result stuck behind it (the run stalled for ever; before: nothing arrived); the
    same for the read lock. The locks are let go of when their holder dies."""
    ctx = ForkServerContext()
    q = LockFreeWaitQueue(0, ctx=ctx)
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(getattr(q, held), ready))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    writer = ctx.Process(target=_put, args=(q, "result of task 5"))
    writer.start()
    try:
        assert q.get(timeout=30) == "result of task 5"
        q.put({"big": "x" * 100_000})  # larger than a pipe's atomic write: through the lock
        assert q.get(timeout=30) == {"big": "x" * 100_000}
        with pytest.raises(queue.Empty):
            q.get(timeout=0.1)
    finally:
        writer.kill()
        writer.join()
        q.close()


def test_the_lock_files_go_with_the_queue(tmp_path, monkeypatch):
    """The queue's lock files (in the pool's TMPDIR, /tmp where the run folder's path is long)
    are removed when the queue goes, by the process that made them only."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    q = LockFreeWaitQueue(0, ctx=ForkServerContext())
    assert len(list(tmp_path.glob("emparsl-queue-*.lock"))) == 2
    q.close()
    q.join_thread()
    del q
    gc.collect()
    assert list(tmp_path.glob("emparsl-queue-*.lock")) == []
