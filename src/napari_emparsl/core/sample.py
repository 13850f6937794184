"""A synthetic EM-like volume with ground truth, generated deterministically from a seed.

What it imitates (serial-section TEM / FIB-SEM of heavy-metal stained neural tissue):

- cells: a warped 3D power (weighted Voronoi) diagram, so that profiles have curved walls and
  mixed sizes (many thin axon-like ones, a few large dendrite-like ones), each with a bright,
  finely granular cytoplasm of its own tone;
- membranes: dark sheets ~20–30 nm thick on every cell boundary, of slightly varying thickness;
- mitochondria: dark capsules (200–440 nm wide, up to 1.4 µm long, any orientation) inside the
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
#: how napari draws them (as the built-in model's description declares them for its output)
CLASS_COLORS = ("#00000000", "#00e5ffff", "#ff00ffff")

__all__ = ["CLASS_NAMES", "Sample", "make_sample"]

# Physical layout (nm). Chosen to look like cortical neuropil at 8 nm voxels.
_CELL_NM = 470.0  # mean seed spacing: ~60 cells in the default 1×2×2 µm volume
_COARSE_NM = 16.0  # grid on which the tessellation is computed (the expensive part)
_MEMBRANE_HALF_NM = 11.0  # half thickness: membranes ~22 nm, 15–30 nm
_ROUND_NM = 45.0  # corner radius of the cells
_MITO_FRACTION = 0.05  # of the volume
_MITO_RADIUS_NM = (100.0, 220.0)  # 200–440 nm wide
_MITO_LENGTH_NM = (500.0, 1400.0)  # end to end
_VESICLE_RADIUS_NM = (17.0, 23.0)
_BLUR_NM = 8.0  # Gaussian sigma of the point spread

# Grey levels before drift and noise.
_CYTOPLASM = 182.0
_MEMBRANE_DEPTH = 135.0


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
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sigma_vox: np.ndarray,
    *octaves: tuple[float, np.ndarray],
) -> np.ndarray:
    """Stationary Gaussian random field, mean 0, variance 1, correlation length ``sigma_vox``.

    ``octaves`` adds further (amplitude, sigma_vox) fields, sigmas no smaller than the first.
    Filtered on a grid coarser by about sigma/2 and zoomed up linearly, once for all octaves:
    wide filters and zooms on the full grid would dominate the run time, and the field is
    smooth at that scale anyway. The white noise is padded beyond the volume and the variance
    set from the filter, not measured: small volumes get the same statistics as large ones.
    """
    sigma_vox = np.asarray(sigma_vox, float)
    factor = np.maximum(1, (sigma_vox // 2).astype(int))
    coarse_shape = np.array([int(-(-n // f)) + 1 for n, f in zip(shape, factor, strict=True)])
    coarse = np.zeros(tuple(coarse_shape), np.float32)
    for amp, sigma in ((1.0, sigma_vox), *octaves):
        sigma = np.asarray(sigma, float) / factor
        pad = np.ceil(4.0 * sigma).astype(int) + 1
        white = rng.standard_normal(tuple(coarse_shape + 2 * pad), dtype=np.float32)
        octave = ndimage.gaussian_filter(white, sigma, truncate=4.0)
        octave = octave[tuple(slice(p, p + n) for p, n in zip(pad, coarse_shape, strict=True))]
        coarse += (amp / _filtered_std(sigma)) * octave
    if np.any(factor > 1):
        coarse = ndimage.zoom(coarse, factor, order=1, grid_mode=True, mode="nearest")
    return np.ascontiguousarray(coarse[tuple(slice(0, n) for n in shape)])


def _filtered_std(sigma: np.ndarray) -> float:
    """Standard deviation of unit white noise after ``ndimage.gaussian_filter(sigma)``."""
    var = 1.0
    for s in sigma:
        if s > 0:
            x = np.arange(-int(4.0 * s + 0.5), int(4.0 * s + 0.5) + 1)
            kernel = np.exp(-0.5 * np.square(x / s))
            var *= float(np.sum(np.square(kernel / kernel.sum())))
    return float(np.sqrt(var))


def _boundaries(cells: np.ndarray, stain: np.ndarray) -> np.ndarray:
    """Of every two face neighbours in different cells, the more stained one."""
    boundary = np.zeros(cells.shape, bool)
    for axis in range(cells.ndim):
        lo = [slice(None)] * cells.ndim
        hi = [slice(None)] * cells.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        change = cells[lo] != cells[hi]
        lo_darker = stain[lo] >= stain[hi]
        boundary[lo] |= change & lo_darker
        boundary[hi] |= change & ~lo_darker
    return boundary


def _membrane_stain(u: np.ndarray, tilt: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """Membrane stain (0..1) seen in each voxel: a Gaussian profile across the membrane.

    ``u`` is the distance to the wall in half thicknesses, ``tilt`` |n_z| of the wall. A thick
    section (serial-section TEM) projects everything within it, so a membrane oblique to the
    section plane is seen smeared over its travel through the section, and one lying almost
    in the plane as a faint wide sheet: average the profile over the section's thickness.
    """
    u = np.maximum(u, 0.0)  # < 0 in the filled corners: darkest there
    if vox[0] <= 1.5 * vox[1]:
        return np.exp(-np.square(u))
    n = int(min(8, np.ceil(vox[0] / 8.0)))
    stain = np.zeros(u.shape, np.float32)
    for k in range(n):
        shift = vox[0] * ((k + 0.5) / n - 0.5) / _MEMBRANE_HALF_NM
        stain += np.exp(-np.square(u + np.float32(shift) * tilt))
    stain /= n
    return stain


def _upsample(
    coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...], order: int
) -> np.ndarray:
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell labels, distance (nm) to the cell's wall and that wall's tilt, on a coarse grid.

    A power diagram (Voronoi with a weight per seed) gives a realistic mix of profile sizes;
    warping the sampling positions with a smooth displacement field bends its flat walls.
    The lifting trick turns the power diagram into an ordinary 4D nearest-neighbour query:
    a seed at (s, sqrt(W - w)) is, from (p, 0), at squared distance |p - s|² - w + W.

    Returns
    -------
    labels, dist, tilt
        On the coarse grid (``_coarse_step`` voxels per coarse voxel). Labels are seed
        numbers + 1, so some numbers are missing (seeds whose cells lie outside); tilt is
        |n_z| of the nearest wall's normal (0: the wall runs along z, 1: it lies in a section).
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
    radius = _CELL_NM * 0.45 * rng.lognormal(0.0, 0.55, n_seeds)
    weight = radius**2
    lift = np.sqrt(weight.max() - weight)
    tree = cKDTree(np.column_stack([seeds, lift]))

    # bent walls: two octaves of smooth displacement (nm)
    disp = [14.0 * _smooth_noise(rng, cshape, 110.0 / cvox, (4.0, 420.0 / cvox)) for _ in range(3)]
    axes = [(np.arange(n, dtype=np.float32) + 0.5) * v for n, v in zip(cshape, cvox, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    pts = np.zeros((int(np.prod(cshape)), 4))  # the 4th (lift) coordinate of a point is 0
    for i in range(3):
        pts[:, i] = (grid[i] + disp[i]).ravel()
    del disp
    # the nearest seed owns the point; the next two bound it with the nearest walls
    d2, idx = tree.query(pts, k=3, workers=2)
    del pts
    d2 = np.square(d2).astype(np.float32)
    nearest = idx[:, 0]
    # distance to the wall with runner-up j: (power_j - power_1) / (2 |s_j - s_1|)
    gaps = np.linalg.norm(seeds[:, None, :] - seeds[None, :, :], axis=2).astype(np.float32)
    walls = [
        (d2[:, j] - d2[:, 0]) / (2.0 * np.maximum(gaps[nearest, idx[:, j]], 1e-3)) for j in (1, 2)
    ]
    dist = np.minimum(walls[0], walls[1])
    other = np.where(walls[0] <= walls[1], idx[:, 1], idx[:, 2])
    tilt = np.abs(seeds[nearest, 0] - seeds[other, 0]) / np.maximum(gaps[nearest, other], 1e-3)
    # round the cells' edges (radius _ROUND_NM) where two walls meet: neurites are round in
    # section, and junctions fill with stain instead of meeting in sharp points
    far = np.maximum(walls[0], walls[1])
    corner = far < _ROUND_NM
    dist[corner] = _ROUND_NM - np.hypot(_ROUND_NM - dist[corner], _ROUND_NM - far[corner])
    labels = (nearest + 1).astype(np.uint32).reshape(cshape)
    return labels, dist.reshape(cshape), tilt.astype(np.float32).reshape(cshape)


def _coarse_step(vox: np.ndarray) -> np.ndarray:
    """Voxels per coarse-grid voxel along each axis (about _COARSE_NM, at least 1)."""
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
    wanted = _MITO_FRACTION * img.size  # voxels; counted as painted (bodies get clipped)
    # candidate centres: deep inside a cell, where a mitochondrion's width fits
    deep = np.flatnonzero(dist.ravel() > _MITO_RADIUS_NM[0] + 25.0)
    if deep.size == 0:
        return
    painted, tries = 0, 0
    while painted < wanted and tries < 200:
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
        if painted + body.sum() > 1.5 * wanted:
            continue  # small volumes: no single body may take a large part of them
        classes[box][body] = 2

        # matrix dark; cristae: thin light lamellae roughly across the long axis, bent, unevenly
        # spaced and broken, not reaching the outer membrane; outer double membrane darker still
        along = sum((coords[i] - center[i]) * direction[i] for i in range(3))
        side = np.cross(direction, rng.normal(size=3))
        side /= np.linalg.norm(side) + 1e-9
        other = np.cross(direction, side)
        across = sum((coords[i] - center[i]) * side[i] for i in range(3))
        across2 = sum((coords[i] - center[i]) * other[i] for i in range(3))
        period = rng.uniform(60.0, 90.0)
        tilt = rng.uniform(-0.35, 0.35)  # lamellae are seldom exactly perpendicular
        phase = (
            along
            + tilt * across
            + 14.0 * np.sin(2 * np.pi * across / rng.uniform(100.0, 200.0) + rng.uniform(0, 6.3))
            + 0.08 * period * np.sin(2 * np.pi * along / (2.7 * period))  # uneven spacing
        )
        cristae = np.cos(2 * np.pi * phase / period) ** 4  # narrow bright lines
        # gaps: a lamella spans only part of the width
        breaks = np.sin(2 * np.pi * (across2 + 0.6 * along) / rng.uniform(90.0, 160.0))
        cristae = cristae * (breaks > -0.4) * (d < radius - 20.0)
        edge = np.exp(-np.square((d - (radius - 9.0)) / 8.0))
        value = 84.0 + 75.0 * cristae - 50.0 * edge + rng.normal(0.0, 6.0)
        img[box][body] = value[body]
        painted += int(body.sum())


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
    n_clusters = max(1, round(float(np.prod(extent)) / 0.9e9))
    near = np.flatnonzero((dist.ravel() > 80.0) & (dist.ravel() < 200.0))
    if near.size == 0:
        return
    for _ in range(n_clusters):
        center = (np.array(np.unravel_index(rng.choice(near), shape)) + 0.5) * vox
        cell_id = cells[tuple((center / vox).astype(int))]
        spread = rng.uniform(50.0, 90.0)
        placed = np.empty((0, 3))
        for _ in range(int(rng.integers(250, 500))):
            r = rng.uniform(*_VESICLE_RADIUS_NM)
            c = center + rng.normal(0.0, spread, 3)
            ci = tuple(np.clip((c / vox).astype(int), 0, np.array(shape) - 1))
            # inside the bouton, off membranes and mitochondria, not overlapping another vesicle
            if cells[ci] != cell_id or dist[ci] < r + 8.0 or classes[ci] != 0:
                continue
            if len(placed) and np.min(np.sum(np.square(placed - c), axis=1)) < (2 * r + 3) ** 2:
                continue
            box = _box(c, np.full(3, r + 10.0), vox, shape)
            if box is None:
                continue
            coords = _coords(box, vox)
            d = np.sqrt(sum((coords[i] - c[i]) ** 2 for i in range(3)))
            free = (classes[box] == 0) & (cells[box] == cell_id)
            rim = np.exp(-np.square((d - r + 3.0) / 5.0)) * free
            img[box] -= 160.0 * rim
            img[box][(d < r - 7.0) & free] += 20.0
            placed = np.vstack([placed, c])
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
        img[box] -= 60.0 * psd * np.exp(-np.square(dist[box] / 35.0))


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
        For a shape that is not three positive sizes, anisotropy or voxel_size_nm <= 0, or
        noise < 0.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, not {shape}")
    if not anisotropy > 0:
        raise ValueError(f"anisotropy must be > 0, not {anisotropy}")
    if not voxel_size_nm > 0:
        raise ValueError(f"voxel_size_nm must be > 0, not {voxel_size_nm}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, not {noise}")
    rng = np.random.default_rng(seed)
    vox = np.array([anisotropy * voxel_size_nm, voxel_size_nm, voxel_size_nm], float)
    step = _coarse_step(vox)

    # ---- cells and membranes (coarse grid, then back to full resolution) --------------------
    labels_c, dist_c, tilt_c = _tessellate(rng, shape, vox)
    cvox = vox * step
    # membranes vary in thickness along their length (~15–30 nm); u < 1 is inside one
    wobble = np.clip(_smooth_noise(rng, labels_c.shape, 200.0 / cvox), -1.2, 1.5)
    u = _upsample(dist_c / (_MEMBRANE_HALF_NM * (1.0 + 0.25 * wobble)), step, shape, order=1)
    stain = _membrane_stain(u, _upsample(tilt_c, step, shape, order=0), vox)
    del u
    # repeating is accurate to a coarse voxel, plenty for placing organelles, and cheap
    dist = _upsample(dist_c, step, shape, order=0)
    cells = _upsample(labels_c, step, shape, order=0)
    del labels_c, dist_c, tilt_c, wobble
    # membrane where it is seen (as stained as at one half thickness from its middle), and on
    # every label change too, so that no two cells ever touch
    membrane = (stain > np.exp(-1.0)) | _boundaries(cells, stain)
    classes = membrane.astype(np.uint8)
    cells[membrane] = 0
    # number the cells 1..N (some seeds own only membrane or lie outside the volume)
    present = np.bincount(cells.ravel()) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.uint32)
    lut[0] = 0
    cells = lut[cells]
    n_cells = int(lut[-1])

    # ---- cytoplasm: a tone per cell, uneven illumination, fine granular texture ------------
    tone = rng.normal(0.0, 7.0, n_cells + 1).astype(np.float32)
    img = tone[cells]
    img += _CYTOPLASM
    # a separable illumination gradient: as good as a full 3D field here, and free
    for axis in (1, 2):
        ramp = 5.0 * _smooth_noise(rng, (shape[axis] + 2,), np.array([shape[axis] / 3.0]))
        img += ramp[: shape[axis]].reshape([-1 if a == axis else 1 for a in range(3)])
    img += 7.0 * _smooth_noise(rng, shape, 10.0 / vox)
    # sparse dark granules (ribosomes, glycogen, cut microtubules): after the blur, faint dots
    img -= 70.0 * (rng.random(shape, dtype=np.float32) < 0.004)
    img -= _MEMBRANE_DEPTH * stain
    del stain

    # ---- organelles ------------------------------------------------------------------------
    _place_mitochondria(rng, img, classes, cells, dist, vox)
    _place_vesicles(rng, img, classes, cells, dist, vox)
    del dist

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


SAMPLE_LEVELS = 3  # pyramid levels written for each dataset of the sample


def write_sample(path: str, sample: Sample, *, overwrite: bool = False) -> None:
    """Write ``sample`` as an N5 container: ``raw``, ``labels/classes`` (with its class names)
    and ``labels/cells``, each a pyramid of :data:`SAMPLE_LEVELS` levels, gzip, 64³ chunks."""
    from napari_emparsl.core.volume import write_pyramid

    chunks = (min(64, sample.raw.shape[0]), 64, 64)
    common = {
        "chunks": chunks,
        "levels": SAMPLE_LEVELS,
        "voxel_size": sample.voxel_size,
        "unit": "nm",
        "overwrite": overwrite,
    }
    write_pyramid(path, "raw", sample.raw, **common)
    names = {"class_names": list(sample.class_names), "class_colors": list(CLASS_COLORS)}
    write_pyramid(path, "labels/classes", sample.classes, labels=True, attrs=names, **common)
    write_pyramid(path, "labels/cells", sample.cells, labels=True, **common)
