"""Dock widget: choose an N5 container, browse its datasets, open them lazily.

Recent containers are remembered in ``~/.config/napari-emparsl/recent.json``. Outputs written
by ``emparsl run`` (they carry a ledger) say how far their run got, so it can be resumed from the
run panel. A layer already open from N5 (dropped on the viewer, File > Open, another panel) can be
chosen to show its container and dataset here; opening a dataset that is open already selects its
layer instead of adding it twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

from napari_emparsl._napari import napari_fixes
from napari_emparsl._napari.background import Relay, error_sentence, guarded, in_background
from napari_emparsl._napari.dataset_tree import DatasetTree
from napari_emparsl._napari.widgets import (
    by_x,
    full_width,
    layer_of,
    n5_source,
    say_error,
    viewer_itself,
    wrapping,
)
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.ledger import Ledger, lock_holder, whole_plan_blocks
from napari_emparsl.core.n5attrs import find_container_root
from napari_emparsl.core.paths import user_path
from napari_emparsl.core.volume import UNFINISHED, Volume, container_tree, openable_in_tree

if TYPE_CHECKING:
    import napari.viewer

log = logging.getLogger(__name__)

__all__ = ["VolumeWidget", "recent_paths"]

_MAX_RECENT = 10


def _recent_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "napari-emparsl" / "recent.json"


def recent_paths() -> list[str]:
    try:
        data = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, list):  # a file edited by hand, or another program's
        return []
    return [p for p in data if isinstance(p, str)][:_MAX_RECENT]


def _remember(path: str) -> None:
    # one entry per container however reached (a symlink and its target were two)
    same = os.path.realpath(path)
    paths = [path] + [p for p in recent_paths() if os.path.realpath(p) != same]
    try:
        _recent_file().parent.mkdir(parents=True, exist_ok=True)
        _recent_file().write_text(json.dumps(paths[:_MAX_RECENT]))
    except OSError:  # a read-only home must not break the panel
        log.info("could not remember recent paths")


class VolumeWidget(Container):
    """Path → tree of datasets (shape, dtype, chunks, voxel size, levels) → Open."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer_itself(viewer)  # napari injects it by this annotation
        napari_fixes.apply()  # a napari crash on removing a layer (see the module)
        self.path = LineEdit(label="N5 container", tooltip="a .n5 folder (type or paste a path)")
        self.recent = ComboBox(
            label="recent", choices=_recent_choices, tooltip="containers opened before"
        )
        self.browse_btn = PushButton(text="Choose folder…", tooltip="pick a .n5 folder")
        self.layer = ComboBox(
            label="open layer",
            choices=self._n5_layers,
            tooltip="a layer already open from an N5 volume: show its container and dataset here",
        )
        self.datasets = DatasetTree(
            label="datasets",
            tooltip="the container's groups, datasets and pyramids (a pyramid's rows: its levels)",
        )
        self.open_btn = PushButton(
            text="Open selected", tooltip="add the selected datasets as lazy layers"
        )
        self.info = Label(label="info", value="")
        self.extend(
            [
                self.path,
                self.recent,
                self.browse_btn,
                self.layer,
                self.datasets,
                self.open_btn,
                self.info,
            ]
        )
        wrapping(self.info)
        full_width(self.datasets)  # the tree's columns need the dock's width
        # typed: listed as it is typed, but what is wrong with a half-typed path is said in
        # the info line only — as a notification once typing is done (Return, or leaving the
        # field); chosen (folder dialog, recent list): said at once
        self.path.changed.connect(lambda *_: self.refresh(notify=not self.path.native.hasFocus()))
        self.path.native.editingFinished.connect(self._typed)
        self._path_error = ""
        self.recent.changed.connect(self._recent_chosen)
        self.browse_btn.changed.connect(self._browse)
        self.layer.changed.connect(self._show_layer)
        self.open_btn.changed.connect(self.open_selected)
        self.datasets.changed.connect(self._describe)
        self.datasets.native.itemDoubleClicked.connect(self._double_clicked)
        # a run output's ledger (10⁵ blocks: ~1 s) is read off the Qt thread
        self._ledger_relay = Relay(self.native)
        self._ledger_relay.answer.connect(guarded(self, self._ledger_read))
        self._described: tuple[str, str] | None = None

    def _recent_chosen(self, path: str) -> None:
        """A recent container chosen: listed; the list goes back to blank, so that choosing
        the same one again later (after browsing elsewhere) is a change too."""
        if path:
            self.path.value = path
            self.recent.value = ""

    def _browse(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Choose an N5 container")
        if folder:
            self.path.value = folder

    def _n5_layers(self, *_: Any) -> list[str]:
        """The viewer's layers opened from N5 (napari resets the list as layers come and go)."""
        return ["", *(layer.name for layer in self._viewer.layers if n5_source(layer))]

    def _show_layer(self, name: str) -> None:
        """Show the chosen layer's container and select its dataset."""
        layer = next((lay for lay in self._viewer.layers if lay.name == name), None)
        src = n5_source(layer) if layer is not None else None
        if src is None:
            return
        self.layer.value = ""  # so that choosing the same layer again later is a change too
        if user_path(self.path.value) != src[0]:
            self.path.value = src[0]  # lists the container's datasets
        if src[1] in self.datasets.choices:
            self.datasets.value = [src[1]]  # says what it is (and how far its run got)
        else:  # removed or renamed since it was opened
            self._error(f"{src[0]} has no dataset {src[1]!r} now; the layer shows what it held.")

    def refresh(self, *_: Any, notify: bool = True) -> None:
        """List what the container holds (JSON only: nothing is read); ``notify``: what is
        wrong is also a napari notification (else the info line only)."""
        path = user_path(self.path.value)
        self.datasets.set_nodes([], [])
        self._path_error = ""
        if not path:
            self.info.value = ""  # what was said of the last path
            return
        try:
            listing = container_tree(path)  # one walk of the folders (on each keystroke)
            tree = {n["key"]: n for n in listing}
            keys = openable_in_tree(listing)
        except UserError as err:
            self._path_error = str(err)
            if notify:
                self._error(str(err))
            else:
                self.info.value = str(err)
            return
        self.datasets.set_nodes(list(tree.values()), keys)
        self.info.value = f"{len(keys)} dataset(s)"
        if not keys:  # a chunk folder, a folder of one level's chunks, an empty group
            self.info.value += " here; choose the container (.n5) or a group in it"
        if notify:  # chosen, not half typed: remembered (typed: once typing is done)
            self._remember_shown()

    def _remember_shown(self) -> None:
        """Remember the container shown (its root: not each folder typed on the way)."""
        _remember(os.path.abspath(self._container()))
        self.recent.choices = ()  # emptied first: magicgui appends new items after those kept
        self.recent.choices = _recent_choices  # most recent first

    def _typed(self) -> None:
        """Typing is done: what is wrong with the path typed is a notification now, once;
        a container listed is remembered."""
        if self._path_error:
            self._error(self._path_error)
            self._path_error = ""
        elif user_path(self.path.value) and self.datasets.choices:
            self._remember_shown()

    def _describe(self, *_: Any) -> None:
        keys = self.datasets.value or []
        self._described = None  # a ledger still being read for the last one is not shown
        if len(keys) > 1:
            self.info.value = f"{len(keys)} datasets selected: Open selected adds each as a layer."
        if len(keys) != 1:
            return
        try:
            vol = Volume.open(self._container(), keys[0])
        except UserError as err:
            self._error(str(err))
            return
        vs = by_x(f"{v:g}" for v in vol.voxel_size)
        text = (
            f"{by_x(vol.shape)} {vol.dtype.name}, chunks {by_x(vol.chunks)}, voxel {vs} {vol.unit}, "
            f"{len(vol.levels)} level(s)"
        )
        if vol.attrs.get(UNFINISHED):
            text += f"; unfinished ({vol.attrs[UNFINISHED]}): parts of it are missing"
        self.info.value = text
        self._described = (vol.root, vol.key)
        ledger = Ledger(vol.root, vol.key)
        if not ledger.exists():
            return
        self.info.value = text + "; run output: reading its ledger…"
        shape, where = vol.shape, (vol.root, vol.key)

        def read() -> tuple[tuple[str, str], str, str]:
            try:
                summary = ledger.summary()
                total = whole_plan_blocks(shape, summary.last_run)  # not only a region's plan
            except Exception as err:
                return where, text, "; " + error_sentence(err, "Reading its run's ledger")
            done, failed = len(summary.done), len(summary.failed)
            run = f"; run output: {done}/{total} blocks done, {failed} failed"
            if lock_holder(*where) is not None:  # no resume to offer while another writes it
                return where, text, run + " — being written now"
            if done >= total and not failed:
                return where, text, run + " — complete"
            return where, text, run + " — resume it from the run panel"

        in_background(self._ledger_relay, read, "emparsl-volume-ledger", daemon=True)

    def _ledger_read(self, answer: Any) -> None:
        """The ledger's summary, on the Qt thread; dropped when another dataset is shown now."""
        where, text, run = answer
        if where == self._described:
            self.info.value = text + run

    def _double_clicked(self, item: Any, *_: Any) -> None:
        """A double-click on a dataset or pyramid opens it (a group's folds, as in any tree)."""
        key = item.data(0, DatasetTree.KEY)
        if key in self.datasets.choices:
            self.datasets.value = [key]
            self.open_selected()

    def open_selected(self, *_: Any) -> list[Any]:
        from napari_emparsl._napari.reader import layer_data

        added = []
        for key in self.datasets.value or []:
            already = layer_of(self._viewer, self._container(), key)
            if already is not None:  # not a second copy of it: its layer is selected
                self._viewer.layers.selection.active = already
                self.info.value = f"{key or '/'} is open already, as the layer '{already.name}'."
                continue
            try:
                data, meta, kind = layer_data(Volume.open(self._container(), key))
            except UserError as err:
                self._error(str(err))
                continue
            added.append(getattr(self._viewer, f"add_{kind}")(data, **meta))
        return added

    def _container(self) -> str:
        """The container the path is or lies in: the tree's keys count from its root, also
        where the path is a group or dataset folder inside it."""
        return find_container_root(user_path(self.path.value))[0]

    def _error(self, message: str) -> None:
        say_error(self.info, message)


def _recent_choices(*_: Any) -> list[str]:
    """Blank, then the recent containers that are still there (one deleted since is left out)."""
    return ["", *(p for p in recent_paths() if os.path.isdir(p))]
