"""Small real TorchScript models written to tmp folders, with their sidecars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_emparsl.core.models.unet import UNet
from napari_emparsl.core.volume import save_array


def save_script(module: nn.Module, path: Path, sidecar: str) -> str:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    Path(str(path) + ".yaml").write_text(sidecar)
    return str(path)


@pytest.fixture
def conv_model(tmp_path) -> str:
    """3D image model, receptive radius 2: two 3×3×3 convs."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 1, 3, padding=1))
    return save_script(
        m, tmp_path / "conv.pt", "kind: image\nhalo: [2, 2, 2]\nblock: [16, 16, 16]\n"
    )


class Scaled(nn.Module):
    """A random U-Net on the tests' volumes of [0, 1) as on data of [0, 255): its logits then
    differ from voxel to voxel enough that the argmax takes every class (on [0, 1) itself it
    was class b on every voxel, logits ~1e-3 apart: comparisons of its labels could not fail,
    nor those of its logits at atol 1e-4 see a halo too small)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x * 255.0)


def _assert_classes_mixed(labels: np.ndarray, classes: int = 3, least: float = 0.02) -> None:
    """Each class on at least ``least`` of the voxels: a comparison of such labels can fail."""
    labels = np.asarray(labels)
    shares = np.bincount(labels.ravel().astype(np.int64), minlength=classes) / labels.size
    assert (shares >= least).all(), f"class shares {shares.round(3)}: a degenerate reference"


@pytest.fixture
def classes_mixed():
    """The check above, for the tests that compare labels of ``unet_model``."""
    return _assert_classes_mixed


@pytest.fixture
def unet_model(tmp_path) -> str:
    """Random-weight 3D U-Net (depth 2) as a 3-class labels model; halo 24 ≥ its context (22).
    On the tests' random volumes every class covers 4–60 % of the voxels."""
    torch.manual_seed(2)
    m = Scaled(UNet(1, 3, base=4, depth=2))
    return save_script(
        m,
        tmp_path / "unet.pt",
        "kind: labels\nclasses: [a, b, c]\nhalo: [24, 24, 24]\nmultiple: [4, 4, 4]\nblock: [32, 32, 32]\n",
    )


class Conv2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.fixture
def conv2d_model(tmp_path) -> str:
    torch.manual_seed(2)
    return save_script(
        Conv2D(),
        tmp_path / "conv2d.pt",
        "kind: image\nspatial_dims: 2\nhalo: [0, 2, 2]\nblock: [1, 32, 32]\n",
    )


class FailsOnMarker(nn.Module):
    """Raises on blocks whose input holds the marker value 255 (a model that breaks on some data)."""

    def forward(self, x):
        if bool((x >= 255.0).any()):
            raise RuntimeError("marker found: this model cannot handle saturated voxels")
        return x * 2.0


@pytest.fixture
def failing_model(tmp_path) -> str:
    return save_script(FailsOnMarker(), tmp_path / "fails.pt", "kind: image\nblock: [16, 16, 16]\n")


@pytest.fixture
def float_volume(tmp_path):
    """Random float32 volume 40×50×60, chunks 16³, anisotropic voxel size 40×8×8."""
    data = np.random.default_rng(0).random((40, 50, 60)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16), voxel_size=(40, 8, 8))
    return f"{tmp_path}/in.n5:raw", data


@pytest.fixture
def save_model():
    """The save_script helper, for tests that write their own model files."""
    return save_script
