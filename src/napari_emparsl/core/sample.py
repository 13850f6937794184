"""A synthetic EM-like volume with ground truth, generated deterministically from a seed.

What it imitates (serial-section / FIB-SEM EM of neural tissue, heavy-metal stained):

- cells: a 3D Voronoi tessellation of jittered seeds, each cell a bright, finely textured
  cytoplasm;
- membranes: dark, ~25 nm thick sheets on the cell boundaries, slightly wavy;
- mitochondria: dark elongated capsules (200–400 nm wide, 0.5–1.5 µm long) inside cells, with a
  darker double outer membrane and striped cristae inside;
- vesicles: clusters of ~40 nm dark-rimmed, light-centred spheres (distractors, class 0);
- acquisition: slow per-section gain/offset drift along z, Gaussian blur (the point spread),
  Poisson-like shot noise and Gaussian read noise.

Everything is in physical units (nm) and converted to voxels with the voxel size, so
``anisotropy`` (z voxel size / xy voxel size) keeps the structures' physical size.
Pure numpy/scipy: no Qt, napari, torch or parsl.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CLASS_NAMES: tuple[str, ...] = ("background", "membrane", "mitochondria")

__all__ = ["CLASS_NAMES", "Sample", "make_sample"]


@dataclass(frozen=True)
class Sample:
    """A synthetic EM volume and its ground truth (all arrays (z, y, x))."""

    raw: np.ndarray  # uint8 intensities: bright cytoplasm, dark membranes and mitochondria
    classes: np.ndarray  # uint8: 0 cytoplasm/background, 1 membrane, 2 mitochondria
    cells: np.ndarray  # uint32 cell instance ids 1..N, 0 on membranes
    voxel_size: tuple[float, float, float]  # nm, (z, y, x)
    class_names: tuple[str, ...] = CLASS_NAMES


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]
) -> np.ndarray:
    """Unit-variance smooth random field, computed on a coarse grid and zoomed up (fast)."""
    factor = [max(1, int(s // 2)) for s in sigma_vox]
    coarse_shape = [max(2, -(-n // f) + 2) for n, f in zip(shape, factor, strict=True)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(
        coarse, [s / f for s, f in zip(sigma_vox, factor, strict=True)], mode="wrap"
    )
    field = ndimage.zoom(coarse, factor, order=1)[tuple(slice(0, n) for n in shape)]
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _voronoi(
    rng: np.random.Generator, shape: tuple[int, int, int], vox: np.ndarray, cell_nm: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Cell labels (1..N) and distance (nm) to the nearest cell boundary.

    Computed on a grid coarsened 2× along the fine axes (the two distance transforms dominate the
    run time), then brought back: labels by nearest neighbour, distances linearly.
    """
    extent = np.array(shape) * vox
    n_cells = max(4, int(np.prod(extent) / cell_nm**3))
    step = np.where(vox <= vox.min() * 1.5, 2, 1)
    coarse_shape = tuple(int(-(-n // s)) for n, s in zip(shape, step, strict=True))
    cvox = vox * step
    seeds = np.zeros(coarse_shape, np.int32)
    pos = np.minimum(
        (rng.random((n_cells, 3)) * coarse_shape).astype(int), np.array(coarse_shape) - 1
    )
    seeds[pos[:, 0], pos[:, 1], pos[:, 2]] = np.arange(1, n_cells + 1)
    # nearest seed for every voxel: feature transform of the "not a seed" mask, in nm
    _, idx = ndimage.distance_transform_edt(seeds == 0, sampling=cvox, return_indices=True)
    coarse_cells = seeds[idx[0], idx[1], idx[2]]
    del idx
    dist = ndimage.distance_transform_edt(~_boundaries(coarse_cells), sampling=cvox)
    crop = tuple(slice(0, n) for n in shape)
    cells = coarse_cells
    for axis, s in enumerate(step):
        cells = np.repeat(cells, s, axis=axis)
    cells = cells[crop]
    dist = ndimage.zoom(dist.astype(np.float32), step, order=1, grid_mode=True, mode="nearest")
    dist = dist[crop]
    return cells, dist, int(cells.max())


def _boundaries(cells: np.ndarray) -> np.ndarray:
    """Voxels with a neighbour (along any axis) in another cell."""
    boundary = np.zeros(cells.shape, bool)
    for axis in range(cells.ndim):
        diff = np.diff(cells, axis=axis) != 0
        lo = [slice(None)] * cells.ndim
        lo[axis] = slice(0, -1)
        boundary[tuple(lo)] |= diff
    return boundary


def _local_coords(box: tuple[slice, ...], vox: np.ndarray) -> list[np.ndarray]:
    """Broadcastable physical coordinates (nm) of the voxel centres inside ``box``."""
    out = []
    for axis, sl in enumerate(box):
        shape = [1, 1, 1]
        shape[axis] = sl.stop - sl.start
        out.append(((np.arange(sl.start, sl.stop) + 0.5) * vox[axis]).reshape(shape))
    return out


def _capsule_distance(coords: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (nm) of every point of a local grid to the segment a–b."""
    ab = b - a
    t = sum((coords[i] - a[i]) * ab[i] for i in range(3)) / max(float(ab @ ab), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(sum((coords[i] - (a[i] + t * ab[i])) ** 2 for i in range(3)))


def make_sample(
    shape: tuple[int, int, int] = (128, 256, 256),
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    voxel_size_nm: float = 8.0,
    noise: float = 1.0,
) -> Sample:
    """Generate the synthetic EM volume and its ground truth.

    Parameters
    ----------
    shape
        Voxels (z, y, x).
    seed
        Same arguments and seed give identical arrays.
    anisotropy
        z voxel size / xy voxel size (serial-section TEM: 5–10).
    voxel_size_nm
        xy voxel size in nm.
    noise
        Scales the shot and read noise (0 = noise free).

    Returns
    -------
    Sample
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, not {shape}")
    rng = np.random.default_rng(seed)
    vox = np.array([anisotropy * voxel_size_nm, voxel_size_nm, voxel_size_nm], float)

    # ---- cells and membranes ----------------------------------------------------------------
    cells, dist, n_cells = _voronoi(rng, shape, vox, cell_nm=450.0)
    field = _smooth_noise(rng, shape, tuple(150.0 / vox))
    wobble = field * 4.0  # nm: membranes are not perfectly flat
    half_thickness = 8.0 + 2.5 * np.abs(field)  # nm: and vary in thickness
    # every label change lies on a membrane, so no two cells ever touch
    membrane = ((dist + wobble) < half_thickness) | _boundaries(cells)
    classes = np.zeros(shape, np.uint8)
    classes[membrane] = 1

    # ---- intensity: cytoplasm with per-cell tone and fine texture --------------------------
    tone = rng.normal(0.0, 6.0, n_cells + 1).astype(np.float32)
    img = 175.0 + tone[cells] + 6.0 * _smooth_noise(rng, shape, tuple(25.0 / vox))
    # membranes: dark core with a soft edge (stain profile across the bilayer)
    profile = np.exp(-np.square(np.maximum(dist + wobble, 0.0) / (half_thickness + 2.0)) * 1.5)
    img -= 110.0 * profile

    # ---- mitochondria ----------------------------------------------------------------------
    mito = np.zeros(shape, bool)
    extent = np.array(shape) * vox
    n_mito = max(1, int(np.prod(extent) / 4e8))
    # centres deep inside cells, so that most bodies fit without crossing a membrane
    deep = np.flatnonzero(dist.ravel() > 110.0)
    if deep.size == 0:
        deep = np.flatnonzero(dist.ravel() >= dist.max() * 0.8)
    tries = max(80, n_mito * 12)
    for attempt in range(tries):
        if n_mito <= 0:
            break
        shrink = 1.0 - 0.6 * attempt / tries  # smaller bodies fit the cells of small volumes
        radius = rng.uniform(60.0, 130.0) * shrink
        length = rng.uniform(300.0, 1100.0) * shrink
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        center = (np.array(np.unravel_index(rng.choice(deep), shape)) + 0.5) * vox
        a, b = center - direction * length / 2, center + direction * length / 2
        reach = np.abs(direction) * length / 2 + radius + 40.0
        lo = np.maximum(((center - reach) / vox).astype(int), 0)
        hi = np.minimum(((center + reach) / vox).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(int(lo_), int(hi_)) for lo_, hi_ in zip(lo, hi, strict=True))
        coords = _local_coords(box, vox)
        d = _capsule_distance(coords, a, b)
        body = d < radius
        # inside one cell and clear of its membrane
        centre_vox = tuple(np.clip((center / vox).astype(int), 0, np.array(shape) - 1))
        cell_id = cells[centre_vox]
        inside = (cells[box] == cell_id) & (dist[box] > 20.0)
        if body.sum() == 0 or (body & ~inside).sum() > 0.02 * body.sum():
            continue
        body &= inside  # never over a membrane or into the next cell
        mito[box] |= body
        # dark matrix, darker double outer membrane, striped cristae across the long axis
        sub = img[box]
        along = sum((coords[i] - a[i]) * direction[i] for i in range(3))
        cristae = 0.5 + 0.5 * np.cos(2 * np.pi * along / rng.uniform(45.0, 70.0))
        edge = np.exp(-np.square((d - radius + 8.0) / 9.0))
        value = 105.0 - 30.0 * cristae - 45.0 * edge
        sub[body] = value[body]
        n_mito -= 1
    classes[mito] = 2
    cells = np.where(classes == 1, 0, cells).astype(np.uint32)

    # ---- vesicle clusters (class 0: distractors) -------------------------------------------
    n_clusters = max(1, int(np.prod(extent) / 3e8))
    for _ in range(n_clusters):
        center = rng.random(3) * extent
        for _ in range(int(rng.integers(15, 40))):
            c = center + rng.normal(0.0, 150.0, 3)
            r = rng.uniform(17.0, 25.0)
            lo = np.maximum(((c - r - 10) / vox).astype(int), 0)
            hi = np.minimum(((c + r + 10) / vox).astype(int) + 1, shape)
            if np.any(hi <= lo):
                continue
            box = tuple(slice(int(lo_), int(hi_)) for lo_, hi_ in zip(lo, hi, strict=True))
            coords = _local_coords(box, vox)
            d = np.sqrt(sum((coords[i] - c[i]) ** 2 for i in range(3)))
            free = classes[box] == 0
            rim = (np.abs(d - r) < 6.0) & free
            lumen = (d < r - 6.0) & free
            sub = img[box]
            sub[rim] -= 85.0
            sub[lumen] += 10.0

    # ---- acquisition: section drift, blur, noise -------------------------------------------
    z = np.arange(shape[0], dtype=np.float32)
    drift_gain = 1.0 + 0.06 * np.sin(2 * np.pi * z / max(shape[0], 1) * rng.uniform(0.5, 1.5))
    drift_gain += rng.normal(0.0, 0.015, shape[0])  # section-to-section jitter
    drift_offset = 8.0 * np.cos(2 * np.pi * z / max(shape[0], 1) * rng.uniform(0.3, 1.0))
    img = img * drift_gain[:, None, None].astype(np.float32) + drift_offset[:, None, None]
    img = ndimage.gaussian_filter(img, sigma=tuple(np.array([6.0, 6.0, 6.0]) / vox))
    if noise > 0:
        shot = rng.standard_normal(shape).astype(np.float32) * np.sqrt(np.maximum(img, 1.0))
        img += noise * (1.1 * shot + rng.normal(0.0, 7.0, shape).astype(np.float32))
    raw = np.clip(np.round(img), 0, 255).astype(np.uint8)

    return Sample(
        raw=raw,
        classes=classes,
        cells=cells,
        voxel_size=(float(vox[0]), float(vox[1]), float(vox[2])),
    )
