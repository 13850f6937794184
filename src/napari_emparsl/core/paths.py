"""Paths as people type or paste them (no heavy imports: workers use this too)."""

from __future__ import annotations

import os

__all__ = ["spec_text", "user_path"]


def user_path(text: str | os.PathLike) -> str:
    """``text`` with surrounding spaces and one pair of surrounding quotes dropped (as file
    managers copy paths) and a leading ``~`` expanded to the home folder, as a shell would."""
    text = os.fspath(text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return os.path.expanduser(text)


def spec_text(root: str, key: str) -> str:
    """``root:key`` as messages show a dataset: the container alone for its root dataset (the
    key empty), not ``root:``."""
    return f"{root}:{key}" if key.strip("/") else root
