"""Small Qt touches the panels share."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QSizePolicy


def wrapping(label: Any) -> Any:
    """A magicgui ``Label`` for sentences: long text wraps instead of widening the dock, and the
    text starts where the other rows' fields do. (A ``QLabel`` is not stretched across its row:
    short text sat in the middle of it, with its row label pushed after it.)"""
    native = label.native
    native.setWordWrap(True)
    policy = native.sizePolicy()  # keeps height-for-width, which wrapped text needs
    policy.setHorizontalPolicy(QSizePolicy.Policy.Expanding)
    native.setSizePolicy(policy)
    return label
