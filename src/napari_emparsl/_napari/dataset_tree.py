"""A magicgui value widget showing an N5 container as a tree: groups, datasets and pyramids,
with shape, dtype, chunks, voxel size and levels in columns; a pyramid's levels are its rows.

Its value is the list of selected keys that can be opened (datasets and pyramids, not groups or
single levels); ``choices`` are all of those, in the tree's order. napari calls
``reset_choices`` on docked widgets when layers come and go: this widget has none, so the tree
stays as the panel filled it.
"""

from __future__ import annotations

from typing import Any

# magicgui's own base for its Qt value widgets (ComboBox, Select… are built on it): a tree is
# a value widget like them, with a label, tooltip, enabled state and ``changed`` signal
from magicgui.backends._qtpy.widgets import QBaseValueWidget
from magicgui.widgets.bases import ValueWidget
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem

from napari_emparsl._napari.widgets import by_x

__all__ = ["COLUMNS", "DatasetTree"]

COLUMNS = ("dataset", "shape", "dtype", "chunks", "voxel", "levels")
_KEY = Qt.ItemDataRole.UserRole


def _row(node: dict[str, Any], finest: dict[str, Any], name: str) -> list[str]:
    voxel = ""
    if finest.get("voxel_size"):
        voxel = f"{by_x(f'{v:g}' for v in finest['voxel_size'])} {finest.get('unit', '')}".strip()
    levels = node.get("levels") or []
    return [
        name,
        by_x(finest.get("shape", [])),
        finest.get("dtype") or "",
        by_x(finest.get("chunks", [])),
        voxel,
        f"{len(levels)} levels" if levels else "",
    ]


def _tooltip(key: str, node: dict[str, Any], finest: dict[str, Any], unfinished: Any) -> str:
    """The whole row in words (the dock is narrower than the columns)."""
    if "shape" not in finest:  # a group
        return key or "/"
    _, shape, dtype, chunks, voxel, _ = _row(node, finest, key)
    text = f"{key or '/'}  {shape} {dtype}, chunks {chunks}"
    if voxel:
        text += f", voxel {voxel}"
    if node.get("levels"):
        text += f", pyramid of {len(node['levels'])} levels"
    if unfinished:
        text += f"; unfinished: {unfinished}"
    return text


class _QDatasetTree(QBaseValueWidget):
    """The Qt side: a QTreeWidget whose value is the selected openable keys."""

    _qwidget: QTreeWidget

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(QTreeWidget, "", "", "", **kwargs)
        tree = self._qwidget
        tree.setColumnCount(len(COLUMNS))
        tree.setHeaderLabels(list(COLUMNS))
        tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        tree.setUniformRowHeights(True)
        tree.header().setStretchLastSection(False)
        tree.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)

    def _mgui_get_value(self) -> list[str]:
        return [
            key
            for key, item in self._qwidget._items.items()
            if item.isSelected() and key in self._qwidget._openable
        ]

    def _mgui_set_value(self, value: Any) -> None:
        keys = {value} if isinstance(value, str) else set(value or [])
        tree = self._qwidget
        tree.blockSignals(True)
        try:
            tree.clearSelection()
            for key in keys:
                if key in tree._openable:
                    item = tree._items[key]
                    item.setSelected(True)
                    tree.scrollToItem(item)
        finally:
            tree.blockSignals(False)
        tree.itemSelectionChanged.emit()

    def _mgui_bind_change_callback(self, callback: Any) -> None:
        self._qwidget.itemSelectionChanged.connect(lambda: callback(self._mgui_get_value()))


class DatasetTree(ValueWidget):
    """The datasets of a container as a tree (see the module); fill it with :meth:`set_nodes`."""

    KEY = _KEY  # the item data role that holds a row's key

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(widget_type=_QDatasetTree, **kwargs)
        self.native._items = {}
        self.native._openable = []

    @property
    def choices(self) -> tuple[str, ...]:
        """The keys that can be opened, in the tree's order."""
        return tuple(self.native._openable)

    def item(self, key: str) -> QTreeWidgetItem:
        """The row of ``key`` (a group, dataset, pyramid or pyramid level)."""
        return self.native._items[key]

    def set_nodes(self, nodes: list[dict[str, Any]], openable: list[str]) -> None:
        """Show ``nodes`` (as :func:`container_tree` lists them); only ``openable`` keys can be
        selected. Rows are sorted by key; unfinished datasets say so in their name and tooltip."""
        tree = self.native
        tree.blockSignals(True)
        try:
            tree.clear()
            tree._items, tree._openable = {}, []
            by_key = {n["key"]: n for n in nodes}
            selectable = set(openable)
            for key in sorted(by_key, key=lambda k: k.split("/")):
                node = by_key[key]
                parent_key = key.rpartition("/")[0] if "/" in key else ""
                parent = tree._items.get(parent_key) if key else None
                if key == "" and node.get("kind") == "group":
                    continue  # the container itself
                levels = node.get("levels") or []
                finest = by_key.get(f"{key}/{levels[0]}", {}) if levels else node
                name = key.rpartition("/")[2] if parent is not None else (key or "/")
                unfinished = node.get("unfinished") or finest.get("unfinished")
                if unfinished:  # an import still writing it, or one stopped mid-way
                    name += "  (unfinished)"
                unreadable = node.get("unreadable") or finest.get("unreadable")
                if unreadable:  # a Paintera label multiset: listed, greyed, not offered
                    name += "  (cannot be read)"
                item = QTreeWidgetItem(_row(node, finest, name))
                item.setData(0, _KEY, key)
                tip = _tooltip(key, node, finest, unfinished)
                item.setToolTip(0, f"{tip}; {unreadable}" if unreadable else tip)
                if unreadable:
                    item.setDisabled(True)
                if key in selectable and not unreadable:
                    tree._openable.append(key)
                else:  # a group, or one level of a pyramid: shown, opened with its pyramid
                    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsSelectable)
                if parent is not None:
                    parent.addChild(item)
                else:
                    tree.addTopLevelItem(item)
                tree._items[key] = item
            # groups open, pyramids closed (their levels on demand)
            for key, item in tree._items.items():
                item.setExpanded(by_key[key].get("kind") == "group")
        finally:
            tree.blockSignals(False)
        tree.itemSelectionChanged.emit()


def item_texts(item: QTreeWidgetItem) -> list[str]:
    """A row's texts, column by column."""
    return [item.text(i) for i in range(item.columnCount())]
