"""Worker-side post-processing: the fast argmax equals numpy's, ties and NaNs included."""

from __future__ import annotations

import numpy as np
import pytest

from napari_emparsl.core.blockwise import _argmax0


@pytest.mark.parametrize("classes", [2, 3, 5, 20])
def test_argmax_equals_numpy_with_ties(classes):
    # integer-valued logits: many voxels where two classes tie; the first one wins, as in numpy
    y = np.random.default_rng(classes).integers(0, 4, (classes, 12, 20, 30)).astype(np.float32)
    np.testing.assert_array_equal(_argmax0(y), np.argmax(y, axis=0))


def test_argmax_with_nan_equals_numpy():
    y = np.random.default_rng(0).random((3, 8, 8, 8)).astype(np.float32)
    y[1, 0, 0, 0] = np.nan
    y[2, 4, 4, 4] = np.nan
    np.testing.assert_array_equal(_argmax0(y), np.argmax(y, axis=0))
