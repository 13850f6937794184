"""Dock widget: pick a volume, model and site; preview a region; launch runs that stream back.

Thin GUI over the engine: every computation is a :class:`~napari_emparsl.execution.runner.Run`
whose events are drained in a napari ``thread_worker`` (never on the Qt thread) and handed to
the Qt thread, where the output layer is refreshed. The output layer's data is a
:class:`~napari_emparsl._napari.live.LiveN5Array` over the output N5: it caches nothing across
writes (no stale chunks), and the drain thread re-reads the plane on screen after each block
that touches it, so the refresh on the Qt thread only draws.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
)
from qtpy.QtCore import QTimer

from napari_emparsl._napari import napari_fixes
from napari_emparsl._napari.background import (
    Relay,
    WorkerRuntimeError,
    alive,
    error_sentence,
    guarded,
    import_engine,
    in_background,
    panel_alive,
)
from napari_emparsl._napari.reader import class_colormap, napari_unit
from napari_emparsl._napari.widgets import n5_source as _source_of
from napari_emparsl._napari.widgets import (
    on_removed,
    set_choices,
    site_chooser,
    viewer_itself,
    wrapping,
)
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.events import BlockDone, BlockFailed, Cancelled, Finished, Planned
from napari_emparsl.core.geometry import Roi, size_values
from napari_emparsl.core.models.loaders import BUILTIN_MODELS
from napari_emparsl.core.paths import user_path
from napari_emparsl.core.volume import Volume

if TYPE_CHECKING:
    import napari.viewer

log = logging.getLogger(__name__)

# a 3D view draws the output's coarsest level whole: kept in memory during a run up to this size
# (64 MB of float32; a multiscale output's coarsest level has at most 2 Mi voxels)
_KEEP_WHOLE_VOXELS = 16 * 2**20

__all__ = ["RunWidget"]


def _show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    log.warning(message)
    show_warning(message)


def _preload(model: str, done: threading.Event | None = None) -> None:
    """Import the engine and torch, and load ``model`` into the per-process cache."""
    try:
        _preload_all(model)
    finally:
        if done is not None:
            done.set()


def _preload_all(model: str) -> None:
    try:
        # the engine, Parsl and what a site's kernel imports when it starts (~0.25 s: a first
        # preview right after the model is loaded waited for it before its block could start)
        import_engine()
        from napari_emparsl.core.models.loaders import load_model

        load_model(model)
    except Exception:  # a model that does not load is reported when it is used
        log.debug("preloading %s failed", model, exc_info=True)
    try:
        # napari's first layer of a kind imports pandas and its drawing modules, and vispy's
        # first line fills a cache (~1.5 s in all): done here, the output layer a run adds
        # later costs the Qt thread only its own set-up
        import importlib

        from napari.layers import Image, Labels
        from napari.utils import progress  # noqa: F401  (the activity dock's bar)

        Labels(np.zeros((1, 1, 1), np.uint8))
        Image(np.zeros((1, 1, 1), np.float32))
        for name in ("layers.labels", "overlays.labels_polygon", "overlays.labels_brush_stroke",
                     "overlays.brush_circle"):  # fmt: skip
            importlib.import_module(f"napari._vispy.{name}")
        # vispy's first line (the labels layer's polygon tool) fills a cache of dash patterns
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
    except Exception:
        log.debug("preloading napari's layers failed", exc_info=True)


def _trial(model: str, options: dict[str, Any], preloaded: threading.Event) -> str | None:
    """Load ``model`` with ``options`` and try it on a small input of zeros (as a run does
    before its first block): the sentence saying how its output does not fit its description,
    or None. After the preload (torch imported: importing it here too would only wait for it)."""
    preloaded.wait(120)
    from napari_emparsl.core.models.loaders import load_model
    from napari_emparsl.execution.runner import _try_on_zeros

    try:
        loaded = load_model(model, options)
        _try_on_zeros(loaded.module, loaded.spec)
    except UserError as err:
        return str(err)
    return None


def _triple(text: str, name: str, minimum: int) -> tuple[int, int, int] | None:
    """'64,128,128' (or '64') -> (64, 128, 128); empty -> None (the model's default)."""
    text = text.strip()
    if not text:
        return None
    try:
        values = size_values(text)
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) < minimum:
        raise UserError(
            f"The {name} must be three whole numbers Z,Y,X of at least {minimum} (e.g. 64,64,64), "
            f"not {text!r}."
        )
    return values[0], values[1], values[2]


def _package_name(model: str) -> str | None:
    """The name a bioimage.io package gives itself (its folder or file name where it gives
    none), or None when ``model`` is not a package."""
    from napari_emparsl.core.models.bioimageio import find_package
    from napari_emparsl.core.models.loaders import resolve_model

    try:
        package = find_package(resolve_model(model))
        if package is None:
            return None
        name = package.description().get("name")
    except UserError:
        return None
    return str(name or os.path.basename(package.path.rstrip("/\\")))


def _triple_or_none(text: str) -> tuple[int, int, int] | None:
    try:
        return _triple(text, "block", 0)
    except UserError:
        return None


def _output_ledger(output: str) -> dict[str, Any]:
    """What the run panel shows of an output's ledger (in a background thread): its failed
    blocks with their errors and write ROIs, the input geometry to outline them in, blocks
    done of the whole plan, and the block, halo and model of its last run. Only
    ``{"output": …}`` when it has no ledger."""
    from napari_emparsl.core.ledger import Ledger, lock_holder, run_scale, whole_plan_blocks
    from napari_emparsl.core.volume import parse_spec
    from napari_emparsl.execution.runner import parse_roi

    root, key = parse_spec(output)
    ledger = Ledger(user_path(root), key)
    if not ledger.exists():
        return {"output": output}
    holder = lock_holder(user_path(root), key)  # another run (or an import) writing it now
    summary = ledger.summary()
    last = summary.last_run
    out = Volume.open(user_path(root), key)
    scale = run_scale(last)
    # the input's grid, from the output's (see Run._create_output): voxel × scale, and the
    # origin of its voxel centres
    in_vs = [v * s for v, s in zip(out.voxel_size[-3:], scale, strict=True)]
    in_off = [
        o - (w - v) / 2 for o, v, w in zip(out.offset[-3:], in_vs, out.voxel_size[-3:], strict=True)
    ]
    rois = {}
    for bid, rec in summary.failed.items():
        try:
            rois[bid] = parse_roi(str(rec["roi"]))
        except (KeyError, UserError):
            pass  # an old or damaged record: listed, not outlined
    return {
        "output": output,
        "failed": {bid: str(rec.get("error", "")) for bid, rec in sorted(summary.failed.items())},
        "rois": rois,
        "geo": (tuple(in_vs), tuple(in_off), out.unit),
        "done": len(summary.done),
        "total": whole_plan_blocks(out.shape, last),
        "block": last.get("block"),
        "halo": last.get("halo"),
        "model": last.get("model"),
        "model_file": last.get("model_file"),
        "model_sha256": last.get("model_sha256"),
        "holder": holder,
    }


def _same_model(chosen: str, model: Any, model_file: Any, sha256: Any = None) -> bool:
    """Whether the model chosen is the one an output's last run recorded, as a run decides:
    the same name or path as typed, the same file (a path given relative to another folder),
    or the same weights elsewhere (a package installed anew)."""
    if chosen == model:
        return True
    from napari_emparsl.core.models.loaders import BUILTIN_MODELS, file_hash, resolve_model

    if chosen in BUILTIN_MODELS or not model_file:
        return False
    try:
        path = resolve_model(chosen)
        if os.path.realpath(path) == os.path.realpath(str(model_file)):
            return True
        return bool(sha256) and os.path.exists(path) and file_hash(path) == sha256
    except (UserError, OSError):
        return False


_WRITERS = {"import": "an import", "napari save": "a save from napari"}


#: failed blocks listed (the rest counted in one row) and outlined (those nearest the view's
#: middle): a model failing on thousands of blocks rebuilt thousands of rows and boxes, seconds
#: of a frozen napari twice a second
_MOST_LISTED = 200
_MOST_BOXES = 400
#: blocks a preview may compute (in napari's process): a huge volume's whole slice on screen
#: was 6,656 blocks of 128³, computed without a word
_MOST_PREVIEW_BLOCKS = 64


def _held_here(holder: dict[str, Any]) -> bool:
    """Whether an output's lock holder (as its lock file says) is this process."""
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def panel_words(message: str) -> str:
    """An engine sentence in the panel's words: it speaks to the command line (--overwrite,
    --block, --model-option), the panel has its fields."""
    # the engine speaks to the command line; here the options are the panel's fields
    message = message.replace("pass --overwrite", "tick “replace output”")
    message = message.replace("--overwrite", "“replace output”")
    message = re.sub(
        r"\(e\.g\. --model-option [^)]*, after the model and output paths\)",
        "(e.g. halo=8,8,8; normalize=zscore)",
        message,
    )
    message = message.replace("set --model-option ", "set the model option ")
    message = message.replace("(e.g. --model-option ", "(e.g. model option ")
    message = message.replace("or with --model-option", "or in the model options")
    message = message.replace("e.g. --block ", "e.g. block ").replace("e.g. --halo ", "e.g. halo ")
    return message


def _floor(values: np.ndarray) -> np.ndarray:
    """Voxel indices below world positions mapped to voxels, forgiving float error (napari keeps
    shapes in float32): a corner drawn on voxel 32 of 0.008 µm voxels maps to 31.99999…,
    which took voxel 31 and the blocks before it into the region."""
    v = np.asarray(values, dtype=float)
    return np.floor(v + 1e-3 + np.abs(v) * 1e-6).astype(int)  # float32: ~1e-7 of the value


def _ceil(values: np.ndarray) -> np.ndarray:
    """As :func:`_floor`, upwards (64.00001 is voxel 64, not 65)."""
    v = np.asarray(values, dtype=float)
    return np.ceil(v - 1e-3 - np.abs(v) * 1e-6).astype(int)


class RunWidget(Container):
    """Volume → model → site → preview / run, with streaming results and failed blocks."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer_itself(viewer)  # napari injects it by this annotation
        napari_fixes.apply()  # a napari crash on removing a layer (see the module)
        self._worker = None
        self._run = None
        self._looked_inside = True  # the model file looked into (see _describe_model)
        self._dirty = False
        self._output_layer = None
        self._live = None  # the output layer's LiveN5Array (its finest level)
        # every level's LiveN5Array with its downsampling factor (z, y, x)
        self._levels: list[tuple[Any, tuple[int, ...]]] = []
        self._range: tuple[float, float] | None = None  # value range of an image output so far
        self._failed_layer = None
        self._failed: dict[int, str] = {}  # block id -> error, of the output shown
        self._filled: dict[str, tuple[str, str]] = {}  # field -> (filled from a ledger, before)
        self._failed_rois: dict[int, Roi] = {}  # block id -> its write ROI (input voxels)
        # input voxel size, origin (z, y, x) and unit the failed blocks' boxes are drawn in
        self._failed_geo: tuple[Any, Any, str] | None = None
        self._failed_pending = False  # failures not listed yet (see _handle)
        self._failed_shown = 0.0  # when they were last listed
        self._planned = 0
        self._last_refresh = 0.0
        self._stale = False  # finished blocks off screen, not yet shown
        self._activity = None  # napari.utils.progress shown in the activity dock
        self._activity_target = 0  # blocks done, for the activity dock's next update
        self._activity_pending = False
        self._activity_last = 0.0
        self.activity_counts: list[tuple[int, int]] = []  # (done, total) of each finished run
        self.activity_texts: list[str] = []  # and the activity dock's last line of each
        # time of each block finished since the model, block, halo, input or output last
        # changed (read + compute + write), for the estimate of a full run
        self.block_seconds: list[float] = []
        self.block_threads: list[int] = []  # torch threads each of those blocks had
        self._voxels = 0  # written by the run going on, for the activity dock's rate
        self._started = 0.0
        self._blocks_left: int | None = None  # of the whole plan, after the last preview

        self.input = ComboBox(
            label="volume", choices=self._input_choices, tooltip="an image layer opened from N5"
        )
        self.model = ComboBox(
            label="model",
            choices=list(BUILTIN_MODELS),
            tooltip="a built-in model (or type a model file path below)",
        )
        self.model_file = LineEdit(
            tooltip="optional: a TorchScript / state-dict model file, or a bioimage.io package "
            "(.zip, or its rdf.yaml); overrides the choice above",
        )
        self.model_file_btn = PushButton(text="…", tooltip="choose a model file")
        self.model_file_btn.native.setMaximumWidth(32)
        self.check_model_btn = PushButton(
            text="Check",
            enabled=False,
            tooltip="a bioimage.io package: run its test input here, block by block, and "
            "compare with the test output its authors published",
        )
        model_file_row = Container(
            widgets=[self.model_file, self.model_file_btn, self.check_model_btn],
            layout="horizontal",
            labels=False,
            label="model file",
        )
        model_file_row.margins = (0, 0, 0, 0)
        self.model_options = LineEdit(
            label="model options",
            tooltip="key=value; … what the model's description (its .yaml) lacks or should "
            "differ, e.g. halo=16,16,16; normalize=zscore (as --model-option on the command "
            "line)",
        )
        self.model_info = Label(label="model says", value="")
        self.site = site_chooser(
            ComboBox(label="site", choices=self._site_choices, tooltip="where blocks are computed")
        )
        self.test_site_btn = PushButton(
            text="Test site", tooltip="start the site and run one no-op task"
        )
        self.output = LineEdit(label="output", tooltip="OUT.n5:DATASET (suggested from the input)")
        self._suggested = ""  # the output this panel suggested (a typed one is kept)
        self._warned: set[str] = set()  # the runs' warnings shown so far
        self.block = LineEdit(
            label="block",
            tooltip="Z,Y,X voxels each block writes, a multiple of the output chunks "
            "(empty: the model's default)",
        )
        self.halo = LineEdit(
            label="halo",
            tooltip="Z,Y,X voxels of context read around each block (empty: the model's default)",
        )
        self.replace = CheckBox(
            text="replace output",
            value=False,
            tooltip="start the output again: what an earlier run with another model, input, "
            "block or halo wrote there is deleted (the input never is); unticks itself once "
            "the run has started",
        )
        self.preview_on_site = CheckBox(
            text="preview on the chosen site",
            value=False,
            tooltip="off: previews run in this process (threads: no site to start, the first "
            "block sooner); on: on the site chosen above, as the full run will",
        )
        self.region_btn = PushButton(
            text="Draw region",
            tooltip="add (or pick) the Shapes layer 'region' in rectangle mode: drag a rectangle "
            "on the slice, and Preview region computes the blocks under it",
        )
        self.preview_btn = PushButton(
            text="Preview region",
            tooltip="compute only the blocks under the rectangle of the 'region' Shapes layer, "
            "or else those of what is on screen (2D: the visible part of the slice; 3D: the "
            "visible box)",
        )
        self.run_btn = PushButton(
            text="Run / resume",
            tooltip="compute every block not done yet; results stream in as blocks finish",
        )
        self.cancel_btn = PushButton(
            text="Cancel",
            enabled=False,
            tooltip="stop submitting blocks; finished blocks stay done",
        )
        self.progress = ProgressBar(
            label="blocks",
            value=0,
            max=1,
            tooltip="Blocks of the output done (before this run too) out of all the blocks "
            "it plans; failed blocks are listed below.",
        )
        self.estimate = Label(label="estimate", value="")
        self.status = Label(label="status", value="")
        self.retry_btn = PushButton(
            text="Retry failed",
            enabled=False,
            tooltip="compute the failed blocks again (e.g. after fixing the model)",
        )
        self.failed_list = Select(
            label="failed blocks", choices=[], tooltip="blocks that failed, with their errors"
        )
        self.extend([
            self.input, self.model, model_file_row, self.model_options, self.model_info,
            self.site, self.test_site_btn,
            self.output, self.block, self.halo, self.replace,
            self.preview_on_site, self.region_btn, self.preview_btn, self.run_btn, self.cancel_btn, self.progress, self.estimate, self.status,
            self.failed_list,
            self.retry_btn,
        ])  # fmt: skip

        for label in (self.model_info, self.estimate, self.status):
            wrapping(label)
        self.failed_list.native.setMaximumHeight(140)
        self._ledger_answer: dict[str, Any] | None = None  # the output's, read last
        self._region: weakref.ref | None = None  # the Shapes layer Draw region made
        self.model.changed.connect(self._show_resumable)
        self.model_file.changed.connect(self._show_resumable)
        self.input.changed.connect(self._suggest_output)
        self.input.changed.connect(self._describe_model)
        self.model.changed.connect(self._describe_model)
        self.model_file.changed.connect(self._describe_model)
        self.model_file_btn.changed.connect(self._choose_model_file)
        self.check_model_btn.changed.connect(self.check_model)
        self.model_options.changed.connect(self._describe_model)
        self.test_site_btn.changed.connect(self.test_site)
        self.region_btn.changed.connect(self.draw_region)
        self.preview_btn.changed.connect(self.preview)
        self.run_btn.changed.connect(self.start_full_run)
        self.cancel_btn.changed.connect(self.cancel)
        self.retry_btn.changed.connect(self.retry_failed)
        self.site.changed.connect(self._show_estimate)
        # the estimate was measured with one model, block and halo: another makes it void
        for w in (self.input, self.model, self.model_file, self.model_options, self.block,
                  self.halo, self.output):  # fmt: skip
            w.changed.connect(self._forget_estimate)
        # an output with a ledger: its failed blocks, and an offer to resume it (read off the
        # Qt thread, once typing has paused)
        self._ledger_relay = Relay(self.native)
        self._ledger_relay.answer.connect(guarded(self, self._ledger_read))
        self._runs_started = 0
        self._ledger_timer = QTimer(self.native)  # goes with the panel
        self._ledger_timer.setSingleShot(True)
        self._ledger_timer.setInterval(300)
        self._ledger_timer.timeout.connect(self.read_output_ledger)
        self.output.changed.connect(self._output_changed)
        # the viewer's events this panel follows; let go when the panel is closed
        self._hooks = [
            (self._viewer.layers.events.inserted, self._layers_changed),
            (self._viewer.layers.events.removed, self._layers_changed),
            (self._viewer.dims.events.current_step, self._on_dims),
            (self._viewer.dims.events.ndisplay, self._on_dims),
            (self._viewer.dims.events.order, self._on_dims),
        ]
        for emitter, callback in self._hooks:
            emitter.connect(callback)
        self._guard, self._guarded = None, []
        self._viewer_closing = False  # set as napari tears the viewer down (see the guard)
        self._install_close_guard()
        on_removed(self, self._removed)
        self._timer = QTimer(self.native)  # goes with the panel
        self._timer.setInterval(200)
        self._timer.timeout.connect(guarded(self, self._refresh_output))
        self._timer.start()
        self._suggest_output()
        # a model file is tried on zeros in the background once described (see _trial)
        self._trial_relay = Relay(self.native)
        self._trial_relay.answer.connect(guarded(self, self._model_tried))
        self._trials = 0  # the description a trial's answer is of (later ones replace it)
        self.trials_answered = 0  # the last description whose trial answered
        # a trial once the options have not changed for a moment (each keystroke of
        # "halo=16,16,16" that parses is a description: a model load each, before)
        self._trial_timer = QTimer(self.native)
        self._trial_timer.setSingleShot(True)
        self._trial_timer.timeout.connect(guarded(self, self._start_trial))
        self._trial_args: tuple[int, str, dict[str, Any]] | None = None
        self._preloaded = threading.Event()
        self._describe_model()
        # import torch and load the chosen model in the background now, not on the first preview.
        # A plain thread, no Qt object: a viewer closed (or a test ended) before it finished
        # deleted a Qt worker's signals under it, and Qt aborted the process. Python waits for
        # it (≤ 3 s) when it exits.
        self._site_relay = Relay(self.native)  # a site test's answer, handed to the Qt thread
        self._site_relay.answer.connect(guarded(self, self._site_tested))
        self._check_relay = Relay(self.native)  # a model check's answer
        self._check_relay.answer.connect(guarded(self, self._model_checked))
        self._testing_site = ""
        self._collected = False
        napari_fixes.load_units()  # before the preload makes layers in its thread
        threading.Thread(
            target=_preload, args=(self._model(), self._preloaded), name="emparsl-preload"
        ).start()
        self._timer.timeout.connect(guarded(self, self._after_preload))

    def _layers_changed(self, event: Any = None) -> None:
        self.input.reset_choices()
        layer = getattr(event, "value", None)
        if (
            getattr(event, "type", None) == "inserted"
            and self._run is not None
            and self._output_layer is not None
            and self._output_layer not in self._viewer.layers
            and _source_of(layer) is not None
            and "channels" not in layer.metadata.get("emparsl", {})
        ):
            # the run's layer was removed and the output opened again (File > Open) while the
            # run goes on: that layer shows it live (napari's cache of it would keep what it
            # read first, blank blocks, after the run ended)
            QTimer.singleShot(0, guarded(self, lambda: self._take_over(layer)))

    def _take_over(self, layer: Any) -> None:
        from napari_emparsl.core.volume import parse_spec

        if self._run is None or layer is self._output_layer or layer not in self._viewer.layers:
            return  # (the run's own new layer, added as it began)
        try:
            out = Volume.open(*parse_spec(self.output.value))
        except UserError:
            return
        if _source_of(layer) != (out.root, out.key):
            return
        for live, _ in self._levels:
            live.follow(False)
            live.keep_whole(False)
        self._ensure_output_layer()
        self._dirty = True
        self._refresh_output()

    def _removed(self) -> None:
        """Closed (the dock's ×; napari keeps the panel alive, connected): lets go of the
        viewer, and stops a run going on — nothing could cancel it or show it any more; a panel
        opened again is a new one, and Run / resume there continues it. Also as napari
        tears the viewer down (its close guard): then once only."""
        hooks, self._hooks = self._hooks, []
        for emitter, callback in hooks:
            emitter.disconnect(callback)
        if self._guard is not None:
            for ref in self._guarded:
                if (w := ref()) is not None and alive(w):
                    w.removeEventFilter(self._guard)
        self._timer.stop()
        self._ledger_timer.stop()
        if self._run is not None and not self._viewer_closing:
            from napari.utils.notifications import show_info

            output = self.output.value
            self.cancel()
            show_info(
                f"The run panel was closed, so the run into {output} stops; finished blocks "
                "stay done: open the panel again and click Run / resume to continue it."
            )

    def _after_preload(self) -> None:
        """Once, after the preload: its imports add ~300,000 objects, and Python's next full
        collection (~150 ms) then comes on the Qt thread (objects it frees may be Qt's). Done
        now, while the panel has just opened — not when a run adds its output layer."""
        if not self._preloaded.is_set():
            return
        if not self._collected:
            self._collected = True
            gc.collect()
        if not self._looked_inside:  # described before torch was there to look inside: once
            self._looked_inside = True
            self._describe_model()

    # ------------------------------------------------------------------------------------------
    # choices

    def _input_choices(self, *_: Any) -> list[tuple[str, Any]]:
        layers = getattr(self, "_viewer", None)
        if layers is None:
            return []
        choices, seen = [], set()
        for layer in self._viewer.layers:
            src = _source_of(layer)
            if not src or layer._type_string != "image" or src in seen:
                continue
            seen.add(src)  # a multichannel volume is one layer per channel, and one input
            channels = layer.metadata["emparsl"].get("channels")
            label = f"{layer.name} (all {channels} channels)" if channels else layer.name
            choices.append((label, layer))
        return choices

    def _no_volume(self) -> str:
        """Why there is no volume to choose, and what to do."""
        others = [
            layer.name
            for layer in self._viewer.layers
            if layer._type_string == "image" and not _source_of(layer)
        ]
        if others:  # opened from a TIFF, made in the console, …: runs read their blocks from N5
            return (
                f"The image layer '{others[0]}' is not read from an N5 container, and runs read "
                "their blocks from N5: save it as N5 (File > Save Selected Layers…, a name ending "
                "in .n5, or `emparsl import` for a TIFF stack) and open that."
            )
        return "Open an N5 volume first (File > Open), then choose it as the volume."

    @staticmethod
    def _site_choices(*_: Any) -> list[str]:
        from napari_emparsl.execution.sites import list_sites

        return list(list_sites())

    def _suggest_output(self, *_: Any) -> None:
        """Suggest the output for the chosen volume (again when the volume changes, unless the
        output was typed): beside it, or in ~/emparsl-predictions where it is read-only."""
        from napari_emparsl.core.volume import suggest_output

        if self._run is not None:  # its output stays (the input layer removed meanwhile made
            return  # another volume the choice, and the run's output layer was looked for there)
        layer = self.input.value
        src = _source_of(layer) if layer is not None else None
        typed = self.output.value.strip()
        if src is None or (typed and typed != self._suggested):
            return
        self._suggested = suggest_output(*src)
        self.output.value = self._suggested

    def _options(self) -> dict[str, Any]:
        """The model options field: ``key=value; key=value`` (UserError when malformed)."""
        from napari_emparsl.core.models.spec import parse_options

        items = [i.strip() for i in self.model_options.value.split(";") if i.strip()]
        return parse_options(items)

    def _describe_model(self, *_: Any) -> None:
        """Show what the model declares, ask for what it lacks, warn when it does not fit."""
        from napari_emparsl.core.models.loaders import (
            describe_model,
            misnamed_description,
            missing_description,
        )
        from napari_emparsl.core.models.spec import resolution_mismatch

        self.check_model_btn.enabled = False
        self._trials += 1  # a trial of what was described before says nothing of this
        if self.status.value.startswith("model check"):  # it spoke of the model before
            self.status.value = ""
        try:
            options = self._options()
            spec = describe_model(self._model(), options)
            # what needs torch to tell (a state dict or a pickled module) waits for the
            # preload's import of it: importing it here would freeze napari for ~1.5 s
            preloaded = getattr(self, "_preloaded", None)
            look = preloaded is not None and preloaded.is_set()
            self._looked_inside = look
            missing = missing_description(self._model(), options, look_inside=look)
        except UserError as err:
            self._looked_inside = True  # nothing to look into again: what is wrong is said
            self.model_info.value = f"⚠ {panel_words(str(err))}"
            for field in (self.block, self.halo):  # no model: no defaults (it kept the last's)
                field.native.setPlaceholderText("")
            return
        package = _package_name(self._model())
        self.check_model_btn.enabled = self._run is None and package is not None
        self.block.native.setPlaceholderText(",".join(map(str, spec.block)) + " (model default)")
        self.halo.native.setPlaceholderText(",".join(map(str, spec.halo)) + " (model default)")
        what = (
            f"{spec.kind}: {', '.join(spec.classes)}"
            if spec.classes
            else f"{spec.kind}, {spec.out_channels} channel(s)"
        )
        if package is not None:
            what = f"bioimage.io “{package}”: {what}"
        text = (
            f"{what}; {spec.in_channels} input channel(s); {spec.spatial_dims}D; halo {list(spec.halo)}"
            + (f"; scale {list(spec.scale)}" if any(s != 1 for s in spec.scale) else "")
            + (f"; {spec.activation}" if spec.activation != "none" else "")
            + (f" > {spec.threshold:g}" if spec.kind == "labels" and spec.n_outputs == 1 else "")
            + (
                f"; written as uint8 ({spec.out_range[0]:g}..{spec.out_range[1]:g} → 0..255)"
                if spec.kind == "image" and spec.out_dtype == "uint8"
                else ""
            )
        )
        layer = self.input.value
        src = _source_of(layer) if layer is not None else None
        try:
            vol = Volume.open(*src) if src else None
        except UserError as err:  # e.g. moved or deleted since it was opened
            vol, text = None, f"{text} — ⚠ {err}"
        if vol is not None:
            channels = vol.shape[vol.axes.index("c")] if "c" in vol.axes else 1
            if channels != spec.in_channels:
                text += f" — ⚠ the volume has {channels} channel(s)"
            spatial = sum(a != "c" for a in vol.axes)
            if spatial != 3:  # 2D models too run on 3D volumes, slice by slice
                text += f" — ⚠ the volume has {spatial} spatial axes; runs need a 3D volume"
            note = resolution_mismatch(spec, vol.voxel_size, vol.unit)
            if note:
                text += f" — ⚠ {note}: expect poorer results"
        if missing:
            text += f" — ⚠ not described: set {', '.join(missing)} in model options"
            aside = misnamed_description(self._model())
            if aside:
                text += (
                    f" ({aside} beside it is not read: a model's description is named "
                    f"{os.path.basename(self._model())}.yaml)"
                )
        self.model_info.value = text
        if (self._model() in BUILTIN_MODELS and not options) or missing or not look:
            # shipped as described; asked for what its description lacks first; described
            # again after the preload (torch, to look inside it), tried then
            return
        # a model whose output does not fit its description is said here, before Preview or
        # Run (which refuse it in the same sentence): loaded in the background, as a run would
        self._trial_args = (self._trials, self._model(), options)
        self._trial_timer.start(400)

    def _start_trial(self) -> None:
        if self._trial_args is None or self._trial_args[0] != self._trials:
            return  # described again since (its own trial is on its way)
        trial, model, options = self._trial_args
        preloaded = self._preloaded
        in_background(
            self._trial_relay,
            lambda: (trial, _trial(model, options, preloaded)),
            name="emparsl-model-trial",
            daemon=True,
        )

    def _model_tried(self, answer: Any) -> None:
        if isinstance(answer, BaseException):  # the trial itself failed: a run will say it
            log.debug("trying the model failed: %s", answer)
            return
        trial, problem = answer
        self.trials_answered = max(self.trials_answered, trial)
        said = f" — ⚠ {panel_words(problem)}" if problem else ""
        if trial == self._trials and said and said not in self.model_info.value:
            self.model_info.value += said

    def check_model(self, *_: Any) -> None:
        """Run the bioimage.io package in the model file on its test input (in a thread)."""
        from napari_emparsl.execution.check import check_model

        model, options = self._model(), self._options()
        self.check_model_btn.enabled = False
        self.status.value = "checking the model on its test input…"
        in_background(
            self._check_relay, lambda: check_model(model, options), name="emparsl-model-check"
        )

    def _model_checked(self, result: Any) -> None:
        from napari.utils.notifications import show_info, show_warning

        self._describe_model()  # enables the button again
        if isinstance(result, BaseException):
            self._error(error_sentence(result, "Checking the model"))
            return
        package = _package_name(self._model())
        self.status.value = (
            f"model check{f' of “{package}”' if package else ''}: {result.sentence()}"
        )
        (show_info if result.ok else show_warning)(self.status.value)

    def test_site(self, *_: Any) -> None:
        from napari_emparsl.execution.sites import check_site, load_site

        name = self._testing_site = self.site.value
        self.test_site_btn.enabled = False  # one test at a time
        self.status.value = f"testing site {name}…"
        in_background(
            self._site_relay,
            lambda: (import_engine(), check_site(load_site(name)))[1],
            name="emparsl-site-test",
        )

    def _site_tested(self, result: Any) -> None:
        name = self._testing_site
        self._testing_site = ""
        self.test_site_btn.enabled = self._run is None
        if isinstance(result, BaseException):
            message = error_sentence(result, f"Testing site {name}")
        else:
            message = f"site {name}: first result after {result:.1f} s"
        if self._run is not None or self._worker is not None:
            # a run began meanwhile: its status line stays its own; the answer is a notice
            from napari.utils.notifications import show_info, show_warning

            (show_warning if isinstance(result, BaseException) else show_info)(message)
        elif isinstance(result, BaseException):
            self._error(message)
        else:
            self.status.value = message

    # ------------------------------------------------------------------------------------------
    # actions

    def _choose_model_file(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        typed = user_path(self.model_file.value)
        path, _ = QFileDialog.getOpenFileName(
            self.native,
            "Choose a model file",
            os.path.dirname(typed) if typed else "",
            "PyTorch and bioimage.io models (*.pt *.pth *.ts *.torchscript *.zip rdf.yaml "
            "*bioimageio.yaml);;All files (*)",
        )
        if path:
            self.model_file.value = path

    def _model(self) -> str:
        return self.model_file.value.strip() or self.model.value

    def _region_layer(self) -> Any:
        """The Shapes layer Draw region made (napari names it 'region [1]' where another layer
        is named 'region'), else the Shapes layer named 'region', or None."""
        made = self._region() if self._region is not None else None
        if made is not None and made in self._viewer.layers:
            return made
        return next(
            (
                lyr
                for lyr in self._viewer.layers
                if lyr._type_string == "shapes" and lyr.name == "region"
            ),
            None,
        )

    def draw_region(self, *_: Any) -> Any:
        """Add the 'region' Shapes layer on the volume's grid (or pick the one there), select it
        and put it in rectangle mode: the user drags a rectangle on the slice shown."""
        layer = self.input.value
        if layer is None:
            self._error(self._no_volume())
            return None
        try:
            self._check_view(layer, drawing=True)
        except UserError as err:
            self._error(str(err))
            return None
        if self._viewer.dims.ndisplay == 3:  # napari draws no rectangle in 3D: the slice view
            self._viewer.dims.ndisplay = 2
        region = self._region_layer()
        if region is None:
            n = 3  # the volume's z, y, x (a multichannel volume's layers are one channel each)
            region = self._viewer.add_shapes(
                name="region",
                ndim=n,
                scale=tuple(layer.scale[-n:]),
                translate=tuple(layer.translate[-n:]),
                units=tuple(layer.units[-n:]),  # the volume's: no "inconsistent units" warning
                axis_labels=tuple(layer.axis_labels[-n:]),
            )
            self._region = weakref.ref(region)
        # what new rectangles look like (a layer's own style is not what it draws with)
        region.current_edge_color = "yellow"
        region.current_face_color = "transparent"
        region.current_edge_width = 2  # voxels of the volume
        self._viewer.layers.selection.active = region
        region.mode = "add_rectangle"
        self.status.value = (
            "Drag a rectangle on the slice shown, then Preview region (the last rectangle counts)."
        )
        return region

    def preview_region(self) -> Roi:
        """The region a preview computes (input voxels).

        The last rectangle of the 'region' Shapes layer on the current slice; without one, what is
        on screen: in 2D the visible part of the current slice, in 3D the visible box — the
        visible footprint around the camera's focus, as deep as it is wide. The plan then adds
        the blocks' context (halo) itself.
        """
        layer = self.input.value
        self._check_view(layer)
        vol = Volume.open(*_source_of(layer))
        shape = vol.shape[-3:]
        dims = self._viewer.dims
        z = round(layer.world_to_data(dims.point)[-3])
        z = min(max(z, 0), shape[0] - 1)
        z0, z1 = z, z + 1
        y0, x0, y1, x1 = 0, 0, shape[1], shape[2]
        region = self._region_layer()
        shapes = [  # in the input's voxels; the last one drawn on this slice counts
            pts
            for pts in (
                np.array([layer.world_to_data(region.data_to_world(p)) for p in shape])
                for shape in (region.data if region is not None else [])
            )
            if np.all(np.round(pts[:, -3]) == z)
        ]
        if shapes:
            pts = shapes[-1]
            y0, x0 = _floor(pts[:, -2:].min(axis=0))
            y1, x1 = _ceil(pts[:, -2:].max(axis=0))
            if y1 <= 0 or x1 <= 0 or y0 >= shape[1] or x0 >= shape[2]:
                raise UserError(
                    "The last shape of the 'region' layer lies outside the volume; draw it over "
                    "the image (or delete the layer to preview what is on screen)."
                )
        else:
            visible = self._visible_box(layer, shape)
            if visible is not None:
                (z0, y0, x0), (z1, y1, x1) = visible
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(shape[1], max(y1, y0 + 1)), min(shape[2], max(x1, x0 + 1))
        return Roi.from_bounds((z0, y0, x0), (z1, y1, x1))

    def _check_view(self, layer: Any, drawing: bool = False) -> None:
        """UserError unless the region can be read off the view: a 3D volume (a 2D one crashed
        with an IndexError), shown as z slices with y down and x across (transposed, a preview
        computed another region than the one on screen)."""
        if layer is None:
            raise TypeError("no input layer")
        ndim = self._viewer.dims.ndim
        if layer.ndim < 3:
            raise UserError(
                f"The layer {layer.name!r} is 2D; previews and runs need a 3D volume (a 2D image "
                "is a volume of one slice: save it as a TIFF and `emparsl import` it)."
            )
        shown = tuple(self._viewer.dims.displayed)
        want = tuple(range(ndim - 3, ndim))[-len(shown) :] if not drawing else None
        if (want is not None and shown != want) or (
            drawing and tuple(shown[-2:]) != (ndim - 2, ndim - 1)
        ):
            raise UserError(
                "Regions are read off the z-slice view (y down, x across), and the view is "
                "transposed or rolled now; restore napari's axis order (z as the slider, y down, "
                "x across), then try again."
            )

    def _visible_box(self, layer: Any, shape: tuple[int, ...]) -> tuple | None:
        """What the canvas shows of ``layer`` (voxels), or None when the canvas has no size;
        UserError when it shows nothing of it.

        From the camera: its centre ± half the canvas size / zoom, in world units, in y and x
        (in 3D: the footprint at the focal point of a view along z; the box is as deep as it
        is wide around the focal point).
        """
        viewer = self._viewer
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        height, width = (float(v) for v in viewer.canvas.size)
        zoom = float(camera.zoom)
        if height < 2 or width < 2 or zoom <= 0:
            return None
        center = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
        cam = np.asarray(camera.center, dtype=float)
        world = np.asarray(viewer.dims.point, dtype=float)
        world[-2:] = cam[-2:]
        if viewer.dims.ndisplay == 3:
            world[-3] = cam[-3]
        lo, hi = world.copy(), world.copy()
        lo[-2:] -= (height / zoom / 2, width / zoom / 2)
        hi[-2:] += (height / zoom / 2, width / zoom / 2)
        a, b = np.asarray(layer.world_to_data(lo)), np.asarray(layer.world_to_data(hi))
        y0, x0 = _floor(np.minimum(a, b)[-2:])
        y1, x1 = _ceil(np.maximum(a, b)[-2:])
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(shape[1], y1), min(shape[2], x1)
        if y1 <= y0 or x1 <= x0:
            raise UserError(
                "Nothing of the volume is on screen; pan to the part to preview, or draw a "
                "rectangle in a Shapes layer named 'region'."
            )
        if viewer.dims.ndisplay != 3:
            z = min(max(round(center[-3]), 0), shape[0] - 1)
            return (z, y0, x0), (z + 1, y1, x1)
        cz = min(max(round(float(layer.world_to_data(world)[-3])), 0), shape[0] - 1)
        half = max(y1 - y0, x1 - x0) // 2
        return (max(0, cz - half), y0, x0), (min(shape[0], cz + half + 1), y1, x1)

    def preview(self, *_: Any) -> None:
        try:
            roi = self.preview_region()
            many = self._preview_blocks(roi)
        except (UserError, TypeError) as err:
            self._error(str(err) if isinstance(err, UserError) else self._no_volume())
            return
        if many > _MOST_PREVIEW_BLOCKS:  # a whole slice of a huge volume at the default zoom
            self._error(
                f"The region on screen touches {many:,} blocks, too many for a preview (it "
                f"computes in napari's own process, at most {_MOST_PREVIEW_BLOCKS}): zoom in, or "
                "draw a smaller region (Draw region); Run computes the whole volume."
            )
            return
        self._start(roi=roi, site=self.site.value if self.preview_on_site.value else "threads")

    def _preview_blocks(self, roi: Roi) -> int:
        """How many blocks of the run's plan the preview region touches (the block typed, or
        the model's default; one slice deep for a 2D model)."""
        from napari_emparsl.core.models.loaders import describe_model

        block = _triple(self.block.value, "block", 1)
        if block is None:
            block = describe_model(self._model(), self._options()).block
        begin, end = roi.begin[-3:], roi.end[-3:]
        return math.prod(
            (e - 1) // b - s // b + 1 for s, e, b in zip(begin, end, block, strict=True)
        )

    def retry_failed(self, *_: Any) -> None:
        """Compute the failed blocks again — only those, not the blocks still pending."""
        if self._failed:
            self._start(roi=None, site=self.site.value, only=set(self._failed))

    def start_full_run(self, *_: Any) -> None:
        self._blocks_left = None  # the estimate was for this run
        self._show_estimate()
        self._start(roi=None, site=self.site.value)

    def cancel(self, *_: Any) -> None:
        if self._run is not None:
            self._run.cancel()
            self.status.value = "cancelling…"

    def _start(self, roi: Roi | None, site: str, only: set[int] | None = None) -> None:
        from napari.qt.threading import thread_worker

        from napari_emparsl.execution.runner import Run

        layer = self.input.value
        if layer is None:
            self._error(self._no_volume())
            return
        src = _source_of(layer)
        try:
            block = _triple(self.block.value, "block", 1)
            halo = _triple(self.halo.value, "halo", 0)
            options = self._options()
            run = Run(
                f"{src[0]}:{src[1]}", self._model(), self.output.value, site=site, roi=roi,
                block=block, halo=halo, model_options=options, overwrite=self.replace.value,
                block_ids=only,
            )  # fmt: skip
        except UserError as err:  # e.g. an output name that leaves its container
            self._error(str(err))
            return
        self._ledger_timer.stop()  # the run's events say what the ledger would
        self._ledger_answer = None
        self._runs_started += 1
        self._run = run
        from napari_emparsl._napari.runs_widget import remember_output

        remember_output(self.output.value)

        # errors go to the handler below (one sentence), not to napari's traceback notification
        @thread_worker(ignore_errors=True)
        def drain(run: Run):  # an argument, not a closure: napari keeps the function, not the run
            try:
                for event in run.events():
                    if isinstance(event, BlockDone) and run.blocks:
                        self._block_written(run.blocks[event.result.block_id].out_write_roi)
                    yield event
            except RuntimeError as err:  # superqt would drop it, and the run never end here
                raise WorkerRuntimeError(str(err)) from err

        self._voxels, self._started = 0, time.perf_counter()
        worker = drain(run)
        # a viewer closed meanwhile (its run cancelled): events and errors are dropped, and the
        # end lets go of the run without touching the panel's deleted widgets
        worker.yielded.connect(guarded(self, self._on_event))
        worker.errored.connect(guarded(self, self._run_errored))
        worker.finished.connect(self._on_finished)
        self._set_running(True)
        # until the plan is made (the checks, the model, the volume's statistics; on a first
        # preview also torch's import): say so rather than show the last run's status
        self.status.value = "preparing: checking the input and the model…"
        self._worker = worker
        worker.start()

    def _block_written(self, roi: Roi) -> None:
        """In the run's thread, not the Qt thread: the live levels re-read the block's part."""
        for live, fac in self._levels:
            begin = [b // f for b, f in zip(roi.begin, fac, strict=True)]
            size = [(e - b) // f for b, e, f in zip(roi.begin, roi.end, fac, strict=True)]
            try:
                live.block_written(begin, [b + n for b, n in zip(begin, size, strict=True)])
            except Exception as err:  # only the display's copy: the run goes on, the block is
                # done (e.g. a network filesystem that shows a chunk whole a while later)
                log.warning("could not show block %s yet (%s); read again when drawn", roi, err)
                live.forget()

    # ------------------------------------------------------------------------------------------
    # events (Qt thread)

    def _on_event(self, event: Any) -> None:
        self._handle(event)
        if isinstance(event, BlockDone):
            self._activity_target = event.done  # also before the bar is there (applied then)
        if isinstance(event, BlockDone) and self._activity is not None:
            # napari's activity dock redraws for ~20 ms: in its own turn of the event loop, so
            # that the layer refresh and it do not add up to one long stall
            # (at most twice a second; the last count is applied when the run ends)
            if not self._activity_pending:
                self._activity_pending = True
                wait = 0.5 - (time.perf_counter() - self._activity_last)
                QTimer.singleShot(max(0, int(wait * 1000)), guarded(self, self._update_activity))

    def _open_activity(self, total: int, run: Any) -> None:
        from napari.utils import progress

        if self._run is None or self._run is not run or self._activity is not None:
            return  # the run ended already (another may have begun since)
        # created last: napari's progress runs queued events (the run may end in them)
        activity = progress(total=total, desc=self._activity_text())
        if self._run is run:
            activity.update(self.progress.value - activity.n)
        if self._run is not run or self._activity is not None:
            activity.close()  # the run ended while napari set its bar up: no bar left open
            return
        self._activity = activity

    def _activity_text(self) -> str:
        """The activity dock's line: the output, and the voxels per second written so far
        (napari's bar adds blocks done / total and the ETA)."""
        text = f"emparsl: {self.output.value}"
        seconds = time.perf_counter() - self._started
        if self._voxels and seconds > 0:
            text += f" — {self._voxels / seconds / 1e6:.2f} Mvoxel/s"
        return text

    def _update_activity(self) -> None:
        # napari's progress may process queued Qt events (the next run events) while it draws,
        # so it is set to the latest count rather than incremented
        self._activity_pending = False
        self._activity_last = time.perf_counter()
        activity = self._activity
        if activity is not None and self._activity_target > activity.n:
            activity.update(self._activity_target - activity.n)
            if self._activity is activity:  # the run did not end while napari drew
                activity.set_description(self._activity_text())

    def _handle(self, event: Any) -> None:
        if isinstance(event, Planned):
            replaced, self.replace.value = self.replace.value, False  # the next one continues
            if self._run is None or self._run.roi is None or replaced:
                self._set_failed({}, {}, None)  # this run's failures come as it goes
            # (a preview computes a region only: the output's other failed blocks stay listed,
            # and those it computes leave the list as they are done)
            self._planned = event.total
            self._set_progress(event.total - event.todo, maximum=max(1, event.total))
            self.status.value = f"{event.todo} of {event.total} blocks to compute"
            self._ensure_output_layer(fresh=replaced)
            from napari_emparsl._napari.runs_widget import run_going

            run_going(self.output.value)  # the runs panel follows it
            # napari's activity dock shows the run too: its bar in a turn of the event loop of
            # its own, so that napari's two set-ups (layer, bar) do not add up to one stall
            # (the count starts at what was done before: a count of the run before would
            # otherwise be applied to this one's bar)
            self._activity_target = event.total - event.todo
            run = self._run
            QTimer.singleShot(
                40, guarded(self, lambda total=event.total: self._open_activity(total, run))
            )
            for warning in event.warnings:  # once per session: previews repeat them
                if warning not in self._warned:
                    self._warned.add(warning)
                    shown = panel_words(warning)
                    QTimer.singleShot(80, lambda w=shown: _show_warning(w))
        elif isinstance(event, BlockDone):
            if self._failed.pop(event.result.block_id, None) is not None:  # failed before
                self._failed_rois.pop(event.result.block_id, None)
                if not self._failed_pending:
                    self._failed_pending = True
                    QTimer.singleShot(500, guarded(self, self._show_failed_now))
            self._widen_contrast(event.result.out_min, event.result.out_max)
            self._set_progress(event.done)
            self.status.value = f"{event.done}/{event.total} blocks done"
            r = event.result
            self.block_seconds.append(r.t_read + r.t_compute + r.t_write)
            # (on a GPU the CPU threads do not make a block's time)
            self.block_threads.append(0 if r.device.startswith("cuda") else r.threads)
            self._voxels += event.voxels
            if not self._on_screen(event.result.block_id):
                self._stale = True  # refreshed when the view moves there: no redraw now
                return
            self._dirty = True
            if time.perf_counter() - self._last_refresh > 0.2:
                self._refresh_output()  # show the first blocks at once; later ones are throttled
        elif isinstance(event, BlockFailed) and event.final:
            run = self._run
            blk = run.blocks.get(event.block_id) if run is not None else None
            if blk is not None and run._src is not None:
                self._failed_rois[event.block_id] = blk.write_roi
                src = run._src  # the run's own plan and input: no re-planning on this thread
                self._failed_geo = (src.voxel_size[-3:], src.offset[-3:], src.unit)
            self._failed[event.block_id] = event.error
            # listed and outlined at most twice a second: a model failing every block of a big
            # volume would otherwise rebuild the list and the boxes thousands of times
            if not self._failed_pending:
                self._failed_pending = True
                wait = 0.5 - (time.perf_counter() - self._failed_shown)
                QTimer.singleShot(max(0, int(wait * 1000)), guarded(self, self._show_failed_now))
        elif isinstance(event, Finished):
            self.status.value = (
                f"retried {event.total} failed block{'' if event.total == 1 else 's'}: "
                f"{event.done} done, {event.failed} failed"
                if self._run is not None and self._run.block_ids is not None
                else f"finished: {event.done}/{event.total} done, {event.failed} failed"
            )
            if self._run is not None and self._run.roi is not None:
                self._estimate_full_run()
            for warning in event.warnings:  # what the blocks showed (a uint8 output clipped)
                if warning not in self._warned:  # once per session: previews repeat it
                    self._warned.add(warning)
                    _show_warning(panel_words(warning))
            self._dirty = True
            self._stale = False
        elif isinstance(event, Cancelled) and not event.total:
            self.status.value = "cancelled before it began: nothing was changed"
        elif isinstance(event, Cancelled):
            self.status.value = f"cancelled at {event.done}/{event.total}; Run / resume continues"
            self._dirty = True

    def _set_progress(self, value: int, maximum: int | None = None) -> None:
        """Qt repaints a progress bar at once when its value changes (~7 ms in napari's window,
        often a whole-window composite): with updates off it is only marked for the next paint."""
        bar = self.progress.native
        bar.setUpdatesEnabled(False)
        try:
            if maximum is not None:
                self.progress.max = maximum
            self.progress.value = value
        finally:
            bar.setUpdatesEnabled(True)

    def _widen_contrast(self, lo: float, hi: float) -> None:
        """Image outputs: contrast limits follow the range of the blocks computed so far."""
        layer = self._output_layer
        if layer is None or layer._type_string != "image" or not np.isfinite([lo, hi]).all():
            return
        if self._range is None:
            self._range = (lo, hi)
        else:
            self._range = (min(self._range[0], lo), max(self._range[1], hi))
        a, b = self._range
        layer.contrast_limits = (a, b if b > a else a + 1)

    def _forget_estimate(self, *_: Any) -> None:
        """Another model, block, halo, input or output: the blocks timed so far say nothing
        about it (before, one estimate averaged every preview of the session)."""
        if self._run is None:
            self.block_seconds.clear()
            self.block_threads.clear()
            self._blocks_left = None
            self.estimate.value = ""

    def _estimate_full_run(self) -> None:
        """After a preview: measured block time × blocks left ÷ workers of the chosen site."""
        left = self._run.blocks_left() if self._run is not None else None
        if not self.block_seconds or left is None:
            return
        self._blocks_left = left
        self._show_estimate()

    def _show_estimate(self, *_: Any) -> None:
        """The estimate for the site chosen now (also when it changes after the preview)."""
        from napari_emparsl.execution.sites import load_site

        if self._blocks_left is None or not self.block_seconds:
            self.estimate.value = ""
            return
        try:
            profile = load_site(self.site.value)
            workers, threads = profile.worker_count, profile.worker_threads
        except UserError:
            self.estimate.value = ""
            return
        # a preview of fewer blocks than workers gave each block more threads than a full
        # run's worker has: its time is scaled to the site's threads, as threads speed a
        # block up (2 threads: 1.8–1.95× here; ^0.9 gives 1.87×, 16 threads 12×)
        timed = zip(self.block_seconds, self.block_threads, strict=False)
        per_block = float(np.mean([s * ((t or threads) / threads) ** 0.9 for s, t in timed]))
        left = self._blocks_left
        secs = per_block * left / workers
        took = f"~{secs / 60:.1f} min" if secs >= 60 else f"~{max(1, round(secs))} s"
        self.estimate.value = (
            f"full run on {self.site.value}: {took} for {left} blocks "
            f"({per_block:.2f} s per block, {workers} workers)"
            if left
            else "every block is done"
        )

    def _on_screen(self, block_id: int) -> bool:
        """Whether a finished block shows in the current 2D slice (always in 3D views)."""
        blocks = getattr(self._run, "blocks", None)
        if self._viewer.dims.ndisplay == 3 or not blocks or self._output_layer is None:
            return True
        # z is the third axis from the end: a multichannel image output's first is its channel
        z = self._output_layer.world_to_data(self._viewer.dims.point)[-3]
        roi = blocks[block_id].out_write_roi
        return roi.begin[0] <= z < roi.end[0]

    def _install_close_guard(self) -> None:
        """Closing the viewer's window during a run asks, then cancels and waits for a clean
        shutdown. ``viewer.close()`` (napari's console, a script, a test's end) tears the viewer
        down before its window closes, whatever is answered: then the run is stopped without
        asking, before the teardown, and nothing later reaches the panel."""
        from qtpy.QtCore import QEvent, QObject
        from qtpy.QtWidgets import QMainWindow

        window = getattr(getattr(self._viewer, "window", None), "_qt_window", None)
        if window is None:
            return
        qt_viewer = getattr(self._viewer.window, "_qt_viewer", None)
        widget = self

        class _Guard(QObject):
            def eventFilter(self, obj, event):
                if event.type() != QEvent.Type.Close:
                    return False
                if not isinstance(obj, QMainWindow):  # the QtViewer: Window.close() tears
                    # it down first, and goes on whatever is answered
                    if widget._run is not None:
                        widget.stop_for_close()
                    widget._viewer_closing = True
                    widget._removed()  # lets go of the viewer's events, stops the timers
                    return False
                if widget._run is not None and not widget.confirm_close():
                    event.ignore()
                    return True
                return False

        self._guard = _Guard()
        # weakly: the panel may outlive its viewer, which must not be kept for it
        self._guarded = [weakref.ref(w) for w in (window, qt_viewer) if w is not None]
        for w in (window, qt_viewer):
            if w is not None:
                w.installEventFilter(self._guard)

    def confirm_close(self) -> bool:
        """Ask whether to stop the run; if yes, cancel it and wait until its workers are gone."""
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native,
            "Stop the run?",
            "A run is going on. Stop it and close? Finished blocks stay done; "
            "Run / resume continues it later.",
        )
        if answer != QMessageBox.StandardButton.Yes:
            return False
        self.stop_for_close()
        return True

    def stop_for_close(self) -> None:
        """Cancel the run and wait (the Qt loop turning) until its workers are gone."""
        from qtpy.QtCore import QEventLoop, QTimer

        self.cancel()
        self.status.value = "stopping the run before the viewer closes…"
        for _ in range(600):  # up to 60 s for the executor to shut down
            if self._run is None:
                break
            loop = QEventLoop()
            QTimer.singleShot(100, loop.quit)
            loop.exec()
        else:  # its site's guard ends the workers once the coordinator (napari) is gone
            log.warning("the run had not stopped 60 s after it was cancelled; closing anyway")

    def _on_dims(self, *_: Any) -> None:
        self._update_watch()
        if self._failed_rois:
            self._show_failed_boxes(create=False)  # the boxes of the slice now shown
        if self._stale:
            self._stale = False
            self._dirty = True

    def _on_finished(self) -> None:
        shown = panel_alive(self)
        if self._activity is not None:
            if shown:
                self._update_activity()  # a count still waiting for its turn
                self.activity_counts.append((self._activity.n, self._activity.total))
                self.activity_texts.append(self._activity.desc)
            try:
                self._activity.close()
            except RuntimeError as err:  # the activity dock went with its viewer
                log.debug("closing the run's progress bar: %s", err)
            self._activity = None
        self._run = None
        if not shown:  # the viewer closed: let go of the run, its layer and live arrays
            self._worker = None
            for live, _ in self._levels:
                live.follow(False)
                live.keep_whole(False)
            return
        self._show_failed_now()  # failures still waiting for their turn
        self._set_running(False)
        self._worker = None  # its generator holds the run, and the run the volumes' file handles
        # napari kept every ended worker in its window's task list (after this slot: napari's
        # own marks the task completed first)
        QTimer.singleShot(0, guarded(self, lambda: napari_fixes.forget_ended_tasks(self._viewer)))
        self._update_watch()  # no run: every read goes to disk again
        self._refresh_output()
        from napari_emparsl._napari.runs_widget import run_going

        run_going(self.output.value)  # the runs panels say how it ended now, not in 2 s

    def _set_running(self, running: bool) -> None:
        self.preview_btn.enabled = not running
        self.run_btn.enabled = not running
        self.cancel_btn.enabled = running
        self.retry_btn.enabled = not running and bool(self._failed)
        self.check_model_btn.enabled = not running and _package_name(self._model()) is not None
        for w in (
            self.input,
            self.model,
            self.model_file,
            self.model_file_btn,
            self.model_options,
            self.site,
            self.output,
            self.block,
            self.halo,
            self.replace,
            self.preview_on_site,
        ):
            w.enabled = not running
        self.test_site_btn.enabled = not running and not self._testing_site

    def _run_errored(self, err: BaseException) -> None:
        from napari_emparsl.core.ledger import OutputBusy

        message = error_sentence(err, "The run")
        if isinstance(err, OutputBusy):
            if _held_here(err.holder) and err.holder.get("what", "run") == "run":
                message = (  # the process named was this napari's own: say so
                    f"The output {self.output.value} is being written by another run in this "
                    "napari (a run panel closed while it ran finishes its blocks under way "
                    "first); the panel says when Run / resume can continue it."
                )
            self._ledger_timer.start(2000)  # look again until it is free: then say so
        self._error(message)

    def _error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        message = panel_words(message)
        log.warning(message)
        self.status.value = message
        show_error(message)

    def _ensure_output_layer(self, fresh: bool = False) -> None:
        """The output's layer, live over its N5 (added, or made live); ``fresh``: the output
        was written anew (replaced), nothing kept of what the layer showed is valid."""
        from napari_emparsl._napari.live import LiveN5Array
        from napari_emparsl.core.volume import parse_spec

        out = Volume.open(*parse_spec(self.output.value))
        name = out.key.replace("/", "_")
        # the output's own layer (not one of the same name over another container's output; a
        # multichannel output opened as one layer per channel is not it either)
        layer = next(
            (
                lyr
                for lyr in self._viewer.layers
                if _source_of(lyr) == (out.root, out.key)
                and "channels" not in lyr.metadata["emparsl"]
            ),
            None,
        )
        # a big output has coarser levels (written by the blocks too): napari shows those when
        # zoomed out and in 3D, instead of reading the whole finest level on the Qt thread
        levels = [LiveN5Array(out.root, key) for key in out.levels]
        factors = [fac[-3:] for fac in out.level_factors()]
        live = levels[0]
        data = levels if len(levels) > 1 else live
        kind = "labels" if out.is_labels else "image"
        colors_shown = None  # the class colours a layer added here is drawn in
        if (
            layer is not None
            and (
                bool(layer.multiscale) != (len(levels) > 1)  # e.g. opened before as one level
                or (layer.multiscale and len(layer.data) != len(levels))
                or layer._type_string != kind  # replaced by another kind of model's output
                or (layer.data[0] if layer.multiscale else layer.data).shape != live.shape
                or tuple(layer.scale[-3:]) != tuple(out.voxel_size)
            )
        ):
            self._viewer.layers.remove(layer)  # made anew
            layer = None
        if layer is None:
            # the output opened before as one layer per channel (File > Open): the live layer
            # takes their place, not a second copy beside them
            for lyr in [
                lyr
                for lyr in self._viewer.layers
                if _source_of(lyr) == (out.root, out.key) and "channels" in lyr.metadata["emparsl"]
            ]:
                self._viewer.layers.remove(lyr)
            add = self._viewer.add_labels if out.is_labels else self._viewer.add_image
            # as napari spells it; none where it is no length napari knows (voxel: a traceback)
            unit = napari_unit(out.unit)
            units = (unit,) * len(out.voxel_size) if unit else None
            kwargs = {
                "name": name, "scale": out.voxel_size, "translate": out.offset,
                "units": units, "opacity": 0.6,
            }  # fmt: skip
            if not out.is_labels:
                if live.ndim == 4:  # one channel axis first: napari shows it as a slider
                    kwargs["scale"] = (1.0, *out.voxel_size)
                    kwargs["translate"] = (0.0, *out.offset[-3:])
                    kwargs["units"] = ("pixel", *units) if units else None  # channels: none
                # widened as blocks finish
                kwargs["contrast_limits"] = (0.0, 255.0 if out.dtype == np.uint8 else 1.0)
            if out.is_labels and out.class_names:  # the status bar names the class
                kwargs["features"] = {"class": out.class_names}
            colormap = class_colormap(out) if out.is_labels else None
            if colormap:  # the colours its model declares
                kwargs["colormap"] = colormap
                colors_shown = out.class_colors
            if len(out.axes) == live.ndim:  # the sliders say z (and c), not -3
                kwargs["axis_labels"] = tuple(out.axes)
            layer = add(data, multiscale=len(levels) > 1, **kwargs)
            self._range = None
            layer.metadata["emparsl"] = {"path": out.root, "key": out.key}
        elif (
            fresh
            or not isinstance(layer.data[0] if layer.multiscale else layer.data, LiveN5Array)
            or [(a.shape, a.dtype) for a in (layer.data if layer.multiscale else [layer.data])]
            != [(a.shape, a.dtype) for a in levels]
        ):  # opened from the file before, or its output written anew: live arrays of it now
            layer.data = data
            if out.is_labels and out.class_names:
                layer.features = {"class": out.class_names}
        else:
            levels = list(layer.data) if layer.multiscale else [layer.data]
            live = levels[0]
        # the colours its model declares now: also of a layer already shown (a resume with
        # other colours: the output takes them; the layer kept the earlier ones)
        shown = layer.metadata.get("emparsl_class_colors")  # (beside the source, not in it)
        if out.is_labels and out.class_colors and shown != out.class_colors:
            if colors_shown != out.class_colors:  # (not just added with them)
                layer.colormap = class_colormap(out)
            layer.metadata["emparsl_class_colors"] = out.class_colors
        self._output_layer = layer
        self._live = live
        self._levels = list(zip(levels, factors, strict=True))
        self._update_watch()

    def _update_watch(self) -> None:
        """While a run goes on in a 2D view, each level's live array keeps the plane napari
        reads from it fresh (off the Qt thread); in a 3D view, the coarsest level (the one
        napari draws in 3D; at most 2 Mi voxels where there are several) is kept whole, fresh
        likewise; otherwise nothing is kept."""
        dims = self._viewer.dims
        on = self._run is not None and dims.ndisplay == 2
        if on:
            displayed = tuple(dims.displayed[-2:])
            n = len(dims.point)
            on = displayed == (n - 2, n - 1)  # a z-plane of y, x: the planes blocks are read in
        whole = self._run is not None and dims.ndisplay == 3
        for i, (live, _) in enumerate(self._levels):
            live.follow(on)
            coarsest = i == len(self._levels) - 1
            live.keep_whole(whole and coarsest and live.size <= _KEEP_WHOLE_VOXELS)

    def _refresh_output(self) -> None:
        """Swap in a fresh lazy view of the output N5 (new dask name: no stale cache)."""
        if not self._dirty or self._output_layer is None:
            return
        self._dirty = False
        self._last_refresh = time.perf_counter()
        self._output_layer.refresh()  # the plane on screen is read already (LiveN5Array)

    def _show_failed_now(self) -> None:
        if self._failed_pending:
            self._set_failed(self._failed, self._failed_rois, self._failed_geo)

    def _set_failed(
        self, failed: dict[int, str], rois: dict[int, Roi], geo: tuple[Any, Any, str] | None
    ) -> None:
        """The failed blocks of the output shown: listed with their errors, outlined, and
        Retry failed offered."""
        self._failed_pending, self._failed_shown = False, time.perf_counter()
        self._failed, self._failed_rois, self._failed_geo = dict(failed), dict(rois), geo
        listed = [  # (the engine's advice in the panel's words: “replace output”, not --overwrite)
            f"block {k}: {panel_words(v)}" for k, v in sorted(self._failed.items())[:_MOST_LISTED]
        ]
        if len(self._failed) > _MOST_LISTED:  # thousands of rows stalled napari for seconds
            listed.append(
                f"… and {len(self._failed) - _MOST_LISTED} more failed blocks (`emparsl status "
                f"{self.output.value}` groups them by error)"
            )
        set_choices(self.failed_list, listed)
        self.retry_btn.enabled = self._run is None and bool(self._failed)
        self._show_failed_boxes()

    def _show_failed_boxes(self, create: bool = True) -> None:
        """Outline the failed blocks in a Shapes layer: in a 2D view, a box for each failed
        block the slice on screen passes through (set again as the slice changes: a box on
        every slice of a block, at the cost of a few rectangles); in 3D, one at each block's
        middle slice. ``create``: add the layer where it is not in the viewer (a layer the user
        removed comes back with the next failure, not as the slice changes)."""
        layer = self._failed_layer
        if not create and (layer is None or layer not in self._viewer.layers):
            return
        if not self._failed_rois or self._failed_geo is None:
            if layer is not None and layer in self._viewer.layers and len(layer.data):
                layer.data = []
            return
        voxel, origin, unit = self._failed_geo
        voxel, origin = np.asarray(voxel, float), np.asarray(origin, float)
        dims = self._viewer.dims
        plane = None
        if dims.ndisplay == 2 and len(dims.point) >= 3:
            plane = int(np.floor((dims.point[-3] - origin[0]) / voxel[0] + 0.5))
        boxes = []
        for block_id in sorted(self._failed_rois):
            roi = self._failed_rois[block_id]
            (z0, y0, x0), (z1, y1, x1) = roi.begin, roi.end
            if plane is None:
                z = (z0 + z1 - 1) / 2
            elif z0 <= plane < z1:
                z = plane
            else:
                continue
            corners = np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], float)
            boxes.append(corners * voxel + origin)
        if len(boxes) > _MOST_BOXES:  # napari draws thousands of shapes in seconds: the ones
            # nearest the middle of the view
            scene = getattr(self._viewer, "scene", self._viewer)  # napari 0.9: viewer.scene
            centre = np.asarray(scene.camera.center[-2:], float)
            boxes.sort(key=lambda b: float(np.sum((b[:, 1:].mean(axis=0) - centre) ** 2)))
            boxes = boxes[:_MOST_BOXES]
        # the boxes' look is given with the boxes: shapes a layer gets after it is made take its
        # defaults for new shapes (polygons 1 unit wide: 1 nm, a line too thin to see — the
        # boxes had never shown), not what the layer was made with
        style = {
            "edge_color": "red",
            "face_color": "transparent",
            "edge_width": 2 * float(voxel[-1]),
        }
        if layer is None or layer not in self._viewer.layers:
            # the input's units: a layer without them makes napari warn "Inconsistent units
            # across layers" and drop units (the scale bar's nm) from the whole view
            unit = napari_unit(unit)
            units = (unit,) * 3 if unit else None
            layer = self._failed_layer = self._viewer.add_shapes(
                name="failed blocks", ndim=3, **style, **({"units": units} if units else {})
            )
        if boxes or len(layer.data):
            layer.data = []
            if boxes:
                layer.add_rectangles(boxes, **style)

    # ------------------------------------------------------------------------------------------
    # an output's ledger: its failed blocks, and an offer to resume it

    def _output_changed(self, *_: Any) -> None:
        """Another output named: what was said of the last one goes at once (its failed blocks
        could otherwise be retried on this one), and this one's ledger is read once typing
        has paused."""
        if self._run is not None:
            return
        if self._failed:
            self._set_failed({}, {}, None)
        self.status.value = ""  # it spoke of the last output ("finished: …", "this output …")
        # block and halo filled in from the last output's ledger (to resume it) go back to
        # what they were, unless changed since: a new output takes the model's defaults
        for field, (filled, before) in self._filled.items():
            if getattr(self, field).value == filled:
                getattr(self, field).value = before
        self._filled = {}
        self._ledger_answer = None
        self._ledger_timer.start(300)

    def read_output_ledger(self, *_: Any) -> None:
        """Read the ledger of the output named now, off the Qt thread (see :meth:`_ledger_read`)."""
        output = self.output.value.strip()
        if self._run is not None or not output:
            return
        runs = self._runs_started  # a run started meanwhile makes this answer stale

        def read() -> tuple[int, Any]:
            try:
                return runs, _output_ledger(output)
            except Exception as err:  # no such output yet, or one half typed
                return runs, err

        in_background(self._ledger_relay, read, "emparsl-run-ledger", daemon=True)

    def _ledger_read(self, result: Any) -> None:
        runs, answer = result
        if isinstance(answer, BaseException):
            log.debug("reading the output's ledger failed: %s", answer)
            answer = None
        if self._run is not None or runs != self._runs_started:
            return  # a run says it itself (or said it: what was read may be stale)
        if answer and answer["output"] != self.output.value.strip():
            return  # the output changed again meanwhile
        if not answer or "done" not in answer:  # a new output: nothing failed there
            if self._failed:
                self._set_failed({}, {}, None)
            self._set_progress(0, maximum=1)  # not the last output's count
            return
        self._set_failed(answer["failed"], answer["rois"], answer["geo"])
        done, total, failed = answer["done"], answer["total"], len(answer["failed"])
        self._set_progress(done, maximum=max(1, total))  # this output's, not the last one's
        holder = answer.get("holder")
        if holder is not None:  # Run / resume would be refused: say so, and look again soon
            writer = _WRITERS.get(holder.get("what", "run"), "another run")
            here = _held_here(holder)
            self.status.value = (
                f"this output is being written by {writer} in this napari now (a run panel "
                f"closed while it ran finishes its blocks under way first), {done}/{total} "
                "blocks done: the panel says when Run / resume can continue it"
                if here
                else f"this output is being written by {writer} now (process "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}), {done}/{total} blocks "
                "done: wait for it to end, or choose another output"
            )
            self._ledger_answer = None
            self._ledger_timer.start(2000)
            return
        if done >= total and not failed:
            self.status.value = f"this output is complete: {done}/{total} blocks done"
            return
        # resuming needs the block and halo it was made with: fill them in
        for field, value in (("block", answer["block"]), ("halo", answer["halo"])):
            if isinstance(value, list) and _triple_or_none(getattr(self, field).value) != tuple(
                value
            ):
                before = getattr(self, field).value
                getattr(self, field).value = ",".join(map(str, value))
                self._filled[field] = (getattr(self, field).value, before)
        self._ledger_answer = answer
        self._show_resumable()

    def _show_resumable(self, *_: Any) -> None:
        """The status of an output that can be resumed (read from its ledger last), again when
        the model changes: whether the model chosen is the one it was made with."""
        answer = self._ledger_answer
        if self._run is not None or not answer or answer["output"] != self.output.value.strip():
            return
        done, total, failed = answer["done"], answer["total"], len(answer["failed"])
        model = answer["model"]
        other = (
            f" (made with model {model}: choose it to resume)"
            if not _same_model(
                self._model(), model, answer.get("model_file"), answer.get("model_sha256")
            )
            else ""
        )
        self.status.value = (
            f"this output has a run at {done}/{total} blocks done, {failed} failed{other}: "
            "Run / resume continues it"
            + ("; Retry failed computes only the failed blocks" if failed else "")
        )
