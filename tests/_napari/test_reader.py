"""napari reader: lazy (dask) layers, voxel size as scale, multiscale pyramids, labels."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from napari_emparsl._napari.reader import get_reader
from napari_emparsl.core import volume as volume_mod
from napari_emparsl.core.volume import Volume, save_array, write_pyramid

PLUGIN = "napari-emparsl"


def test_get_reader_declines_non_n5(tmp_path):
    (tmp_path / "plain").mkdir()
    assert get_reader(str(tmp_path / "plain")) is None
    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    assert get_reader(str(tmp_path / "x.tif")) is None


def test_open_container_in_viewer(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (32, 64, 96), dtype=np.uint8)
    labels = (raw > 128).astype(np.uint16)
    path = tmp_path / "vol.n5"
    write_pyramid(path, "raw", raw, chunks=(16, 32, 32), voxel_size=(40, 8, 8))
    save_array(path, "seg", labels, chunks=(16, 32, 32), voxel_size=(40, 8, 8), labels=True)

    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    by_name = {layer.name: layer for layer in layers}
    assert set(by_name) == {"raw", "seg"}
    image, seg = by_name["raw"], by_name["seg"]
    assert image._type_string == "image" and seg._type_string == "labels"
    assert image.multiscale and len(image.data) == 3
    assert all(isinstance(level, da.Array) for level in image.data)
    assert tuple(image.scale) == (40.0, 8.0, 8.0) and tuple(seg.scale) == (40.0, 8.0, 8.0)
    assert isinstance(seg.data, da.Array) and not seg.multiscale
    np.testing.assert_array_equal(np.asarray(image.data[0][5]), raw[5])
    np.testing.assert_array_equal(np.asarray(seg.data[7]), labels[7])


def test_open_dataset_folder_and_shared_labels(shared_data, make_napari_viewer):
    viewer = make_napari_viewer()
    path = shared_data / "cremi_C_crop" / "cremi_C_crop.n5"
    [raw] = viewer.open(str(path / "raw"), plugin=PLUGIN)
    assert raw._type_string == "image" and tuple(raw.scale) == (40.0, 4.0, 4.0)
    [labels] = viewer.open(str(path / "labels" / "sparse_neurons"), plugin=PLUGIN)
    assert labels._type_string == "labels" and isinstance(labels.data, da.Array)


@pytest.fixture
def huge_sparse_pyramid(tmp_path):
    """A (10^4)^3 uint8 pyramid with only a few chunks written (metadata is all there is)."""
    root = tmp_path / "huge.n5"
    shape, factors = (10_000,) * 3, []
    level = 0
    while True:
        f = 2**level
        lshape = tuple(-(-s // f) for s in shape)
        vol = Volume.create(root, f"em/s{level}", lshape, "uint8", (64, 64, 64))
        attrs = root / "em" / f"s{level}" / "attributes.json"
        a = json.loads(attrs.read_text())
        a["downsamplingFactors"] = [f, f, f]
        attrs.write_text(json.dumps(a))
        factors.append([f, f, f])
        if max(lshape) <= 160:
            break
        level += 1
    group = {"resolution": [8, 8, 8], "unit": "nm", "scales": factors}
    (root / "em" / "attributes.json").write_text(json.dumps(group))
    vol.write(np.full((64, 64, 64), 200, np.uint8), (0, 0, 0))  # one bright corner chunk
    return root


def test_huge_dataset_reads_only_visible_chunks(
    make_napari_viewer, huge_sparse_pyramid, qtbot, monkeypatch
):
    reads: list[tuple[str, tuple]] = []
    original = volume_mod._ChunkReader.__getitem__

    def counting(self, index):  # instrumentation around the real reader
        reads.append((self.key, index))
        return original(self, index)

    monkeypatch.setattr(volume_mod._ChunkReader, "__getitem__", counting)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(huge_sparse_pyramid), plugin=PLUGIN)
    # drawn (the counts below are of what drawing it read: none yet would pass them all)
    qtbot.waitUntil(lambda: bool(reads) and layer.loaded, timeout=20_000)
    qtbot.wait(300)  # and whatever else one draw reads
    assert layer.multiscale and layer.data[0].shape == (10_000,) * 3
    n_levels = len(layer.data)
    assert n_levels == 7
    # a 2D view of one plane reads at most the chunks of that plane at the level shown
    levels_read = {key for key, _ in reads}
    finest_reads = [r for r in reads if r[0] == "em/s0"]
    print(f"chunk reads: {len(reads)}, levels: {sorted(levels_read)}")
    assert len(reads) <= 400, f"{len(reads)} chunk reads"
    assert finest_reads == []  # the finest level is never touched at this zoom
    assert levels_read, "nothing was read for display"
    voxels_read = sum(
        int(np.prod([s.stop - s.start for s in idx])) for _, idx in reads if isinstance(idx, tuple)
    )
    assert voxels_read < 1e-4 * 1e12  # far less than the volume (10^12 voxels)


def test_bad_data_is_one_notification_not_a_traceback(make_napari_viewer, small_n5):
    path, _ = small_n5
    attrs = path / "raw" / "attributes.json"
    attrs.write_text(attrs.read_text()[:20])
    viewer = make_napari_viewer()
    layers, messages = _open_saying(viewer, path / "raw")
    assert layers == [] and len(viewer.layers) == 0
    assert any("is corrupt or truncated" in m and "\n" not in m for m in messages), messages


def test_masked_float_data_gets_finite_contrast(tmp_path):
    """NaN voxels (masked float data) are left out of the layer's contrast limits."""
    data = np.random.default_rng(2).random((8, 32, 32)).astype(np.float32) * 50 + 10
    data[:, :8] = np.nan
    save_array(tmp_path / "m.n5", "raw", data, chunks=(8, 16, 16))
    [(_, meta, _)] = get_reader(str(tmp_path / "m.n5"))(str(tmp_path / "m.n5"))
    lo, hi = meta["contrast_limits"]
    assert 10 <= lo < hi <= 60


def test_contrast_of_small_chunks_reads_a_few_of_them(tmp_path, monkeypatch):
    """A float dataset without a pyramid in small chunks: its contrast (computed on the Qt
    thread as the layer opens) comes from at most 4×4×4 whole chunks around the centre
    (before: all 1024 chunk files of it were read)."""
    from napari_emparsl._napari.reader import contrast_limits

    data = np.random.default_rng(3).random((32, 128, 128)).astype(np.float32) * 100 + 50
    save_array(tmp_path / "f.n5", "raw", data, chunks=(8, 8, 8))
    reads: list[tuple] = []
    original = volume_mod._ChunkReader.__getitem__

    def counting(self, index):  # instrumentation around the real reader
        reads.append(index)
        return original(self, index)

    monkeypatch.setattr(volume_mod._ChunkReader, "__getitem__", counting)
    lo, hi = contrast_limits(Volume.open(tmp_path / "f.n5", "raw"))
    assert 50 <= lo < 52 and 148 < hi <= 150
    assert 0 < len(reads) <= 64, len(reads)


def test_unfinished_dataset_opens_with_a_warning(make_napari_viewer, tmp_path):
    """A dataset an import is still writing (or that a killed import left) opens — one may look
    at what is there — with a warning that parts of it are missing."""
    import tifffile
    from napari.utils.notifications import notification_manager

    from napari_emparsl.core.importer import iter_import

    tifffile.imwrite(tmp_path / "s.tif", np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    steps = iter_import(str(tmp_path / "s.tif"), f"{tmp_path}/o.n5:raw", chunks=(2, 8, 8))
    next(steps), next(steps)  # the estimate, the first of two slabs
    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        [layer] = viewer.open(str(tmp_path / "o.n5"), plugin=PLUGIN)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert layer.data.shape == (4, 8, 8)
    assert [str(n.message) for n in seen] == [
        f"{tmp_path}/o.n5:raw is an import of {tmp_path}/s.tif that has not finished: parts of "
        "it are missing and show as zeros."
    ]


def test_labels_with_class_names_name_the_class_under_the_cursor(make_napari_viewer, tmp_path):
    # the sample's ground truth and run outputs carry class_names (on a pyramid's group)
    from napari_emparsl.cli import main

    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "16,32,32"]) == 0
    viewer = make_napari_viewer()
    [classes] = viewer.open(str(tmp_path / "s.n5" / "labels" / "classes"), plugin=PLUGIN)
    assert classes.multiscale
    assert list(classes.features["class"]) == ["background", "membrane", "mitochondria"]
    # drawn in the colours of its classes (as the built-in model's output is)
    rgba = classes.colormap.map(np.array([1, 2]))
    assert np.allclose(rgba, [[0, 229 / 255, 1, 1], [1, 0, 1, 1]], atol=1e-6), rgba
    # a label beyond the classes (painted with napari's "new label"): seen, white
    assert np.allclose(classes.colormap.map(np.array([3]))[0], [1, 1, 1, 1])
    # a label beyond the classes (painted with napari's "new label"): seen, white
    assert np.allclose(classes.colormap.map(np.array([3]))[0], [1, 1, 1, 1])
    value = int(np.asarray(classes.data[0][8, 16, 16]))
    status = classes.get_status((8 * 8.0, 16 * 8.0, 16 * 8.0), world=True)
    assert f"class: {classes.features['class'][value]}" in str(status)
    [cells] = viewer.open(str(tmp_path / "s.n5" / "labels" / "cells"), plugin=PLUGIN)
    assert cells.features.shape[1] == 0  # instance ids: no classes to name


def test_an_integer_volume_with_channels_opens_as_images(make_napari_viewer, tmp_path):
    """A 4D (c, z, y, x) uint32 volume marked as labels: napari's labels have no channel axis,
    so it opens as one image layer per channel (before: napari refused the layer, 'units must
    have length ndim=4')."""
    data = np.arange(2 * 4 * 6 * 8, dtype=np.uint32).reshape(2, 4, 6, 8)
    save_array(tmp_path / "d.n5", "seg", data, chunks=(1, 4, 4, 4), voxel_size=(8, 4, 4),
               labels=True)  # fmt: skip
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "d.n5"), plugin=PLUGIN)
    assert [lyr._type_string for lyr in layers] == ["image", "image"]
    np.testing.assert_array_equal(np.asarray(layers[1].data), data[1])
    assert tuple(layers[0].scale) == (8.0, 4.0, 4.0)


@pytest.mark.parametrize(
    ("unit", "expected"),
    [("voxel", "pixel"), ("\\u00B5m", "micrometer"), ("a.u.", "pixel"), ("nanometers", "nanometer"),
     ("µm", "micrometer"), ("cm", "centimeter"), ("pm", "picometer"), ("meter", "meter")],
)  # fmt: skip
def test_units_napari_cannot_parse_are_left_out(tmp_path, unit, expected):
    """A unit napari cannot parse ("voxel", ImageJ's literal "\\u00B5m") made napari's layer
    creation fail with a ValueError ("Could not find unit voxel"): known lengths are spelled
    as napari reads them, others are left out (napari's default units)."""
    from napari.components import ViewerModel

    from napari_emparsl._napari.reader import read_layers

    save_array(tmp_path / "u.n5", "raw", np.ones((4, 5, 6), np.uint16), voxel_size=(50, 10, 10))
    attrs_file = tmp_path / "u.n5" / "raw" / "attributes.json"
    attrs = json.loads(attrs_file.read_text())
    attrs["unit"] = unit
    attrs["pixelResolution"]["unit"] = unit
    attrs_file.write_text(json.dumps(attrs))
    viewer = ViewerModel()
    for layer_data in read_layers(str(tmp_path / "u.n5")):
        viewer._add_layer_from_data(*layer_data)
    [layer] = viewer.layers
    assert [str(u) for u in layer.units] == [expected] * 3
    assert tuple(layer.scale) == (50.0, 10.0, 10.0)


@pytest.mark.parametrize(
    ("shape", "axes", "resolution", "scale", "layers"),
    [
        ((3, 4, 5, 6), ["x", "y", "z", "t"], [4, 4, 40, 1], (1.0, 40.0, 4.0, 4.0), 1),
        ((2, 2, 4, 5, 6), ["x", "y", "z", "c", "t"], [4, 4, 40, 1, 1], (1.0, 40.0, 4.0, 4.0), 2),
        ((3, 4, 5, 6), ["x", "y", "z", "t"], None, (1.0, 1.0, 1.0, 1.0), 1),
    ],
    ids=["tzyx", "tczyx", "tzyx-no-size"],
)
def test_a_time_axis_gets_scale_one_and_units_of_the_layers_length(
    tmp_path, shape, axes, resolution, scale, layers
):
    """A 4-D (t, z, y, x) dataset with a unit: napari refused the layer ('units must have
    length ndim=4', 3 units for 4 axes); a time axis gets scale 1, translate 0, unit pixel."""
    import z5py
    from napari.components import ViewerModel

    from napari_emparsl._napari.reader import read_layers

    path = tmp_path / "t.n5"
    ds = z5py.File(str(path), "w").create_dataset("raw", shape=shape, chunks=shape, dtype="uint16")
    ds[:] = 1
    ds.attrs.update(
        {"axes": axes} | ({"resolution": resolution, "unit": "nm"} if resolution else {})
    )
    viewer = ViewerModel()
    for layer_data in read_layers(str(path)):
        viewer._add_layer_from_data(*layer_data)
    assert len(viewer.layers) == layers
    for layer in viewer.layers:
        assert layer.ndim == 4 and tuple(layer.scale) == scale
        assert tuple(layer.translate) == (0.0,) * 4
        units = [str(u) for u in layer.units]
        assert units == (["pixel"] + ["nanometer"] * 3 if resolution else ["pixel"] * 4)


def test_a_pyramid_level_of_other_dimensions_is_left_out_of_the_layer(tmp_path):
    """A 3-D s0 with a 2-D s1: napari's layer creation failed with a raw traceback ('setting an
    array element with a sequence'); the layer has the levels that fit."""
    import z5py
    from napari.components import ViewerModel

    from napari_emparsl._napari.reader import read_layers

    f = z5py.File(str(tmp_path / "p.n5"), "w")
    f.create_dataset("vol/s0", shape=(8, 16, 16), chunks=(4, 8, 8), dtype="uint16")[:] = 5
    f.create_dataset("vol/s1", shape=(8, 8), chunks=(8, 8), dtype="uint16")
    viewer = ViewerModel()
    for layer_data in read_layers(str(tmp_path / "p.n5")):
        viewer._add_layer_from_data(*layer_data)
    [layer] = viewer.layers
    assert not layer.multiscale and layer.data.shape == (8, 16, 16)


@pytest.mark.parametrize("shape", [(64, 64, 4), (64, 64, 3), (2, 64, 64, 3)])
def test_a_last_axis_of_3_or_4_is_no_rgb(make_napari_viewer, tmp_path, shape):
    """A volume without a voxel size (unit pixel, as `emparsl import` writes where the files
    record none) whose last axis is 3 or 4 long: napari took it for RGB(A) and failed with a
    traceback ("could not broadcast input array from shape (3,) into shape (2,)"); it opens as
    a volume of as many dimensions as it has, its scale one per axis (a 4-D one: one layer per
    channel, each a 3-D volume)."""
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    save_array(tmp_path / "narrow.n5", "raw", data, chunks=shape, voxel_size=(1, 1, 1),
               unit="pixel")  # fmt: skip
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "narrow.n5" / "raw"), plugin=PLUGIN)
    channels = data if len(shape) == 4 else [data]
    assert len(layers) == len(channels)
    for layer, channel in zip(layers, channels, strict=True):
        assert layer._type_string == "image" and not layer.rgb
        assert layer.ndim == 3 and layer.data.shape == channel.shape
        assert tuple(layer.scale) == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(np.asarray(layer.data[..., 2]), channel[..., 2])


def test_n5_javas_rgb_test_image_opens_as_a_volume(shared_data, make_napari_viewer):
    """N5-Java's gzip dataset of the shared test data, 512×512×3 uint8 (an RGB picture stored
    as a volume, no voxel size): it failed to open with napari's RGB guess; it opens as the 3-D
    volume it is stored as, each plane one colour of the reference picture."""
    import imageio.v3 as iio

    data_dir = shared_data / "n5_implementations" / "data"
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(data_dir / "n5-java.n5" / "gzip"), plugin=PLUGIN)
    assert not layer.rgb and layer.ndim == 3 and layer.data.shape == (512, 512, 3)
    np.testing.assert_array_equal(
        np.asarray(layer.data), iio.imread(data_dir / "reference_image.png")
    )


def test_a_huge_volume_without_coarser_levels_is_refused_not_frozen(make_napari_viewer, tmp_path):
    """One level of 2×20000×20000 voxels (a chunk or two written): napari read whole
    20000×20000 slices to show it — 151 s with napari frozen and 11.7 GB; at 100000² it was
    killed for memory. Refused in one sentence; a small dataset beside it still opens."""
    import z5py

    f = z5py.File(str(tmp_path / "big.n5"), "a")
    f.create_dataset("raw", shape=(2, 20000, 20000), chunks=(1, 512, 512), dtype="uint8",
                     compression="gzip")  # fmt: skip
    f["raw"][0, :512, :512] = 7
    f.create_dataset("small", shape=(2, 64, 64), chunks=(1, 64, 64), dtype="uint8")
    layers, messages = _open_saying(make_napari_viewer(), tmp_path / "big.n5")
    assert [layer.name for layer in layers] == ["small"]
    assert any(
        m.startswith(f"Left out: {tmp_path}/big.n5:raw is one level of 2×20000×20000 voxels without "
                     "coarser levels: napari reads whole 20000×20000 slices of it (400 M voxels")
        for m in messages
    ), messages  # fmt: skip


def test_a_zarr_or_an_empty_container_is_one_sentence(make_napari_viewer, tmp_path):
    """File > Open of a zarr container or an N5 without datasets: napari's "Reader
    'napari-emparsl' was selected to open […], but returned no data" (a ValueError) instead of
    the sentence the volume panel says."""
    (tmp_path / "z.zarr" / "raw").mkdir(parents=True)
    (tmp_path / "z.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    (tmp_path / "e.n5").mkdir()
    (tmp_path / "e.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
    viewer = make_napari_viewer()
    said = []
    for name in ("z.zarr", "e.n5"):
        layers, messages = _open_saying(viewer, tmp_path / name)
        assert layers == []
        said += messages
    assert said == [
        f"{tmp_path}/z.zarr is a zarr container, which this version does not open yet; convert "
        "it to N5 (e.g. with z5py or BigDataViewer) and open that.",
        f"{tmp_path}/e.n5 holds no dataset (an empty container or group, or datasets without "
        "their attributes.json); pick another folder.",
    ]


def _open_saying(viewer, path) -> tuple[list, list[str]]:
    """The layers File > Open adds for ``path`` and the notifications it shows."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        layers = viewer.open(str(path), plugin=PLUGIN)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    return layers, [str(n.message) for n in seen]
