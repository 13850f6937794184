"""The ledger read incrementally (the runs panel asks on every mouse move)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from napari_emparsl.core.ledger import LEDGER_NAME, Ledger, LedgerFollower


def _line(rec: dict) -> str:
    return json.dumps(rec) + "\n"


def test_follower_reads_only_what_was_appended(tmp_path):
    folder = tmp_path / "o.n5" / "pred"
    folder.mkdir(parents=True)
    path = folder / LEDGER_NAME
    follower = LedgerFollower(str(tmp_path / "o.n5"), "pred")
    assert follower.summary().runs == []  # no ledger yet
    first = follower.generation

    path.write_text(_line({"type": "run", "time": 1.0, "block": [8, 8, 8]}))
    with path.open("a") as f:
        f.write(_line({"type": "block", "id": 0, "status": "failed", "error": "boom"}))
        f.write('{"type": "block", "id": 1, "sta')  # being written: left for the next call
    summary = follower.summary()
    assert len(summary.runs) == 1 and list(summary.failed) == [0] and not summary.done
    with path.open("a") as f:
        f.write('tus": "done"}\n')
        f.write(_line({"type": "block", "id": 0, "status": "done", "t_read": 0.5,
                       "histogram": list(range(16)), "out_min": 0.0, "out_max": 15.0}))  # fmt: skip
    summary = follower.summary()
    assert sorted(summary.done) == [0, 1] and not summary.failed
    # what no reader of a summary uses is not kept (a million blocks' records held GBs)
    assert summary.done[0] == {"type": "block", "id": 0, "status": "done", "t_read": 0.5}
    # the same answer as reading the whole file
    whole = Ledger(str(tmp_path / "o.n5"), "pred").summary()
    assert (summary.runs, summary.done, summary.failed) == (whole.runs, whole.done, whole.failed)

    # replaced (--overwrite removes the dataset folder): read again from the start
    shutil.rmtree(folder)
    folder.mkdir()
    path.write_text(_line({"type": "run", "time": 2.0}) + "torn line\n")
    summary = follower.summary()
    assert [r["time"] for r in summary.runs] == [2.0] and not summary.done
    assert follower.generation > first  # readers of the output know to open it again


def test_a_line_torn_by_a_crash_loses_nothing_after_it(tmp_path):
    """kill -9 mid-append leaves a line without its end: the next record starts on a line of its
    own instead of being glued to it (and lost); damaged records are skipped, not errors."""
    from napari_emparsl.core.blockwise import BlockResult

    folder = tmp_path / "o.n5" / "pred"
    folder.mkdir(parents=True)
    (folder / "attributes.json").write_text("{}")
    ledger = Ledger(str(tmp_path / "o.n5"), "pred")
    ledger.start_run({"block": [8, 8, 8], "site": "a"})
    with open(ledger.path, "a") as f:
        f.write('{"type": "block", "id": 7, "sta')  # the crash
    ledger.start_run({"block": [8, 8, 8], "site": "b"})
    ledger.record(BlockResult(3, True, "w:1"), 1, "0:8,0:8,0:8")
    with open(ledger.path, "a") as f:  # edited by hand, or damaged
        f.write(_line({"type": "block", "id": "x", "status": "done"}))
        f.write(_line({"type": "block", "status": "done"}))
        f.write(_line({"type": "block", "id": [1], "status": "done"}))
        f.write("\x00\x00 garbage\n[1, 2]\n")
    summary = ledger.summary()
    assert [run["site"] for run in summary.runs] == ["a", "b"]
    assert list(summary.done) == [3] and not summary.failed
    assert open(ledger.path).read().count("\n") == 9  # the torn line ended where it broke off


def test_a_lock_let_go_and_removed_is_held_by_one_at_a_time(tmp_path, monkeypatch):
    """A run waiting for the lock took it on the file its holder removed as it let go (the
    napari writer and a run refused while preparing let go so): the next one made a new file
    and took that, and two runs held "the lock" of one output at once."""
    import fcntl
    import threading

    import pytest

    from napari_emparsl.core.ledger import OutputBusy, OutputLock, lock_holder

    (tmp_path / "o.n5").mkdir()
    first = OutputLock(str(tmp_path / "o.n5"), "pred")
    first.acquire()
    waiting = OutputLock(str(tmp_path / "o.n5"), "pred")
    refused = threading.Event()  # the waiting lock's first try failed: it waits to try again
    flock = fcntl.flock

    def spy(fd, op):
        try:
            return flock(fd, op)
        except BlockingIOError:
            refused.set()
            raise

    monkeypatch.setattr(fcntl, "flock", spy)
    took = threading.Thread(target=waiting.acquire)
    took.start()  # its first try fails (held), then it waits 50 ms before the next
    assert refused.wait(10)  # (released before that, the lock would never be contended)
    first.release(remove=True)
    took.join(10)
    assert waiting._file is not None  # it holds the lock …
    assert lock_holder(str(tmp_path / "o.n5"), "pred")  # … on the file at the lock's path
    with pytest.raises(OutputBusy):  # so a third one is refused
        OutputLock(str(tmp_path / "o.n5"), "pred").acquire()
    waiting.release(remove=True)


def test_a_lock_taken_on_a_second_try_still_removes_the_folders_it_made(tmp_path, monkeypatch):
    """A try that found its file removed and tried again forgot the folders the first made for
    the lock file: a run refused while preparing left an empty new container behind."""
    import os

    from napari_emparsl.core.ledger import OutputLock

    lock = OutputLock(str(tmp_path / "new.n5"), "raw")
    real_stat, failed = os.stat, []

    def stat_once_gone(path, *args, **kwargs):  # the first recheck sees the file removed
        if str(path) == lock.path and not failed:
            failed.append(path)
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_once_gone)
    lock.acquire()
    monkeypatch.setattr(os, "stat", real_stat)
    assert failed and lock.held
    lock.release(remove=True)
    assert not (tmp_path / "new.n5").exists()


def test_a_long_dataset_name_is_still_locked(tmp_path):
    """A key of 260 characters made a lock file name over 255 bytes: the lock could not be
    made, and a second run wrote the same output unhindered."""
    from napari_emparsl.core.ledger import OutputBusy, OutputLock, lock_holder

    key = "/".join(("a" * 100, "b" * 100, "c" * 60))
    (tmp_path / "o.n5").mkdir()
    first = OutputLock(str(tmp_path / "o.n5"), key)
    first.acquire()
    try:
        assert first.held and lock_holder(str(tmp_path / "o.n5"), key) is not None
        assert len(os.path.basename(first.path).encode()) <= 255
        with pytest.raises(OutputBusy):
            OutputLock(str(tmp_path / "o.n5"), key).acquire()
    finally:
        first.release()


@pytest.mark.parametrize("spec", [None, [1, 1, 1], "x", {"scale": "abc"}])
def test_a_run_record_of_odd_values_is_read_as_saying_nothing(tmp_path, spec):
    """A run record whose spec is null, a list or a word crashed status (AttributeError)."""
    from napari_emparsl.core.ledger import run_block, run_scale, whole_plan_blocks

    record = {"type": "run", "block": [8, 8, 8], "spec": spec, "planned": 3}
    assert run_scale(record) == [1, 1, 1] and run_block(record) == [8, 8, 8]
    assert whole_plan_blocks((16, 16, 16), record) == 8
    assert whole_plan_blocks((16, 16, 16), record | {"block": "abc"}) == 3
