"""Every container in ../shared/data (written by N5-Java, rust-n5, zarr-python, z5py) opens with
the expected values, or fails with a clear message where no library can read it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_emparsl.core.volume import Volume, VolumeError, container_tree, openable_keys

JAVA_EXPECTED = np.array([[0] * 5 + [1] * 2] * 4 + [[2] * 5 + [3] * 2], dtype=np.uint8)


@pytest.mark.parametrize("version", ["1.5.0", "2.5.1", "3.1.3"])
def test_n5_java_backward(shared_data, version):
    vol = Volume.open(shared_data / "n5_java_backward" / f"data-{version}.n5", "raw")
    assert vol.shape == (5, 7) and vol.compression == "raw"
    np.testing.assert_array_equal(vol.data.compute(), JAVA_EXPECTED)  # truncated edge blocks


@pytest.mark.parametrize(
    ("container", "compressions"),
    [
        ("n5-java.n5", ["raw", "gzip", "bzip2", "xz"]),
        ("pyn5.n5", ["raw", "gzip", "bzip2"]),
        ("zarr.n5", ["raw", "gzip"]),
        ("z5py.n5", ["raw", "gzip"]),
    ],
)
def test_n5_implementations(shared_data, container, compressions):
    import imageio.v3 as iio

    data_dir = shared_data / "n5_implementations" / "data"
    reference = iio.imread(data_dir / "reference_image.png")
    for comp in compressions:
        vol = Volume.open(data_dir / container, comp)
        np.testing.assert_array_equal(vol.data.compute(), reference, err_msg=f"{container}:{comp}")


def test_n5_java_lz4_clear_error(shared_data):
    with pytest.raises(VolumeError, match="N5-Java's lz4 compression") as err:
        Volume.open(shared_data / "n5_implementations" / "data" / "n5-java.n5", "lz4")
    assert "\n" not in str(err.value)


def test_cremi_anisotropic(shared_data):
    path = shared_data / "cremi_C_crop" / "cremi_C_crop.n5"
    raw = Volume.open(path, "raw")
    assert raw.shape == (25, 625, 625) and raw.voxel_size == (40.0, 4.0, 4.0)
    assert raw.chunks == (8, 128, 128) and not raw.is_labels
    labels = Volume.open(path, "labels/sparse_neurons")
    assert labels.is_labels and labels.dtype == np.uint64
    assert np.count_nonzero(labels.data[4].compute()) > 0.3 * 625 * 625
    assert labels.data[5].compute().max() == 0  # only z=4 is labelled


def test_gala_every_dataset_opens(shared_data):
    path = shared_data / "gala_fibsem_tiny" / "gala_tiny.n5"
    keys = openable_keys(path)
    assert len(keys) == 8
    kinds = {k: Volume.open(path, k).is_labels for k in keys}
    assert kinds["train/raw"] is False and kinds["train/boundary_probability"] is False
    assert kinds["train/labels/neurons"] is True and kinds["train/watershed"] is True
    raw = Volume.open(path, "train/raw").data.compute()
    gt = Volume.open(path, "train/labels/neurons").data.compute()
    assert raw[gt == 0].mean() < raw[gt > 0].mean() - 30  # boundaries are dark


def test_every_shared_container_opens_or_says_why(shared_data):
    containers = sorted(shared_data.rglob("*.n5"))
    assert len(containers) >= 8
    for container in containers:
        for key in [n["key"] for n in container_tree(container) if n["kind"] == "dataset"]:
            try:
                vol = Volume.open(container, key)
                vol.data[tuple(slice(0, c) for c in vol.chunks)].compute()
            except VolumeError as err:
                assert key == "lz4" and "lz4" in str(err), f"{container}:{key}: {err}"
