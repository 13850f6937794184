"""napari writers: save an Image or Labels layer (or several) as N5 datasets (chunked, gzip,
resolution).

``path`` is ``OUT.n5`` (the dataset is named after the layer) or ``OUT.n5/DATASET``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from napari_emparsl.core.ledger import OutputLock
from napari_emparsl.core.n5attrs import VolumeError, find_container_root
from napari_emparsl.core.paths import user_path
from napari_emparsl.core.volume import check_writable, hidden_output, save_array, stale_levels


def _place(path: str) -> tuple[str, str]:
    """The container ``path`` names and the dataset (or group) in it, "" for none."""
    parent = os.path.dirname(path.rstrip(os.sep))
    inside = any(part.lower().endswith(".n5") for part in parent.split(os.sep))
    if path.lower().endswith(".n5") and inside:
        # napari appends the extension: "out.n5/seg" arrives as "out.n5/seg.n5" (a folder
        # merely named with .n5 in it, "proj.n5backup/out.n5", is no container: kept)
        path = path[: -len(".n5")]
    root, key = find_container_root(path)
    if not root.lower().endswith((".n5", ".zarr")):
        root, key = path, ""
    return root, key


def _layer_key(layer_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer_name).strip("_") or "data"


def _target(path: str, layer_name: str) -> tuple[str, str]:
    root, key = _place(path)
    return root, key or _layer_key(layer_name)


#: attribute of a dataset this writer saved: saving a layer there again may replace it
SAVED_LAYER = "emparsl_saved_layer"


def _saved_layer(target: str) -> bool:
    from napari_emparsl.core.n5attrs import read_attrs

    try:
        return read_attrs(target).get(SAVED_LAYER) is True
    except VolumeError:  # damaged: not replaced without a word either
        return False


def _reads(source: dict[str, Any], root: str, key: str) -> bool:
    """Whether a layer of N5 ``source`` (its metadata's path and key) reads ``root:key`` or a
    dataset inside it (a level of a pyramid)."""
    return bool(source) and (
        os.path.realpath(source.get("path", "")) == os.path.realpath(root)
        and (source.get("key") == key or str(source.get("key", "")).startswith(key + "/"))
    )


def _open_layer_reading(root: str, key: str) -> str | None:
    """The name of a layer of napari's current viewer that reads ``root:key`` (or a level of
    it), or None: writing it anew would pull its data from under it."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no napari, or no viewer: nothing open
        return None
    for layer in viewer.layers if viewer is not None else ():
        if _reads((layer.metadata or {}).get("emparsl") or {}, root, key):
            return layer.name
    return None


def _write(path: str, data: Any, meta: dict[str, Any], labels: bool) -> list[str]:
    root, key = _target(user_path(path), meta.get("name") or "data")
    return [_save(*_checked(root, key, data, meta), labels)]


def _checked(root: str, key: str, data: Any, meta: dict[str, Any]) -> tuple:
    """``root:key`` where ``data`` (its finest level, for a pyramid) may be saved, and whether
    it replaces a layer saved there before; VolumeError (one sentence) where it may not."""
    source = (meta.get("metadata") or {}).get("emparsl") or {}
    if _reads(source, root, key):
        raise VolumeError(
            f"{root}:{key} is the dataset this layer reads from; save it under another name."
        )
    # nothing asks before a dataset is replaced: napari is handed OUT.n5/seg.n5, which does
    # not exist, and Qt's save dialog enters an existing folder rather than asking. So only a
    # layer saved here before is replaced (saving an edited layer again); a run's output, an
    # import, the sample or ground truth of the same name is not (it was, without a word)
    hidden = hidden_output(root, key)
    if hidden:  # saved, then neither listed nor opened
        raise VolumeError(
            f"{root}:{key} would lie inside {hidden}; save it under a name outside it."
        )
    stale = stale_levels(root, key)
    if stale:  # its pyramid's other levels would show the old data
        raise VolumeError(f"{stale}; save it under a name outside the pyramid.")
    target = os.path.join(root, key)
    replace = os.path.exists(target)
    if replace and not _saved_layer(target):
        raise VolumeError(
            f"{root}:{key} exists already and is not a layer saved from napari; save under "
            "another name, or remove it first."
        )
    reading = _open_layer_reading(root, key) if replace else None
    if reading is not None:
        raise VolumeError(
            f"{root}:{key} is open as the layer '{reading}'; save under another name, or "
            "remove that layer first."
        )
    if isinstance(data, list) or meta.get("multiscale"):
        # multiscale (napari hands its MultiScaleData, no list): the finest level holds all
        data = data[0]
    # what writing would refuse (float16, an empty axis): before any layer is written
    check_writable(root, key, getattr(data, "dtype", np.float64), getattr(data, "shape", (1,)))
    return root, key, data, meta, replace


def _save(root: str, key: str, data: Any, meta: dict[str, Any], replace: bool, labels: bool) -> str:
    scale = meta.get("scale")
    units = meta.get("units")
    # napari's "pixel" (a layer without units, e.g. from a TIFF) stays so: 1 nm voxels would be
    # a size nobody measured (and a model trained on 8 nm would warn of a mismatch)
    unit = str(units[-1]) if units else "pixel"  # a spatial axis's (a channel axis has none)
    extra: dict[str, Any] = {SAVED_LAYER: True}
    labels_given = [str(a).lower() for a in (meta.get("axis_labels") or ())]
    if (
        getattr(data, "ndim", 0) >= 4
        and len(labels_given) == data.ndim
        and set(labels_given) <= set("tczyx")
        and len(set(labels_given)) == data.ndim
        and labels_given[-3:] == ["z", "y", "x"]
    ):  # a time axis stays one (the first axis of a 4D layer was written as channels: "c")
        extra["axes"] = list(reversed(labels_given))
    lock = OutputLock(root, key, "napari save")  # not while a run writes it, nor a run meanwhile
    lock.acquire()
    try:
        save_array(
            root,
            key,
            data,
            voxel_size=tuple(float(s) for s in scale) if scale is not None else None,
            offset=tuple(float(t) for t in meta["translate"])
            if meta.get("translate") is not None
            else None,
            unit=unit,
            labels=labels,
            attrs=extra,
            overwrite=replace,  # a layer saved here before (see above)
        )
    finally:
        lock.release(remove=True)  # a saved layer keeps no lock file
    return os.path.join(root, key)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save an Image layer's data (numpy or dask, streamed chunk by chunk)."""
    return _write(path, data, meta, labels=False)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save a Labels layer's data; marked ``layer_type: labels`` so it reopens as Labels."""
    return _write(path, data, meta, labels=True)


def write_layers(path: str, layer_data: list[tuple[Any, dict[str, Any], str]]) -> list[str]:
    """Save several Image and Labels layers (napari's Save Selected Layers with more than one
    selected), each as a dataset named after it in the container ``path`` names (in the group
    it names: ``out.n5/run1.n5``, as napari hands it, saves ``run1/<layer>``). Every layer is checked before any is
    written: one that may not be saved, or two that would be saved as one dataset, saves none."""
    root, group = _place(user_path(path))
    planned, seen = [], {}
    for data, meta, layer_type in layer_data:
        name = meta.get("name") or "data"
        key = f"{group.rstrip('/')}/{_layer_key(name)}" if group else _layer_key(name)
        if key in seen:
            raise VolumeError(
                f"The layers '{seen[key]}' and '{name}' would both be saved as {root}:{key}; "
                "rename one of them, or save them one at a time."
            )
        seen[key] = name
        planned.append((_checked(root, key, data, meta), layer_type == "labels"))
    return [_save(*checked, labels) for checked, labels in planned]
