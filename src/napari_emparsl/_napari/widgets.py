"""Small Qt touches the panels share."""

from __future__ import annotations

import weakref
from typing import Any

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QLabel, QSizePolicy


class _FitHeight(QObject):
    """Keeps a word-wrapped label at least as tall as its text needs at its current width.

    Qt lays a dock's rows out by height-for-width only when the dock's own size changes: a
    label that gets longer text later, or a narrower row than it was measured for, kept the
    old height and cut its first and last lines off (seen on the run panel's model info).
    """

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if isinstance(obj, QLabel) and event.type() in (QEvent.Type.Resize, QEvent.Type.Show):
            fit(obj)
        return False


def by_x(values: Any) -> str:
    """``(64, 128, 128)`` → ``"64×128×128"``: shapes, chunks and voxel sizes as the panels say them."""
    return "×".join(map(str, values))


def fit(native: QLabel) -> None:
    """Set ``native``'s minimum height to what its text needs at its width."""
    need = native.heightForWidth(native.width()) if native.width() > 0 else -1
    if need > 0 and need != native.minimumHeight():
        native.setMinimumHeight(need)


def wrapping(label: Any) -> Any:
    """A magicgui ``Label`` for sentences: long text wraps instead of widening the dock, the
    text starts where the other rows' fields do (a ``QLabel`` is not stretched across its row:
    short text sat in the middle of it, with its row label pushed after it), and the row is as
    tall as the wrapped text (:class:`_FitHeight`)."""
    native = label.native
    native.setWordWrap(True)
    policy = native.sizePolicy()  # keeps height-for-width, which wrapped text needs
    policy.setHorizontalPolicy(QSizePolicy.Policy.Expanding)
    native.setSizePolicy(policy)
    native._fit_height = _FitHeight(native)  # owned by the label
    native.installEventFilter(native._fit_height)
    label.changed.connect(lambda *_: fit(native))
    return label


def set_choices(widget: Any, choices: Any) -> None:
    """Set a list the panel fills itself (datasets, failed blocks, runs) so that it stays.

    napari calls ``reset_choices`` on a docked widget whenever a layer is added or removed,
    and magicgui then sets plain choices back to those the widget was created with: the list
    emptied (e.g. the failed blocks as soon as their Shapes layer was added, the datasets when
    Open added their layers). Choices given as a function survive it.
    """
    items = list(choices)
    widget.choices = ()  # emptied first: magicgui appends new items after those it keeps
    widget.choices = lambda *_: items


def say_error(line: Any, message: str) -> None:
    """What went wrong, in a panel's message line and as a napari notification."""
    from napari.utils.notifications import show_error

    line.value = message
    show_error(message)


def layer_of(viewer: Any, root: str, key: str) -> Any | None:
    """The viewer's layer opened from ``root:key`` already (symlinks, ``~``, ``..`` resolved),
    or None: a panel selects it rather than adding a second copy."""
    import os

    from napari_emparsl.core.paths import user_path

    want = os.path.realpath(user_path(root)), key
    for layer in viewer.layers:
        src = n5_source(layer)
        if src and (os.path.realpath(user_path(src[0])), src[1]) == want:
            return layer
    return None


def n5_source(layer: Any) -> tuple[str, str] | None:
    """``(container, dataset)`` of a layer opened from N5 by this plugin; None for others."""
    src = (getattr(layer, "metadata", None) or {}).get("emparsl")
    return (src["path"], src["key"]) if src else None


def full_width(widget: Any) -> Any:
    """Hide the row label of ``widget`` in a labelled container, so that a wide widget (a tree
    with columns) spans the whole dock; its tooltip still says what it is."""
    row = getattr(widget.native.parentWidget(), "_magic_widget", None)
    label = getattr(row, "_label_widget", None)
    if label is not None:
        label.hide()
    return widget


def viewer_itself(viewer: Any) -> Any:
    """The viewer a panel works on. napari hands a plugin's panel (Plugins > EM Parsl > …) a
    ``PublicOnlyProxy`` of it, which wraps each layer anew at every access — a layer taken from it
    is never the same object twice, so the panel could not tell its own output layer by identity
    — and warns on private attributes (the close guard needs the Qt main window). The panels are
    this plugin's GUI and work on the viewer itself, as when they are made in a script."""
    return getattr(viewer, "__wrapped__", viewer)


class _OnRemoved(QObject):
    def __init__(self, callback: Any) -> None:
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            obj.removeEventFilter(self)
            self._callback()
        return False


def on_removed(panel: Any, callback: Any) -> None:
    """Call ``callback()`` once, when the panel is taken out of its dock — the dock's × button:
    napari then unparents the panel and drops its dock, but the panel lives on, still connected
    to the viewer (its handlers, a run), unless it lets go."""
    watcher = _OnRemoved(callback)
    panel._removed_watcher = watcher  # kept with the panel
    panel.native.installEventFilter(watcher)


#: the site choosers open now (the run panel's, the site panel's): a profile saved in one
#: panel is offered in the others at once
_SITE_CHOOSERS: weakref.WeakSet[Any] = weakref.WeakSet()


def site_chooser(combo: Any) -> Any:
    """Register a site ComboBox to be told of saved profiles (:func:`sites_changed`)."""
    _SITE_CHOOSERS.add(combo)
    return combo


def sites_changed() -> None:
    """A site profile was saved: every site chooser lists the profiles again."""
    for combo in list(_SITE_CHOOSERS):
        try:
            combo.reset_choices()
        except RuntimeError:  # its Qt widget is gone
            _SITE_CHOOSERS.discard(combo)
