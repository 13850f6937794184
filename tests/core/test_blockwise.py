"""Worker-side post-processing: the fast argmax equals numpy's, ties and NaNs included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


class _Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] > 5:
            raise ValueError("block too deep for this model")
        return torch.cat([x, x[:, :, :1]], 1)


def test_torchscript_errors_read_as_the_model_raised_them():
    """TorchScript wraps a model's error in its interpreter's report: the block's error is the
    model's own line, with its type once ("ValueError: …", not "Error: builtins.ValueError")."""
    from napari_emparsl.core.blockwise import _failure

    scripted = torch.jit.script(_Raises())
    errors = []
    for shape in ((1, 1, 8, 8, 8), (1, 1, 4, 4, 4)):
        with pytest.raises(Exception) as err:
            scripted(torch.zeros(shape))
        errors.append(_failure(3, "w", err.value).error)
    assert errors[0] == "ValueError: block too deep for this model"
    assert errors[1].startswith("RuntimeError: Sizes of tensors must match except in dimension")
    assert "RuntimeError: RuntimeError" not in errors[1]
    assert _failure(3, "w", KeyError("x")).error == "KeyError: 'x'"
