"""napari reader: File > Open on an ``*.n5`` folder (or a dataset folder inside one).

Layers are lazy: dask arrays whose chunks are the storage chunks, multiscale where a pyramid
exists, with the voxel size as layer scale. Opening reads JSON metadata only (and, for contrast
limits, at most the coarsest pyramid level or one chunk), never the whole volume.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from napari_emparsl._napari import napari_fixes
from napari_emparsl.core.n5attrs import VolumeError, find_container_root, is_container, is_zarr
from napari_emparsl.core.paths import spec_text
from napari_emparsl.core.units import nm_per_unit
from napari_emparsl.core.volume import UNFINISHED, Volume, finite_values, openable_keys

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: read the coarsest level for contrast limits only when it is at most this many voxels
_CONTRAST_SAMPLE_VOXELS = 4 * 1024**2


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_n5` when ``path`` is (inside) an N5/zarr container, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    root, _ = find_container_root(path)
    if not is_container(root):
        return None
    napari_fixes.apply()  # a napari crash on removing a layer (see the module)
    return read_n5


def read_n5(path: str | list[str]) -> list[LayerData]:
    """Layers for a container (all datasets and pyramids) or for one dataset.

    Bad data is reported as one sentence in a napari notification (no traceback) and nothing
    is added: ``[(None,)]`` is napari's "read, but no layers" answer.
    """
    skipped: list[str] = []
    try:
        layers = read_layers(path, skipped)
    except VolumeError as err:
        from napari.utils.notifications import show_error

        log.info("could not open %s: %s", path, err)
        show_error(str(err))
        return [(None,)]  # type: ignore[list-item]
    if skipped:
        from napari.utils.notifications import show_warning

        for reason in skipped:
            log.info("left out of %s: %s", path, reason)
        more = f" ({len(skipped) - 1} more in the log)" if len(skipped) > 1 else ""
        show_warning(f"Left out: {skipped[0]}{more}")
    for _, meta, _ in layers:
        source = meta["metadata"]["emparsl"]
        if source.get("unfinished"):
            from napari.utils.notifications import show_warning

            show_warning(
                f"{source['path']}:{source['key']} is {source['unfinished']}: parts of it are "
                "missing and show as zeros."
            )
    return layers


def read_layers(path: str | list[str], skipped: list[str] | None = None) -> list[LayerData]:
    """LayerData tuples (raises VolumeError on bad data).

    A container or group of several datasets opens those that can be opened; why each other
    one cannot is added to ``skipped`` (a Paintera label multiset left the rest of its
    container unopened). VolumeError when none can be opened, or ``skipped`` is None.
    """
    paths = [path] if isinstance(path, str) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        for volume in _volumes(os.fspath(p), skipped):
            layers.append(layer_data(volume))
    # images below labels, in the order napari stacks them
    layers.sort(key=lambda ld: ld[2] == "labels")
    return layers


#: the most voxels of one slice of a volume without coarser levels napari is given: it reads
#: whole slices to show one (a 20000² slice: 151 s and 11.7 GB with napari frozen; 100000²:
#: killed for memory); a 16384² montage still opens. EMPARSL_MAX_SLICE_VOXELS sets another.
MAX_SLICE_VOXELS = 2**28


def _max_slice_voxels() -> int:
    try:
        return int(os.environ.get("EMPARSL_MAX_SLICE_VOXELS", "") or MAX_SLICE_VOXELS)
    except ValueError:
        return MAX_SLICE_VOXELS


def _showable(volume: Volume) -> Volume:
    """``volume``, unless napari would freeze reading its slices (one level, huge slices)."""
    spatial = [n for n, a in zip(volume.shape, volume.axes, strict=True) if a != "c"]
    plane = math.prod(spatial[-2:])
    if volume.is_multiscale or plane <= _max_slice_voxels():
        return volume
    spec = spec_text(volume.root, volume.key)
    raise VolumeError(
        f"{spec} is one level of {'×'.join(map(str, volume.shape))} voxels without coarser "
        f"levels: napari reads whole {'×'.join(map(str, spatial[-2:]))} slices of it "
        f"({plane / 1e6:,.0f} M voxels each) and would freeze for minutes or run out of "
        f"memory; run on it from the command line (emparsl run --input {spec} …), open a "
        "copy with coarser levels (a pyramid s0, s1, … as N5 tools write), or raise "
        "EMPARSL_MAX_SLICE_VOXELS."
    )


def _volumes(path: str, skipped: list[str] | None = None) -> list[Volume]:
    """The dataset or pyramid at ``path``, or every one inside the group/container there
    (see :func:`read_layers` for ``skipped``)."""
    root, _ = find_container_root(path)
    keys = openable_keys(path)
    if not keys:  # napari said only that the reader "returned no data"
        if is_zarr(root):
            raise VolumeError(
                f"{root} is a zarr container, which this version does not open yet; convert "
                "it to N5 (e.g. with z5py or BigDataViewer) and open that."
            )
        raise VolumeError(
            f"{path} holds no dataset (an empty container or group, or datasets without their "
            "attributes.json); pick another folder."
        )
    if skipped is None or len(keys) < 2:
        return [_showable(Volume.open(root, key)) for key in keys]
    volumes, errors = [], []
    for key in keys:
        try:
            volumes.append(_showable(Volume.open(root, key)))
        except VolumeError as err:
            errors.append(err)
    if not volumes and errors:
        raise errors[0]
    skipped.extend(str(err) for err in errors)
    return volumes


def layer_data(volume: Volume) -> LayerData:
    """A napari LayerData tuple for a volume (lazy; multiscale where it exists)."""
    _showable(volume)
    data = volume.pyramid if volume.is_multiscale else volume.data
    name = volume.key.replace("/", "_") or os.path.basename(volume.root.rstrip("/"))
    meta: dict[str, Any] = {
        "name": name,
        **_geometry(volume),
        "multiscale": volume.is_multiscale,
        "metadata": {"emparsl": {"path": volume.root, "key": volume.key}},
    }
    if "c" not in volume.axes:  # the sliders say z (not -3); channels are split into layers
        meta["axis_labels"] = tuple(volume.axes)
    if volume.attrs.get(UNFINISHED):  # an import or save still writing it, or stopped mid-way
        meta["metadata"]["emparsl"]["unfinished"] = volume.attrs[UNFINISHED]
    # labels have no channel axis in napari: an integer volume with one (tagged or named as
    # labels, or 32-bit) opens as images, one per channel (napari refused the labels layer)
    if volume.is_labels and "c" not in volume.axes:
        if volume.class_names:  # napari's status bar names the class under the cursor
            meta["features"] = {"class": volume.class_names}
        colormap = class_colormap(volume)
        if colormap:
            meta["colormap"] = colormap
        return data, meta, "labels"
    # never RGB: napari guesses it from a last axis of 3 or 4 (a 64×64×4 volume without a voxel
    # size, N5-Java's 512×512×3 test image), and then refused our scale with a traceback
    # ("could not broadcast input array from shape (3,) into shape (2,)")
    meta["rgb"] = False
    if "c" in volume.axes and not _channel_slider(volume):
        meta["channel_axis"] = volume.axes.index("c")
        channels = volume.shape[meta["channel_axis"]]
        meta["name"] = [f"{name}_c{i}" for i in range(channels)]
        meta["metadata"]["emparsl"]["channels"] = channels  # one layer each, one volume
    else:
        if "c" in volume.axes:  # many channels: one layer, its channel axis a slider
            meta["axis_labels"] = tuple(volume.axes)
            meta["metadata"]["emparsl"]["channels"] = volume.shape[volume.axes.index("c")]
        meta["contrast_limits"] = contrast_limits(volume)
    return data, meta, "image"


#: more channels than this open as one layer with a channel slider, not a layer each: napari
#: took 40 s to add 200 layers, frozen (a 4-D dataset without axes is read as c, z, y, x: a
#: time series from another tool is one); the run panel's live output shows channels so too
MOST_CHANNEL_LAYERS = 8


def _channel_slider(volume: Volume) -> bool:
    """Whether ``volume``'s channels open as a slider of one layer (too many for a layer
    each)."""
    return "c" in volume.axes and volume.shape[volume.axes.index("c")] > MOST_CHANNEL_LAYERS


def _geometry(volume: Volume) -> dict[str, tuple]:
    """A layer's scale, translate and units: one per axis of the layer (the volume's axes but
    a channel axis, which napari splits into layers unless there are many); a time axis (and a
    channel slider) gets scale 1, translate 0 and napari's unit ``pixel`` (before: 3 values for
    a 4-D t, z, y, x layer, which napari refused: 'units must have length ndim=4'). Units are
    left out where unknown."""
    layer_axes = [a for a in volume.axes if a != "c" or _channel_slider(volume)]
    space = [i for i, a in enumerate(layer_axes) if a not in ("c", "t")]
    if len(space) != len(volume.voxel_size) or len(volume.offset) != len(space):
        return {}  # axes and sizes disagree: napari's defaults (1 per axis)
    scale, translate = [1.0] * len(layer_axes), [0.0] * len(layer_axes)
    for i, size, offset in zip(space, volume.voxel_size, volume.offset, strict=True):
        scale[i], translate[i] = size, offset
    out: dict[str, tuple] = {"scale": tuple(scale), "translate": tuple(translate)}
    unit = napari_unit(volume.unit)
    if unit:
        out["units"] = tuple(unit if i in space else "pixel" for i in range(len(layer_axes)))
    return out


#: napari's (pint's) name for a length of so many nanometres (see core/units.py)
_NAPARI_UNITS = {1.0: "nanometer", 1e3: "micrometer", 1e6: "millimeter", 0.1: "angstrom"}


def class_colormap(volume: Volume) -> dict | None:
    """A Labels layer's colours of a labels volume whose model declared them (``class_colors``:
    class id -> colour; any other value, e.g. a label painted over it, white), for napari's
    ``colormap``; None for napari's own colours."""
    colors = volume.class_colors
    return {**colors, None: "#ffffffff"} if colors else None


def napari_unit(unit: str) -> str | None:
    """``unit`` as napari spells it (``µm``, ImageJ's ``\\u00B5m``, ``micron`` → micrometer), or
    None where it is no length (``pixel``, ``voxel``, ``a.u.``): napari refused those with a
    traceback ("Could not find unit voxel"), and its layers then keep their default units."""
    text = str(unit).strip()
    nm = nm_per_unit(text)
    if nm is None and text.lower().endswith("s"):  # plurals: nanometers, microns
        nm = nm_per_unit(text[:-1])
    if nm in _NAPARI_UNITS:
        return _NAPARI_UNITS[nm]
    named = _pint_length(text)  # other lengths napari's units know: cm, m, pm, meter, …
    if named is None and text.lower() not in ("pixel", "pixels", ""):
        log.info("unit %r is not a length napari knows: the layer keeps napari's units", unit)
    return named


def _pint_length(text: str) -> str | None:
    """``text`` as pint (napari's units) names it, where it is a length; else None."""
    try:
        import pint

        registry = pint.get_application_registry()
        parsed = registry.Unit(text)
        if parsed.dimensionality != registry.Unit("meter").dimensionality:
            return None  # a.u. (atomic mass × year), a second, …
        return str(parsed)
    except Exception:  # not a unit pint knows (voxel), or no pint
        return None


def _central_chunks(shape: tuple[int, ...], chunks: list[int]) -> tuple[slice, ...]:
    """The box of whole chunks around the centre that the contrast is sampled from: all of a
    small array; else at most 4 chunks per axis and _CONTRAST_SAMPLE_VOXELS voxels (read on the
    Qt thread as a layer opens: a few chunk files, not thousands)."""
    counts = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    take = [min(k, 4) for k in counts]
    while (
        int(np.prod([t * c for t, c in zip(take, chunks, strict=True)])) > _CONTRAST_SAMPLE_VOXELS
    ):
        axis = int(np.argmax(take))
        if take[axis] == 1:
            break  # one chunk: as small as whole chunks get
        take[axis] -= 1
    box = []
    for n, c, k, t in zip(shape, chunks, counts, take, strict=True):
        first = max(0, min(k - t, (n // 2) // c - t // 2))
        box.append(slice(first * c, min(n, (first + t) * c)))
    return tuple(box)


def contrast_limits(volume: Volume) -> tuple[float, float]:
    """From the dtype for 8-bit data, else from the coarsest level or one central chunk."""
    if volume.dtype == np.uint8:
        return 0.0, 255.0
    coarse = volume.level(len(volume.levels) - 1)
    coarse = coarse[_central_chunks(coarse.shape, [c[0] for c in coarse.chunks])]
    sample = finite_values(np.asarray(coarse.compute()))  # NaN: masked voxels of float data
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max()) + 1.0
    return float(lo), float(hi)
