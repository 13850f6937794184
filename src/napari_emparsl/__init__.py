"""napari-emparsl: AI on volume EM far larger than memory, from napari, on any compute site.

Importing the package is cheap: no Qt, napari, torch or parsl is loaded here.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Volume", "VolumeError", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import napari_emparsl` stays light on headless workers.
    if name in ("Volume", "VolumeError"):
        from napari_emparsl.core import volume

        return getattr(volume, name)
    raise AttributeError(name)
