"""Volume: the only z5py / N5 / dask code of the package.

A :class:`Volume` is one dataset of an N5 (or zarr v2) container seen as a lazy dask array whose
chunks are the storage chunks, plus what is needed to place it in the world: voxel size, unit,
offset and axis names, all in C order (z, y, x). When the dataset is a pyramid group
(``s0, s1, …``) the volume is its finest level and :attr:`Volume.pyramid` gives all levels.

Nothing is read when a volume is opened except the small JSON metadata files; chunks are read
when the dask array is computed, and a missing chunk reads as the fill value (0), N5's rule.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

import numpy as np
import z5py

from napari_emparsl.core.n5attrs import (
    ATTRS,
    BROKEN,
    N5_DTYPES,
    Node,
    VolumeError,
    ancestor_attrs,
    axes_c_order,
    bdv_setup_attrs,
    check_dataset_attrs,
    compression_of,
    find_container_root,
    is_container,
    is_dataset_attrs,
    is_level_name,
    is_zarr,
    level_index,
    looks_like_labels,
    multiscale_paths,
    pyramid_levels,
    read_attrs,
    voxel_size_of,
    walk_tree,
    with_group_transform,
)
from napari_emparsl.core.paths import spec_text, user_path

if TYPE_CHECKING:  # dask.array takes ~0.3 s to import: a block worker only reads with z5py
    import dask.array as da

__all__ = [
    "Volume",
    "VolumeError",
    "check_output_free",
    "container_tree",
    "downsample_block",
    "hidden_output",
    "next_level_problem",
    "openable_in_tree",
    "openable_keys",
    "output_level_factors",
    "parse_spec",
    "pyramid_factors",
    "save_array",
    "stale_levels",
    "suggest_output",
    "sync_region",
    "volume_stats",
    "write_pyramid",
]

LOCK_SUFFIX = ".emparsl-lock"  # a run's lock file beside its output dataset (ledger.OutputLock)
WRITE_ID = "emparsl_written"
"""Attribute of each dataset (and pyramid group) emparsl writes: a random id made anew by each
writing (an import, a sample, a run's output created or replaced). A run records its input's id
in its ledger, so that resuming after the input was written again is refused — by id or by
path the input would look the same, and the blocks done before came from what it held then."""
UNFINISHED = "emparsl_unfinished"
"""Attribute of a dataset still being written by an import, a napari save or `emparsl sample`
(removed once its last chunk is written): a writer killed mid-way (kill -9, a node's failure)
leaves it, and runs and `evaluate` refuse such an input instead of reading its missing chunks
as zeros."""

_WRITABLE_DTYPES = set(N5_DTYPES)


class _TolerantFile(z5py.File):
    """z5py.File that opens N5 containers without a root ``attributes.json`` (as tensorstore
    writes them) or whose root ``attributes.json`` has no ``"n5"`` version (``{}``, or only
    ``pixelResolution``); z5py itself refuses the first and fails inside on the second."""

    def _check_version(self) -> None:
        if self._handle.is_zarr():
            super()._check_version()
            return
        self._zarr_format = 2
        root = self._handle.path()
        version = read_attrs(root).get("n5")  # the root's JSON, read here (VolumeError if bad)
        if version is None:
            return  # no version said: nothing to check
        try:
            major = int(str(version).strip().split(".")[0])
        except ValueError:
            return  # a version that is not a number: read it as an N5 one can
        if major > 4:
            raise VolumeError(
                f"The container {root} is N5 version {version}, newer than this version reads "
                "(up to 4.x); save it again in an older N5 format (e.g. Fiji > N5 export)."
            )


def _open_file(root: str, mode: str = "r") -> z5py.File:
    try:
        return _TolerantFile(root, mode, use_zarr_format=is_zarr(root))
    except (RuntimeError, OSError) as err:
        raise VolumeError(f"Cannot open the container {root} ({_first_line(err)}).") from None


def _dataset(root: str, key: str, mode: str = "r") -> z5py.Dataset:
    """The z5py dataset ``root:key``; ``key`` "" is a dataset at the container's root (N5 allows
    it), which z5py opens only by name: as the dataset named after its folder, from the folder
    above."""
    if key:
        return _open_file(root, mode)[key]
    parent, name = os.path.split(os.path.abspath(root).rstrip(os.sep))
    return _open_file(parent, mode)[name]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def _meant_writable(folder: str) -> bool:
    """Whether outputs may be suggested in ``folder``: this user may write there, and — for
    root, who may write anywhere — its mode lets someone write (a data folder made read-only
    on purpose, ``chmod a-w``, got a run's predictions written into it)."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        return os.geteuid() != 0 or bool(os.stat(folder).st_mode & 0o222)
    except (AttributeError, OSError):  # no euid (Windows), or gone
        return True


def suggest_output(root: str, key: str) -> str:
    """Where a run's output goes unless told: ``predictions/<name>`` in the input's container,
    or, where that cannot be written (a read-only data disk), in a container of the same name
    in ``~/emparsl-predictions``."""
    parts = [p for p in key.split("/") if p]
    if parts and level_index(root, "/".join(parts)) is not None:
        parts.pop()  # one level of a pyramid (raw/s0): named after its pyramid
    if len(parts) > 1 and parts[-1] == "data":  # Paintera's raw/data: named after its source
        parts.pop()
    home = os.path.join(os.path.expanduser("~"), "emparsl-predictions")
    if not parts:  # the container's root is the volume: nothing can go inside it
        base = os.path.normpath(root)
        stem = os.path.basename(base)
        stem = stem[:-3] if stem.lower().endswith(".n5") else stem
        folder = os.path.dirname(base)
        folder = folder if _meant_writable(folder or ".") else home
        return f"{os.path.join(folder, stem + '-predictions.n5')}:predictions"
    if not _meant_writable(root):
        root = os.path.join(home, os.path.basename(os.path.normpath(root)))
    return f"{root}:predictions/{parts[-1]}"


def hidden_output(root: str, key: str) -> str | None:
    """Where a dataset written at ``key`` would be hidden, said in words, or None: inside a
    pyramid group (its levels are all it shows) or a Paintera source (which shows its
    ``data``)."""
    parts = [p for p in key.split("/") if p]
    if any(p.startswith(".") for p in parts):  # what the tree leaves out (imports' own files)
        return "a hidden folder (a name starting with a dot), where nothing is listed or opened"
    for n in range(len(parts)):  # the groups above the dataset, the root first
        above = "/".join(parts[:n])
        directory = os.path.join(root, above) if above else root
        if not os.path.isdir(directory):
            break
        try:
            attrs = read_attrs(directory)
        except VolumeError:
            continue
        if is_dataset_attrs(attrs):
            break  # refused elsewhere: a dataset holds nothing
        where = above or f"at the root of {root}"
        below = "/".join(parts[n:])  # the key from this group down
        levels = pyramid_levels(directory, attrs)
        # a level of the pyramid, or its next one (s3 after s0–s2), is listed; another (s5
        # after s0–s2) was written, then left out of the pyramid
        listed = below in levels or (
            n == len(parts) - 1
            and is_level_name(below)
            and not multiscale_paths(attrs)
            and below == f"s{len(levels)}"
        )
        if levels and not listed:
            return f"the pyramid {where}, where nothing but its levels is listed or opened"
        if isinstance(attrs.get("painteraData"), dict) and parts[n] != "data":
            return f"the Paintera source {where}, where nothing but its data is listed or opened"
    return None


def _pyramid_above(root: str, key: str) -> tuple[str, str, str, tuple[str, ...]] | None:
    """For ``key`` = ``GROUP/NAME``: GROUP, NAME, GROUP's folder and its pyramid levels (``()``
    for a group that is no pyramid); None where GROUP is a dataset or cannot be read."""
    parts = [p for p in key.split("/") if p]
    if not parts:
        return None
    above = "/".join(parts[:-1])
    directory = os.path.join(root, above) if above else root
    try:
        attrs = read_attrs(directory)
    except VolumeError:
        return None
    if is_dataset_attrs(attrs):
        return None
    return above, parts[-1], directory, pyramid_levels(directory, attrs)


def stale_levels(root: str, key: str) -> str | None:
    """Where ``key`` is a level of a pyramid of several levels (``raw/s0`` of ``raw``: s0, s1,
    s2), what writing it alone would leave, said in words: "… is level s0 of the pyramid raw,
    whose other levels (s1, s2) would keep what they hold"; None otherwise. A level written
    anew, its pyramid's other levels showed the old data when napari zoomed out."""
    found = _pyramid_above(root, key)
    if found is None:
        return None
    above, level, _, levels = found
    if level not in levels or len(levels) < 2:
        return None
    others = ", ".join(v for v in levels if v != level)
    where = above or f"at the root of {root}"
    return (
        f"{root}:{key} is level {level} of the pyramid {where}, whose other levels ({others}) "
        "would keep what they hold"
    )


def next_level_problem(root: str, key: str, shape: Sequence[int], dtype: Any) -> str | None:
    """Where ``key`` is a pyramid's next level (``raw/s3`` after s0–s2), why a dataset of
    ``shape`` and ``dtype`` there would be left out of the pyramid (another data type, or an
    axis longer than the level before: the pyramid lists it no more), in words; else None."""
    found = _pyramid_above(root, key)
    if found is None:
        return None
    _, level, directory, levels = found
    if not levels or level != f"s{len(levels)}":
        return None
    try:
        last = read_attrs(os.path.join(directory, levels[-1]))
    except VolumeError:
        return None
    finer = [int(n) for n in reversed(last.get("dimensions") or [])]  # (N5 order: x first)
    if np.dtype(dtype).name != last.get("dataType") or len(finer) != len(shape):
        return f"would be a level of {np.dtype(dtype).name} in a pyramid of {last.get('dataType')}, which leaves it out"
    if any(int(n) > m for n, m in zip(shape, finer, strict=True)):
        return (
            f"({'×'.join(map(str, shape))}) would be a level larger than the one before it "
            f"({'×'.join(map(str, finer))}), which the pyramid leaves out"
        )
    return None


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``PATH.n5:DATASET`` into ``(PATH.n5, DATASET)``; the key is ``""`` when absent.
    The path may be typed as a person would (``~/data.n5``, quoted — also the path alone, as
    pasted before ``:KEY`` was typed: ``'/a b/s.n5':raw``): see :func:`user_path`.

    The split is at the first ``:`` after a folder named ``*.n5`` / ``*.zarr`` (also after a
    folder inside it: ``s.n5/labels:cells``), so a colon in a folder above it
    (``exp:1/out.n5``) stays in the path and one in the dataset name after it
    (``c.n5:raw:v2``) stays in the key; a path with such a folder but no colon after it has no
    key. Without such a folder (a container named otherwise), the split is at the last colon
    whose path part exists, else at the last colon.
    """
    spec = user_path(spec)
    if ":" not in spec or os.path.exists(spec):
        return spec, ""
    if spec.startswith(":"):
        raise VolumeError(
            f"{spec} names no container before the colon; give it as PATH.n5:DATASET (e.g. "
            f"out.n5{spec})."
        )
    # "C:\\data" is a drive letter on Windows only: elsewhere x:raw is container x, dataset raw
    drive = os.name == "nt" and re.match(r"^[A-Za-z]:[/\\]", spec) is not None
    colons = [i for i, ch in enumerate(spec) if ch == ":" and not (drive and i == 1)]

    def container(text: str) -> bool:
        return any(p.lower().endswith((".n5", ".zarr")) for p in re.split(r"[/\\]", text))

    for i in colons:  # the first colon inside the container (s.n5:raw, s.n5/labels:cells)
        if container(user_path(spec[:i])):  # also quoted alone: '/a b/s.n5':raw:v2
            return user_path(spec[:i]), check_key(spec[i + 1 :].strip("/"), spec)
    existing = [i for i in colons if os.path.exists(user_path(spec[:i]))]
    found = re.search(r"(?:^|[/\\])([^/\\]*\.(?:n5|zarr))(?=$|[/\\])", spec, re.IGNORECASE)
    if found:  # every colon is before the container's folder
        # part of the path (exp:1/out.n5), unless only what lies before a colon exists
        # (vol:exports/a.n5, vol existing: the dataset exports/a.n5 in the container vol)
        folder = spec[: found.start(1)].rstrip("/\\")
        if not existing or (":" in folder and os.path.isdir(folder)):
            return spec, ""
    if not colons:
        return spec, ""
    i = existing[-1] if existing else colons[-1]
    return user_path(spec[:i]), check_key(spec[i + 1 :].strip("/"), spec)


def check_key(key: str, where: str = "") -> str:
    """A dataset name is a path inside its container: ``..`` would write beside it."""
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise VolumeError(
            f"The dataset name {key!r}{f' in {where}' if where else ''} is not a path inside "
            "the container (no '..', '.' or '//' in it); give a name such as pred or "
            "labels/pred."
        )
    return key


class _ChunkReader:
    """Array-like over one z5py dataset for ``dask.array.from_array``.

    Pickles by path (z5py handles do not pickle), so dask graphs can travel to other processes,
    and turns z5py's decoding errors into a sentence that names the broken chunk file.
    """

    def __init__(self, root: str, key: str, shape: tuple[int, ...], dtype: np.dtype):
        self.root, self.key = root, key
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)
        self._ds = None
        self._stamp: tuple[int, ...] | None = None  # of the attributes the handle was made with

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_ds"} | {"_ds": None}

    def _attrs_stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(os.path.join(self.root, self.key, "attributes.json"))
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def ds(self) -> z5py.Dataset:
        # the dataset written anew since (an import --overwrite, a layer saved over it, in
        # this process or another): z5py's handle keeps the old chunk size, type and
        # compression, and reading with it crashed the process (heap corruption, SIGABRT in
        # napari); a new handle reads it as it is now, or it is said to have changed
        stamp = self._attrs_stamp()
        ds = self._ds  # one look (napari reads from several threads)
        if ds is None or stamp != self._stamp:
            ds = _dataset(self.root, self.key)
            if tuple(ds.shape) != self.shape or np.dtype(ds.dtype) != self.dtype:
                now, was = "×".join(map(str, ds.shape)), "×".join(map(str, self.shape))
                raise VolumeError(
                    f"{spec_text(self.root, self.key)} was written anew since it was opened "
                    f"(now {now} {np.dtype(ds.dtype)}, was {was} {self.dtype}); open it again "
                    "(remove its layer first)."
                )
            self._ds, self._stamp = ds, stamp
        return ds

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        try:
            return self.ds[index]
        except RuntimeError as err:
            raise self._chunk_error(index, err) from None

    def _chunk_error(self, index: tuple[slice, ...], err: RuntimeError) -> VolumeError:
        ds = self.ds
        if not isinstance(index, tuple):
            index = (index,)
        ranges = []
        for sl, n, c in zip(index, self.shape, ds.chunks, strict=False):
            start, stop, _ = sl.indices(n) if isinstance(sl, slice) else (sl, sl + 1, 1)
            ranges.append(range(start // c, max(start // c + 1, -(-stop // c))))
        for idx in product(*ranges):
            try:
                ds.read_chunk(idx)
            except RuntimeError as chunk_err:
                sep = "." if ds.is_zarr else "/"
                parts = idx if ds.is_zarr else tuple(reversed(idx))
                path = os.path.join(self.root, self.key, sep.join(str(i) for i in parts))
                return VolumeError(
                    f"The chunk file {path} is truncated or corrupt ({_first_line(chunk_err)}); "
                    "restore it, or delete it so that it reads as empty."
                )
        return VolumeError(
            f"Reading {self.root}:{self.key} failed ({_first_line(err)}); check the files."
        )


@dataclass
class Volume:
    """One N5 dataset (or the finest level of a pyramid) as a lazy dask array with geometry.

    Attributes
    ----------
    root, key
        Container folder and dataset key (the pyramid group's key for a multiscale volume).
    shape, dtype, chunks
        Of the finest level, C order.
    voxel_size, unit, offset
        Spatial axes only (channels excluded), C order, world units.
    axes
        Axis names in C order, e.g. ``("z", "y", "x")``.
    levels
        Dataset keys of the pyramid levels, finest first (one entry for a plain dataset).
    """

    root: str
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    compression: str
    voxel_size: tuple[float, ...]
    unit: str
    offset: tuple[float, ...]
    axes: tuple[str, ...]
    attrs: dict[str, Any] = field(repr=False)
    levels: tuple[str, ...] = ()
    level_voxel_sizes: tuple[tuple[float, ...], ...] = ()
    _arrays: dict[str, da.Array] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------
    # opening

    @classmethod
    def open(cls, path: str | os.PathLike, key: str = "") -> Volume:
        """Open a dataset lazily: reads only its ``attributes.json`` files.

        Parameters
        ----------
        path
            The container folder (``*.n5``), or a group/dataset folder inside it; or
            ``DATA.n5:DATASET`` when ``key`` is not given.
        key
            Dataset or pyramid group inside ``path``. Optional when ``path`` is a dataset or the
            container holds just one.

        Raises
        ------
        VolumeError
            With one sentence saying what is wrong and what to do.
        """
        path = user_path(path)
        if not path:
            raise VolumeError("No volume was given; give it as DATA.n5:DATASET.")
        if not key and not os.path.exists(path):  # "DATA.n5:DATASET", as everywhere else
            path, key = parse_spec(path)
        if not os.path.exists(path):
            raise VolumeError(f"{path} does not exist; check the path.")
        if not os.path.isdir(path):
            raise VolumeError(
                f"{path} is a file, not an N5 container (a folder such as data.n5); "
                "convert images with `emparsl import`."
            )
        root, sub = find_container_root(path)
        if not is_container(root):
            raise VolumeError(
                f"{path} is not an N5 or zarr container (no attributes.json inside); pick the "
                ".n5 folder, or convert your images with `emparsl import`."
            )
        if is_zarr(root):
            raise VolumeError(
                f"{root} is a zarr container, which this version does not open yet; convert it "
                "to N5 (e.g. with z5py or BigDataViewer) and open that."
            )
        full_key = "/".join(p for p in (sub, key.strip("/")) if p)
        node = _resolve(root, full_key)
        return cls._from_node(root, node)

    @classmethod
    def _from_node(cls, root: str, node: Node) -> Volume:
        if node.kind == "multiscale":
            level_keys = tuple(f"{node.key}/{lv}" if node.key else lv for lv in node.levels)
            ancestors = [node.attrs, *ancestor_attrs(root, node.key)] if node.key else [node.attrs]
            indices: list[int | None] = list(range(len(level_keys)))
        else:
            level_keys = (node.key,)
            ancestors = ancestor_attrs(root, node.key)
            indices = [level_index(root, node.key)]
        parent_attrs = ancestors[0] if ancestors else {}
        level_attrs = [read_attrs(os.path.join(root, k)) for k in level_keys]
        # what the pyramid group's multiscales list says of a level (OME-NGFF, COSEM)
        if node.kind == "multiscale":
            level_attrs = [
                with_group_transform(a, node.attrs, name)
                for a, name in zip(level_attrs, node.levels, strict=True)
            ]
        elif indices[0] is not None:
            name = node.key.rpartition("/")[2]
            level_attrs = [with_group_transform(level_attrs[0], parent_attrs, name)]
        if any(a.get("isLabelMultiset") is True for a in (node.attrs, *level_attrs)):
            # varlength chunks of label lists per voxel: z5py reads them as bytes, or fails
            raise VolumeError(
                f"{root}:{node.key} is a Paintera label multiset, which this version cannot "
                "read; export it as a plain label dataset (e.g. with `paintera-convert "
                "to-scalar`) and open that."
            )
        for k, a in zip(level_keys, level_attrs, strict=True):
            check_dataset_attrs(a, f"{root}:{k}")
        try:
            ds = _dataset(root, level_keys[0])
        except (RuntimeError, KeyError) as err:
            raise VolumeError(
                f"Cannot open dataset {root}:{level_keys[0]} ({_first_line(err)}); check the "
                "settings in its attributes.json (compression, dataType, blockSize, dimensions), "
                "or write the dataset again."
            ) from None
        ndim = ds.ndim
        attrs0 = level_attrs[0]
        own_axes = "axes" in attrs0 or "numChannels" in attrs0  # numChannels: ImageJ's
        axes, _ = axes_c_order(attrs0 if own_axes else parent_attrs, ndim)
        sizes = []
        for a, index in zip(level_attrs, indices, strict=True):
            vs, unit, offset0 = voxel_size_of(a, ndim, ancestors, index)
            sizes.append(vs)
            if len(sizes) == 1:
                unit0, offset = unit, offset0
        return cls(
            root=root,
            key=node.key,
            shape=tuple(int(s) for s in ds.shape),
            dtype=np.dtype(ds.dtype),
            chunks=tuple(int(c) for c in ds.chunks),
            compression=compression_of(attrs0) if attrs0 else str(ds.compression),
            voxel_size=sizes[0],
            unit=unit0,
            offset=offset,
            axes=axes,
            attrs=node.attrs if node.kind == "multiscale" else attrs0,
            levels=level_keys,
            level_voxel_sizes=tuple(sizes),
        )

    # ------------------------------------------------------------------------------------------
    # data

    def level(self, i: int) -> da.Array:
        """Lazy dask array of pyramid level ``i`` (chunks = storage chunks)."""
        key = self.levels[i]
        if key not in self._arrays:
            import dask.array as da

            ds = _dataset(self.root, key)
            reader = _ChunkReader(self.root, key, tuple(ds.shape), ds.dtype)
            # a fresh name per open: dask/napari caches must never mix two versions of a dataset
            name = f"n5-{os.path.basename(self.root)}-{key}-{uuid.uuid4().hex[:8]}"
            self._arrays[key] = da.from_array(
                reader,
                chunks=tuple(ds.chunks),
                name=name,
                lock=False,
                asarray=True,
                fancy=False,
                meta=np.empty((0,) * ds.ndim, dtype=ds.dtype),
            )
        return self._arrays[key]

    @property
    def data(self) -> da.Array:
        """The finest level, lazily."""
        return self.level(0)

    @property
    def pyramid(self) -> list[da.Array]:
        """All levels, finest first (a one-element list for a plain dataset)."""
        return [self.level(i) for i in range(len(self.levels))]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape without its channel axis (z, y, x; a time axis stays)."""
        return tuple(n for n, a in zip(self.shape, self.axes, strict=True) if a != "c")

    @property
    def is_multiscale(self) -> bool:
        return len(self.levels) > 1

    @property
    def is_labels(self) -> bool:
        return looks_like_labels(self.key, self.attrs, self.dtype.name)

    @property
    def class_names(self) -> list[str]:
        """A labels output's class names (``class_names``), also for one level of a pyramid
        (named on its group); empty when it has none."""
        names = self.attrs.get("class_names")
        if not names and "/" in self.key:
            names = read_attrs(os.path.join(self.root, self.key.rsplit("/", 1)[0])).get(
                "class_names"
            )
        return [str(n) for n in names] if isinstance(names, list) else []

    @property
    def class_colors(self) -> dict[int, str]:
        """A labels output's colour per class id (``class_colors``: ``#rrggbbaa``, one per class
        name, as its model declared them), also for one level of a pyramid; empty when it has
        none or they do not read as colours."""
        colors = self.attrs.get("class_colors")
        if not colors and "/" in self.key:
            colors = read_attrs(os.path.join(self.root, self.key.rsplit("/", 1)[0])).get(
                "class_colors"
            )
        if not isinstance(colors, list) or not all(
            isinstance(c, str) and re.fullmatch(r"#[0-9a-fA-F]{8}", c) for c in colors
        ):
            return {}
        return dict(enumerate(c.lower() for c in colors))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def sample(self, max_voxels: int = 2_000_000, written_only: bool = False) -> np.ndarray:
        """Voxels of the finest level for global statistics (what a model sees), flat: all of a
        volume of at most ~``max_voxels``, else whole chunks spread evenly over its chunk grid
        until ~``max_voxels`` (a pyramid's coarser levels are averages: their spread is smaller,
        and a volume's normalization must not depend on whether it has a pyramid).

        ``written_only``: where fewer than half the picks are chunks ever written (N5 reads the
        others as zeros: the padding around an acquisition, the unwritten rest of a sparse
        volume), the picks are spread over the written chunks instead (found by listing the
        dataset's folder) — evenly spaced picks then hit mostly zeros, and a model normalized
        by them saw its data 3–8 standard deviations off. A volume mostly written keeps every
        pick (z5py leaves all-zero chunks unwritten: its zeros are data).

        Read chunk by chunk with z5py (no dask: a coordinator that only plans and submits blocks
        never pays dask's import), in a few threads.
        """
        from concurrent.futures import ThreadPoolExecutor

        key = self.levels[0]
        ds = _dataset(self.root, key)
        shape, chunks = tuple(ds.shape), tuple(ds.chunks)
        reader = _ChunkReader(self.root, key, shape, ds.dtype)
        counts = tuple(-(-n // c) for n, c in zip(shape, chunks, strict=True))
        total = math.prod(counts)
        wanted = -(-max_voxels // int(np.prod(chunks)))
        # evenly spaced over the grid (deterministic), without a list of every chunk (16 M of
        # them for a TB volume in 32³ chunks: 1.2 GB)
        picks = np.unique(np.linspace(0, total - 1, min(wanted, total)).round().astype(np.int64))
        indices = [
            tuple(int(v) for v in i) for i in zip(*np.unravel_index(picks, counts), strict=True)
        ]
        if written_only:
            folder = os.path.join(self.root, key)

            def written(index: tuple[int, ...]) -> bool:
                return os.path.isfile(os.path.join(folder, *map(str, reversed(index))))

            if 2 * sum(map(written, indices)) < len(indices):
                # mostly unwritten: spread over the written chunks instead (a volume mostly
                # written keeps its zeros: z5py leaves all-zero chunks unwritten)
                found = sorted(_written_chunks(folder, len(counts)))
                if len(found) > wanted:
                    at = np.unique(np.linspace(0, len(found) - 1, wanted).round().astype(int))
                    found = [found[i] for i in at]
                indices = found
        grid = [tuple(i * c for i, c in zip(index, chunks, strict=True)) for index in indices]

        def read(begin: tuple[int, ...]) -> np.ndarray:  # one chunk: memory stays bounded
            region = tuple(
                slice(b, min(b + c, n)) for b, c, n in zip(begin, chunks, shape, strict=True)
            )
            return np.asarray(reader[region]).ravel()

        with ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(read, grid))
        return np.concatenate(parts) if parts else np.empty(0, ds.dtype)

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """Read a region of the finest level into memory (VolumeError names a corrupt chunk)."""
        region = tuple(region) if region is not None else (slice(None),) * self.ndim
        reader = _ChunkReader(self.root, self.levels[0], self.shape, self.dtype)
        return reader[region]

    def write(
        self, data: np.ndarray, offset: Sequence[int] | None = None, sync: bool = False
    ) -> None:
        """Write ``data`` into the finest level at ``offset`` (voxels, C order); with ``sync``,
        its chunk files are on disk when this returns (see :func:`sync_region`)."""
        offset = tuple(offset) if offset is not None else (0,) * self.ndim
        if len(offset) != self.ndim or data.ndim != self.ndim:
            raise ValueError(
                f"data of {data.ndim} dims / offset {offset} for a {self.ndim}-D volume"
            )
        region = tuple(slice(o, o + s) for o, s in zip(offset, data.shape, strict=True))
        if any(r.stop > n or r.start < 0 for r, n in zip(region, self.shape, strict=True)):
            raise ValueError(f"region {region} is outside the volume of shape {self.shape}")
        ds = _dataset(self.root, self.levels[0], "a")
        ds[region] = np.ascontiguousarray(data, dtype=self.dtype)
        if sync:
            sync_region(os.path.join(self.root, self.levels[0]), region, ds.chunks)

    @property
    def write_id(self) -> str | None:
        """The :data:`WRITE_ID` of this volume's writing; None where another tool wrote it."""
        value = self.attrs.get(WRITE_ID)
        return value if isinstance(value, str) else None

    def mark_finished(self) -> None:
        """Remove the :data:`UNFINISHED` mark the writer set when it created the volume."""
        nodes = [_dataset(self.root, self.levels[0], "a")]
        if self.key != self.levels[0]:  # a pyramid: its group too
            nodes.append(_open_file(self.root, "a")[self.key])
        for node in nodes:
            if UNFINISHED in node.attrs:
                del node.attrs[UNFINISHED]
        self.attrs.pop(UNFINISHED, None)

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Write ``values`` into the attributes the volume was made with (a pyramid's: its
        group's, where its writer put them)."""
        _open_file(self.root, "a")[self.key].attrs.update(values)
        self.attrs.update(values)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (what `emparsl info` prints)."""
        levels = []
        for i, key in enumerate(self.levels):
            arr = self.level(i)
            levels.append(
                {
                    "key": key,
                    "shape": list(arr.shape),
                    "chunks": [int(c[0]) for c in arr.chunks],
                    "voxel_size": list(self.level_voxel_sizes[i]),
                }
            )
        return {
            "path": self.root,
            "key": self.key,
            "kind": "labels" if self.is_labels else "image",
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "chunks": list(self.chunks),
            "compression": self.compression,
            "voxel_size": list(self.voxel_size),
            "unit": self.unit,
            "offset": list(self.offset),
            "axes": list(self.axes),
            "levels": levels,
        } | ({"unfinished": self.attrs[UNFINISHED]} if UNFINISHED in self.attrs else {})

    # ------------------------------------------------------------------------------------------
    # creating

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        key: str,
        shape: Sequence[int],
        dtype: Any,
        chunks: Sequence[int],
        *,
        compression: str = "gzip",
        voxel_size: Sequence[float] | None = None,
        unit: str = "nm",
        offset: Sequence[float] | None = None,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
        levels: Sequence[Sequence[int]] | None = None,
        level_chunks: Sequence[Sequence[int]] | None = None,
    ) -> Volume:
        """Create an empty dataset (chunks not written read as 0) and return it opened.

        Attributes are written the way N5 tools read them: ``resolution``, ``offset`` and
        ``axes`` in N5 order (x, y, z), plus ``pixelResolution`` for BigDataViewer / n5-viewer.

        With ``levels`` (cumulative downsampling factors per level, C order, the first all ones)
        the volume is an empty pyramid group ``key/s0, s1, …``: level ``i`` has shape
        ``shape // levels[i]`` and chunks ``level_chunks[i]``; :meth:`write_levels` fills it.

        Raises
        ------
        VolumeError
            When the dataset exists and ``overwrite`` is false, or the dtype cannot be stored.
        """
        root = user_path(path)  # "~/x.n5" is under the home folder, not a folder named ~
        key = key.strip("/")
        if not key:
            raise VolumeError(f"Give a dataset name inside {root}, e.g. {root}:raw.")
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            dtype = np.dtype("uint8")
        shape = tuple(int(s) for s in shape)
        check_writable(root, key, dtype, shape)
        chunks = tuple(max(1, min(int(c), s)) for c, s in zip(chunks, shape, strict=True))
        _prepare_output(root, key, overwrite)
        f = _open_file(root, "a")
        kwargs = {"compression": compression} if compression != "raw" else {"compression": "raw"}
        geometry = _geometry_attrs(len(shape), voxel_size, unit, offset)
        written = {WRITE_ID: uuid.uuid4().hex}
        if not levels or len(levels) < 2:
            f.create_dataset(key, shape=shape, chunks=chunks, dtype=dtype.name, **kwargs)
            f[key].attrs.update(geometry | written | (attrs or {}))
            return cls.open(root, key)
        factors = [tuple(int(v) for v in fac) for fac in levels]
        group = f.require_group(key)
        group.attrs.update(
            geometry
            | {"multiScale": True, "scales": [list(reversed(fac)) for fac in factors]}
            | written
            | (attrs or {})
        )
        spatial = min(len(shape), 3)
        vs = [float(v) for v in (voxel_size or (1.0,) * spatial)][-spatial:]
        for i, fac in enumerate(factors):
            level_shape = tuple(max(1, n // d) for n, d in zip(shape, fac, strict=True))
            lchunks = tuple(level_chunks[i]) if level_chunks else chunks
            lchunks = tuple(
                max(1, min(int(c), n)) for c, n in zip(lchunks, level_shape, strict=True)
            )
            level_key = f"{key}/s{i}"
            f.create_dataset(
                level_key, shape=level_shape, chunks=lchunks, dtype=dtype.name, **kwargs
            )
            f[level_key].attrs.update(
                {  # as N5 viewers read it: the finest voxel size, and this level's factors
                    "downsamplingFactors": list(reversed(fac)),
                    "pixelResolution": {"dimensions": list(reversed(vs)), "unit": unit},
                }
                | _level_offset(
                    geometry.get("offset"),
                    vs,
                    fac[-spatial:],
                    bool(attrs) and attrs.get("layer_type") == "labels",
                )
                | ({"layer_type": attrs["layer_type"]} if attrs and "layer_type" in attrs else {})
                | written  # also where one level is opened as the input
            )
        return cls.open(root, key)

    def level_factors(self) -> list[tuple[int, ...]]:
        """Cumulative downsampling factor of each level (C order, level 0 = ones)."""
        out = [(1,) * self.ndim]
        ancestors = ancestor_attrs(self.root, self.levels[0])
        scales = next((a["scales"] for a in ancestors if isinstance(a.get("scales"), list)), [])
        for i, key in enumerate(self.levels[1:], 1):
            fac = read_attrs(os.path.join(self.root, key)).get("downsamplingFactors")
            if fac is None and i < len(scales):  # n5-viewer: the factors on a group above
                fac = scales[i]
            if not isinstance(fac, list) or len(fac) != self.ndim:
                raise VolumeError(
                    f"The pyramid level {self.root}:{key} has no usable downsamplingFactors; "
                    "write the output again with --overwrite."
                )
            out.append(tuple(int(v) for v in reversed(fac)))
        return out

    def level_chunks(self) -> list[tuple[int, ...]]:
        """Chunk shape of each level (C order), from the attributes."""
        out = [tuple(self.chunks)]
        for key in self.levels[1:]:
            size = read_attrs(os.path.join(self.root, key)).get("blockSize", [])
            out.append(tuple(int(v) for v in reversed(size)))
        return out

    def write_levels(
        self,
        data: np.ndarray,
        offset: Sequence[int],
        labels: bool,
        factors: Sequence[Sequence[int]] | None = None,
        sync: bool = False,
    ) -> None:
        """Write ``data`` (a region of the finest level at ``offset``) into every coarser level
        (with ``sync``: on disk when this returns).

        ``offset`` must be a multiple of each level's factor (blocks are planned so): the
        region's part of level ``i`` is then whole voxels of that level, written by this call
        alone. Labels keep the first voxel of each window, images the window's mean.
        """
        factors = factors if factors is not None else self.level_factors()
        f = None
        for key, fac in zip(self.levels[1:], factors[1:], strict=True):
            if any(o % d for o, d in zip(offset, fac, strict=True)):
                raise ValueError(f"offset {tuple(offset)} is not a multiple of {tuple(fac)}")
            small = downsample_block(data, fac, labels)
            if not small.size:
                continue
            f = f or _open_file(self.root, "a")
            ds = f[key]
            start = tuple(o // d for o, d in zip(offset, fac, strict=True))
            region = tuple(
                slice(b, min(b + n, m))
                for b, n, m in zip(start, small.shape, ds.shape, strict=True)
            )
            small = small[tuple(slice(0, r.stop - r.start) for r in region)]
            ds[region] = np.ascontiguousarray(small, dtype=self.dtype)
            if sync:
                sync_region(os.path.join(self.root, key), region, ds.chunks)


def sync_region(directory: str, region: Sequence[slice], chunks: Sequence[int]) -> None:
    """Flush to disk the chunk files of the dataset at ``directory`` that ``region`` (slices, C
    order, within the dataset) covers, and the folders that name them.

    A block's result is recorded in the ledger (flushed to disk) once its worker returns; its
    chunks were only in the system's cache then, and a machine that lost power, or a node that
    crashed, could come back with the ledger saying done over chunks that never reached the
    disk — a resume then skipped them. ~4 ms for a 128³ block of 64³ chunks here.
    """
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, chunks, strict=True)]
    folders = {directory}
    for index in product(*ranges):
        parts = [str(i) for i in reversed(index)]  # N5's chunk paths are in N5 order: x first
        folders.update(os.path.join(directory, *parts[:n]) for n in range(1, len(parts)))
        _fsync(os.path.join(directory, *parts))
    for folder in sorted(folders, key=len, reverse=True):  # a new chunk's folders, up to here
        _fsync(folder)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # a chunk all fill value (z5py writes none, removes an old one)
        return
    try:
        os.fsync(fd)
    except OSError as err:  # a full disk, an I/O error: the block fails, it is not on disk
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        # a file system that cannot flush (a folder, on some network ones): as written
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# helpers


def _resolve(root: str, key: str) -> Node:
    """The node for ``key``; without a key, the container's only dataset or pyramid."""
    if key:
        directory = os.path.join(root, key)
        attrs = read_attrs(directory) if os.path.isdir(directory) else {}
        if is_dataset_attrs(attrs):
            return Node(key, "dataset", attrs)
        levels = pyramid_levels(directory, attrs) if os.path.isdir(directory) else ()
        if levels:
            return Node(key, "multiscale", attrs, levels)
        where = key
    else:
        where = ""
    base = os.path.join(root, where) if where else root
    candidates = _openable(walk_tree(base)) if os.path.isdir(base) else []
    if not os.path.isdir(base):
        all_keys = _openable(walk_tree(root))
        raise VolumeError(
            f"There is no dataset '{key}' in {root}; available: {_listing(all_keys)}."
        )
    if len(candidates) == 1:
        node = candidates[0]
        if BROKEN in node.attrs:  # its metadata cannot be read: why
            raise VolumeError(str(node.attrs[BROKEN]))
        full = "/".join(p for p in (where, node.key) if p)
        return Node(full, node.kind, node.attrs, node.levels)
    if not candidates:
        raise VolumeError(f"{os.path.join(root, where)} holds no dataset; pick another folder.")
    keys = [Node("/".join(p for p in (where, n.key) if p), n.kind) for n in candidates]

    # the example an image, not labels (a run's input taken from it warned it looked like one)
    def dtype(node: Node) -> str:  # a pyramid's is its finest level's
        if node.kind != "multiscale" or not node.levels:
            return str(node.attrs.get("dataType", ""))
        try:
            return str(read_attrs(os.path.join(base, node.key, node.levels[0])).get("dataType", ""))
        except VolumeError:
            return ""

    example = next(
        (k for k, n in zip(keys, candidates, strict=True)
         if not looks_like_labels(n.key, n.attrs, dtype(n))),
        keys[0],
    )  # fmt: skip
    raise VolumeError(
        f"{root}{':' + where if where else ''} holds several datasets ({_listing(keys)}); "
        f"name one, e.g. {root}:{example.key}."
    )


def _openable(nodes: list[Node]) -> list[Node]:
    """Datasets and pyramids, without the levels inside pyramids."""
    pyramids = [n.key for n in nodes if n.kind == "multiscale"]

    def inside_pyramid(key: str) -> bool:
        return any(key != p and (not p or key.startswith(p + "/")) for p in pyramids)

    return [n for n in nodes if n.kind in ("dataset", "multiscale") and not inside_pyramid(n.key)]


def _listing(nodes: list[Node], limit: int = 20) -> str:
    keys = [n.key or "(root)" for n in nodes]
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def check_output_free(root: str, key: str, overwrite: bool) -> None:
    """Refuse, before any work starts, an output that exists (unless overwriting) or cannot be one."""
    check_key(key.strip("/"), f"{root}:{key}")
    name = os.path.basename(os.path.normpath(root))
    if name.lower().endswith(".zarr") or (os.path.isdir(root) and is_zarr(root)):
        raise VolumeError(
            f"{root} names a zarr container; emparsl writes N5: give the output a container name "
            f"ending in .n5 (e.g. {name.rsplit('.', 1)[0] or 'out'}.n5:{key or 'pred'})."
        )
    if os.path.exists(root) and not os.path.isdir(root):
        raise VolumeError(f"{root} is a file; choose a folder name for the output container.")
    if key and is_dataset_attrs(read_attrs(root) if os.path.isdir(root) else {}):
        raise VolumeError(
            f"{root} is a dataset itself, not a container that can hold {key}; write the output "
            "into another container (e.g. out.n5:pred)."
        )
    existing = os.path.abspath(root)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # where the output's folders will be made
    if not os.access(existing, os.W_OK):
        raise VolumeError(
            f"Cannot write to {existing} (a read-only disk, or no permission); choose an "
            "output on a disk you can write to."
        )
    target = os.path.join(root, key)
    if os.path.exists(target) and not overwrite:
        raise VolumeError(
            f"The output {root}:{key} already exists; pass --overwrite to replace it, "
            "or choose another name."
        )
    if overwrite and key and os.path.isdir(target):
        # --overwrite replaces one dataset or pyramid, never a group of others (a whole
        # container's ground truth, say)
        nodes = walk_tree(target)
        inside = [f"{key}/{n.key}" for n in _openable(nodes)] if nodes[0].kind == "group" else []
        if inside:
            raise VolumeError(
                f"The output {root}:{key} is a group holding other datasets "
                f"({_names(inside)}); --overwrite replaces one dataset, not a group: choose a "
                f"dataset name such as {key}/pred."
            )


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def check_writable(root: str, key: str, dtype: Any, shape: Sequence[int]) -> None:
    """VolumeError where data of ``dtype`` and ``shape`` cannot be written as ``root:key``
    (a type N5 cannot store, an axis of no voxels, a dataset where a group would have to be),
    before anything is written."""
    dtype = np.dtype(dtype)
    if dtype != np.bool_ and dtype.name not in _WRITABLE_DTYPES:
        raise VolumeError(
            f"N5 cannot store {dtype.name} data; convert it to one of "
            f"{', '.join(sorted(_WRITABLE_DTYPES))}."
        )
    _check_new_dataset(root, key, shape)


def _check_new_dataset(root: str, key: str, shape: Sequence[int]) -> None:
    """Refuse what z5py would fail on, or die of, before anything is written."""
    if not all(s > 0 for s in shape):  # z5py divides by it: SIGFPE, the process gone
        raise VolumeError(
            f"Cannot write {root}:{key} with {'×'.join(map(str, shape))} voxels: a dataset "
            "needs at least one voxel along each axis."
        )
    parts = key.split("/")
    for n in range(1, len(parts)):  # z5py: "Incompatible object (Dataset) already exists"
        above = "/".join(parts[:n])
        try:
            is_dataset = is_dataset_attrs(read_attrs(os.path.join(root, above)))
        except VolumeError:
            is_dataset = False
        if is_dataset:
            raise VolumeError(
                f"{root}:{above} is a dataset, which cannot hold {key}; choose a name "
                f"beside it, e.g. {root}:{'/'.join([*parts[: n - 1], parts[-1]])}."
            )


def _prepare_output(root: str, key: str, overwrite: bool) -> None:
    check_output_free(root, key, overwrite)
    if os.path.exists(root) and not os.path.isdir(root):
        raise VolumeError(f"{root} is a file; choose a folder name for the output container.")
    others = (
        [e for e in os.listdir(root) if not e.endswith(LOCK_SUFFIX)] if os.path.isdir(root) else []
    )
    if os.path.isdir(root) and not is_container(root) and others:
        raise VolumeError(
            f"{root} is a non-empty folder that is not an N5 container; choose another output path."
        )
    target = os.path.join(root, key)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.makedirs(root, exist_ok=True)
    if not is_zarr(root) and not os.path.exists(os.path.join(root, ATTRS)):
        # always a root attributes.json: z5py and N5-Java need it to open the container
        with open(os.path.join(root, ATTRS), "w", encoding="utf-8") as f:
            f.write('{"n5": "2.0.0"}')


def _level_offset(
    offset: Sequence[float] | None,
    voxel_size: Sequence[float],
    factors: Sequence[int],
    labels: bool,
) -> dict[str, Any]:
    """A pyramid level's ``offset`` attribute (N5 order, as ``offset`` is given): where its
    voxel 0's centre lies. Labels keep the first voxel of each window: the finest level's
    offset. Images take the window's mean, whose centre lies (factor - 1) / 2 finest voxels
    further (COSEM's levels likewise): a level opened alone, or run on, lies where its voxels
    came from. ``{}`` where there is nothing to say (no offset, labels, or the finest level)."""
    base = [float(o) for o in offset] if offset is not None else [0.0] * len(factors)
    if labels or all(int(f) == 1 for f in factors):
        return {"offset": base} if offset is not None else {}
    shift = [(int(f) - 1) / 2 * float(v) for f, v in zip(factors, voxel_size, strict=True)]
    return {"offset": [b + d for b, d in zip(base, reversed(shift), strict=True)]}


def _geometry_attrs(
    ndim: int,
    voxel_size: Sequence[float] | None,
    unit: str,
    offset: Sequence[float] | None,
) -> dict[str, Any]:
    spatial = ndim if ndim <= 3 else 3
    names = ["z", "y", "x"][-spatial:]
    axes = (["c"] if ndim == 4 else []) + names
    out: dict[str, Any] = {"axes": list(reversed(axes))}
    if voxel_size is not None:  # without one, no unit: the voxel size is not known
        out["unit"] = unit
        vs = [float(v) for v in voxel_size][-spatial:]
        out["resolution"] = list(reversed(vs))
        out["pixelResolution"] = {"dimensions": list(reversed(vs)), "unit": unit}
    if offset is not None:
        out["offset"] = list(reversed([float(o) for o in offset][-spatial:]))
    return out


def openable_keys(path: str | os.PathLike) -> list[str]:
    """Keys (from the container root) of the dataset or pyramid at ``path``, or of every dataset
    and pyramid below it (levels inside a pyramid are not listed on their own)."""
    root, sub = find_container_root(user_path(path))
    base = os.path.join(root, sub) if sub else root
    nodes = walk_tree(base)
    if nodes and nodes[0].kind in ("dataset", "multiscale"):
        return [sub]
    return ["/".join(p for p in (sub, n.key) if p) for n in _openable(nodes)]


def openable_in_tree(tree: list[dict[str, Any]]) -> list[str]:
    """:func:`openable_keys` of the path a :func:`container_tree` listing was made for, from
    the listing (no second walk of the folders: the volume panel lists as the user types)."""
    if tree and tree[0]["kind"] in ("dataset", "multiscale"):
        return [tree[0]["key"]]  # the path is a dataset or a pyramid itself
    pyramids = [n["key"] for n in tree if n["kind"] == "multiscale"]
    return [
        n["key"]
        for n in tree
        if n["kind"] in ("dataset", "multiscale")
        and not any(n["key"] != p and n["key"].startswith(p + "/") for p in pyramids)
    ]


def container_tree(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every group, dataset and pyramid of a container, with shape/dtype/chunks (JSON only)."""
    path = user_path(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path} does not exist; check the path.")
    root, sub = find_container_root(path)
    if not is_container(root):
        raise VolumeError(
            f"{path} is not an N5 or zarr container (no attributes.json inside); pick the "
            ".n5 folder, or convert your images with `emparsl import`."
        )
    if is_zarr(root):  # its datasets would be listed as empty groups
        raise VolumeError(
            f"{root} is a zarr container, which this version does not open yet; convert it "
            "to N5 (e.g. with z5py or BigDataViewer) and open that."
        )
    base = os.path.join(root, sub) if sub else root
    out = []
    nodes = [  # a BigDataViewer setup group: with what its dataset.xml says (voxel size, unit)
        Node(n.key, n.kind, n.attrs | extra, n.levels)
        if n.kind == "group"
        and (extra := bdv_setup_attrs(root, "/".join(p for p in (sub, n.key) if p)))
        else n
        for n in walk_tree(base)
    ]
    by_key = {node.key: node for node in nodes}
    above = ancestor_attrs(root, sub) if sub else []  # the groups above the listed folder
    for node in nodes:
        key = "/".join(p for p in (sub, node.key) if p)
        entry: dict[str, Any] = {"key": key, "kind": node.kind}
        if BROKEN in node.attrs:  # listed, greyed in the panel, said why; not opened
            entry["unreadable"] = str(node.attrs[BROKEN]).rstrip(".")
        elif node.kind == "dataset":
            dims = node.attrs.get("dimensions", [])
            entry |= {
                "shape": list(reversed(dims)),
                "dtype": node.attrs.get("dataType"),
                "chunks": list(reversed(node.attrs.get("blockSize", []))),
                "compression": compression_of(node.attrs),
            }
            if UNFINISHED in node.attrs:
                entry["unfinished"] = node.attrs[UNFINISHED]
            if node.attrs.get("isLabelMultiset") is True:  # varlength label lists per voxel
                entry["unreadable"] = "a Paintera label multiset, which this version cannot read"
            try:  # a pyramid level may take its size from its group's attributes, or above
                parts = node.key.split("/") if node.key else []
                inside = [by_key["/".join(parts[:i])].attrs for i in range(len(parts) - 1, -1, -1)]
                parent_key, _, name = node.key.rpartition("/")
                parent = by_key.get(parent_key) if node.key else None
                if parent is not None:
                    level = parent.levels.index(name) if name in parent.levels else None
                else:  # the listed folder itself: a level of a pyramid above it?
                    level = level_index(root, key)
                attrs = node.attrs
                group = (inside + above)[:1]
                if level is not None and group:  # what the group's multiscales says of it
                    attrs = with_group_transform(attrs, group[0], key.rpartition("/")[2])
                voxel, unit, _ = voxel_size_of(attrs, len(dims), inside + above, level)
                entry |= {"voxel_size": list(voxel), "unit": unit}
            except Exception:  # odd attributes: the listing goes on without a voxel size
                pass
        elif node.kind == "multiscale":
            entry["levels"] = list(node.levels)
            if UNFINISHED in node.attrs:
                entry["unfinished"] = node.attrs[UNFINISHED]
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# pyramids


def pyramid_factors(
    shape: Sequence[int], voxel_size: Sequence[float], levels: int
) -> list[tuple[int, ...]]:
    """Cumulative downsampling factors per level (level 0 = ones).

    Each level halves an axis unless its voxels are already at least twice as large as the
    finest axis at that level (so an anisotropic z is left alone until x/y catch up), or the axis
    would shrink below 1 voxel.
    """
    current = [1] * len(shape)
    out = [tuple(current)]
    for _ in range(1, levels):
        sizes = [v * f for v, f in zip(voxel_size, current, strict=True)]
        smallest = min(sizes)
        step = [
            2 if sizes[i] < 2 * smallest and shape[i] // (current[i] * 2) >= 1 else 1
            for i in range(len(shape))
        ]
        if all(s == 1 for s in step):
            break
        current = [c * s for c, s in zip(current, step, strict=True)]
        out.append(tuple(current))
    return out


def output_level_factors(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    block: Sequence[int],
    max_voxels: int = 2**21,
    min_block: int = 8,
) -> list[tuple[int, ...]]:
    """Pyramid levels the blocks of a run can write themselves (z, y, x factors, level 0 first).

    A level is added while the coarsest so far has more than ``max_voxels`` (2 Mi, ~128³: what
    napari shows in 3D without stalling). An axis can be halved only where the block size stays
    a multiple of the factor with at least ``min_block`` voxels per block (so each block's part
    of every level is whole voxels and whole chunks); of those, as in :func:`pyramid_factors`,
    the ones whose voxels are less than twice the finest of them are halved.
    """
    current = [1] * len(shape)
    out = [tuple(current)]
    while float(np.prod([n // c for n, c in zip(shape, current, strict=True)])) > max_voxels:
        sizes = [v * c for v, c in zip(voxel_size, current, strict=True)]
        can = [
            block[i] % (current[i] * 2) == 0
            and block[i] // (current[i] * 2) >= min_block
            and shape[i] // (current[i] * 2) >= 1
            for i in range(len(shape))
        ]
        if not any(can):
            break
        # the finest of the axes that can still be halved (a 2D model's z never can)
        smallest = min(s for s, c in zip(sizes, can, strict=True) if c)
        step = [2 if can[i] and sizes[i] < 2 * smallest else 1 for i in range(len(shape))]
        current = [c * s for c, s in zip(current, step, strict=True)]
        out.append(tuple(current))
    return out


def downsample_block(data: np.ndarray, factor: Sequence[int], labels: bool) -> np.ndarray:
    """``data`` downsampled by whole windows of ``factor`` (a trailing partial window dropped):
    labels keep each window's first voxel, images its mean (rounded for integer dtypes)."""
    counts = [n // d for n, d in zip(data.shape, factor, strict=True)]
    if labels:
        return data[tuple(slice(0, c * d, d) for c, d in zip(counts, factor, strict=True))]
    trimmed = data[tuple(slice(0, c * d) for c, d in zip(counts, factor, strict=True))]
    shape = [v for c, d in zip(counts, factor, strict=True) for v in (c, d)]
    mean = (
        trimmed.astype(np.float32, copy=False)
        .reshape(shape)
        .mean(axis=tuple(range(1, 2 * len(counts), 2)))
    )
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        mean = np.clip(np.round(mean), info.min, info.max)
    return mean.astype(data.dtype, copy=False)


def write_pyramid(
    path: str | os.PathLike,
    key: str,
    data: np.ndarray | da.Array,
    *,
    chunks: Sequence[int],
    levels: int = 3,
    voxel_size: Sequence[float] | None = None,
    unit: str = "nm",
    labels: bool = False,
    compression: str = "gzip",
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Volume:
    """Write ``data`` as a pyramid group ``key/s0, s1, …`` and return it opened (multiscale).

    Image levels are block means, label levels take every other voxel (labels must not be averaged).
    Every level is written chunk by chunk through dask, so memory stays bounded by a few chunks.
    """
    import dask.array as da

    root = user_path(path)
    key = key.strip("/")
    voxel_size = tuple(voxel_size) if voxel_size is not None else (1.0,) * data.ndim
    _check_new_dataset(root, key, data.shape)
    _prepare_output(root, key, overwrite)
    factors = pyramid_factors(data.shape, voxel_size, levels)
    written = {WRITE_ID: uuid.uuid4().hex}  # this writing's id (see WRITE_ID)
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=tuple(chunks))
    group_attrs = (
        _geometry_attrs(data.ndim, voxel_size, unit, None)
        | {
            "multiScale": True,
            "scales": [list(reversed(f)) for f in factors],
            "layer_type": "labels" if labels else "image",
            UNFINISHED: "a write that has not finished",
        }
        | written
        | (attrs or {})
    )
    f = _open_file(root, "a")
    group = f.require_group(key)
    group.attrs.update(group_attrs)
    previous = (1,) * data.ndim
    for i, fac in enumerate(factors):
        step = tuple(a // b for a, b in zip(fac, previous, strict=True))
        if i > 0:
            arr = _downsample(arr, step, labels)
        level_key = f"{key}/s{i}"
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, arr.shape, strict=True))
        f.create_dataset(
            level_key, shape=arr.shape, chunks=level_chunks, dtype=data.dtype.name,
            compression=compression,
        )  # fmt: skip
        ds = f[level_key]
        ds.attrs.update(
            {
                "downsamplingFactors": list(reversed(fac)),
                "pixelResolution": {"dimensions": list(reversed(voxel_size)), "unit": unit},
                "layer_type": group_attrs["layer_type"],
            }
            | _level_offset(None, voxel_size, fac, labels)
            | written
        )
        # one dask task per output chunk: no two tasks ever write the same chunk file
        arr = arr.rechunk(level_chunks)
        da.store(arr, ds, lock=False)
        reader = _ChunkReader(root, level_key, tuple(ds.shape), ds.dtype)
        arr = da.from_array(
            reader, chunks=level_chunks, lock=False, fancy=False, name=f"lvl-{uuid.uuid4().hex}"
        )
        previous = fac
    vol = Volume.open(root, key)
    vol.mark_finished()
    return vol


def _first(x: np.ndarray, axis: tuple[int, ...] = ()) -> np.ndarray:
    """Reduction for :func:`dask.array.coarsen` that keeps the first voxel of each block."""
    return x[tuple(0 if i in axis else slice(None) for i in range(x.ndim))]


def _downsample(arr: da.Array, step: tuple[int, ...], labels: bool) -> da.Array:
    import dask.array as da

    trimmed = arr[tuple(slice(0, (n // s) * s) for n, s in zip(arr.shape, step, strict=True))]
    axes = dict(enumerate(step))
    if labels:  # labels must not be averaged: keep one voxel per block
        return da.coarsen(_first, trimmed, axes)
    mean = da.coarsen(np.mean, trimmed.astype(np.float32), axes)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        mean = da.clip(da.round(mean), info.min, info.max)
    return mean.astype(arr.dtype)


def save_array(
    path: str | os.PathLike,
    key: str,
    data: np.ndarray | da.Array,
    *,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str = "nm",
    offset: Sequence[float] | None = None,
    labels: bool = False,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Volume:
    """Write a whole array (numpy or dask, streamed chunk by chunk) as a new dataset."""
    import dask.array as da

    chunks = tuple(chunks) if chunks is not None else (64,) * data.ndim
    vol = Volume.create(
        path,
        key,
        data.shape,
        data.dtype,
        chunks[-data.ndim :],
        voxel_size=voxel_size,
        unit=unit,
        offset=offset,
        attrs={"layer_type": "labels" if labels else "image"}
        | {UNFINISHED: "a write that has not finished"}
        | (attrs or {}),
        overwrite=overwrite,
    )
    ds = _dataset(vol.root, vol.levels[0], "a")
    arr = data if isinstance(data, da.Array) else da.from_array(data, chunks=vol.chunks)
    # one task per output chunk: no two tasks write the same chunk file
    da.store(arr.rechunk(vol.chunks).astype(vol.dtype), ds, lock=False)
    vol.mark_finished()
    return vol


def _written_chunks(folder: str, ndim: int) -> list[tuple[int, ...]]:
    """Grid indices (C order) of the chunk files a dataset's folder holds (N5 keeps them as
    ``x/y/z``)."""
    out = []
    for directory, _, files in os.walk(folder):
        rel = os.path.relpath(directory, folder)
        parts = [] if rel == "." else rel.split(os.sep)
        if len(parts) != ndim - 1 or not all(p.isdigit() for p in parts):
            continue
        out.extend(tuple(int(v) for v in reversed([*parts, f])) for f in files if f.isdigit())
    return out


def volume_stats(volume: Volume, max_voxels: int = 2_000_000) -> tuple[float, float]:
    """Global mean and std of a volume, from its finest level (:meth:`Volume.sample`, written
    chunks only); NaN and infinite voxels (masked or padded regions of float data) are left
    out."""
    sample = finite_values(volume.sample(max_voxels, written_only=True))
    if sample.size == 0:
        return 0.0, 1.0
    return float(sample.mean()), float(sample.std() or 1.0)


def finite_values(data: np.ndarray) -> np.ndarray:
    """``data`` as float64, without its NaN and infinite values (integers: all of it)."""
    values = data.astype(np.float64).ravel()
    return values if np.issubdtype(data.dtype, np.integer) else values[np.isfinite(values)]
