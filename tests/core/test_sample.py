"""The synthetic EM sample: deterministic, the promised classes, EM-like contrast, physical size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_emparsl.core.sample import CLASS_NAMES, Sample, make_sample


@pytest.fixture(scope="module")
def default_sample() -> Sample:
    return make_sample()  # the only full-size call: ~3 s


def _cells_per_line(cells: np.ndarray, axis: int) -> float:
    """Mean number of distinct cells a line of voxels along ``axis`` passes through."""
    ordered = np.sort(np.moveaxis(cells, axis, -1), axis=-1)
    new_id = (ordered[..., 1:] != ordered[..., :-1]) & (ordered[..., 1:] > 0)
    return float(np.mean(new_id.sum(axis=-1) + (ordered[..., 0] > 0)))


def test_default_sample_types_and_classes(default_sample):
    s = default_sample
    assert s.raw.shape == s.classes.shape == s.cells.shape == (128, 256, 256)
    assert (s.raw.dtype, s.classes.dtype, s.cells.dtype) == (np.uint8, np.uint8, np.uint32)
    assert s.class_names == CLASS_NAMES == ("background", "membrane", "mitochondria")
    assert s.voxel_size == (8.0, 8.0, 8.0)
    assert set(np.unique(s.classes).tolist()) == {0, 1, 2}
    fractions = np.bincount(s.classes.ravel(), minlength=3) / s.classes.size
    assert 0.05 < fractions[1] < 0.25, fractions  # membranes
    assert 0.01 < fractions[2] < 0.15, fractions  # mitochondria


def test_default_sample_cells(default_sample):
    cells, classes = default_sample.cells, default_sample.classes
    ids = np.unique(cells)
    assert ids[0] == 0 and len(ids) - 1 > 10
    np.testing.assert_array_equal(ids[1:], np.arange(1, len(ids)))  # numbered 1..N
    np.testing.assert_array_equal(cells == 0, classes == 1)  # 0 exactly on membranes
    # two cells never touch: there is always membrane between them
    for axis in range(3):
        a, b = np.moveaxis(cells, axis, 0)[:-1], np.moveaxis(cells, axis, 0)[1:]
        assert not np.any((a != b) & (a > 0) & (b > 0))


def test_each_mitochondrion_lies_in_one_cell(default_sample):
    bodies, n = ndimage.label(default_sample.classes == 2)
    assert n >= 3
    cells = default_sample.cells
    for sl, label in zip(ndimage.find_objects(bodies), range(1, n + 1), strict=True):
        under = np.unique(cells[sl][bodies[sl] == label])
        assert len(under) == 1 and under[0] > 0, (label, under)


def test_em_contrast(default_sample):
    raw, classes = default_sample.raw, default_sample.classes
    cytoplasm, membrane, mito = (float(raw[classes == k].mean()) for k in range(3))
    assert 140 < cytoplasm < 220
    assert membrane < cytoplasm - 40, (cytoplasm, membrane)
    assert mito < cytoplasm - 40, (cytoplasm, mito)
    # grainy, not flat: the noise shows within the cytoplasm
    assert raw[classes == 0].std() > 8


def test_deterministic_and_seed_dependent():
    a = make_sample((16, 48, 48), seed=5)
    b = make_sample((16, 48, 48), seed=5)
    c = make_sample((16, 48, 48), seed=6)
    for name in ("raw", "classes", "cells"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.raw, c.raw)
    assert not np.array_equal(a.cells, c.cells)


def test_noise_scales_only_the_raw():
    clean = make_sample((16, 64, 64), seed=3, noise=0.0)
    noisy = make_sample((16, 64, 64), seed=3, noise=1.0)
    noisier = make_sample((16, 64, 64), seed=3, noise=2.0)
    np.testing.assert_array_equal(clean.classes, noisier.classes)
    np.testing.assert_array_equal(clean.cells, noisier.cells)
    sd1 = np.std(noisy.raw.astype(float) - clean.raw)
    sd2 = np.std(noisier.raw.astype(float) - clean.raw)
    assert sd1 > 5 and 1.6 < sd2 / sd1 < 2.4, (sd1, sd2)


def _adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement of two cell labellings (1: the same partition, ~0: unrelated), off membranes."""
    both = (a > 0) & (b > 0)
    _, ai = np.unique(a[both], return_inverse=True)
    _, bi = np.unique(b[both], return_inverse=True)

    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(float)
        return float(np.sum(counts * (counts - 1) / 2))

    joint = pairs(np.bincount(ai * (bi.max() + 1) + bi))
    pa, pb, n = pairs(np.bincount(ai)), pairs(np.bincount(bi)), pairs(np.array([ai.size]))
    expected = pa * pb / n
    return (joint - expected) / (0.5 * (pa + pb) - expected)


def test_anisotropy_keeps_physical_size():
    # the same 1.92 × 0.77 × 0.77 µm of tissue, cut into 8 nm and into 40 nm sections
    iso = make_sample((240, 96, 96), seed=2)
    aniso = make_sample((48, 96, 96), seed=2, anisotropy=5.0)
    assert aniso.voxel_size == (40.0, 8.0, 8.0)
    # section k of 40 nm is centred on 8 nm section 5k + 2: the same cells there, at the same
    # place and size (the smooth warp of the walls is drawn anew, so not voxel for voxel)
    agreement = _adjusted_rand_index(iso.cells[2::5], aniso.cells)
    assert agreement > 0.6, agreement
    # while 48 sections of 8 nm span a few cells along z, 48 of 40 nm span many more
    along_z = _cells_per_line(aniso.cells, 0) / _cells_per_line(iso.cells[:48], 0)
    assert along_z > 2.0, along_z


@pytest.mark.parametrize("shape", [(8, 32, 32), (4, 20, 30), (3, 100, 7), (1, 1, 1)])
def test_small_and_odd_shapes(shape):
    s = make_sample(shape, seed=1, anisotropy=2.0)
    assert s.raw.shape == s.classes.shape == s.cells.shape == shape
    assert s.cells.max() >= 1
    assert np.all(s.classes <= 2)
    np.testing.assert_array_equal(s.cells == 0, s.classes == 1)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((0, 10, 10),), {}, "three positive sizes"),
        (((10, 10),), {}, "three positive sizes"),
        (((4, 16, 16),), {"anisotropy": 0.0}, "anisotropy"),
        (((4, 16, 16),), {"voxel_size_nm": -8.0}, "voxel_size_nm"),
        (((4, 16, 16),), {"noise": -1.0}, "noise"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sample(*args, **kwargs)
