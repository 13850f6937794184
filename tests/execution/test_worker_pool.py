"""The local site's worker pool: workers forked from a process that has torch loaded."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from napari_emparsl.core.events import BlockDone
from napari_emparsl.execution.runner import Run
from napari_emparsl.execution.sites import load_site, python_app, start_kernel


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's C++ library loaded."""
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


@pytest.mark.parametrize("preload", [True, False])
def test_workers_start_from_a_process_with_torch_loaded(
    tmp_path, conv_model, float_volume, htex, preload
):
    # preload_workers (default): torch is imported once, in a fork server the pool starts at once,
    # and every worker is forked from it; off: Parsl's pool spawns each worker as a fresh Python
    src, _ = float_volume
    profile = load_site("local").model_copy(update={"preload_workers": preload})
    run = Run(src, conv_model, f"{tmp_path}/o.n5:x", site=profile, block=(8, 16, 16))
    seen = None
    for event in run.events():
        if isinstance(event, BlockDone) and seen is None:
            worker = psutil.Process(int(event.result.worker.rsplit(":", 1)[1]))
            parent = worker.parent()
            pool = parent.parent() if preload else parent
            seen = (
                " ".join(parent.cmdline()),
                _maps_torch(parent.pid),
                " ".join(pool.cmdline()),
                _maps_torch(pool.pid),
                [p.nice() for p in (worker, parent, pool)],
            )
    assert event.ok and event.done > 1
    parent_cmd, parent_torch, pool_cmd, pool_torch, niceness = seen
    if preload:
        assert "multiprocessing.forkserver" in parent_cmd and parent_torch
        assert "-m napari_emparsl.execution.sites" in pool_cmd
    else:
        assert "process_worker_pool.py" in pool_cmd and not parent_torch
    assert not pool_torch  # the pool itself (Parsl's manager) never loads torch
    assert niceness == [10, 10, 10]  # the local site's priority reaches every worker
    assert htex.gone()


def test_workers_killed_while_idle_do_not_hang_the_site(tmp_path, htex):
    # Parsl's pool hands tasks out through a multiprocessing queue whose readers share a lock,
    # held by a worker for as long as it waits: an idle worker killed dies holding it, and no
    # worker ever takes a task again (measured: no result in 40 s). The preloading pool's queue
    # waits without the lock: the pool starts new workers and the next task runs.
    profile = load_site("local")
    dfk = start_kernel(profile, str(tmp_path))
    try:
        getpid = python_app(os.getpid, dfk, profile)
        workers: set[int] = set()
        deadline = time.monotonic() + 60
        while len(workers) < profile.workers and time.monotonic() < deadline:
            workers |= {f.result(timeout=60) for f in [getpid() for _ in range(4)]}
        assert len(workers) == profile.workers
        time.sleep(1.0)  # every worker idle, waiting for a task
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert getpid().result(timeout=60) not in workers  # a new worker ran it
    finally:
        dfk.cleanup()
    assert htex.gone()
