"""Dock widget: runs of this session and runs found in opened outputs, with provenance.

A run is known by its output dataset and the ledger beside it: status and progress, site, model,
when. Selecting one and moving the mouse over the viewer shows the provenance of the block under
the cursor (model hash, site, worker, time).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, Label, PushButton, Select

from napari_emparsl._napari import napari_fixes
from napari_emparsl._napari.background import Relay, error_sentence, guarded, in_background
from napari_emparsl._napari.widgets import (
    layer_of,
    on_removed,
    set_choices,
    viewer_itself,
    wrapping,
)
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import plan_blocks
from napari_emparsl.core.ledger import (
    Ledger,
    LedgerFollower,
    lock_holder,
    run_block,
    run_scale,
    run_spec,
    whole_plan_blocks,
)
from napari_emparsl.core.volume import Volume, parse_spec

__all__ = ["SESSION_OUTPUTS", "RunsWidget", "remember_output"]

if TYPE_CHECKING:
    import napari.viewer

log = logging.getLogger(__name__)

#: how often the list looks again while a run writes one of its outputs
FOLLOW_MS = 2000

#: outputs of runs started in this session (OUT.n5:KEY)
SESSION_OUTPUTS: list[str] = []


#: the runs panels open now (a run started in another panel refreshes them)
_PANELS: weakref.WeakSet[RunsWidget] = weakref.WeakSet()


def remember_output(output: str) -> None:
    if output not in SESSION_OUTPUTS:
        SESSION_OUTPUTS.append(output)


def run_going(output: str) -> None:
    """A run of this session writes ``output`` now (it has planned: its lock is held): the
    runs panels list it and follow it, also where its layer was open before (a preview's)."""
    remember_output(output)
    for panel in list(_PANELS):
        try:
            panel.refresh()
        except RuntimeError:  # its Qt widget is gone (its viewer closed)
            _PANELS.discard(panel)


class _Output:
    """One output's ledger (read incrementally) and volume, for questions asked on the Qt thread
    as often as the mouse moves."""

    def __init__(self, output: str):
        self.root, self.key = parse_spec(output)
        self.ledger = LedgerFollower(self.root, self.key)
        self.lock = threading.Lock()  # the Qt thread and a background refresh both read it
        self._volume: Volume | None = None
        self._volume_of = -1  # the ledger generation it was opened with

    def volume(self) -> Volume:
        """The output's volume, opened again when its ledger was replaced (--overwrite)."""
        if self._volume is None or self._volume_of != self.ledger.generation:
            self._volume = Volume.open(self.root, self.key)
            self._volume_of = self.ledger.generation
        return self._volume

    def describe(self) -> tuple[str, bool]:
        """The run's line in the list, and whether a run writes the output now."""
        summary = self.ledger.summary()
        last = summary.last_run
        when = datetime.datetime.fromtimestamp(last.get("time", 0)).strftime("%Y-%m-%d %H:%M")
        try:
            total = whole_plan_blocks(self.volume().shape, last)
        except UserError:
            total = int(last.get("planned", 0))
        done = len(summary.done)
        running = lock_holder(self.root, self.key) is not None  # this napari's or `emparsl run`
        state = "running" if running else ("complete" if done >= total else "stopped")
        return (
            f"{os.path.basename(self.root)}:{self.key} — {state}, {done}/{total} done, "
            f"{len(summary.failed)} failed — {last.get('model')} on {last.get('site')} — {when}"
        ), running


class RunsWidget(Container):
    """List of runs; open an output; provenance of the block under the cursor."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer_itself(viewer)  # napari injects it by this annotation
        napari_fixes.apply()  # a napari crash on removing a layer (see the module)
        self._outputs: dict[str, _Output] = {}
        self._generation = 0  # of refreshes: only the latest one's answer is shown
        self.refreshed = 0  # refreshes shown so far
        self._relay = Relay(self.native)  # background refreshes hand their answer to the Qt thread
        self._relay.answer.connect(guarded(self, self._answered))
        from qtpy.QtCore import QTimer

        # while a run writes one of the outputs, the list follows it (the ledgers are read
        # incrementally, in the background); owned by the panel, gone with it
        self._follow = QTimer(self.native)
        self._follow.setSingleShot(True)
        self._follow.setInterval(FOLLOW_MS)
        self._follow.timeout.connect(self.refresh)
        self.runs = Select(
            label="runs", choices=[], tooltip="runs of this session and of opened outputs"
        )
        self.refresh_btn = PushButton(text="Refresh", tooltip="look for runs again")
        self.open_btn = PushButton(
            text="Open output", tooltip="add the selected run's output as a layer"
        )
        self.provenance = Label(label="under cursor", value="")
        self.extend([self.runs, self.refresh_btn, self.open_btn, self.provenance])
        wrapping(self.provenance)
        self.refresh_btn.changed.connect(self.refresh)
        self.open_btn.changed.connect(self.open_output)
        self._viewer.layers.events.inserted.connect(self.refresh)
        self._viewer.mouse_move_callbacks.append(self._on_mouse_move)
        _PANELS.add(self)
        on_removed(self, self._removed)
        # gone with its viewer's window (Qt deletes docked panels): no longer told of runs
        ref = weakref.ref(self)
        self.native.destroyed.connect(lambda *_: _PANELS.discard(ref()) if ref() else None)
        self.refresh()

    def _removed(self) -> None:
        """Closed (the dock's ×): lets go of the viewer; a panel opened again is a new one."""
        _PANELS.discard(self)
        self._follow.stop()
        self._viewer.layers.events.inserted.disconnect(self.refresh)
        if self._on_mouse_move in self._viewer.mouse_move_callbacks:
            self._viewer.mouse_move_callbacks.remove(self._on_mouse_move)

    def outputs(self) -> list[str]:
        found = list(SESSION_OUTPUTS)
        for layer in self._viewer.layers:
            src = (layer.metadata or {}).get("emparsl")
            if src:
                spec = f"{src['path']}:{src['key']}"
                if spec not in found:
                    found.append(spec)
        listed = [o for o in found if Ledger(*parse_spec(o)).exists()]
        # outputs deleted since are forgotten (a day of runs kept every one, and each refresh
        # looked for them all); a run not yet begun is remembered again as it begins
        SESSION_OUTPUTS[:] = [o for o in SESSION_OUTPUTS if o in listed]
        return listed

    def refresh(self, *_: Any) -> None:
        """Describe every run again; the ledgers are read in the background (a first read of a
        ledger of 10⁵ blocks takes ~1 s), the list is updated when they are."""
        outputs = self.outputs()
        # those no longer listed let go of their ledger summaries and volumes
        self._outputs = {o: t for o, t in self._outputs.items() if o in outputs}
        tracked = [self._output(o) for o in outputs]
        self._generation += 1
        generation = self._generation

        def describe_all() -> tuple[list[tuple[str, str]], int, bool]:
            found, running = [], False
            for t, o in zip(tracked, outputs, strict=True):
                with t.lock:
                    label, now = t.describe()
                found.append((label, o))
                running = running or now
            return found, generation, running

        in_background(self._relay, describe_all, name="emparsl-runs", daemon=True)

    def _answered(self, answer: Any) -> None:
        if isinstance(answer, BaseException):
            log.warning("listing the runs failed: %s", error_sentence(answer, "Listing the runs"))
            return
        self._show_runs(*answer)

    def _show_runs(self, runs: list[tuple[str, str]], generation: int, running: bool) -> None:
        if generation != self._generation:
            return  # a later refresh is on its way
        selected = [o for o in (self.runs.value or []) if o in {o for _, o in runs}]
        set_choices(self.runs, runs)
        self.runs.value = selected  # the selection survives new layers and refreshes
        self.refreshed += 1
        if running:
            self._follow.start()  # look again soon

    def _output(self, output: str) -> _Output:
        if output not in self._outputs:
            self._outputs[output] = _Output(output)
        return self._outputs[output]

    def open_output(self, *_: Any) -> list[Any]:
        from napari.utils.notifications import show_error

        from napari_emparsl._napari.reader import layer_data

        added = []
        for output in self.runs.value or []:
            root, key = parse_spec(output)
            already = layer_of(self._viewer, root, key)
            if already is not None and os.path.isdir(os.path.join(root, key)):
                # not a second copy of it (`pred [1]`): its layer is selected
                self._viewer.layers.selection.active = already
                continue
            try:
                data, meta, kind = layer_data(Volume.open(*parse_spec(output)))
            except UserError as err:  # e.g. removed from disk since it was listed
                show_error(str(err))
                self.refresh()
                continue
            added.append(getattr(self._viewer, f"add_{kind}")(data, **meta))
        return added

    def provenance_at(self, world_point: Any) -> str:
        """Provenance of the block of the selected run at a world position (nm)."""
        selected = self.runs.value or []
        if len(selected) != 1:
            return ""
        tracked = self._output(selected[0])
        if not tracked.lock.acquire(blocking=False):
            return self.provenance.value  # its ledger is being read in the background
        try:
            summary = tracked.ledger.summary()  # only what was appended since the last move
            out = tracked.volume()
        except UserError as err:
            return str(err)
        finally:
            tracked.lock.release()
        last = summary.last_run
        spatial = tuple(float(p) for p in world_point)[-3:]
        voxel = tuple(
            int((p - o) // v) for p, o, v in zip(spatial, out.offset, out.voxel_size, strict=True)
        )
        if any(v < 0 or v >= n for v, n in zip(voxel, out.shape[-3:], strict=True)):
            return ""
        scale = run_scale(last)
        in_shape = tuple(n // s for n, s in zip(out.shape[-3:], scale, strict=True))
        in_voxel = tuple(v // s for v, s in zip(voxel, scale, strict=True))
        block_grid, halo = run_block(last), last.get("halo")
        if not block_grid or halo is None:  # no run record (yet), or one from an old version
            return ""
        ids = [
            b.id
            for b in plan_blocks(in_shape, block_grid, halo, scale=scale, out_chunks=out.chunks[-3:],
                                 roi=_point_roi(in_voxel),
                                 fixed=run_spec(last).get("fixed"))
        ]  # fmt: skip
        if not ids:
            return ""
        rec = summary.done.get(ids[0]) or summary.failed.get(ids[0])
        if rec is None:
            return f"block {ids[0]}: not computed yet"
        when = datetime.datetime.fromtimestamp(rec["time"]).strftime("%H:%M:%S")
        return (
            f"block {ids[0]} {rec['status']}: model {str(rec.get('model_sha256', ''))[:12]}…, "
            f"site {rec.get('site')}, worker {rec.get('worker')}"
            + (f" ({rec['device']})" if rec.get("device") else "")
            + f", at {when}"
        )

    def _on_mouse_move(self, viewer: Any, event: Any) -> None:
        self.provenance.value = self.provenance_at(viewer.cursor.position)


def _point_roi(voxel: tuple[int, ...]):
    from napari_emparsl.core.geometry import Roi

    return Roi(tuple(voxel), (1,) * len(voxel))
