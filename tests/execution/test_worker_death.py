"""Kill one HTEX worker process mid-run: its block is retried and the output is unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil

from napari_emparsl.core.events import BlockDone, BlockFailed
from napari_emparsl.core.volume import Volume, save_array
from napari_emparsl.execution.runner import Run


def _worker_pids(htex) -> list[int]:
    """Processes of emparsl's HTEX sites that are no pool: the workers (forked from a fork
    server, which is a child of this process, or of the pool when it starts the server)."""
    pools = set(htex.pools())
    return [pid for pid in htex.all(guards=False, interchanges=False) if pid not in pools]


def _wait_until_computing(pid: int, timeout: float = 20.0) -> bool:
    """Whether the worker is running a block (using CPU), not waiting for its next task.

    Only a worker killed computing loses a block, which must then be retried (a worker killed
    while idle is replaced without any block failing: test_worker_pool.py).
    """
    proc = psutil.Process(pid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        before = sum(proc.cpu_times()[:2])
        time.sleep(0.1)  # a third of a core at least: computing, also on a loaded machine (a
        # worker waiting for its next task uses none); 60 % of 50 ms could miss it under load
        if sum(proc.cpu_times()[:2]) - before > 0.03:
            return True
    return False


def test_killed_worker_block_is_retried(tmp_path, unet_model, htex, classes_mixed):
    data = np.random.default_rng(3).random((128, 128, 128)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(32, 32, 32))
    src = f"{tmp_path}/in.n5:raw"
    block = (64, 64, 64)  # 8 blocks of about a second each: the kill lands inside one
    ref = Run(src, unet_model, f"{tmp_path}/ref.n5:seg", site="threads", block=block).execute()
    assert ref.ok

    run = Run(src, unet_model, f"{tmp_path}/out.n5:seg", site="local", block=block)
    killed: list[int] = []
    failures: list[BlockFailed] = []
    last = None
    for event in run.events():
        last = event
        if isinstance(event, BlockDone) and not killed:
            # the worker that just finished has already taken its next block (blocks are queued)
            pid = int(event.result.worker.rsplit(":", 1)[1])
            assert pid in _worker_pids(htex), "not an HTEX worker of this run"
            assert _wait_until_computing(pid), "the worker did not take a next block"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if isinstance(event, BlockFailed):
            failures.append(event)
    assert killed and last.ok, (last, failures)
    assert failures and all(
        not f.final for f in failures
    )  # the lost block failed, then was retried
    ref_seg = Volume.open(tmp_path / "ref.n5", "seg").data.compute()
    classes_mixed(ref_seg)  # (one class everywhere: a block written wrong would be equal too)
    np.testing.assert_array_equal(Volume.open(tmp_path / "out.n5", "seg").data.compute(), ref_seg)
    assert (
        not psutil.pid_exists(killed[0])
        or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    )


def test_a_coordinator_killed_as_its_site_starts_leaves_no_interchange(tmp_path, htex):
    """kill -9 of `emparsl run` as its local site's interchange starts — before the site's guard
    is told of it — left the interchange running for good (its parent gone, its pipe held)."""

    save_array(tmp_path / "in.n5", "raw", np.zeros((16, 32, 32), np.float32), chunks=(16, 32, 32))
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", "unet3d-em", "--output", f"{tmp_path}/o.n5:p", "--site", "local"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    interchange = None
    deadline = time.time() + 60
    while interchange is None and time.time() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children():
            try:
                if "interchange" in " ".join(child.cmdline()).lower():
                    interchange = child
            except psutil.Error:
                pass
        time.sleep(0.01)
    assert interchange is not None, "the site's interchange never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, _ = psutil.wait_procs([interchange], timeout=10)
    assert gone, "the interchange outlived its coordinator"
    assert htex.gone(timeout=30), htex.all()
