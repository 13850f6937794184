"""A fix for a napari crash that our workflows meet (applied when our widgets or reader load).

napari 0.9 (``VispyCanvas._clean_and_update_scenegraph``) flushes the canvas's queued OpenGL
commands (``context.finish()``) when a layer is removed, to free the layer's textures at once
— without making the canvas's OpenGL context current first. Outside a paint, Qt has its
window compositor's context current, so the flushed commands (deleting the removed layer's
objects, uploading the others' data) go to the wrong context. Under Mesa (software OpenGL: Xvfb,
VNC and other remote desktops, virtual machines) the next drawing of a remaining layer then
crashes the whole process (segmentation fault in ``glDrawArrays``): e.g. remove the raw image
below a run's output and move the z slider. Plain napari does it with two image layers.

The fix makes the canvas's context current before napari's own clean-up; nothing else changes.
It is applied once, only where napari still has that method.

Also here, :func:`forget_ended_tasks`: napari's ``thread_worker`` registers each worker with
its window's task list (for "tasks are running" when the window closes) and never removes it:
every preview and run of a session stayed in memory with its worker and generator.

And :func:`load_units`: napari's layers take their units from pint's application
registry, which loads its definitions on first use (~0.5 s) in a way that is not thread-safe:
while one thread loads it, a layer made on another thread fails ("'pixel' is not defined in the
unit registry"). The run panel makes its first layers in a background thread (to pay napari's
first-layer costs before a run): the registry is loaded on the Qt thread before that starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging

__all__ = ["apply", "forget_ended_tasks", "load_units"]

log = logging.getLogger(__name__)


def apply() -> bool:
    """Patch napari's layer removal (idempotent); whether the patch is in place."""
    try:
        from napari._vispy.canvas import VispyCanvas
    except ImportError:  # a napari without it: nothing to fix
        return False
    original = getattr(VispyCanvas, "_clean_and_update_scenegraph", None)
    if original is None:
        return False
    if getattr(original, "_emparsl_context_current", False):
        return True

    @functools.wraps(original)
    def clean_and_update_scenegraph(self, *args, **kwargs):
        # a canvas not shown yet has no context to make current: napari's clean-up as it was
        with contextlib.suppress(Exception):
            self._scene_canvas.set_current()
        return original(self, *args, **kwargs)

    clean_and_update_scenegraph._emparsl_context_current = True  # type: ignore[attr-defined]
    VispyCanvas._clean_and_update_scenegraph = clean_and_update_scenegraph
    log.debug("napari's layer removal now makes the canvas's OpenGL context current first")
    return True


def load_units() -> None:
    """Load pint's unit registry now, on this thread, if nothing has yet (see the module)."""
    try:
        import pint

        registry = pint.get_application_registry()
        if type(registry.get()).__name__ == "LazyRegistry":
            registry.pixel  # noqa: B018  (its first attribute loads every definition)
    except Exception:  # another pint: napari then loads it as it always did
        log.debug("could not load pint's unit registry", exc_info=True)


def forget_ended_tasks(viewer: object) -> int:
    """Remove the tasks that ended from ``viewer``'s window's task list, and from the current
    viewer's (napari files a worker under the viewer current when it starts: with two open,
    perhaps the other) — napari keeps them, and with them their workers, for the rest of the
    session; how many were removed. Running ones stay (napari asks about them on closing)."""
    try:
        import napari

        current = napari.current_viewer()
    except Exception:  # no napari viewer at all
        current = None
    removed = _forget_ended(viewer)
    if current is not None and current is not viewer:
        removed += _forget_ended(current)
    return removed


def _forget_ended(viewer: object) -> int:
    manager = getattr(getattr(viewer, "window", None), "_task_status_manager", None)
    tasks = getattr(manager, "_tasks", None)
    if not isinstance(tasks, dict):  # another napari: nothing to do
        return 0
    try:
        from napari.utils.task_status import Status

        running = {Status.PENDING, Status.BUSY}
        ended = [key for key, item in list(tasks.items()) if item.state()[2] not in running]
    except Exception as err:  # napari changed its task items: leave them
        log.debug("could not read napari's task list: %s", err)
        return 0
    for key in ended:
        tasks.pop(key, None)
    return len(ended)
