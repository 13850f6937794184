"""Kill one HTEX worker process mid-run: its block is retried and the output is unchanged."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil

from napari_emparsl.core.events import BlockDone, BlockFailed
from napari_emparsl.core.volume import Volume, save_array
from napari_emparsl.execution.runner import Run


def _worker_pids() -> list[int]:
    """Worker processes of emparsl's HTEX pools (children of process_worker_pool.py, which
    LocalProvider starts detached, so they are not children of this process)."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "process_worker_pool" in cmd and "emparsl-parsl-" in cmd:
            pids += [c.pid for c in proc.children(recursive=True)]
    return pids


def test_killed_worker_block_is_retried(tmp_path, unet_model):
    data = np.random.default_rng(3).random((64, 96, 96)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(32, 32, 32))
    src = f"{tmp_path}/in.n5:raw"
    ref = Run(src, unet_model, f"{tmp_path}/ref.n5:seg", site="threads").execute()
    assert ref.ok

    run = Run(src, unet_model, f"{tmp_path}/out.n5:seg", site="local")
    killed: list[int] = []
    failures: list[BlockFailed] = []
    last = None
    for event in run.events():
        last = event
        if isinstance(event, BlockDone) and not killed:
            # the worker that just finished has already taken its next block (blocks are queued)
            pid = int(event.result.worker.rsplit(":", 1)[1])
            assert pid in _worker_pids(), "not an HTEX worker of this run"
            time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if isinstance(event, BlockFailed):
            failures.append(event)
    assert killed and last.ok, (last, failures)
    assert failures and all(
        not f.final for f in failures
    )  # the lost block failed, then was retried
    np.testing.assert_array_equal(
        Volume.open(tmp_path / "out.n5", "seg").data.compute(),
        Volume.open(tmp_path / "ref.n5", "seg").data.compute(),
    )
    assert (
        not psutil.pid_exists(killed[0])
        or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    )
