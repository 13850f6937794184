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


def _put_big(q, ready) -> None:  # a worker whose result is larger than an atomic pipe write
    q.put({"task": 7, "traceback": "y" * 200_000})
    ready.set()
    time.sleep(60)


def test_a_writer_killed_while_sending_a_large_item_leaves_no_half_of_it():
    """A worker killed while it sent a result larger than a pipe's atomic write (4 KB) left the
    part it had sent in the pipe: the next worker's result was read as the rest of it (garbage,
    or a reader waiting for ever; before: nothing came back in 30 s). Large items go through a
    file now, and the pipe carries a note of it that is written whole or not at all."""
    import threading

    ctx = ForkServerContext()
    q = LockFreeWaitQueue(0, ctx=ctx)
    ready = ctx.Event()
    writer = ctx.Process(target=_put_big, args=(q, ready))
    writer.start()  # nobody reads yet: a 200 kB item sent through the pipe filled it, and
    # its writer waited there (now it is a file, and the pipe carries a short note of it)
    assert ready.wait(60)
    # its feeder thread has sent (the note, or the start of the item) to the pipe: killed now,
    # as it sends or after (0.5 s of sleep could be too short on a loaded machine)
    assert q._reader.poll(60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    other = ctx.Process(target=_put, args=(q, "result of task 5"))
    other.start()
    got: list = []

    def read() -> None:
        try:
            got.extend(q.get(timeout=30) for _ in range(2))
        except BaseException as error:  # shown by the assertion below
            got.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reader.join(40)
        assert got == [{"task": 7, "traceback": "y" * 200_000}, "result of task 5"]
        with pytest.raises(queue.Empty):
            q.get(timeout=0.1)
        assert os.listdir(q._files) == []  # the item's file went once it was read
    finally:
        other.kill()
        other.join()
        q.close()


def test_small_and_large_items_keep_their_order_and_kind():
    ctx = ForkServerContext()
    q = LockFreeWaitQueue(0, ctx=ctx)
    items = [b"r" * 10, b"R" * 5000, None, {"a": 1}, "s" * 3990, "S" * 4010, b""]
    for item in items:
        q.put(item)
    try:
        assert [q.get(timeout=10) for _ in items] == items
        assert os.listdir(q._files) == []
    finally:
        q.close()


def test_the_lock_files_go_with_the_queue(tmp_path, monkeypatch):
    """The queue's lock files (in the pool's TMPDIR, /tmp where the run folder's path is long)
    are removed when the queue goes, by the process that made them only."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    q = LockFreeWaitQueue(0, ctx=ForkServerContext())
    assert len(list(tmp_path.glob("emparsl-queue-*.lock"))) == 2
    q.put("x" * 10_000)  # never read: its file goes with the queue too
    assert len(list(tmp_path.glob("emparsl-queue-*/*.item"))) == 1
    q.close()
    q.join_thread()
    del q
    gc.collect()
    assert list(tmp_path.glob("emparsl-queue-*")) == []


def test_a_large_item_the_queue_refuses_leaves_no_file():
    """An item put into a closed (or full) queue raised, and its file was left behind."""
    q = LockFreeWaitQueue(0, ctx=ForkServerContext())
    q.close()
    with pytest.raises(ValueError):
        q.put("x" * 10_000)
    assert os.listdir(q._files) == []
