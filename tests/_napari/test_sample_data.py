"""napari sample data: the synthetic EM volume with classes and cells."""

from __future__ import annotations

import numpy as np


def test_open_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-emparsl", "synthetic_em")
    names = [layer.name for layer in layers]
    assert names == ["sample raw", "sample classes", "sample cells"]
    raw, classes, cells = layers
    assert raw._type_string == "image" and raw.data.dtype == np.uint8
    assert classes._type_string == "labels" and set(np.unique(classes.data)) == {0, 1, 2}
    assert cells._type_string == "labels" and len(np.unique(cells.data)) > 10
    assert raw.data.shape == (128, 256, 256)
    assert tuple(raw.scale) == tuple(classes.scale)
