"""A synthetic EM-like volume with ground truth, generated deterministically from a seed.

What it imitates (serial-section TEM / FIB-SEM of heavy-metal stained neural tissue):

- cells: a warped 3D power (weighted Voronoi) diagram, so that profiles have curved walls and
  mixed sizes (many thin axon-like ones, a few large dendrite-like ones), each with a bright,
  finely granular cytoplasm of its own tone;
- membranes: dark sheets ~20–30 nm thick on every cell boundary, of slightly varying thickness;
- mitochondria: dark capsules (200–500 nm wide, 0.5–1.5 µm long, any orientation) inside the
  larger cells, with a darker double outer membrane and light, wavy cristae across the long axis;
- vesicles: clusters of ~40 nm dark-rimmed, light-centred spheres near a membrane, facing a dark
  postsynaptic density across it (distractors, class 0);
- acquisition: slow per-section gain/offset drift along z with section-to-section jitter,
  Gaussian blur (the point spread), then Poisson-like shot noise and Gaussian read noise.

Everything is laid out in physical units (nm) and sampled with the voxel size, so ``anisotropy``
(z voxel size / xy voxel size) keeps the structures' physical size. Pure numpy/scipy (no Qt,
napari, torch or parsl): it runs on headless workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

CLASS_NAMES: tuple[str, ...] = ("background", "membrane", "mitochondria")

__all__ = ["CLASS_NAMES", "Sample", "make_sample"]

# Physical layout (nm). Chosen to look like cortical neuropil at 8 nm voxels.
_CELL_NM = 520.0  # mean seed spacing: ~45 profiles in the default 1×2×2 µm volume
_COARSE_NM = 16.0  # grid on which the tessellation is computed (the expensive part)
_MEMBRANE_HALF_NM = 11.0  # half thickness: membranes ~22 nm (±30 %)
_MITO_FRACTION = 0.04  # of the volume
_MITO_RADIUS_NM = (100.0, 220.0)
_MITO_LENGTH_NM = (500.0, 1500.0)  # end to end
_VESICLE_RADIUS_NM = (17.0, 23.0)
_BLUR_NM = 8.0  # Gaussian sigma of the point spread

# Grey levels before drift and noise.
_CYTOPLASM = 182.0
_MEMBRANE_DEPTH = 115.0


@dataclass(frozen=True)
class Sample:
    """A synthetic EM volume and its ground truth.

    Attributes
    ----------
    raw
        uint8 (z, y, x) EM intensities: bright cytoplasm, dark membranes and mitochondria.
    classes
        uint8 (z, y, x): 0 cytoplasm/background, 1 membrane, 2 mitochondria.
    cells
        uint32 (z, y, x) cell instance ids 1..N; 0 exactly on membranes.
    voxel_size
        nm, (z, y, x).
    class_names
        Names of the class ids, in order.
    """

    raw: np.ndarray
    classes: np.ndarray
    cells: np.ndarray
    voxel_size: tuple[float, float, float]
    class_names: tuple[str, ...] = CLASS_NAMES


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma_vox``.

    Filtered on a grid coarser by about sigma/2 and zoomed up linearly: a wide filter on the
    full grid would dominate the run time, and the field is smooth at that scale anyway.
    """
    sigma_vox = np.asarray(sigma_vox, float)
    factor = np.maximum(1, (sigma_vox // 2).astype(int))
    coarse_shape = tuple(int(-(-n // f)) + 1 for n, f in zip(shape, factor, strict=True))
    coarse = rng.standard_normal(coarse_shape, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma_vox / factor, mode="wrap")
    if np.any(factor > 1):
        coarse = ndimage.zoom(coarse, factor, order=1, grid_mode=True, mode="nearest")
    field = np.ascontiguousarray(coarse[tuple(slice(0, n) for n in shape)])
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _boundaries(cells: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour (on the higher side, along any axis) in another cell."""
    boundary = np.zeros(cells.shape, bool)
    for axis in range(cells.ndim):
        lo = [slice(None)] * cells.ndim
        lo[axis] = slice(0, -1)
        boundary[tuple(lo)] |= np.diff(cells, axis=axis) != 0
    return boundary


def _upsample(coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...], order: int):
    """Back from the coarse grid to ``shape``; order 0 repeats, order 1 interpolates."""
    crop = tuple(slice(0, n) for n in shape)
    if order == 0:
        out = coarse
        for axis, s in enumerate(step):
            if s > 1:
                out = np.repeat(out, s, axis=axis)
        return np.ascontiguousarray(out[crop])
    if np.all(step == 1):
        return coarse[crop]
    out = ndimage.zoom(coarse, step, order=1, grid_mode=True, mode="nearest")
    return np.ascontiguousarray(out[crop])


def _tessellate(
    rng: np.random.Generator, shape: tuple[int, int, int], vox: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cell labels and each voxel's distance (nm) to its cell's wall, on a coarse grid.

    A power diagram (Voronoi with a weight per seed) gives a realistic mix of profile sizes;
    warping the sampling positions with a smooth displacement field bends its flat walls.
    The lifting trick turns the power diagram into an ordinary 4D nearest-neighbour query:
    a seed at (s, sqrt(W - w)) is, from (p, 0), at squared distance |p - s|² - w + W.

    Returns
    -------
    labels, dist
        On the coarse grid (``step`` voxels per coarse voxel, see ``_coarse_step``); labels
        1..N numbered by first appearance is not guaranteed, only distinctness.
    """
    step = _coarse_step(vox)
    cvox = vox * step
    cshape = tuple(int(-(-n // s)) for n, s in zip(shape, step, strict=True))
    extent = np.array(shape) * vox
    # seeds beyond the borders too, so cells cut by the border look like any other
    margin = _CELL_NM
    lo, hi = -margin, extent + margin
    n_seeds = max(3, int(np.prod(hi - lo) / _CELL_NM**3))
    seeds = lo + rng.random((n_seeds, 3)) * (hi - lo)
    # log-normal radii: mostly thin profiles, a few thick ones; weight = radius² (power
    # diagram), so a thick seed pushes its walls outward
    radius = _CELL_NM * 0.45 * rng.lognormal(0.0, 0.45, n_seeds)
    weight = radius**2
    lift = np.sqrt(weight.max() - weight)
    tree = cKDTree(np.column_stack([seeds, lift]))

    # bent walls: two octaves of smooth displacement (nm)
    disp = [
        55.0 * _smooth_noise(rng, cshape, 420.0 / cvox)
        + 14.0 * _smooth_noise(rng, cshape, 110.0 / cvox)
        for _ in range(3)
    ]
    axes = [(np.arange(n, dtype=np.float32) + 0.5) * v for n, v in zip(cshape, cvox, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    pts = np.column_stack(
        [(grid[i] + disp[i]).ravel() for i in range(3)] + [np.zeros(int(np.prod(cshape)))]
    )
    k = min(4, n_seeds)
    d2, idx = tree.query(pts, k=k, workers=2)
    d2 = np.square(d2)
    nearest = idx[:, 0]
    # distance to the wall with each runner-up j: (power_j - power_1) / (2 |s_j - s_1|)
    dist = np.full(len(pts), np.inf)
    for j in range(1, k):
        gap = np.linalg.norm(seeds[idx[:, j]] - seeds[nearest], axis=1)
        dist = np.minimum(dist, (d2[:, j] - d2[:, 0]) / (2.0 * np.maximum(gap, 1e-6)))
    labels = (nearest + 1).astype(np.uint32).reshape(cshape)
    return labels, dist.astype(np.float32).reshape(cshape)


def _coarse_step(vox: np.ndarray) -> np.ndarray:
    return np.maximum(1, np.round(_COARSE_NM / vox)).astype(int)


def _box(
    center: np.ndarray, reach: np.ndarray, vox: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Voxel box around a physical centre (nm), clipped to the volume; None when outside."""
    lo = np.maximum(np.floor((center - reach) / vox).astype(int), 0)
    hi = np.minimum(np.ceil((center + reach) / vox).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _coords(box: tuple[slice, ...], vox: np.ndarray) -> list[np.ndarray]:
    """Broadcastable physical coordinates (nm) of the voxel centres inside ``box``."""
    out = []
    for axis, sl in enumerate(box):
        shape = [1, 1, 1]
        shape[axis] = sl.stop - sl.start
        out.append(((np.arange(sl.start, sl.stop) + 0.5) * vox[axis]).reshape(shape))
    return out


def _place_mitochondria(
    rng: np.random.Generator,
    img: np.ndarray,
    classes: np.ndarray,
    cells: np.ndarray,
    dist: np.ndarray,
    vox: np.ndarray,
) -> None:
    """Paint mitochondria into ``img`` and ``classes`` (in place), each inside one cell."""
    shape = img.shape
    extent = np.array(shape) * vox
    mean_r, mean_len = np.mean(_MITO_RADIUS_NM), np.mean(_MITO_LENGTH_NM)
    mean_volume = np.pi * mean_r**2 * (mean_len - 2 * mean_r) + 4 / 3 * np.pi * mean_r**3
    wanted = int(round(np.prod(extent) * _MITO_FRACTION / mean_volume))
    # candidate centres: deep inside a cell, where a mitochondrion's width fits
    deep = np.flatnonzero(dist.ravel() > _MITO_RADIUS_NM[0] + 25.0)
    if wanted == 0 or deep.size == 0:
        return
    placed, tries = 0, 0
    while placed < wanted and tries < 20 * wanted + 20:
        tries += 1
        center = (np.array(np.unravel_index(rng.choice(deep), shape)) + 0.5) * vox
        cell_id = cells[tuple((center / vox).astype(int))]
        room = float(dist[tuple((center / vox).astype(int))])
        radius = min(rng.uniform(*_MITO_RADIUS_NM), room - 20.0)
        if radius < _MITO_RADIUS_NM[0] * 0.8:
            continue
        length = rng.uniform(*_MITO_LENGTH_NM)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        # shorten until it stays inside its cell, clear of the membrane
        for _ in range(4):
            half = max(length / 2 - radius, 0.0)
            a, b = center - direction * half, center + direction * half
            box = _box(center, np.abs(direction) * half + radius + 30.0, vox, shape)
            if box is None:
                break
            coords = _coords(box, vox)
            ab = b - a
            t = sum((coords[i] - a[i]) * ab[i] for i in range(3)) / max(float(ab @ ab), 1e-6)
            t = np.clip(t, 0.0, 1.0)
            d = np.sqrt(sum((coords[i] - a[i] - t * ab[i]) ** 2 for i in range(3)))
            body = d < radius
            fits = (cells[box] == cell_id) & (dist[box] > 18.0) & (classes[box] == 0)
            if (body & ~fits).sum() <= 0.01 * body.sum():
                break
            length *= 0.7
        else:
            continue
        if box is None or not body.any():
            continue
        body &= fits  # the last few voxels that would cross the membrane or another body
        classes[box][body] = 2

        # matrix dark; cristae: thin light lamellae across the long axis, wavy and irregularly
        # spaced, not reaching the outer membrane; outer double membrane darker still
        along = sum((coords[i] - center[i]) * direction[i] for i in range(3))
        side = np.cross(direction, rng.normal(size=3))
        side /= np.linalg.norm(side) + 1e-9
        across = sum((coords[i] - center[i]) * side[i] for i in range(3))
        period = rng.uniform(55.0, 80.0)
        phase = along + 12.0 * np.sin(2 * np.pi * across / rng.uniform(120.0, 220.0))
        cristae = np.cos(2 * np.pi * phase / period) ** 8  # narrow bright lines
        cristae = cristae * (d < radius - 22.0)
        edge = np.exp(-np.square((d - (radius - 9.0)) / 8.0))
        value = 96.0 + 48.0 * cristae - 55.0 * edge + rng.normal(0.0, 6.0)
        img[box][body] = value[body]
        placed += 1


def _place_vesicles(
    rng: np.random.Generator,
    img: np.ndarray,
    classes: np.ndarray,
    cells: np.ndarray,
    dist: np.ndarray,
    vox: np.ndarray,
) -> None:
    """Paint clusters of synaptic vesicles near a membrane, and a dark density across it."""
    shape = img.shape
    extent = np.array(shape) * vox
    n_clusters = max(1, int(round(np.prod(extent) / 1.1e9)))
    near = np.flatnonzero((dist.ravel() > 60.0) & (dist.ravel() < 140.0))
    if near.size == 0:
        return
    for _ in range(n_clusters):
        center = (np.array(np.unravel_index(rng.choice(near), shape)) + 0.5) * vox
        cell_id = cells[tuple((center / vox).astype(int))]
        spread = rng.uniform(70.0, 130.0)
        placed: list[np.ndarray] = []
        for _ in range(int(rng.integers(40, 90))):
            r = rng.uniform(*_VESICLE_RADIUS_NM)
            c = center + rng.normal(0.0, spread, 3)
            ci = tuple(np.clip((c / vox).astype(int), 0, np.array(shape) - 1))
            # inside the bouton, off membranes and mitochondria, not overlapping another vesicle
            if cells[ci] != cell_id or dist[ci] < r + 8.0 or classes[ci] != 0:
                continue
            if placed and np.min(np.linalg.norm(np.array(placed) - c, axis=1)) < 2 * r + 4:
                continue
            box = _box(c, np.full(3, r + 10.0), vox, shape)
            if box is None:
                continue
            coords = _coords(box, vox)
            d = np.sqrt(sum((coords[i] - c[i]) ** 2 for i in range(3)))
            free = (classes[box] == 0) & (cells[box] == cell_id)
            rim = np.exp(-np.square((d - r + 3.0) / 4.5)) * free
            img[box] -= 70.0 * rim
            img[box][(d < r - 6.0) & free] += 8.0
            placed.append(c)
        if len(placed) < 5:
            continue
        # postsynaptic density: a dark band in the neighbouring cell, across the wall closest
        # to the cluster (class 0 on the far side of the membrane: another distractor)
        box = _box(center, np.full(3, 260.0), vox, shape)
        coords = _coords(box, vox)
        d = np.sqrt(sum((coords[i] - center[i]) ** 2 for i in range(3)))
        other = (cells[box] != cell_id) & (cells[box] > 0)
        if not other.any():
            continue
        reach = float(d[other].min()) + 35.0
        psd = other & (d < reach) & (dist[box] < 45.0) & (classes[box] == 0)
        img[box] -= 45.0 * psd * np.exp(-np.square(dist[box] / 30.0))


def make_sample(
    shape: tuple[int, int, int] = (128, 256, 256),
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    voxel_size_nm: float = 8.0,
    noise: float = 1.0,
) -> Sample:
    """Generate a synthetic EM volume of neural tissue and its ground truth.

    Parameters
    ----------
    shape
        Voxels (z, y, x). Any positive sizes, tiny ones included.
    seed
        Same arguments give identical arrays; another seed gives another volume.
    anisotropy
        z voxel size / xy voxel size (FIB-SEM ~1, serial-section TEM 5–10). Structures keep
        their physical size, so they span fewer sections as it grows.
    voxel_size_nm
        xy voxel size in nm.
    noise
        Scales the shot and read noise (0: noise free, blur and drift only).

    Returns
    -------
    Sample
        ``raw``, ``classes``, ``cells`` and ``voxel_size`` = (anisotropy × voxel_size_nm,
        voxel_size_nm, voxel_size_nm).

    Raises
    ------
    ValueError
        For a shape that is not three positive sizes, or non-positive sizes or noise < 0.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, not {shape}")
    if not (anisotropy > 0 and voxel_size_nm > 0 and noise >= 0):
        raise ValueError(
            f"need anisotropy > 0, voxel_size_nm > 0, noise >= 0; got {anisotropy}, "
            f"{voxel_size_nm}, {noise}"
        )
    rng = np.random.default_rng(seed)
    vox = np.array([anisotropy * voxel_size_nm, voxel_size_nm, voxel_size_nm], float)
    step = _coarse_step(vox)

    # ---- cells and membranes (coarse grid, then back to full resolution) --------------------
    labels_c, dist_c = _tessellate(rng, shape, vox)
    cvox = vox * step
    # membranes vary in thickness along their length; u < 1 is inside one
    half_c = _MEMBRANE_HALF_NM * (1.0 + 0.3 * _smooth_noise(rng, labels_c.shape, 200.0 / cvox))
    u = _upsample(dist_c / half_c, step, shape, order=1)
    dist = _upsample(dist_c, step, shape, order=1)
    cells = _upsample(labels_c, step, shape, order=0)
    # every label change lies on a membrane, so no two cells ever touch
    membrane = (u < 1.0) | _boundaries(cells)
    classes = membrane.astype(np.uint8)
    cells[membrane] = 0
    # number the cells 1..N in order of their seeds
    present = np.bincount(cells.ravel()) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.uint32)
    lut[0] = 0
    cells = lut[cells]
    n_cells = int(lut[-1])

    # ---- cytoplasm: a tone per cell, gentle shading, fine granular texture ------------------
    tone = rng.normal(0.0, 7.0, n_cells + 1).astype(np.float32)
    shade_c = 6.0 * _smooth_noise(rng, labels_c.shape, 300.0 / cvox)
    img = _upsample(shade_c, step, shape, order=1)
    img += _CYTOPLASM
    img += tone[cells]
    img += 7.0 * _smooth_noise(rng, shape, 10.0 / vox)
    # membranes: stain profile across the bilayer, darkest in the middle
    img -= _MEMBRANE_DEPTH * np.exp(-np.square(u) * 1.2)

    # ---- organelles ------------------------------------------------------------------------
    _place_mitochondria(rng, img, classes, cells, dist, vox)
    _place_vesicles(rng, img, classes, cells, dist, vox)
    del dist, u

    # ---- acquisition: per-section drift, point spread, noise -------------------------------
    nz = shape[0]
    drift = _smooth_noise(rng, (nz + 2,), np.array([max(nz / 6.0, 1.0)]))[:nz]
    gain = 1.0 + 0.05 * drift + rng.normal(0.0, 0.012, nz)  # slow drift + per-section jitter
    offset = 6.0 * np.roll(drift, nz // 3) + rng.normal(0.0, 2.0, nz)
    img *= gain.astype(np.float32)[:, None, None]
    img += offset.astype(np.float32)[:, None, None]
    img = ndimage.gaussian_filter(img, sigma=tuple(_BLUR_NM / vox), truncate=3.0)
    if noise > 0:
        # shot noise grows with the signal (variance ∝ intensity), read noise does not
        sd = np.sqrt(0.8 * np.maximum(img, 0.0) + 36.0)
        img += noise * sd * rng.standard_normal(shape, dtype=np.float32)
    raw = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    return Sample(
        raw=raw,
        classes=classes,
        cells=cells,
        voxel_size=(float(vox[0]), float(vox[1]), float(vox[2])),
    )
