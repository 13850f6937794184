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


def test_many_unnamed_classes_are_not_cut_to_uint8():
    """A labels model of 300 output channels without class names: uint16 class ids (before:
    uint8, ids over 255 wrapped)."""
    from napari_emparsl.core.models.spec import ModelSpec

    spec = ModelSpec(kind="labels", out_channels=300)
    assert spec.n_outputs == 300 and spec.label_dtype == "uint16"
    assert ModelSpec(kind="labels", classes=("a", "b")).label_dtype == "uint8"


def test_a_2d_model_pads_each_axis_by_its_own_length():
    """Padding to a 2D model's size multiple: mirrored along y and x wherever they are long
    enough, whatever the z of the batch (before: one slice in a block made it repeat the edge,
    so tiles differed from a whole-volume forward near the far edge)."""
    from napari_emparsl.core.blockwise import _pad_end

    x = np.arange(2 * 1 * 5 * 6, dtype=np.float32).reshape(2, 1, 5, 6)
    padded = _pad_end(x, [0, 0, 3, 2])
    assert padded.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(padded, np.pad(x, [(0, 0), (0, 0), (0, 3), (0, 2)], "reflect"))
    short = _pad_end(np.ones((1, 1, 2, 6), np.float32), [0, 0, 3, 0])  # y shorter than its pad
    assert short.shape == (1, 1, 5, 6)


@pytest.mark.parametrize(
    ("conv", "spatial_dims", "expected"),
    [
        # a 3D model described as 2D takes a block's batch of slices for one unbatched volume
        (torch.nn.Conv3d(3, 3, 3, padding=1), 2, "The model is a 3D model (its convolutions "
         "are conv3d), but its description says spatial_dims: 2; set spatial_dims: 3."),
        (torch.nn.Conv3d(1, 3, 3, padding=1), 2, "The model is a 3D model (its convolutions "
         "are conv3d), but its description says spatial_dims: 2; set spatial_dims: 3."),
        (torch.nn.Conv2d(3, 3, 3, padding=1), 3, "The model is a 2D model (its convolutions are "
         "conv2d), but its description says spatial_dims: 3; set spatial_dims: 2."),
        (torch.nn.Conv3d(2, 3, 3, padding=1), 3, "The model takes 2 input channel(s), not the 3 "
         "its description says; set in_channels: 2 (and give it a volume with 2 channel(s))."),
    ],
)  # fmt: skip
def test_a_block_of_a_misdescribed_model_fails_in_a_sentence(conv, spatial_dims, expected):
    """What a block says where the run's trial could not tell (torch's own words were a
    reshape error, "Expected 3D (unbatched) or 4D (batched) input to conv2d", "expected input
    … to have 2 channels, but got 3 channels instead")."""
    from napari_emparsl.core.blockwise import run_model_on_array
    from napari_emparsl.core.models.spec import ModelSpec

    spec = ModelSpec(kind="image", in_channels=3, out_channels=3, spatial_dims=spatial_dims)
    with pytest.raises(ValueError) as err:
        run_model_on_array(conv.eval(), spec, np.zeros((3, 3, 8, 8), np.float32))
    assert str(err.value) == expected


def test_a_3d_model_of_2d_convolutions_runs_as_described():
    """A 3D model that runs 2D convolutions slice by slice itself (a 2D network wrapped for
    z, y, x input, as some bioimage.io packages are) has only 4-D weights: described as 3D it
    runs (it was refused as a 2D model, with advice that broke it)."""
    from napari_emparsl.core.blockwise import run_model_on_array
    from napari_emparsl.core.models.spec import ModelSpec

    class SliceWise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            n, c, z, y, w = x.shape
            out = self.conv(x.permute(0, 2, 1, 3, 4).reshape(n * z, c, y, w))
            return out.reshape(n, z, 2, y, w).permute(0, 2, 1, 3, 4)

    module = torch.jit.script(SliceWise().eval())
    spec = ModelSpec(kind="image", out_channels=2, spatial_dims=3)
    x = np.random.default_rng(0).random((1, 4, 8, 8)).astype(np.float32)
    out = run_model_on_array(module, spec, x)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
