"""Pure compute, importable on a headless worker: no Qt, napari, magicgui or parsl."""
