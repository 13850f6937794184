"""N5 attribute conventions: voxel size, unit, axes, pyramids, and the container tree.

Pure JSON and path logic (no z5py): this is where the many conventions of N5 writers are read and
converted once into C order (z, y, x), the order z5py and numpy use.

Conventions understood
----------------------
- ``resolution``: list of voxel sizes. N5 tools (N5-Java, BigDataViewer, Fiji, n5-viewer) write it in
  N5 order (x, y, z), the reverse of the array's C order. When the dataset also has an ``axes``
  list, ``resolution`` follows the order of ``axes``; an ``axes`` list that starts with ``x`` is in N5
  order and is reversed, one that ends with ``x`` (``["z", "y", "x"]``) is already in C order.
- ``pixelResolution``: ``{"dimensions": [x, y, z], "unit": "nm"}`` (or a plain list), N5 order.
- ``downsamplingFactors``: per pyramid level, N5 order; a level's voxel size is the base voxel size
  times its factors.
- ``scales``: on a pyramid group or any group above it (n5-viewer writes it on the container's
  root), one factor list per level, N5 order; used for a level without ``downsamplingFactors``.
- ``unit``: a string for all axes (default: ``pixel`` when no voxel size is given at all).
- ``transform`` (COSEM / OpenOrganelle, on each dataset): ``{"axes": [...], "order": "C",
  "scale": [...], "translate": [...], "units": [...]}`` — the dataset's own voxel size, unit and
  offset, in the order ``order`` (or ``ordering``) says (``C`` when absent). It comes first: its
  ``translate`` is the offset (pyramid levels are shifted by half a voxel there), which
  ``pixelResolution`` beside it cannot say.
- BigDataViewer projects: a ``setupN`` group's voxel size and unit from the project's XML
  beside the container (:func:`bdv_setup_attrs`); its N5 keeps a unit-less ``resolution``.
- ``offset``: world offset of voxel 0, same order rules as ``resolution``; a dataset without
  one takes the nearest group's above it (Paintera keeps it on the pyramid group).

A dataset without its own voxel size takes the one of the nearest group above it that has one,
up to the container's root (n5-viewer keeps ``pixelResolution`` and ``scales`` on the root, with
channel pyramids ``c0/s0, s1, …`` below).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_emparsl.core.errors import UserError

ATTRS = "attributes.json"

log = logging.getLogger(__name__)

#: Compressions z5py decodes in N5 containers (z5py's ``Dataset.compressors_n5`` when built with
#: all codecs); ``zlib`` is not one (N5-Java writes zlib streams as gzip with ``useZlib``, which
#: reads). :func:`supported_compressions` asks the z5py that is installed.
SUPPORTED_COMPRESSIONS = ("raw", "gzip", "bzip2", "xz", "lz4", "blosc", "zstd")

_LEVEL_RE = re.compile(r"^s(\d+)$")
#: words of a dataset's name that say it holds intensities, whatever groups it lies in
_IMAGE_WORDS = frozenset(
    "raw em fibsem sem tem image img intensity intensities pred prediction predictions prob "
    "probs probability probabilities affinities affs boundary boundaries distance distances".split()
)
_LABEL_NAME_RE = re.compile(
    r"(label|seg|watershed|neuron|instance|mask|class|cells|gt$|groundtruth|ids$)", re.IGNORECASE
)


class VolumeError(UserError):
    """A problem with the user's data, said in one sentence: what is wrong and what to do."""


def read_attrs(directory: str) -> dict[str, Any]:
    """Read ``attributes.json`` of a group or dataset folder; ``{}`` when there is none.

    Raises
    ------
    VolumeError
        When the file exists but is not valid JSON (truncated, corrupt).
    """
    path = os.path.join(directory, ATTRS)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            attrs = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeError(
            f"The metadata file {path} is corrupt or truncated ({_short(err)}); "
            "restore it from a backup or re-export the dataset."
        ) from None
    if not isinstance(attrs, dict):
        raise VolumeError(
            f"The metadata file {path} does not hold a JSON object; restore it or re-export the dataset."
        )
    return attrs


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__


def is_dataset_attrs(attrs: dict[str, Any]) -> bool:
    return "dimensions" in attrs and "dataType" in attrs


def compression_of(attrs: dict[str, Any]) -> str:
    """The compression name of a dataset (``compression.type`` or the legacy ``compressionType``)."""
    comp = attrs.get("compression")
    if isinstance(comp, dict):
        return str(comp.get("type", "raw"))
    if isinstance(comp, str):
        return comp
    return str(attrs.get("compressionType", "raw"))


@functools.cache
def supported_compressions() -> tuple[str, ...]:
    """The N5 compressions the installed z5py decodes (imported only here: this module is JSON
    logic, and the command line starts without z5py)."""
    try:
        from z5py.dataset import Dataset
    except ImportError:
        return SUPPORTED_COMPRESSIONS
    return tuple(Dataset.compressors_n5)


#: the voxel types of the N5 format (z5py reads these; others are refused before it opens them)
N5_DTYPES = (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64",
)  # fmt: skip


def _whole_numbers(value: Any, least: int) -> bool:
    """A list of whole numbers of at least ``least`` (8.0 counts: z5py reads it)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(n, int | float)
            and not isinstance(n, bool)
            and float(n).is_integer()
            and n >= least
            for n in value
        )
    )


def check_dataset_attrs(attrs: dict[str, Any], where: str) -> None:
    """Refuse a dataset whose attributes z5py cannot open safely, before it opens them: a
    blockSize of 0 made z5py divide by zero (SIGFPE: the whole process, napari too, died without
    a word), negative dimensions allocated for ever, an unknown dataType ended in ``map::at``."""
    dims, block, dtype = attrs.get("dimensions"), attrs.get("blockSize"), attrs.get("dataType")
    fix = "restore its attributes.json or write the dataset again"
    if not _whole_numbers(dims, 0):
        raise VolumeError(
            f"Dataset {where} has dimensions {dims!r} in its attributes.json, not whole "
            f"numbers of 0 or more (one per axis); {fix}."
        )
    if not _whole_numbers(block, 1) or len(block) != len(dims):
        raise VolumeError(
            f"Dataset {where} has a blockSize of {block!r} in its attributes.json, not "
            f"{len(dims)} whole numbers of at least 1 (one per axis); {fix}."
        )
    if dtype not in N5_DTYPES:
        raise VolumeError(
            f"Dataset {where} stores voxels of type {dtype!r}, which N5 readers here cannot "
            f"read ({', '.join(N5_DTYPES)}); convert it to one of those and open that."
        )
    check_compression(attrs, where)


def check_compression(attrs: dict[str, Any], where: str) -> None:
    """Refuse compressions no Python N5 library decodes, before any chunk is read."""
    comp = compression_of(attrs)
    if comp not in supported_compressions():
        raise VolumeError(
            f"Dataset {where} uses '{comp}' compression, which cannot be read here; "
            "re-save it with gzip compression (e.g. Fiji > N5 export) and open that."
        )
    raw_comp = attrs.get("compression")
    # N5-Java writes lz4 as framed LZ4BlockOutputStream blocks (with a "blockSize" setting);
    # z5py, zarr and tensorstore cannot decode that framing.
    if comp == "lz4" and isinstance(raw_comp, dict) and "blockSize" in raw_comp:
        raise VolumeError(
            f"Dataset {where} uses N5-Java's lz4 compression, which no Python N5 library can read; "
            "re-save it with gzip compression (e.g. Fiji > N5 export) and open that."
        )


# ----------------------------------------------------------------------------------------------
# axes, voxel size, unit


def axes_c_order(attrs: dict[str, Any], ndim: int) -> tuple[tuple[str, ...], bool]:
    """Axis names in C order, and whether the stored ``axes`` list (if any) was in N5 order."""
    axes = attrs.get("axes")
    if isinstance(axes, list) and len(axes) == ndim and all(isinstance(a, str) for a in axes):
        names = [a.lower() for a in axes]
        if names[0] == "x" and names[-1] != "x":
            return tuple(reversed(names)), True
        return tuple(names), False
    imagej = _imagej_axes(attrs)
    if imagej is not None and len(imagej) == ndim:
        return tuple(reversed(imagej)), True
    default = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x"), 4: ("c", "z", "y", "x")}
    names = default.get(ndim, tuple(f"d{i}" for i in range(ndim)))
    return names, True


def _imagej_axes(attrs: dict[str, Any]) -> list[str] | None:
    """The N5-order axes of an image Fiji's N5 export wrote with ImageJ metadata: ImageJ's
    X, Y, C, Z, T order without the axes of length one (``numChannels``, ``numSlices``,
    ``numFrames``); None without those keys."""
    counts = [attrs.get(k) for k in ("numChannels", "numSlices", "numFrames")]
    if not any(isinstance(c, int) for c in counts):
        return None
    names = ["x", "y"]
    for name, count in zip(("c", "z", "t"), counts, strict=True):
        if isinstance(count, int) and count > 1:
            names.append(name)
    return names


def _spatial_c_order(
    values: Any, axes: tuple[str, ...], stored_n5_order: bool
) -> tuple[float, ...] | None:
    """Convert a per-axis list to C order over the spatial (non-channel) axes."""
    if isinstance(values, dict):
        values = values.get("dimensions")
    if not isinstance(values, (list, tuple)) or not values:
        return None
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    spatial = [a for a in axes if a not in ("c", "t")]
    if len(vals) == len(axes):
        c_vals = list(reversed(vals)) if stored_n5_order else vals
        return tuple(v for v, a in zip(c_vals, axes, strict=True) if a not in ("c", "t"))
    if len(vals) == len(spatial):
        return tuple(reversed(vals)) if stored_n5_order else tuple(vals)
    return None


def voxel_size_of(
    attrs: dict[str, Any],
    ndim: int,
    parent_attrs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    level: int | None = None,
) -> tuple[tuple[float, ...], str, tuple[float, ...]]:
    """Voxel size (C order, spatial axes), unit, and world offset of a dataset.

    ``parent_attrs`` are the attributes of the groups above the dataset, nearest first, up to the
    container's root (one dict: the parent alone). A dataset without its own voxel size takes
    the nearest one above it. ``level`` is the dataset's index in its pyramid (None: not a
    pyramid level): a level's voxel size is the base voxel size times its
    ``downsamplingFactors``, or, without those, times ``scales[level]`` of the nearest group
    above it that has ``scales``. The offset is the dataset's own, else the nearest above.
    """
    if parent_attrs is None:
        ancestors: list[dict[str, Any]] = []
    elif isinstance(parent_attrs, dict):
        ancestors = [parent_attrs]
    else:
        ancestors = list(parent_attrs)
    chain = [attrs, *ancestors]
    axes, n5_order = axes_c_order(attrs, ndim)
    n_spatial = len([a for a in axes if a not in ("c", "t")])
    factors = _spatial_c_order(attrs.get("downsamplingFactors"), axes, True)
    if factors is None and level is not None:
        scales = next((found for a in ancestors if (found := _level_factor_lists(a))), None)
        if scales is not None and 0 <= level < len(scales):
            factors = _spatial_c_order(scales[level], axes, True)

    own = _st_transform(attrs, ndim)
    if own is not None:  # absolute, per dataset: no factors, nothing from above
        return own
    base, unit = None, None
    for source in chain:
        src_order = axes_c_order(source, ndim)[1]
        if "pixelResolution" in source:  # always N5 order
            base = _spatial_c_order(source["pixelResolution"], axes, True)
        elif "resolution" in source:
            base = _spatial_c_order(source["resolution"], axes, src_order)
        elif "pixelWidth" in source:  # Fiji's N5 export, ImageJ metadata
            base = _imagej_size(source, len([a for a in axes if a not in ("c", "t")]))
        if base is not None and not _positive(base):
            base = None  # a zero size napari refuses, a negative one mirrors
        if base is not None:
            # the unit said with the size, else the nearest one said from there up
            at = chain.index(source)
            units = _units_list(source, axes, src_order)
            if units is not None and len(units) == len(base) and len(set(units)) > 1:
                base, units = _in_nm(base, units)  # nm, µm, …: one unit for every axis
            unit = units[0] if units and len(set(units)) == 1 else None  # (not nm, nm, s)
            unit = unit or next((u for a in chain[at:] if (u := _unit_of(a))), None)
            break
    if base is None:  # no voxel size recorded: a unit alone says nothing of the voxels
        base, unit = (1.0,) * n_spatial, "pixel"
    if factors is not None and len(factors) == len(base) and _positive(factors):
        base = tuple(b * f for b, f in zip(base, factors, strict=True))
    # the offset said with the dataset, else the nearest above (Paintera: on the pyramid group)
    at = next((a for a in chain if a.get("offset") is not None), attrs)
    if at.get("offset") is None and "pixelWidth" in attrs:  # ImageJ: the origin, in voxels
        origin = _imagej_origin(attrs, len(base))
        if origin is not None:
            offset = tuple(0.0 - o * b for o, b in zip(origin, base, strict=True))  # not -0.0
            return base, str(unit or "nm"), offset
    order = n5_order if at is attrs else axes_c_order(at, ndim)[1]
    offset = _spatial_c_order(at.get("offset"), axes, order) or (0.0,) * n_spatial
    if len(offset) != len(base) or not all(math.isfinite(o) for o in offset):
        offset = (0.0,) * len(base)
    return base, str(unit or "nm"), offset


def _level_factor_lists(attrs: dict[str, Any]) -> list[Any] | None:
    """Per-level factor lists a group gives its pyramid: n5-viewer's ``scales``, or
    BigDataViewer's ``downsamplingFactors`` on the setup group (a list of lists)."""
    for name in ("scales", "downsamplingFactors"):
        value = attrs.get(name)
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
    return None


def _imagej_size(attrs: dict[str, Any], n_spatial: int) -> tuple[float, ...] | None:
    """The voxel size (C order) in ImageJ metadata: ``pixelDepth``, ``pixelHeight``,
    ``pixelWidth``."""
    keys = ("pixelDepth", "pixelHeight", "pixelWidth")[-n_spatial:] if 0 < n_spatial <= 3 else ()
    try:
        return tuple(float(attrs.get(k, 1.0)) for k in keys) or None
    except (TypeError, ValueError):
        return None


def _imagej_origin(attrs: dict[str, Any], n_spatial: int) -> tuple[float, ...] | None:
    """ImageJ's origin (C order, in voxels: where world 0 lies), or None where none is given."""
    keys = ("zOrigin", "yOrigin", "xOrigin")[-n_spatial:] if 0 < n_spatial <= 3 else ()
    if not keys or not any(k in attrs for k in keys):
        return None
    try:
        origin = tuple(float(attrs.get(k, 0.0)) for k in keys)
    except (TypeError, ValueError):
        return None
    return origin if all(math.isfinite(o) for o in origin) else None


def _units_list(
    attrs: dict[str, Any], axes: tuple[str, ...], stored_n5_order: bool
) -> tuple[str, ...] | None:
    """A ``units`` list (tensorstore and neuroglancer write one beside ``resolution``, in its
    order), C order over the spatial axes; None without one."""
    units = attrs.get("units")
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        return None
    spatial = [a for a in axes if a not in ("c", "t")]
    if len(units) == len(axes):
        c_units = list(reversed(units)) if stored_n5_order else units
        out = tuple(u for u, a in zip(c_units, axes, strict=True) if a not in ("c", "t"))
    elif len(units) == len(spatial):
        out = tuple(reversed(units)) if stored_n5_order else tuple(units)
    else:
        return None
    return out if out and all(out) else None  # a channel axis may have "" for its unit


def _in_nm(
    size: tuple[float, ...], units: tuple[str, ...]
) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """A voxel size given in a unit per axis, in nm (every unit a length), else as given."""
    from napari_emparsl.core.units import nm_per_unit

    factors = [nm_per_unit(u) for u in units]
    if any(f is None for f in factors):
        return size, units
    return tuple(v * f for v, f in zip(size, factors, strict=True)), ("nm",) * len(size)


def _st_transform(
    attrs: dict[str, Any], ndim: int
) -> tuple[tuple[float, ...], str, tuple[float, ...]] | None:
    """Voxel size, unit and offset (C order, spatial axes) from a COSEM ``transform``; None when
    there is none or it does not fit the dataset (then the other conventions are read)."""
    tx = attrs.get("transform")
    if not isinstance(tx, dict):
        return None
    order = tx.get("order", tx.get("ordering", "C"))
    if order not in ("C", "F", None):
        return None
    names, scale = tx.get("axes"), tx.get("scale")
    translate, units = tx.get("translate"), tx.get("units")
    if translate is None:
        translate = [0.0] * ndim
    lists = (names, scale, translate)
    if not all(isinstance(v, list) and len(v) == ndim for v in lists):
        return None
    if not all(isinstance(n, str) for n in names):
        return None
    try:
        scale_f = [float(v) for v in scale]
        translate_f = [float(v) for v in translate]
    except (TypeError, ValueError):
        return None
    if order == "F":  # N5 order: reversed into C order
        names, scale_f, translate_f = names[::-1], scale_f[::-1], translate_f[::-1]
        units = units[::-1] if isinstance(units, list) else units
    spatial = [i for i, n in enumerate(names) if n.lower() not in ("c", "t", "channel", "time")]
    base = tuple(scale_f[i] for i in spatial)
    offset = tuple(translate_f[i] for i in spatial)
    if not spatial or not _positive(base) or not all(math.isfinite(o) for o in offset):
        return None
    unit = None
    if isinstance(units, list) and len(units) == ndim:
        unit = next((u for i in spatial if isinstance(u := units[i], str) and u), None)
    return base, unit or _unit_of(attrs) or "nm", offset


def _unit_of(attrs: dict[str, Any]) -> str | None:
    """The unit a group or dataset states: ``pixelResolution.unit``, else ``unit``."""
    res = attrs.get("pixelResolution")
    if isinstance(res, dict) and isinstance(res.get("unit"), str) and res["unit"]:
        return res["unit"]
    for key in ("unit", "pixelUnit"):  # pixelUnit: ImageJ metadata
        unit = attrs.get(key)
        if isinstance(unit, str) and unit:
            return unit
    return None


def ancestor_attrs(root: str, key: str) -> list[dict[str, Any]]:
    """Attributes of the groups above ``key`` in the container at ``root``, nearest first, the
    root's last (``[]`` for the root itself); a BigDataViewer setup group's with what the
    ``dataset.xml`` beside the container says of it (:func:`bdv_setup_attrs`)."""
    parts = [p for p in key.split("/") if p]
    return [
        read_attrs(os.path.join(root, *parts[:i])) | bdv_setup_attrs(root, "/".join(parts[:i]))
        for i in range(len(parts) - 1, -1, -1)
    ]


_BDV_SETUP_RE = re.compile(r"setup(\d+)")
_BDV_XML_MAX = 64 * 2**20  # a larger "XML" beside the container is no BigDataViewer project
_BDV_CACHE: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}


def bdv_setup_attrs(root: str, key: str) -> dict[str, Any]:
    """What a BigDataViewer project (``dataset.xml``, any ``*.xml`` beside the container whose
    ``bdv.n5`` image loader names it) says of the setup group ``key`` (``setup0``): its voxel
    size (``resolution``, N5 order) and ``unit``. BigDataViewer's "Export to N5" and
    BigStitcher keep the unit there only (the N5 has a unit-less ``resolution``): µm data read
    as nm without it. ``{}`` for any other key, or where no project names the container."""
    match = _BDV_SETUP_RE.fullmatch(key)
    if match is None:
        return {}
    return dict(_bdv_setups(root).get(int(match.group(1)), {}))


def _bdv_setups(root: str) -> dict[int, dict[str, Any]]:
    """Setup id -> ``{"resolution": [x, y, z], "unit": …}`` from the projects beside ``root``."""
    folder = os.path.dirname(os.path.abspath(root))
    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".xml"))
        stats = [os.stat(os.path.join(folder, n)) for n in names]
    except OSError:
        return {}
    files = [
        (n, st.st_mtime_ns, st.st_size)
        for n, st in zip(names, stats, strict=True)
        if st.st_size <= _BDV_XML_MAX
    ]
    cache_key = (os.path.realpath(root), tuple(files))
    if cache_key not in _BDV_CACHE:
        found: dict[int, dict[str, Any]] = {}
        # BigDataViewer's own name first; each file is read up to its sequence description only
        # (a BigStitcher project's registrations after it run to tens of MB)
        for name, _, _ in sorted(files, key=lambda f: f[0] != "dataset.xml"):
            found = _bdv_project(os.path.join(folder, name), cache_key[0])
            if found:
                break
        if len(_BDV_CACHE) > 64:
            _BDV_CACHE.clear()
        _BDV_CACHE[cache_key] = found
    return _BDV_CACHE[cache_key]


def _bdv_project(xml: str, root: str) -> dict[int, dict[str, Any]]:
    """The setups of the BigDataViewer project ``xml`` if its image loader is the N5 container
    ``root`` (a real path), else ``{}``. A file that is no such project is passed over."""
    import xml.etree.ElementTree as ET

    sequence = None
    try:
        for index, (event, element) in enumerate(ET.iterparse(xml, events=("start", "end"))):
            if index == 0 and element.tag != "SpimData":  # the root's start
                return {}  # another kind of XML: not read further
            if event == "end" and element.tag == "SequenceDescription":
                sequence = element
                break
    except (ET.ParseError, OSError, ValueError):
        return {}
    if sequence is None:
        return {}
    loader = sequence.find("ImageLoader")
    if loader is None or not str(loader.get("format", "")).startswith("bdv.n5"):
        return {}
    n5 = loader.find("n5")
    if n5 is None or not (n5.text or "").strip():
        return {}
    where = n5.text.strip()
    if n5.get("type") == "relative":
        where = os.path.join(os.path.dirname(xml), where)
    if os.path.realpath(where) != root:
        return {}
    setups: dict[int, dict[str, Any]] = {}
    for setup in sequence.iterfind("ViewSetups/ViewSetup"):
        try:
            number = int((setup.findtext("id") or "").strip())
        except ValueError:
            continue
        entry: dict[str, Any] = {}
        unit = (setup.findtext("voxelSize/unit") or "").strip()
        if unit:
            entry["unit"] = unit
        try:
            size = [float(v) for v in (setup.findtext("voxelSize/size") or "").split()]
        except ValueError:
            size = []
        if size and all(math.isfinite(v) and v > 0 for v in size):
            entry["resolution"] = size  # x, y, z: N5 order
        if entry:
            setups[number] = entry
    return setups


def level_index(root: str, key: str) -> int | None:
    """The index of dataset ``key`` in its pyramid (``s2`` of a group of ``s0, s1, s2``), or
    None when it is not a level of a pyramid."""
    if not key:
        return None
    parent, _, name = key.rpartition("/")
    directory = os.path.join(root, parent) if parent else root
    try:  # (opened for every block a run reads or writes: only what a level name needs)
        group = read_attrs(directory)
        if not _LEVEL_RE.match(name) and name not in (multiscale_paths(group) or ()):
            return None
        levels = pyramid_levels(directory, group)
    except VolumeError:  # a damaged file of the group or of a level: the levels are not known
        return None
    return levels.index(name) if name in levels else None


def _positive(values: tuple[float, ...]) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def looks_like_labels(key: str, attrs: dict[str, Any], dtype: str) -> bool:
    """Integer datasets marked as labels, named like labels, or wider than 16 bits."""
    if not (dtype.startswith("uint") or dtype.startswith("int")):
        return False
    marked = attrs.get("layer_type") or attrs.get("kind")
    if marked in ("labels", "segmentation"):
        return True
    if marked in ("image", "intensity", "raw"):
        return False
    parts = [p for p in key.split("/") if p]
    # the dataset's own name first (a pyramid level's: its group's), then the groups above it:
    # COSEM's labels/mito_pred is a prediction image, HeLa_cells/raw the EM
    while parts and (_LEVEL_RE.match(parts[-1]) or parts[-1].isdigit()):
        parts.pop()
    if parts:  # its last word that tells: pred_labels, raw_mask are labels; cells_raw an image
        for word in reversed([w for w in re.split(r"[^a-z0-9]+", parts[-1].lower()) if w]):
            if word in _IMAGE_WORDS:
                return False
            if _LABEL_NAME_RE.search(word):
                return True
        if _LABEL_NAME_RE.search(parts[-1]):  # a label word inside another (neuronids)
            return True
    if any(_LABEL_NAME_RE.search(part) for part in parts[:-1]):
        return True
    return dtype in ("uint32", "uint64", "int32", "int64")


# ----------------------------------------------------------------------------------------------
# container and tree


@dataclass(frozen=True)
class Node:
    """One entry of a container's tree."""

    key: str  # "" for the root
    kind: str  # "dataset" | "multiscale" | "group"
    attrs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    levels: tuple[str, ...] = ()  # keys of the pyramid levels, finest first (multiscale only)


def find_container_root(path: str) -> tuple[str, str]:
    """Split a path to a container or to a group/dataset inside one into (root, key).

    The root is the nearest enclosing folder named ``*.n5`` / ``*.zarr``; without such a name, the
    highest folder of an unbroken chain of folders holding ``attributes.json``.
    """
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(len(parts), 0, -1):
        if parts[i - 1].lower().endswith((".n5", ".zarr")):
            root = os.sep.join(parts[:i]) or os.sep
            return root, "/".join(parts[i:])
    root = path
    while True:
        parent = os.path.dirname(root)
        if parent == root or not os.path.exists(os.path.join(parent, ATTRS)):
            break
        root = parent
    rel = os.path.relpath(path, root)
    return root, "" if rel == "." else rel.replace(os.sep, "/")


def is_container(root: str) -> bool:
    """A folder with N5/zarr metadata at its top, or a ``*.n5``/``*.zarr`` folder with metadata
    only further down (tensorstore writes no root ``attributes.json``)."""
    if not os.path.isdir(root):
        return False
    if any(
        os.path.exists(os.path.join(root, m)) for m in (ATTRS, ".zgroup", ".zarray", "zarr.json")
    ):
        return True
    if not root.lower().rstrip(os.sep).endswith((".n5", ".zarr")):
        return False
    # tensorstore writes no root attributes.json: look a few levels down for a dataset
    for dirpath, dirnames, filenames in os.walk(root):
        if ATTRS in filenames:
            return True
        depth = os.path.relpath(dirpath, root).count(os.sep)
        if depth >= 3:
            dirnames[:] = []
        else:
            dirnames[:] = [d for d in dirnames if not d.isdigit()]
    return False


def is_zarr(root: str) -> bool:
    return any(os.path.exists(os.path.join(root, m)) for m in (".zgroup", ".zarray", "zarr.json"))


def is_level_name(name: str) -> bool:
    """Whether ``name`` is a pyramid level's name in the ``s0, s1, …`` convention."""
    return bool(_LEVEL_RE.match(name))


def multiscale_paths(attrs: dict[str, Any]) -> list[str] | None:
    """The level paths a group's ``multiscales`` lists (OME-NGFF, as Fiji's N5 export and
    n5-universe write it into N5; COSEM), finest first; None without a usable list."""
    entries = attrs.get("multiscales")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    datasets = entries[0].get("datasets")
    if not isinstance(datasets, list) or not datasets:
        return None
    paths = [d.get("path") if isinstance(d, dict) else None for d in datasets]
    if not all(
        isinstance(p, str) and p.strip("/") and ".." not in p.split("/") and not p.startswith(".")
        for p in paths
    ):
        return None
    return [p.strip("/") for p in paths]


def with_group_transform(attrs: dict[str, Any], group: dict[str, Any], name: str) -> dict[str, Any]:
    """A pyramid level's attributes, with what its group's ``multiscales`` says of it where the
    level says nothing itself: OME-NGFF's ``coordinateTransformations`` (scale, translation;
    the axes' names and units) or a COSEM ``transform``, as a ``transform``; the axes' names as
    ``axes``."""
    paths = multiscale_paths(group)
    own = ("transform", "pixelResolution", "resolution", "downsamplingFactors", "pixelWidth")
    if not paths or name not in paths or any(k in attrs for k in own):
        return attrs
    entry = group["multiscales"][0]
    level = entry["datasets"][paths.index(name)]
    out = dict(attrs)
    if isinstance(level.get("transform"), dict):  # COSEM: the level's transform on the group
        out["transform"] = level["transform"]
        return out
    axes = entry.get("axes")
    if not isinstance(axes, list) or not axes:
        return attrs
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    if not all(isinstance(n, str) and n for n in names):
        return attrs
    if "coordinateTransformations" not in level and "coordinateTransformations" not in entry:
        return attrs  # OME-NGFF 0.3 and before: no voxel size said there
    scale, translate = _ngff_transforms(level.get("coordinateTransformations"), len(names))
    outer_scale, outer_translate = _ngff_transforms(
        entry.get("coordinateTransformations"), len(names)
    )  # the whole multiscale's, applied after the level's
    if scale is None or outer_scale is None:
        return attrs
    translate = [o * t + u for o, t, u in zip(outer_scale, translate, outer_translate, strict=True)]
    scale = [o * v for o, v in zip(outer_scale, scale, strict=True)]
    lowered = [n.lower() for n in names]
    order = "F" if lowered[0] == "x" and lowered[-1] != "x" else "C"
    out["transform"] = {
        "axes": names, "scale": scale, "translate": translate, "units": units, "order": order,
    }  # fmt: skip
    if "axes" not in attrs:
        out["axes"] = lowered
    return out


def _ngff_transforms(transforms: Any, ndim: int) -> tuple[list[float] | None, list[float]]:
    """Scale and translation of an OME-NGFF ``coordinateTransformations`` list (ones and zeros
    where absent); scale None where the list cannot be read."""
    scale, translate = [1.0] * ndim, [0.0] * ndim
    if transforms is None:
        return scale, translate
    if not isinstance(transforms, list):
        return None, translate
    for t in transforms:
        kind = t.get("type") if isinstance(t, dict) else None
        values = t.get(kind) if kind in ("scale", "translation") else None
        if kind == "identity":
            continue
        if not isinstance(values, list) or len(values) != ndim:
            return None, translate
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return None, translate
        if kind == "scale":
            scale = [a * b for a, b in zip(scale, numbers, strict=True)]
            translate = [a * b for a, b in zip(translate, numbers, strict=True)]
        else:
            translate = [a + b for a, b in zip(translate, numbers, strict=True)]
    return scale, translate


def pyramid_levels(directory: str, attrs: dict[str, Any]) -> tuple[str, ...]:
    """Names of the levels of a pyramid group, finest first; ``()`` if not one: the paths its
    ``multiscales`` lists (OME-NGFF, COSEM), else its ``s0, s1, …`` datasets."""
    paths = multiscale_paths(attrs)
    if paths:
        levels = [(i, p) for i, p in enumerate(paths)]
    else:
        try:
            names = os.listdir(directory)
        except OSError:
            return ()
        levels = sorted(
            (int(m.group(1)), n)
            for n in names
            if (m := _LEVEL_RE.match(n)) and os.path.isdir(os.path.join(directory, n))
        )
    if not levels or levels[0][0] != 0:
        return ()
    out: list[str] = []
    previous: dict[str, Any] = {}
    for expected, (idx, name) in enumerate(levels):
        if idx != expected:
            log.warning(
                "%s: pyramid level(s) %s left out (the level before them, s%d, is missing)",
                directory, ", ".join(n for _, n in levels[expected:]), expected,
            )  # fmt: skip
            break
        level_dir = os.path.join(directory, name)
        level = read_attrs(level_dir) if os.path.isdir(level_dir) else {}
        if not is_dataset_attrs(level):
            break
        if previous and not _coarser_level(previous, level):
            if not _sane_level(previous):  # the finer level is what is wrong: said when opened
                break
            rest = [n for i, n in levels[expected:]]
            log.warning(
                "%s: pyramid level(s) %s left out (a level needs the number of dimensions and "
                "the data type of %s, and no axis longer than the level before)",
                directory, ", ".join(rest), out[0],
            )  # fmt: skip
            break
        out.append(name)
        previous = level
    if not out and paths:  # a multiscales list naming no dataset here: the s0, s1, … there are
        return pyramid_levels(directory, {k: v for k, v in attrs.items() if k != "multiscales"})
    return tuple(out)


def _sane_level(attrs: dict[str, Any]) -> bool:
    """Whether a level passes the checks it meets when opened (its dimensions and data type
    can then be compared with another's)."""
    try:
        check_dataset_attrs(attrs, "")
    except VolumeError:
        return False
    return True


def _coarser_level(finer: dict[str, Any], level: dict[str, Any]) -> bool:
    """Whether ``level`` can follow ``finer`` in a pyramid: as many dimensions, the same data
    type, and no axis longer (napari refuses a pyramid whose levels differ so)."""
    dims, finer_dims = level.get("dimensions"), finer.get("dimensions")
    if not isinstance(dims, list) or not isinstance(finer_dims, list):
        return False
    if len(dims) != len(finer_dims) or level.get("dataType") != finer.get("dataType"):
        return False
    try:
        return all(int(n) <= int(m) for n, m in zip(dims, finer_dims, strict=True))
    except (TypeError, ValueError):
        return False


#: attribute of a :func:`walk_tree` node that is a dataset whose metadata cannot be read: why
BROKEN = "emparsl_broken"


def _chunk_folders_only(directory: str, children: list[str]) -> bool:
    """Whether a folder without attributes.json holds N5 chunks only: names of digits, down to
    a chunk file, with no attributes.json on the way — a dataset that lost its metadata. A
    group (z5py writes none for groups) of groups or datasets named 0, 1, … (time points,
    OME-NGFF levels) has attributes.json or other names below: not."""
    names = [c for c in children if not c.startswith(".")]
    for _ in range(8):  # N5 chunk paths are one folder per axis, then the chunk file
        if not names or not all(c.isdigit() for c in names):
            return False
        if any(os.path.exists(os.path.join(directory, c, ATTRS)) for c in names):
            return False
        first = os.path.join(directory, sorted(names)[0])
        if os.path.isfile(first):
            return True  # a chunk file
        try:
            directory, names = first, [c for c in os.listdir(first) if not c.startswith(".")]
        except OSError:
            return False
    return False


def dataset_above(directory: str) -> tuple[str, str] | None:
    """The container and dataset key of the dataset ``directory`` lies inside (a folder of its
    chunks, ``data.n5/raw/0/1``), or None."""
    root, key = find_container_root(directory)
    parts = key.split("/") if key else []
    for i in range(len(parts)):  # (0: a dataset that is the container itself)
        prefix = "/".join(parts[:i])
        try:
            attrs = read_attrs(os.path.join(root, prefix))
        except VolumeError:
            return None
        if is_dataset_attrs(attrs):
            return root, prefix
    return None


def _chunk_folder(directory: str) -> str | None:
    """What to say of ``directory`` when it is a folder of a dataset's chunks, else None."""
    above = dataset_above(directory)
    if above is None:
        return None
    root, key = above
    if not key:  # the container is the dataset
        return (
            f"{directory} is a folder of chunks of the dataset {root}, not a dataset; give {root}."
        )
    return (
        f"{directory} is a folder of chunks of the dataset {root}:{key}, not a dataset; give "
        f"that dataset ({root}:{key}) or the container ({root})."
    )


def walk_tree(root: str) -> list[Node]:
    """All groups, datasets and pyramids of a container (JSON only, no chunk is read).

    A folder is visited once: a link back up the tree (``latest -> .``) is not followed again.
    A dataset inside whose metadata cannot be read (a corrupt attributes.json, or none beside
    its chunks) is listed as a dataset with :data:`BROKEN` saying why, and the rest of the
    container as it is (one such file hid every dataset of its container).
    """
    nodes: list[Node] = []
    visited: set[str] = set()

    def visit(directory: str, key: str) -> None:
        real = os.path.realpath(directory)
        if real in visited:
            log.debug("%s: already listed (a link back into the container), not followed", key)
            return
        visited.add(real)
        try:
            attrs = read_attrs(directory)
        except VolumeError as err:
            if not key:  # the container's own: nothing of it can be trusted
                raise
            nodes.append(Node(key, "dataset", {BROKEN: str(err)}))
            return
        if not attrs and not os.path.exists(os.path.join(directory, ATTRS)):
            try:
                lost = _chunk_folders_only(directory, os.listdir(directory))
            except OSError:
                lost = False
            if lost:
                inside = _chunk_folder(directory)  # chosen inside a dataset: not lost at all
                if inside is not None and not key:
                    raise VolumeError(inside)
                nodes.append(Node(key, "dataset", {BROKEN: inside or (
                    f"{directory} holds chunk folders but no attributes.json (the dataset's "
                    "shape, type and chunking); restore it from a backup or re-export the "
                    "dataset."
                )}))  # fmt: skip
                return
        if is_dataset_attrs(attrs):
            nodes.append(Node(key, "dataset", attrs))
            return  # chunk folders below are not groups
        try:
            levels = pyramid_levels(directory, attrs)
        except VolumeError as err:  # a level's metadata cannot be read: the pyramid, why
            if not key:
                raise
            nodes.append(Node(key, "dataset", {BROKEN: str(err)}))
            return
        if levels:
            nodes.append(Node(key, "multiscale", attrs, levels))
        else:
            nodes.append(Node(key, "group", attrs))
        try:
            children = sorted(os.listdir(directory))
        except OSError:
            return
        if isinstance(attrs.get("painteraData"), dict) and "data" in children:
            # a Paintera source: its image or labels are `data`; `unique-labels`,
            # `label-to-block-mapping` and `fragment-segment-assignment` are Paintera's own
            # look-up tables (varlength chunks napari cannot draw)
            children = ["data"]
        for child in children:
            sub = os.path.join(directory, child)
            if os.path.isdir(sub) and not child.startswith("."):
                visit(sub, f"{key}/{child}" if key else child)

    visit(root, "")
    return nodes
