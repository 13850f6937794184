"""The synthetic EM sample: deterministic, the promised classes, EM-like contrast."""

from __future__ import annotations

import numpy as np
import pytest

from napari_emparsl.core.sample import CLASS_NAMES, make_sample


@pytest.fixture(scope="module")
def default_sample():
    return make_sample()


def test_default_sample_classes_and_contrast(default_sample):
    s = default_sample
    assert s.raw.shape == s.classes.shape == s.cells.shape == (128, 256, 256)
    assert s.raw.dtype == np.uint8 and s.classes.dtype == np.uint8 and s.cells.dtype == np.uint32
    assert s.class_names == CLASS_NAMES == ("background", "membrane", "mitochondria")
    assert set(np.unique(s.classes)) == {0, 1, 2}
    fractions = [float((s.classes == k).mean()) for k in range(3)]
    assert 0.03 < fractions[1] < 0.25, fractions  # membranes
    assert 0.005 < fractions[2] < 0.15, fractions  # mitochondria
    assert len(np.unique(s.cells)) - 1 > 10
    np.testing.assert_array_equal(s.cells == 0, s.classes == 1)  # 0 exactly on membranes
    means = [float(s.raw[s.classes == k].mean()) for k in range(3)]
    assert means[1] < means[0] - 20 and means[2] < means[0] - 20, means
    assert s.voxel_size == (8.0, 8.0, 8.0)


def test_cells_never_touch_without_membrane(default_sample):
    cells = default_sample.cells
    for axis in range(3):
        a = np.moveaxis(cells, axis, 0)
        left, right = a[:-1], a[1:]
        touching = (left != right) & (left > 0) & (right > 0)
        assert not touching.any()


def test_deterministic_and_seed_dependent():
    a = make_sample((16, 48, 48), seed=5)
    b = make_sample((16, 48, 48), seed=5)
    c = make_sample((16, 48, 48), seed=6)
    np.testing.assert_array_equal(a.raw, b.raw)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert not np.array_equal(a.raw, c.raw)


def test_anisotropy_keeps_physical_size():
    iso = make_sample((48, 96, 96), seed=2)
    aniso = make_sample((48, 96, 96), seed=2, anisotropy=5.0)
    assert aniso.voxel_size == (40.0, 8.0, 8.0)

    def changes_along_z(s):
        return float((np.diff(s.cells.astype(np.int64), axis=0) != 0).mean())

    # a z-step crosses 5× more tissue, so cell ids change more often along z
    assert changes_along_z(aniso) > 2 * changes_along_z(iso)


def test_small_and_noise_free_shapes():
    s = make_sample((4, 20, 30), seed=1, noise=0.0)
    assert s.raw.shape == (4, 20, 30) and s.cells.max() >= 1
    with pytest.raises(ValueError, match="three positive sizes"):
        make_sample((0, 10, 10))
