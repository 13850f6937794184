"""Paths as people type or paste them (no heavy imports: workers use this too)."""

from __future__ import annotations

import os

__all__ = ["log_details", "log_path", "spec_text", "std_fds_open", "user_path"]


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


def log_path() -> str:
    """The file that keeps the tracebacks messages do not show: ``~/.cache/napari-emparsl/
    emparsl.log`` (``$XDG_CACHE_HOME`` where set; the temporary folder where that cannot be
    made)."""
    import tempfile

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "napari-emparsl")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        folder = tempfile.gettempdir()
    return os.path.join(folder, "emparsl.log")


#: the log is cut to its last half when it grows past this (it only ever gains tracebacks)
_LOG_MOST_BYTES = 4 * 2**20


def log_details(title: str, text: str) -> str | None:
    """Append ``text`` (a traceback) under a dated ``title`` line to :func:`log_path`; the
    path, or None where it could not be written."""
    import time

    path = log_path()
    try:
        if os.path.exists(path) and os.path.getsize(path) > _LOG_MOST_BYTES:
            with open(path, "rb") as f:
                f.seek(-_LOG_MOST_BYTES // 2, os.SEEK_END)
                kept = f.read()
            with open(path, "wb") as f:
                f.write(kept[kept.find(b"\n--- ") + 1 :] if b"\n--- " in kept else kept)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.ctime()} {title}\n{text.rstrip()}\n")
    except OSError:
        return None
    return path


def std_fds_open() -> None:
    """Descriptors 0, 1 and 2 opened on /dev/null where closed (a batch job started with
    ``0<&-`` or ``>&-``): else the next files opened take those numbers, and a child process
    given them (the site's fork server: its socket and pipe) had them replaced by its standard
    streams, so every worker failed to start."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            new = os.open(os.devnull, os.O_RDWR)
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
