"""The local site's worker pool: workers forked from a process that has torch loaded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from napari_emparsl.core.events import BlockDone
from napari_emparsl.core.volume import save_array
from napari_emparsl.execution.runner import Run
from napari_emparsl.execution.sites import load_site, python_app, start_kernel


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's C++ library loaded."""
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


@pytest.mark.parametrize("pool", ["coordinator's fork server", "pool's fork server", "Parsl's"])
def test_workers_start_from_a_process_with_torch_loaded(
    tmp_path, conv_model, float_volume, htex, pool
):
    # preload_workers (default): torch is imported once, in a fork server the coordinator starts
    # with the site (its own process group: a Ctrl-C in the terminal does not reach the workers),
    # every worker is forked from it; with a worker_init the workers need the pool's environment,
    # so the pool starts the fork server itself; off: Parsl's pool spawns each worker afresh
    src, _ = float_volume
    update = {
        "coordinator's fork server": {},
        "pool's fork server": {"worker_init": "export EMPARSL_TEST_INIT=1"},
        "Parsl's": {"preload_workers": False},
    }[pool]
    profile = load_site("local").model_copy(update=update)
    pymp_before = set(Path(tempfile.gettempdir()).glob("pymp-*"))
    run = Run(src, conv_model, f"{tmp_path}/o.n5:x", site=profile, block=(8, 16, 16))
    seen = None
    for event in run.events():
        if isinstance(event, BlockDone) and seen is None:
            worker = psutil.Process(int(event.result.worker.rsplit(":", 1)[1]))
            parent = worker.parent()
            [pool_pid] = htex.pools()
            seen = {
                "parent": " ".join(parent.cmdline()),
                "parent torch": _maps_torch(parent.pid),
                "grandparent": parent.parent().pid,
                "parent pid": parent.pid,
                "parent's group": os.getpgid(parent.pid),
                "parent's session": os.getsid(parent.pid),
                "pool": " ".join(psutil.Process(pool_pid).cmdline()),
                "pool pid": pool_pid,
                "pool torch": _maps_torch(pool_pid),
                "environment": worker.environ().get("EMPARSL_TEST_INIT"),
                "TMPDIR": {
                    p.environ().get("TMPDIR") for p in (worker, parent, psutil.Process(pool_pid))
                },
                "niceness": [p.nice() for p in (worker, parent, psutil.Process(pool_pid))],
            }
    assert event.ok and event.done > 1
    if pool == "coordinator's fork server":
        assert "multiprocessing.forkserver" in seen["parent"] and seen["parent torch"]
        assert seen["grandparent"] == os.getpid()  # started here, in a process group of its own
        assert seen["parent's group"] == seen["parent pid"] != os.getpgid(0)
        # ... in this session: Linux shares CPU time between sessions before niceness counts
        assert seen["parent's session"] == os.getsid(0)
        assert "-m napari_emparsl.execution.sites --fork-server" in seen["pool"]
    elif pool == "pool's fork server":
        assert "multiprocessing.forkserver" in seen["parent"] and seen["parent torch"]
        assert seen["grandparent"] == seen["pool pid"]
        assert "--fork-server" not in seen["pool"]
        assert seen["environment"] == "1"  # the worker_init's environment reaches the workers
    else:
        assert "process_worker_pool.py" in seen["pool"] and not seen["parent torch"]
    assert "napari_emparsl.execution.sites" in seen["pool"] or pool == "Parsl's"
    assert not seen["pool torch"]  # the pool itself (Parsl's manager) never loads torch
    assert seen["niceness"] == [10, 10, 10]  # the local site's priority reaches every worker
    assert htex.gone()
    # the site's processes keep their temporary files (multiprocessing's pymp-* socket
    # folders: the pool's manager's is never removed, killed as it is) in the run's folder,
    # which goes with the run: nothing is left in the temporary folder
    [site_tmp] = seen["TMPDIR"]
    assert Path(site_tmp).name.startswith("emparsl-parsl-") and not Path(site_tmp).exists()
    assert set(Path(tempfile.gettempdir()).glob("pymp-*")) <= pymp_before


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
        while len(workers) < profile.worker_count and time.monotonic() < deadline:
            workers |= {f.result(timeout=60) for f in [getpid() for _ in range(4)]}
        assert len(workers) == profile.worker_count
        import psutil

        def idle() -> bool:  # every worker waiting for a task (asleep in the queue's get)
            return all(psutil.Process(p).status() == psutil.STATUS_SLEEPING for p in workers)

        def still_idle() -> bool:  # asleep now and 0.2 s later (not a pause within a task)
            return idle() and (time.sleep(0.2) or idle())

        while not still_idle() and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        assert idle()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert getpid().result(timeout=60) not in workers  # a new worker ran it
    finally:
        dfk.cleanup()
    assert htex.gone()


@pytest.mark.parametrize("preload", [True, False])
def test_coordinator_killed_leaves_no_site_processes(tmp_path, unet_model, htex, preload):
    # Parsl's interchange outlives a coordinator killed with SIGKILL, and with it the pool and
    # its workers (measured: all still there 25 s later, killed 1.5 s into the site's start);
    # the site's guard, a shell reading a pipe from the coordinator, stops them and removes the
    # run's Parsl folder
    data = np.random.default_rng(5).random((64, 64, 128)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(32, 32, 32))
    site = tmp_path / "site.yaml"
    site.write_text(
        f"name: local\nkind: local\nnice: 10\npreload_workers: {str(preload).lower()}\n"
    )
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", unet_model, "--output", f"{tmp_path}/out.n5:seg", "--block", "32,32,32",
           "--site", str(site)]  # fmt: skip
    # the run's Parsl folder goes there (a short path: under a long one it goes to /tmp)
    short = Path(tempfile.mkdtemp(prefix="k9-", dir="/tmp"))
    (tmp_path / "tmp").symlink_to(short)
    env = {**os.environ, "TMPDIR": str(short)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while len(htex.pools()) < 1 and time.monotonic() < deadline:  # the site is starting
            time.sleep(0.05)
        assert htex.pools(), "the site did not start"
        time.sleep(0.5)
        assert list((tmp_path / "tmp").glob("emparsl-parsl-*"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert htex.gone(timeout=30)
    assert not list((tmp_path / "tmp").glob("emparsl-parsl-*"))
    shutil.rmtree(short)


_SHUTDOWN_WHILE_LAUNCHING = """
import os, sys, tempfile
from napari_emparsl.execution.sites import load_site, python_app, start_kernel
profile = load_site("local")
for i in range(3):
    dfk = start_kernel(profile, tempfile.mkdtemp(dir=sys.argv[1]))
    app = python_app(os.getpid, dfk, profile)
    futures = [app() for _ in range(200)]  # Parsl's launch thread is still sending these
    dfk.cleanup()
    print("round", i, "shut down", flush=True)
"""


def test_site_shut_down_while_parsl_launches_tasks(tmp_path, htex):
    # Parsl's cleanup closed the executor's ZeroMQ socket while its launch thread still sent
    # tasks on it: libzmq asserted and the whole process aborted (a run failing its checks just
    # after the site's warm-up tasks were submitted; measured: 3 of 3 such scripts aborted in
    # their first or second round). The site now waits for the launches before shutting down.
    done = subprocess.run(
        [sys.executable, "-c", _SHUTDOWN_WHILE_LAUNCHING, str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("shut down") == 3
    assert htex.gone()


@pytest.mark.parametrize("update", [{"workers": 2}, {"workers": 1, "threads_per_worker": 2}])
def test_each_worker_loads_the_model_once_with_its_share_of_threads(
    tmp_path, conv_model, float_volume, htex, update
):
    # models are cached per worker process; torch's threads per worker are the site's share
    src, _ = float_volume
    profile = load_site("local").model_copy(update=update)
    expected_threads = profile.worker_threads
    if "threads_per_worker" in update:
        assert expected_threads == 2
    run = Run(src, conv_model, f"{tmp_path}/o.n5:x", site=profile, block=(8, 16, 16))
    results = [e.result for e in run.events() if isinstance(e, BlockDone)]
    assert len(results) == 80  # 5 × 4 × 4 blocks
    by_worker: dict[str, list] = {}
    for r in results:
        by_worker.setdefault(r.worker, []).append(r)
    assert 1 <= len(by_worker) <= update["workers"]
    assert max(len(rs) for rs in by_worker.values()) > 1  # a worker computed several blocks ...
    assert {r.model_loads for r in results} == {1}  # ... from the one model it loaded
    assert {r.threads for r in results} == {expected_threads}
    assert htex.gone()


def test_the_pool_starts_the_workers_the_profile_asks_for(htex):
    """Parsl's pool starts min(workers, cores ÷ cores_per_worker) workers: `workers: 3` on 2
    cores started 2 (the runner sized its warm-ups and window for 3), and threads_per_worker
    above the cores started none — every block waited for ever. A site that runs no task says
    so in one sentence (before: "could not run a task (TimeoutError: )")."""
    import glob
    import shutil

    from napari_emparsl.execution.sites import (
        SiteError,
        SiteProfile,
        _noop,
        check_site,
        machine_capacity,
        new_run_dir,
    )

    cores = machine_capacity()[0]
    for workers, threads in ((cores + 1, 1), (1, cores + 2)):
        profile = SiteProfile(
            name="many", kind="local", workers=workers, threads_per_worker=threads
        )
        run_dir = new_run_dir()
        dfk = start_kernel(profile, run_dir)
        try:
            assert python_app(_noop, dfk, profile)().result(timeout=120) > 0
            [log] = glob.glob(f"{run_dir}/**/manager.log", recursive=True)
            spawn = [ln for ln in Path(log).read_text().splitlines() if "will spawn" in ln]
        finally:
            dfk.cleanup()
            shutil.rmtree(run_dir, ignore_errors=True)
        assert len(spawn) == 1 and spawn[0].endswith(f"Manager will spawn {workers} workers")
    assert htex.gone()
    # a pool told it has no cores starts no worker: the test says so, in one sentence
    none = SiteProfile(name="nocores", kind="local", workers=1, worker_init="export PARSL_CORES=0")
    with pytest.raises(SiteError) as err:
        check_site(none, timeout=5)
    assert str(err.value) == (
        "The site 'nocores' ran no task within 5 s (no worker took it); check its settings."
    )
    assert htex.gone()


@pytest.mark.parametrize("interchange", ["killed", "not answering"])
def test_a_site_whose_interchange_died_shuts_down_whole(
    tmp_path, htex, monkeypatch, interchange, caplog
):
    # Parsl's shutdown asked the interchange for its workers with no time limit: with the
    # interchange dead (the out-of-memory killer, a batch job's SIGTERM) the asking thread was
    # given up on after 2 s and stayed blocked for ever, one per such run in a napari session.
    # A dead interchange has no workers now, and one that does not answer is given a few seconds
    import threading

    from napari_emparsl.execution import sites

    monkeypatch.setattr(sites, "MANAGERS_TIMEOUT", 2.0)
    profile = load_site("local")
    dfk = start_kernel(profile, str(tmp_path))
    assert python_app(sites._noop, dfk, profile)().result(timeout=120) > 0
    [proc] = [e.interchange_proc for e in dfk.executors.values() if hasattr(e, "interchange_proc")]
    if interchange == "killed":
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    else:  # alive, never answering
        os.kill(proc.pid, signal.SIGSTOP)
    # Parsl's status poller asks the interchange for its worker pools every 5 s (the local
    # provider's interval), holding the executor's command socket: the shutdown waits for it
    time.sleep(6)
    caplog.set_level("WARNING", logger="napari_emparsl")
    dfk.cleanup()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        t.name == "emparsl-site-cleanup" for t in threading.enumerate()
    ):
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t.name == "emparsl-site-cleanup"]
    assert htex.gone()  # interchange, pool, workers, fork server: all stopped
    if interchange == "killed":  # a whole shutdown, not one given up on after its grace
        assert "did not shut down" not in caplog.text, caplog.text


@pytest.mark.parametrize("kind", ["local", "threads"])
def test_fewer_blocks_than_workers_get_the_idle_workers_threads(
    tmp_path, conv_model, float_volume, htex, kind
):
    # a preview of one block, or a volume of one block, used one core of two: the idle
    # workers' threads now go to the blocks there are
    import torch

    src, _ = float_volume
    profile = load_site(kind).model_copy(update={"workers": 2, "threads_per_worker": 1})
    before = torch.get_num_threads()
    try:
        threads = {}
        for roi, name in (("0:8,0:16,0:16", "one"), ("0:8,0:16,0:32", "two")):
            run = Run(
                src,
                conv_model,
                f"{tmp_path}/{name}.n5:x",
                site=profile,
                block=(16, 16, 16),
                roi=roi,
                batch=1,
            )
            threads[name] = [e.result.threads for e in run.events() if isinstance(e, BlockDone)]
    finally:
        torch.set_num_threads(before)
    assert threads == {"one": [2], "two": [1, 1]}
    assert htex.gone()
