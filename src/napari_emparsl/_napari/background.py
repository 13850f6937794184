"""Work the panels do off napari's Qt thread, in plain Python threads.

Not napari's Qt workers: a worker still running when its viewer closed (or a test ended) had its
signals deleted under it, and Qt aborted the whole process. A plain thread hands its answer to
the Qt thread through a :class:`Relay` the panel owns (a queued signal), connected through
:func:`guarded`: a panel closed meanwhile simply gets no answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

from napari_emparsl.core.errors import UserError

__all__ = [
    "Relay",
    "WorkerRuntimeError",
    "alive",
    "error_sentence",
    "guarded",
    "import_engine",
    "in_background",
    "panel_alive",
]

log = logging.getLogger(__name__)


class Relay(QObject):
    """Hands a background thread's answer (a value or the exception it raised) to the Qt
    thread; create it on the Qt thread, in the panel that connects to ``answer``, as a child of
    the panel's widget: Qt then deletes it with the panel, on the Qt thread. (Without a parent,
    a panel closed while its thread ran left that thread the relay's last reference, and the
    Qt object was destroyed on the wrong thread when the thread ended.)"""

    answer = Signal(object)

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        # a thread sends while Qt may be deleting the relay on its own thread: the deletion
        # waits for a send under way, and no send begins after it (``destroyed`` is emitted
        # first thing in the deletion, on the deleting thread)
        lock, gone = threading.Lock(), threading.Event()

        def deleted(*_: Any) -> None:
            with lock:
                gone.set()

        self.destroyed.connect(deleted)
        self._lock, self._gone = lock, gone

    def send(self, value: Any) -> None:
        """Emit ``value`` from any thread (queued to the Qt thread); nothing once deleted."""
        with self._lock:
            if not self._gone.is_set():
                self.answer.emit(value)


def alive(widget: Any) -> bool:
    """Whether a Qt object's C++ side still exists (a closed viewer deletes its panels' widgets
    while their Python objects live on)."""
    try:
        widget.objectName()
    except RuntimeError:  # "wrapped C/C++ object … has been deleted" (PyQt and PySide alike)
        return False
    return True


def panel_alive(owner: Any) -> bool:
    """Whether ``owner`` — a Qt widget, or a panel (its ``native`` widget) — still exists, and,
    for a panel, its viewer has not begun closing (``_viewer_closing``: set by the run panel
    when napari tears its viewer down; the widgets are deleted only a moment later)."""
    try:  # a deleted Qt widget, or magicgui asking one, raises on any attribute
        if getattr(owner, "_viewer_closing", False):
            return False
        return alive(getattr(owner, "native", owner))
    except RuntimeError:
        return False


def guarded(owner: Any, func: Callable[..., Any]) -> Callable[..., None]:
    """``func``, called only while ``owner`` (see :func:`panel_alive`) is there: for answers,
    timers and run events that reach the Qt thread after the panel was closed (a background
    thread's answer queued just before the viewer closed read a deleted field and raised in
    Qt's event loop)."""

    def call(*args: Any) -> None:
        if panel_alive(owner):
            func(*args)

    return call


def in_background(relay: Relay, func: Callable[[], Any], name: str, daemon: bool = False) -> None:
    """Run ``func()`` in a thread; its result, or the exception it raised, is emitted by
    ``relay.answer`` on the Qt thread. A non-daemon thread is waited for when Python exits (a
    site test then shuts its site down cleanly)."""

    def run() -> None:
        try:
            result = func()
        except Exception as err:  # handed over, said in one sentence there
            result = err
        try:
            relay.send(result)  # queued to the Qt thread
        except RuntimeError:
            pass  # the panel was closed meanwhile

    threading.Thread(target=run, name=name, daemon=daemon).start()


_ENGINE_IMPORT = threading.Lock()


def import_engine() -> None:
    """Import the engine and Parsl's kernel, one thread at a time. The panels' background
    threads (the run panel's preload, a site test) import them, and two threads importing
    Parsl at once could see it half-initialized ("partially initialized module 'parsl' has no
    attribute '__version__'"). Cheap once done."""
    with _ENGINE_IMPORT:
        from napari_emparsl.execution import runner  # noqa: F401  (parsl, the engine)
        from napari_emparsl.execution.sites import import_kernel

        import_kernel()


class WorkerRuntimeError(Exception):
    """A RuntimeError raised in a napari thread worker, carried out of it as another type:
    superqt takes a worker's RuntimeError for its own deletion and drops it (no ``errored``,
    no ``finished``), and the panel would wait for its run forever. ``__cause__`` is it."""


def error_sentence(err: BaseException, what: str) -> str:
    """Our own errors say what is wrong in one sentence; anything else is named in one, with
    its traceback in the log file it names (:func:`~napari_emparsl.core.paths.log_path`)."""
    if isinstance(err, WorkerRuntimeError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, UserError):
        return str(err)
    import traceback

    from napari_emparsl.core.paths import log_details

    log.error("%s failed", what, exc_info=(type(err), err, err.__traceback__))
    path = log_details(f"napari: {what}", "".join(traceback.format_exception(err)))
    first = (str(err).strip().splitlines() or [""])[0][:200]
    where = f"the details are in {path}" if path else "see the log"
    return f"{what} failed unexpectedly ({type(err).__name__}: {first}); {where}."
