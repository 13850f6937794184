"""napari sample data: the synthetic EM volume with its ground truth, ready to run on.

Runs read their blocks from N5, so the sample is written once as an N5 container in the user's
cache (``$XDG_CACHE_HOME/napari-emparsl/sample-seed0.n5``, else ``~/.cache/…``; the temporary
folder where that cannot be written) and opened lazily
from there, as File > Open would open it: the run panel offers it as a volume at once, and a
run's output goes beside it (``sample-seed0.n5:predictions/…``). The container is written in a
temporary folder and moved into place when whole, so an interrupted first opening leaves nothing
half-written; later openings reuse it. Generating it takes a few seconds: on the Qt thread that
first writing runs in a thread of its own while Qt's events go on (napari stays responsive, with a
progress bar in its activity dock); asked again meanwhile, the same writing is waited for.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.sample import make_sample, write_sample
from napari_emparsl.core.volume import Volume

log = logging.getLogger(__name__)

__all__ = ["make_sample_data", "sample_container"]

# the sample's datasets and the names of their layers
LAYERS = {"raw": "sample raw", "labels/classes": "sample classes", "labels/cells": "sample cells"}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-emparsl"


def _whole(path: Path) -> bool:
    """Whether ``path`` holds every dataset of the sample."""
    try:
        for key in LAYERS:
            Volume.open(str(path), key)
    except UserError:
        return False
    return True


def sample_container(seed: int = 0) -> str:
    """The sample's N5 container in the user's cache, written first where it is not there whole;
    where the cache cannot be written (a read-only home), in the temporary folder instead."""
    try:
        return _container_in(_cache_dir(), seed)
    except OSError as err:
        fallback = Path(tempfile.gettempdir()) / f"napari-emparsl-{os.getuid()}"
        log.warning("could not write the sample to %s (%s); using %s", _cache_dir(), err, fallback)
    try:
        return _container_in(fallback, seed)
    except OSError as err:
        raise UserError(
            f"Could not write the EM sample to {_cache_dir()} nor to {fallback} "
            f"({err.strerror or err}): free some disk space there, or set XDG_CACHE_HOME to a "
            "folder you can write to."
        ) from err


def _container_in(folder: Path, seed: int) -> str:
    path = folder / f"sample-seed{seed}.n5"
    if _whole(path):
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".sample-", dir=path.parent) as tmp:
        fresh = Path(tmp) / path.name
        write_sample(str(fresh), make_sample(seed=seed))
        if path.exists():  # not whole (a dataset deleted by hand): kept aside, not deleted
            aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
            path.rename(aside)
            log.warning("the cached sample at %s was incomplete; moved it to %s", path, aside)
        try:
            fresh.rename(path)
        except OSError:  # another viewer wrote it meanwhile: that one is used
            if not _whole(path):
                raise
    log.info("wrote the sample to %s in %.1f s", path, time.perf_counter() - t0)
    return str(path)


# the writings of the sample going on, by seed (see _container_keeping_qt_alive)
_writing: dict[int, Future[str]] = {}
_writing_lock = threading.Lock()


def _writing_of(seed: int) -> Future[str]:
    """The writing of the sample for ``seed``: the one going on, else a new one in a thread."""
    with _writing_lock:
        future = _writing.get(seed)
        if future is not None and not future.done():
            return future
        future = _writing[seed] = Future()

    def write() -> None:
        try:
            future.set_result(sample_container(seed))
        except BaseException as err:  # handed to the caller, raised there
            future.set_exception(err)

    threading.Thread(target=write, name=f"emparsl-sample-{seed}", daemon=True).start()
    return future


def _container_keeping_qt_alive(seed: int) -> str:
    """``sample_container(seed)``; called on the Qt thread of a running app (napari's File >
    Open Sample) where the container has still to be written, the writing runs in a thread and
    Qt's events go on meanwhile in a local event loop, with a progress bar."""
    try:
        from qtpy.QtCore import QCoreApplication, QEventLoop, QThread, QTimer
    except ImportError:  # napari without a Qt binding (headless)
        return sample_container(seed)
    app = QCoreApplication.instance()
    cached = _cache_dir() / f"sample-seed{seed}.n5"
    if app is None or QThread.currentThread() is not app.thread() or _whole(cached):
        return sample_container(seed)
    import napari
    from napari.utils import progress

    asking = napari.current_viewer()
    future = _writing_of(seed)
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: future.done() and loop.quit())
    with progress(total=0, desc="EM sample: writing it to the cache (first time only)"):
        timer.start()
        if not future.done():
            loop.exec()
        timer.stop()
    path = future.result()
    if asking is not None and asking not in getattr(type(asking), "_instances", (asking,)):
        # napari's own widgets fail on layers added to a closed viewer
        raise UserError(
            f"The viewer was closed while the sample was being written; it is now in {path}: "
            "open the sample again in a viewer."
        )
    return path


def make_sample_data(seed: int = 0) -> list[tuple[Any, dict[str, Any], str]]:
    """Raw EM, class labels (background, membrane, mitochondria) and cell instances, as lazy
    layers over the sample's N5 container (see the module)."""
    from napari_emparsl._napari.reader import layer_data

    path = _container_keeping_qt_alive(seed)
    layers = []
    for key, name in LAYERS.items():
        data, meta, kind = layer_data(Volume.open(path, key))
        meta["name"] = name
        layers.append((data, meta, kind))
    layers[1][1]["opacity"] = 0.5  # the classes over the raw data
    layers[2][1]["visible"] = False  # the cells: hidden at first
    return layers
