"""LiveN5Array: the output layer's data while a run writes it (no Qt here).

napari shows the output N5 while workers write it. A dask view would need a fresh graph per
refresh (its chunk cache would show stale data) and reads the slice on the Qt thread. This
array-like reads straight from N5 (nothing cached across writes), and keeps one plane — the one
on screen — that the run's background thread re-reads after each block that touches it, so a
refresh on the Qt thread only draws. A multiscale output layer has one per level; each follows
the z-plane napari reads from it (``follow``), whichever level napari shows. In a 3D view napari
draws a whole level (the coarsest): that one is kept whole instead (``keep_whole``), refreshed
in the same way.

Consistency: the kept plane is always the watched one (``watch`` drops it); the first finished
block that touches it reads it whole, each later one re-reads its own part of it
(``block_written``: a block's few chunks, not a plane of the whole volume); any other read
goes to disk.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_emparsl.core.n5attrs import VolumeError
from napari_emparsl.core.volume import Volume

__all__ = ["LiveN5Array"]


def _norm_key(key: Any, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """A key of ints / step-1 slices as ((start, stop), ...) per axis; None for anything else."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key) or len(key) > len(shape):
        return None
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, (int, np.integer)):
            i = int(k) + (n if k < 0 else 0)
            if not 0 <= i < n:  # as numpy says it (a read there would return a block of 0s)
                raise IndexError(f"index {int(k)} is out of bounds for axis with size {n}")
            out.append((i, i + 1, True))
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                return None
            out.append((start, stop, False))
        else:
            return None
    return tuple(out)


#: voxels of the plane on screen a :class:`LiveN5Array` keeps in memory at most (a 4096² plane)
_MOST_KEPT_PLANE = 2**24


class LiveN5Array:
    """Array-like over the finest level of an N5 dataset, for a napari layer being written.

    Parameters
    ----------
    root, key
        The output container and dataset.
    """

    def __init__(self, root: str, key: str) -> None:
        vol = Volume.open(root, key)
        self.root, self.key = vol.root, vol.key
        self.shape = tuple(vol.shape)
        self.dtype = np.dtype(vol.dtype)
        self.ndim = len(self.shape)
        self._volume = vol
        self._lock = threading.Lock()
        self._watched: int | None = None  # the plane index (first spatial axis) on screen
        self._plane: np.ndarray | None = None  # its data, as of the last block that touched it
        self._generation = 0  # counts watch changes: a plane read before one is not kept
        self._follow = False  # watch whichever plane napari reads (see ``follow``)
        self._last_plane: int | None = None  # the plane napari read last
        self.plane_hits = 0  # reads answered from the kept plane (for tests and benchmarks)
        self._keep_whole = False  # keep the whole array (a 3D view of a coarse level)
        self._whole: np.ndarray | None = None  # it, as of the last block written
        self.whole_hits = 0  # reads answered from the kept whole array

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LiveN5Array({self.root}:{self.key}, shape={self.shape}, dtype={self.dtype})"

    # -- reading -------------------------------------------------------------------------------

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        # a worker may be writing a chunk of this region right now: a half-written chunk file
        # reads as corrupt; it is whole again a moment later
        for attempt in range(4):
            try:
                return self._volume.read(region)
            except VolumeError:
                if attempt == 3:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _plane_region(self, z: int) -> tuple[slice, ...]:
        lead = (slice(None),) * (self.ndim - 3)  # channels of an image output come first
        return (*lead, slice(z, z + 1), slice(None), slice(None))

    def __getitem__(self, key: Any) -> np.ndarray | _Region:
        """Read ``key``; a key of slices alone gives a lazy region instead, read when converted
        to an array or indexed further (napari crops each level of a multiscale layer to the
        view over every axis before it picks the plane: eager, that would read the whole depth).
        """
        norm = _norm_key(key, self.shape)
        if norm is None:  # fancy indexing: read everything, index in memory
            return np.asarray(self._read((slice(None),) * self.ndim))[key]
        if not any(drop for *_, drop in norm):
            return _Region(self, tuple((a, b) for a, b, _ in norm))
        return self._get(norm)

    def _get(self, norm: tuple[tuple[int, int, bool], ...]) -> np.ndarray:
        axis = self.ndim - 3
        drop = tuple(0 if drop else slice(None) for *_, drop in norm)
        with self._lock:  # a copy: the run's thread patches the kept array in place
            if self._whole is not None:
                self.whole_hits += 1
                return self._whole[tuple(slice(a, b) for a, b, _ in norm)].copy()[drop]
        if norm[axis][2] and not norm[axis + 1][2] and not norm[axis + 2][2]:  # a z-plane of y, x
            self._last_plane = norm[axis][0]
            if self._follow and self._watched != self._last_plane:
                self.watch(self._last_plane)
        with self._lock:
            plane, watched = self._plane, self._watched
        if plane is not None and watched is not None:
            z0, z1, _ = norm[axis]
            if z0 >= watched and z1 <= watched + 1 and z1 > z0:
                self.plane_hits += 1
                sub = tuple(
                    slice(0, 1) if i == axis else slice(a, b) for i, (a, b, _) in enumerate(norm)
                )
                with self._lock:  # a copy: the run's thread patches the kept plane in place
                    out = plane[sub].copy()
                return out[drop]
        return self._read(tuple(slice(a, b) for a, b, _ in norm))[drop]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._get(tuple((0, n, False) for n in self.shape))
        return out.astype(dtype) if dtype is not None else out

    # -- the plane on screen -------------------------------------------------------------------

    def watch(self, z: int | None) -> None:
        """The plane now on screen (None: none, e.g. a 3D view); drops the kept plane."""
        with self._lock:
            if z != self._watched:
                self._watched, self._plane = z, None
                self._generation += 1

    def follow(self, on: bool) -> None:
        """Watch the z-plane napari reads (on), from the last one it read; or none (off).

        napari picks the level of a multiscale layer by zoom, and the plane within it by its own
        rounding: following its reads keeps the plane it shows, at any level, without redoing
        that arithmetic here.
        """
        with self._lock:
            self._follow = on
        self.watch(self._last_plane if on else None)

    def keep_whole(self, on: bool) -> None:
        """Keep the whole array in memory (on), for a 3D view, which draws a whole level (the
        coarsest: small); or not (off). Kept, it is read whole when the next block is written,
        afterwards each block re-reads its own box (:meth:`block_written`, off the Qt thread),
        and every read is answered from it."""
        with self._lock:
            if on != self._keep_whole:
                self._keep_whole, self._whole = on, None
                self._generation += 1

    def forget(self) -> None:
        """Drop what is kept (plane or whole array): read from the N5 again when next needed."""
        with self._lock:
            self._plane = self._whole = None
            self._generation += 1

    def block_written(self, begin: Sequence[int], end: Sequence[int]) -> bool:
        """A block wrote the box ``begin:end`` (z, y, x); refresh the kept plane if the box
        crosses it (call off the Qt thread): read it whole the first time, afterwards only the
        box's part; or the kept whole array (:meth:`keep_whole`) likewise. Returns whether what
        is kept changed."""
        lead = (slice(None),) * (self.ndim - 3)
        with self._lock:
            keep, whole = self._keep_whole, self._whole
            z, plane, generation = self._watched, self._plane, self._generation
        if keep:
            if whole is None:
                fresh = self._read((slice(None),) * self.ndim)
                with self._lock:
                    if self._generation == generation:
                        self._whole = fresh
                return True
            box = (*lead, *(slice(b, e) for b, e in zip(begin, end, strict=True)))
            part = self._read(box)
            with self._lock:
                if self._generation == generation and self._whole is whole:
                    whole[box] = part
            return True
        if z is None or not begin[0] <= z < end[0]:
            return False
        if plane is None:
            if math.prod(self.shape[:-3]) * math.prod(self.shape[-2:]) > _MOST_KEPT_PLANE:
                # a plane of a huge volume (16384²: 268 MB, 2.3 s to read in its chunks' full
                # depth) is not kept: napari reads the part it shows as it refreshes
                return True
            fresh = self._read(self._plane_region(z))
            with self._lock:
                if self._generation == generation:  # not moved meanwhile
                    self._plane = fresh
            return True
        yx = (slice(begin[1], end[1]), slice(begin[2], end[2]))
        part = self._read((*lead, slice(z, z + 1), *yx))
        with self._lock:
            if self._generation == generation and self._plane is plane:
                plane[(*lead, slice(0, 1), *yx)] = part
        return True


class _Region:
    """A step-1 box of a :class:`LiveN5Array`, read only when converted or indexed further."""

    def __init__(self, parent: LiveN5Array, bounds: tuple[tuple[int, int], ...]) -> None:
        self._parent, self._bounds = parent, bounds
        self.shape = tuple(max(0, b - a) for a, b in bounds)  # a reversed slice is empty
        self.dtype = parent.dtype
        self.ndim = len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray | _Region:
        norm = _norm_key(key, self.shape)
        if norm is None:
            return np.asarray(self)[key]
        inner = tuple(
            a0 + a if drop else slice(a0 + a, a0 + b)
            for (a0, _), (a, b, drop) in zip(self._bounds, norm, strict=True)
        )
        return self._parent[inner]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._parent._get(tuple((a, b, False) for a, b in self._bounds))
        return out.astype(dtype) if dtype is not None else out
