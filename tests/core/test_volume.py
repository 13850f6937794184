"""Volume: lazy opening, geometry attributes, pyramids, creation and writes."""

from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest

from napari_emparsl.core.volume import (
    Volume,
    VolumeError,
    container_tree,
    parse_spec,
    pyramid_factors,
    save_array,
    write_pyramid,
)


def test_open_is_lazy_with_storage_chunks(small_n5):
    path, data = small_n5
    vol = Volume.open(path, "raw")
    assert isinstance(vol.data, da.Array)
    assert vol.data.chunksize == (8, 16, 16) == vol.chunks
    assert vol.shape == data.shape and vol.dtype == np.uint8
    assert vol.voxel_size == (30.0, 10.0, 10.0) and vol.unit == "nm"
    assert vol.axes == ("z", "y", "x") and vol.compression == "gzip"
    np.testing.assert_array_equal(vol.data.compute(), data)
    np.testing.assert_array_equal(
        vol.read((slice(3, 9), slice(0, 5), slice(40, 50))), data[3:9, :5, 40:]
    )


def test_attributes_written_in_n5_order(small_n5):
    path, _ = small_n5
    attrs = json.loads((path / "raw" / "attributes.json").read_text())
    assert attrs["resolution"] == [10.0, 10.0, 30.0]  # x, y, z as N5 tools expect
    assert attrs["pixelResolution"] == {"dimensions": [10.0, 10.0, 30.0], "unit": "nm"}
    assert attrs["dimensions"] == [50, 40, 20]
    assert json.loads((path / "attributes.json").read_text())["n5"].startswith("2.")


def test_missing_chunks_read_as_fill_value(tmp_path):
    vol = Volume.create(tmp_path / "e.n5", "x", (10, 10, 10), "uint16", (4, 4, 4))
    vol.write(np.full((4, 4, 4), 7, np.uint16), (4, 4, 4))
    arr = vol.data.compute()
    assert arr[4:8, 4:8, 4:8].min() == 7 and arr.sum() == 7 * 64
    assert not (tmp_path / "e.n5" / "x" / "0" / "0" / "0").exists()


def test_write_outside_volume_is_refused(small_n5):
    vol = Volume.open(small_n5[0], "raw")
    with pytest.raises(ValueError, match="outside"):
        vol.write(np.zeros((4, 4, 4), np.uint8), (18, 0, 0))


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"resolution": [4, 4, 40]}, (40.0, 4.0, 4.0)),  # N5 order (x, y, z)
        ({"resolution": [40, 4, 4], "axes": ["z", "y", "x"]}, (40.0, 4.0, 4.0)),  # C-order axes
        ({"resolution": [4, 5, 40], "axes": ["x", "y", "z"]}, (40.0, 5.0, 4.0)),
        ({"pixelResolution": {"dimensions": [4, 4, 40], "unit": "um"}}, (40.0, 4.0, 4.0)),
        ({"pixelResolution": [4, 4, 40]}, (40.0, 4.0, 4.0)),
        ({"resolution": [4, 4, 40], "downsamplingFactors": [2, 2, 1]}, (40.0, 8.0, 8.0)),
        ({}, (1.0, 1.0, 1.0)),
    ],
)
def test_voxel_size_conventions(tmp_path, attrs, expected):
    vol = Volume.create(tmp_path / "v.n5", "d", (4, 4, 4), "uint8", (4, 4, 4))
    attrs_file = tmp_path / "v.n5" / "d" / "attributes.json"
    stored = json.loads(attrs_file.read_text())
    for k in ("resolution", "pixelResolution", "axes", "unit"):
        stored.pop(k, None)
    attrs_file.write_text(json.dumps(stored | attrs))
    vol = Volume.open(tmp_path / "v.n5", "d")
    assert vol.voxel_size == expected
    if "pixelResolution" in attrs and isinstance(attrs["pixelResolution"], dict):
        assert vol.unit == "um"


def test_pyramid_written_and_detected(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (40, 70, 90)).astype(np.uint8)
    vol = write_pyramid(
        tmp_path / "p.n5", "raw", data, chunks=(16, 32, 32), voxel_size=(30, 10, 10)
    )
    assert vol.is_multiscale and vol.levels == ("raw/s0", "raw/s1", "raw/s2")
    # z (30 nm) is not halved until x/y (10 → 20 → 40 nm) catch up
    assert [a.shape for a in vol.pyramid] == [(40, 70, 90), (40, 35, 45), (20, 17, 22)]
    assert vol.level_voxel_sizes == ((30, 10, 10), (30, 20, 20), (60, 40, 40))
    np.testing.assert_array_equal(vol.pyramid[0].compute(), data)
    expected_s1 = data[:, :70, :90].reshape(40, 35, 2, 45, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(vol.pyramid[1].compute(), np.round(expected_s1), atol=1)
    # a level opened alone lies where its means came from: (factor - 1) / 2 finest voxels on
    assert Volume.open(tmp_path / "p.n5", "raw/s1").offset == (0.0, 5.0, 5.0)
    assert Volume.open(tmp_path / "p.n5", "raw/s2").offset == (15.0, 15.0, 15.0)
    again = Volume.open(tmp_path / "p.n5")  # the only pyramid, found without a key
    assert again.key == "raw" and again.is_multiscale


def test_label_pyramid_is_not_averaged(tmp_path):
    labels = np.zeros((8, 8, 8), np.uint32)
    labels[:, :, 4:] = 1000
    labels[:, 4:, :] = 7
    vol = write_pyramid(tmp_path / "l.n5", "seg", labels, chunks=(4, 4, 4), labels=True)
    assert vol.is_labels
    for level in vol.pyramid[1:]:
        assert set(np.unique(level.compute())) <= {0, 7, 1000}
    assert Volume.open(tmp_path / "l.n5", "seg/s1").offset == (0.0, 0.0, 0.0)  # first voxels


def test_bdv_style_pyramid_with_group_scales(tmp_path):
    # as BigDataViewer / n5-viewer write it: factors on every level, resolution on the group
    root = tmp_path / "bdv.n5"
    save_array(root, "setup0/s0", np.ones((8, 16, 16), np.uint16), chunks=(4, 8, 8))
    save_array(root, "setup0/s1", np.ones((8, 8, 8), np.uint16), chunks=(4, 8, 8))
    for level, factors in (("s0", [1, 1, 1]), ("s1", [2, 2, 1])):
        f = root / "setup0" / level / "attributes.json"
        a = {
            k: v
            for k, v in json.loads(f.read_text()).items()
            if k not in ("resolution", "pixelResolution", "axes")
        }
        f.write_text(json.dumps(a | {"downsamplingFactors": factors}))
    (root / "setup0" / "attributes.json").write_text(
        json.dumps(
            {
                "pixelResolution": {"dimensions": [5, 5, 50], "unit": "nm"},
                "scales": [[1, 1, 1], [2, 2, 1]],
            }
        )
    )
    vol = Volume.open(root, "setup0")
    assert vol.is_multiscale
    assert vol.level_voxel_sizes == ((50, 5, 5), (50, 10, 10))


def test_pyramid_factors_anisotropic():
    assert pyramid_factors((100, 1000, 1000), (40, 4, 4), 4) == [
        (1, 1, 1),
        (1, 2, 2),
        (1, 4, 4),
        (1, 8, 8),
    ]
    assert pyramid_factors((4, 4, 4), (1, 1, 1), 5)[-1] == (4, 4, 4)


def test_tree_lists_groups_datasets_and_pyramids(tmp_path, small_n5):
    path, data = small_n5
    write_pyramid(path, "em/pyr", data, chunks=(8, 16, 16))
    tree = {n["key"]: n for n in container_tree(path)}
    assert tree["raw"]["kind"] == "dataset" and tree["raw"]["shape"] == [20, 40, 50]
    assert tree["raw"]["chunks"] == [8, 16, 16] and tree["raw"]["dtype"] == "uint8"
    assert tree["em"]["kind"] == "group"
    assert tree["em/pyr"]["kind"] == "multiscale" and tree["em/pyr"]["levels"] == ["s0", "s1", "s2"]


def test_open_dataset_folder_directly(small_n5):
    path, _ = small_n5
    vol = Volume.open(path / "raw")
    assert vol.root == str(path) and vol.key == "raw"


def test_parse_spec(tmp_path):
    assert parse_spec("/a/b.n5:raw/s0") == ("/a/b.n5", "raw/s0")
    assert parse_spec("/a/b.n5") == ("/a/b.n5", "")
    assert parse_spec("b.N5:x") == ("b.N5", "x")
    # a one-letter container is no drive letter outside Windows (before: a folder "x:raw")
    assert parse_spec("x:raw") == ("x", "raw")
    assert parse_spec("w:bar/baz") == ("w", "bar/baz")
    with pytest.raises(VolumeError, match=r"^:raw names no container before the colon; give "
                       r"it as PATH\.n5:DATASET \(e\.g\. out\.n5:raw\)\.$"):  # fmt: skip
        parse_spec(":raw")


def test_open_takes_path_colon_dataset_as_everywhere_else(small_n5):
    path, data = small_n5
    vol = Volume.open(f"{path}:raw")
    assert vol.key == "raw" and vol.shape == data.shape
    with pytest.raises(VolumeError, match=r"There is no dataset 'nope' in .*; available: raw"):
        Volume.open(f"{path}:nope")


def test_create_refuses_existing_unless_overwrite(small_n5):
    path, data = small_n5
    with pytest.raises(VolumeError, match="already exists; pass --overwrite"):
        Volume.create(path, "raw", (2, 2, 2), "uint8", (2, 2, 2))
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)  # untouched
    vol = Volume.create(path, "raw", (2, 2, 2), "uint8", (2, 2, 2), overwrite=True)
    assert vol.shape == (2, 2, 2)


def test_create_refuses_unstorable_dtype(tmp_path):
    with pytest.raises(VolumeError, match="cannot store complex128"):
        Volume.create(tmp_path / "c.n5", "x", (2, 2), np.complex128, (2, 2))


def test_dask_graph_pickles_by_path(small_n5):
    import pickle

    path, data = small_n5
    arr = Volume.open(path, "raw").data
    clone = pickle.loads(pickle.dumps(arr))
    np.testing.assert_array_equal(clone[2:5].compute(), data[2:5])


def test_channels_axis(tmp_path):
    data = np.arange(2 * 4 * 6 * 8, dtype=np.float32).reshape(2, 4, 6, 8)
    save_array(tmp_path / "c.n5", "multi", data, chunks=(1, 4, 6, 8), voxel_size=(20, 5, 5))
    vol = Volume.open(tmp_path / "c.n5", "multi")
    assert vol.axes == ("c", "z", "y", "x") and vol.voxel_size == (20.0, 5.0, 5.0)
    assert os.path.isdir(tmp_path / "c.n5" / "multi")


def test_a_write_that_fails_midway_stays_marked_unfinished(tmp_path):
    """save_array / write_pyramid mark the dataset until its last chunk is written: one whose
    source fails mid-way (or whose process is killed) says so, and is refused as a run's input."""
    import dask.array as da

    from napari_emparsl.core.volume import UNFINISHED, save_array, write_pyramid
    from napari_emparsl.execution.runner import Run, RunError

    def read(block, block_info=None):
        if block_info and block_info[None]["chunk-location"] == (1, 0, 0):
            raise OSError("the source disk went away")
        return block

    data = da.ones((32, 16, 16), dtype=np.uint8, chunks=(8, 16, 16)).map_blocks(
        read, dtype=np.uint8
    )
    with pytest.raises(OSError, match="went away"):
        save_array(tmp_path / "o.n5", "raw", data, chunks=(8, 16, 16))
    vol = Volume.open(tmp_path / "o.n5", "raw")
    assert vol.attrs[UNFINISHED] == "a write that has not finished"
    with pytest.raises(RunError, match="is a write that has not finished"):
        Run(f"{tmp_path}/o.n5:raw", "unet3d-em", f"{tmp_path}/p.n5:x", site="threads").prepare()
    ok = save_array(tmp_path / "o.n5", "raw", data[:8], chunks=(8, 16, 16), overwrite=True)
    assert UNFINISHED not in ok.attrs and UNFINISHED not in Volume.open(ok.root, "raw").attrs
    pyr = write_pyramid(tmp_path / "o.n5", "pyr", np.ones((32, 32, 32), np.uint8), chunks=(16,) * 3)
    assert UNFINISHED not in pyr.attrs and UNFINISHED not in Volume.open(pyr.root, "pyr/s0").attrs


@pytest.mark.parametrize("resolution", [[0, 8, 8], [-4, 8, 8], [8, "x", 8], [8, 8, None]], ids=str)
def test_unusable_voxel_size_reads_as_one(tmp_path, resolution):
    """A zero voxel size made napari refuse the layer with a traceback ("scale values of 0"),
    a negative one mirrored it: sizes that are not positive numbers read as 1 (as a missing
    one does), and the data opens."""
    save_array(tmp_path / "v.n5", "a", np.ones((4, 8, 8), np.uint8), voxel_size=(30, 4, 4))
    path = tmp_path / "v.n5" / "a" / "attributes.json"
    attrs = json.loads(path.read_text())
    attrs.pop("pixelResolution", None)
    attrs["resolution"] = resolution
    path.write_text(json.dumps(attrs))
    vol = Volume.open(tmp_path / "v.n5", "a")
    assert vol.voxel_size == (1.0, 1.0, 1.0) and vol.data.shape == (4, 8, 8)
    attrs["downsamplingFactors"] = [1, 0, 1]
    attrs["resolution"] = [4, 4, 30]
    path.write_text(json.dumps(attrs))
    assert Volume.open(tmp_path / "v.n5", "a").voxel_size == (30.0, 4.0, 4.0)  # factors ignored


def test_dataset_at_the_container_root(tmp_path, capsys):
    """N5 allows a container whose root is the dataset; z5py opens datasets by name only, and
    every command was an internal error on one. It reads, runs and is listed; an output into it
    is refused (a dataset cannot hold other datasets)."""
    import shutil

    from napari_emparsl.cli import main

    data = (np.arange(8 * 16 * 16) % 251).astype(np.uint8).reshape(8, 16, 16)
    save_array(tmp_path / "tmp.n5", "x", data, voxel_size=(40, 4, 4))
    shutil.move(tmp_path / "tmp.n5" / "x", tmp_path / "root.n5")
    vol = Volume.open(tmp_path / "root.n5")
    assert vol.key == "" and vol.voxel_size == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(vol.data.compute(), data)
    assert main(["info", str(tmp_path / "root.n5")]) == 0
    assert "/  8×16×16 uint8  chunks 8×16×16  gzip" in capsys.readouterr().out
    out = f"{tmp_path}/o.n5:p"
    model = "unet3d-em"
    assert main(["run", "--input", str(tmp_path / "root.n5"), "--model", model, "--output", out,
                 "--site", "threads"]) == 0  # fmt: skip
    assert Volume.open(tmp_path / "o.n5", "p").shape == (8, 16, 16)
    capsys.readouterr()
    assert main(["status", out]) == 0  # the input named by its container alone, not "root.n5:"
    assert f"\ninput {tmp_path}/root.n5, model unet3d-em" in capsys.readouterr().out
    shutil.copytree(tmp_path / "root.n5", tmp_path / "copy.n5")
    assert main(["run", "--input", str(tmp_path / "copy.n5"), "--model", model, "--output", out,
                 "--site", "threads"]) == 2  # fmt: skip
    assert f"made with the input {tmp_path}/root.n5, not {tmp_path}/copy.n5;" in (
        capsys.readouterr().err
    )
    assert main(["run", "--input", str(tmp_path / "root.n5"), "--model", model, "--output",
                 f"{tmp_path}/root.n5:p", "--site", "threads"]) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        f"emparsl: error: {tmp_path}/root.n5 is a dataset itself, not a container that can hold "
        "p; write the output into another container (e.g. out.n5:pred).\n"
    )
    assert sorted(os.listdir(tmp_path / "root.n5")) == ["0", "attributes.json"]


def test_openable_keys_from_one_walk_of_the_tree(tmp_path):
    """What the volume panel lists from one walk (openable_in_tree) is what openable_keys says,
    for a container, a group, a pyramid, one of its levels and a plain dataset."""
    from napari_emparsl.core.volume import openable_in_tree, openable_keys

    root = tmp_path / "c.n5"
    data = np.zeros((8, 16, 16), np.uint8)
    write_pyramid(root, "raw", data, levels=2, chunks=(8, 8, 8))
    write_pyramid(root, "labels/classes", data, levels=2, chunks=(8, 8, 8), labels=True)
    save_array(root, "labels/plain", data)
    save_array(root, "plain", data)
    paths = [root, root / "labels", root / "raw", root / "raw" / "s1", root / "labels" / "plain"]
    for path in paths:
        assert openable_in_tree(container_tree(path)) == openable_keys(path), path
    assert openable_keys(root) == ["labels/classes", "labels/plain", "plain", "raw"]


def test_statistics_come_from_the_finest_level_pyramid_or_not(tmp_path):
    """A volume's normalization does not depend on whether it has a pyramid (before: from its
    coarsest level, averages whose spread is smaller: zscore std 3.8 instead of 30); a big one
    is sampled in whole chunks spread over it; channels are all sampled."""
    from napari_emparsl.core.models.spec import ModelSpec
    from napari_emparsl.core.volume import volume_stats
    from napari_emparsl.execution.runner import _norm

    data = np.random.default_rng(0).normal(128, 30, (64, 64, 64)).clip(0, 255).astype(np.uint8)
    flat = save_array(tmp_path / "a.n5", "raw", data, chunks=(16, 16, 16))
    pyramid = write_pyramid(tmp_path / "b.n5", "raw", data, levels=3, chunks=(16, 16, 16))
    assert len(pyramid.levels) == 3
    truth = (float(data.mean()), float(data.std()))
    for vol in (flat, pyramid):
        mean, std = volume_stats(vol)
        assert mean == pytest.approx(truth[0], abs=0.5) and std == pytest.approx(truth[1], rel=0.02)
        lo, span = _norm(vol, ModelSpec(normalize="percentile", percentiles=(1.0, 99.0)))
        want = np.percentile(data, [1, 99])
        assert lo == pytest.approx(want[0], abs=2) and span == pytest.approx(
            want[1] - want[0], abs=3
        )
    # more than max_voxels: whole chunks, evenly spread, about max_voxels of them
    part = pyramid.sample(max_voxels=20_000)
    assert 20_000 <= part.size <= 24_576 and part.size % 4096 == 0
    # channels: both sampled (before, the stride stepped over the channel axis too)
    two = np.stack([np.zeros((32, 32, 32), np.uint8), np.full((32, 32, 32), 100, np.uint8)])
    vol = save_array(tmp_path / "c.n5", "raw", two, chunks=(1, 16, 16, 16))
    assert volume_stats(vol) == pytest.approx((50.0, 50.0))
    assert set(np.unique(vol.sample(max_voxels=8192))) == {0, 100}
    # nearly constant: percentiles equal; the spread falls back to the standard deviation
    # (before: a divisor of 1e-6, voxels normalized to 2e8)
    sparse = np.zeros((32, 32, 32), np.uint8)
    sparse.flat[:30] = 200
    vol = save_array(tmp_path / "d.n5", "raw", sparse)
    lo, span = _norm(vol, ModelSpec(normalize="percentile"))
    assert lo == 0 and span == pytest.approx(float(sparse.std()))


def test_statistics_leave_out_chunks_never_written(tmp_path):
    """A big volume written in part (an acquisition in its padding, a sparse volume): evenly
    spaced chunks hit mostly the unwritten rest, zeros, and the normalization was 3–8 standard
    deviations off what the model saw; now the written chunks only."""
    import z5py

    from napari_emparsl.core.models.spec import ModelSpec
    from napari_emparsl.core.volume import volume_stats
    from napari_emparsl.execution.runner import _norm

    f = z5py.File(str(tmp_path / "big.n5"), "a")
    ds = f.create_dataset("raw", shape=(64, 512, 512), chunks=(16, 32, 32), dtype="uint8",
                          compression="gzip")  # fmt: skip
    part = np.random.default_rng(1).normal(120, 40, (32, 128, 128)).clip(0, 255).astype(np.uint8)
    ds[16:48, 192:320, 192:320] = part  # 32 of the 4,096 chunks
    ds.attrs["resolution"] = [8, 8, 8]
    vol = Volume.open(tmp_path / "big.n5", "raw")
    everything = vol.sample(max_voxels=600_000)  # ~36 evenly spaced chunks: mostly zeros
    assert everything.mean() < 20
    mean, std = volume_stats(vol, max_voxels=600_000)
    assert mean == pytest.approx(float(part.mean()), abs=0.5)
    assert std == pytest.approx(float(part.std()), rel=0.02)
    lo, span = _norm(vol, ModelSpec(normalize="percentile", percentiles=(1.0, 99.0)))
    want = np.percentile(part, [1, 99])
    assert lo == pytest.approx(want[0], abs=2) and span == pytest.approx(want[1] - want[0], abs=3)


def test_n5_viewer_layout_scales_and_resolution_on_the_root(tmp_path):
    """n5-viewer keeps `scales` and `pixelResolution` on the container's root, with channel
    pyramids c0/s0, s1 below and no downsamplingFactors on the levels (before: voxel size 1
    pixel on every level: only the level and its direct parent were read, `scales` never)."""
    import z5py

    path = tmp_path / "nv.n5"
    f = z5py.File(str(path), "w")
    f.attrs.update(
        {"scales": [[1, 1, 1], [2, 2, 1]],
         "pixelResolution": {"unit": "um", "dimensions": [0.097, 0.097, 0.18]}}
    )  # fmt: skip
    for c in ("c0", "c1"):
        f.create_group(c)
        for i, shape in enumerate([(16, 64, 64), (16, 32, 32)]):
            f.create_dataset(f"{c}/s{i}", shape=shape, chunks=(8, 16, 16), dtype="uint16")
    vol = Volume.open(path, "c0")
    assert vol.is_multiscale and vol.unit == "um"
    assert vol.voxel_size == pytest.approx((0.18, 0.097, 0.097))
    assert vol.level_voxel_sizes[1] == pytest.approx((0.18, 0.194, 0.194))
    assert vol.level_factors() == [(1, 1, 1), (1, 2, 2)]
    level = Volume.open(path, "c1/s1")  # one level alone, as a plain dataset
    assert level.voxel_size == pytest.approx((0.18, 0.194, 0.194)) and level.unit == "um"
    tree = {n["key"]: n for n in container_tree(path)}
    assert tree["c1/s1"]["voxel_size"] == pytest.approx([0.18, 0.194, 0.194])
    assert tree["c1/s0"]["unit"] == "um"
    only_level = {n["key"]: n for n in container_tree(path / "c0" / "s1")}
    assert only_level["c0/s1"]["voxel_size"] == pytest.approx([0.18, 0.194, 0.194])


@pytest.mark.parametrize(
    "root_attrs",
    [{}, {"pixelResolution": {"unit": "nm", "dimensions": [4, 4, 40]}}, {"n5": "4.0.0"}],
    ids=["empty", "resolution-only", "n5-4"],
)
def test_root_attributes_without_an_n5_version_open(tmp_path, root_attrs):
    """A root attributes.json without an "n5" key is read (before: a raw AttributeError from
    inside z5py's version check); outputs can be written into such a container too."""
    import z5py

    path = tmp_path / "r.n5"
    f = z5py.File(str(path), "w")
    f.create_dataset("raw", shape=(4, 8, 8), chunks=(4, 4, 4), dtype="uint8")[:] = 3
    (path / "attributes.json").write_text(json.dumps(root_attrs))
    vol = Volume.open(path, "raw")
    assert int(vol.data.sum().compute()) == 3 * 4 * 8 * 8
    if "pixelResolution" in root_attrs:  # the root's voxel size, as n5-viewer keeps it
        assert vol.voxel_size == (40.0, 4.0, 4.0)
    assert save_array(path, "out", np.ones((2, 2, 2), np.uint8)).shape == (2, 2, 2)


def test_root_of_a_newer_n5_major_version_is_refused_in_one_sentence(tmp_path):
    import z5py

    path = tmp_path / "new.n5"
    z5py.File(str(path), "w").create_dataset("raw", shape=(4, 4), chunks=(4, 4), dtype="uint8")
    (path / "attributes.json").write_text(json.dumps({"n5": "5.0.0"}))
    with pytest.raises(VolumeError) as err:
        Volume.open(path, "raw")
    assert str(err.value) == (
        f"The container {path} is N5 version 5.0.0, newer than this version reads (up to 4.x); "
        "save it again in an older N5 format (e.g. Fiji > N5 export)."
    )


def test_parse_spec_splits_after_the_container_folder(tmp_path):
    """A colon in a folder above the container stays in the path (before: `exp:1/out.n5` split
    at the last colon, an output written to `exp` as dataset `1/out.n5`); one in the dataset
    name after it stays in the key."""
    import z5py

    base = tmp_path / "exp:1"
    assert parse_spec(f"{base}/out.n5") == (f"{base}/out.n5", "")
    assert parse_spec(f"{base}/out.n5:pred") == (f"{base}/out.n5", "pred")
    assert parse_spec(f"{base}/OUT.ZARR:a/b") == (f"{base}/OUT.ZARR", "a/b")
    assert parse_spec("/a/b.n5/:raw") == ("/a/b.n5/", "raw")
    assert parse_spec(f"{base}/c.n5/raw") == (f"{base}/c.n5/raw", "")  # a dataset folder
    z5py.File(str(base / "c.n5"), "w").create_dataset(
        "raw:v2", shape=(2, 4, 4), chunks=(2, 4, 4), dtype="uint8"
    )
    assert parse_spec(f"{base}/c.n5:raw:v2") == (f"{base}/c.n5", "raw:v2")
    assert Volume.open(f"{base}/c.n5:raw:v2").shape == (2, 4, 4)
    saved = save_array(*parse_spec(f"{base}/out.n5:pred"), np.ones((2, 2, 2), np.uint8))
    assert saved.root == f"{base}/out.n5" and (base / "out.n5" / "pred").is_dir()
    # a container named otherwise: the split whose path exists, else the last colon
    (tmp_path / "run:1" / "cont").mkdir(parents=True)
    assert parse_spec(f"{tmp_path}/run:1/cont:raw") == (f"{tmp_path}/run:1/cont", "raw")
    assert parse_spec("/nowhere/x:y:z") == ("/nowhere/x:y", "z")
    # a folder inside the container, then the key (a regression of this split: the whole text
    # was taken as a path, and a run wrote a dataset named "raw:s0")
    assert parse_spec(f"{base}/c.n5/labels:cells") == (f"{base}/c.n5/labels", "cells")
    assert parse_spec("/nowhere/s.n5/raw:s0") == ("/nowhere/s.n5/raw", "s0")
    assert parse_spec("'/no where/s.n5':raw:v2") == ("/no where/s.n5", "raw:v2")  # quoted
    # a container named otherwise holding a dataset named like one (as before today's split)
    (tmp_path / "vol").mkdir()
    assert parse_spec(f"{tmp_path}/vol:exports/a.n5") == (f"{tmp_path}/vol", "exports/a.n5")
    assert parse_spec(f"{tmp_path}/vol:a.zarr") == (f"{tmp_path}/vol", "a.zarr")


def test_zstd_reads_and_zlib_is_refused_in_one_sentence(tmp_path):
    """z5py reads zstd in N5 (before: refused as 'cannot be read here'); a "zlib" compression
    type, which z5py rejects for N5, is refused in one sentence (before: z5py's own message)."""
    data = (np.arange(8 * 8 * 8) % 1000).astype(np.uint16).reshape(8, 8, 8)
    vol = Volume.create(tmp_path / "z.n5", "raw", data.shape, data.dtype, (4, 4, 4),
                        compression="zstd")  # fmt: skip
    vol.write(data)
    stored = json.loads((tmp_path / "z.n5" / "raw" / "attributes.json").read_text())
    assert stored["compression"]["type"] == "zstd"
    again = Volume.open(tmp_path / "z.n5", "raw")
    assert again.compression == "zstd"
    np.testing.assert_array_equal(again.data.compute(), data)

    path = tmp_path / "zl.n5"
    (path / "raw").mkdir(parents=True)
    (path / "attributes.json").write_text('{"n5": "2.0.0"}')
    (path / "raw" / "attributes.json").write_text(
        json.dumps({"dimensions": [4, 4], "blockSize": [4, 4], "dataType": "uint8",
                    "compression": {"type": "zlib"}})
    )  # fmt: skip
    with pytest.raises(VolumeError) as err:
        Volume.open(path, "raw")
    assert str(err.value) == (
        f"Dataset {path}:raw uses 'zlib' compression, which cannot be read here; re-save it "
        "with gzip compression (e.g. Fiji > N5 export) and open that."
    )
    # the list is z5py's own (the fixed one, used without z5py, is the same)
    from z5py.dataset import Dataset

    from napari_emparsl.core.n5attrs import SUPPORTED_COMPRESSIONS, supported_compressions

    assert set(supported_compressions()) == set(Dataset.compressors_n5) >= {"zstd", "gzip"}
    assert set(SUPPORTED_COMPRESSIONS) == set(Dataset.compressors_n5)


def test_pyramid_group_offset_is_used_as_its_resolution_is(tmp_path):
    """Paintera keeps `resolution` and `offset` (x, y, z) on the pyramid group: the offset was
    ignored while the resolution was used."""
    import z5py

    path = tmp_path / "pt.n5"
    f = z5py.File(str(path), "w")
    group = f.create_group("raw/data")
    group.attrs.update(
        {"multiScale": True, "resolution": [4.0, 4.0, 40.0], "offset": [400.0, 800.0, 1200.0]}
    )
    for i, shape in enumerate([(8, 32, 32), (8, 16, 16)]):
        ds = f.create_dataset(f"raw/data/s{i}", shape=shape, chunks=(8, 16, 16), dtype="uint8")
        ds.attrs["downsamplingFactors"] = [2**i, 2**i, 1]
    vol = Volume.open(path, "raw/data")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (1200.0, 800.0, 400.0)
    assert vol.level_voxel_sizes[1] == (40.0, 8.0, 8.0)
    assert Volume.open(path, "raw/data/s1").offset == (1200.0, 800.0, 400.0)
    f["raw/data/s0"].attrs["offset"] = [1.0, 2.0, 3.0]  # a level's own offset comes first
    assert Volume.open(path, "raw/data").offset == (3.0, 2.0, 1.0)


@pytest.mark.parametrize(
    ("s1", "s2", "kept"),
    [
        (((8, 8), "uint16"), None, 1),  # 3-D s0, 2-D s1
        (((8, 8, 8), "uint8"), None, 1),  # another data type
        (((8, 8, 8), "uint16"), ((8, 32, 32), "uint16"), 2),  # s2 larger than s1
        (((8, 8, 8), "uint16"), ((4, 4, 4), "uint16"), 3),
    ],
    ids=["ndim", "dtype", "larger", "fine"],
)
def test_pyramid_levels_that_do_not_fit_the_ones_before_are_left_out(
    tmp_path, caplog, s1, s2, kept
):
    """Levels were not checked against each other: a 3-D s0 with a 2-D s1 made napari fail with
    a raw traceback. The leading levels of s0's ndim and dtype, none larger than the one
    before, are kept, with a warning about the rest."""
    import logging

    import z5py

    f = z5py.File(str(tmp_path / "p.n5"), "w")
    f.create_dataset("vol/s0", shape=(8, 16, 16), chunks=(4, 8, 8), dtype="uint16")
    for i, level in enumerate((s1, s2), 1):
        if level:
            f.create_dataset(f"vol/s{i}", shape=level[0], chunks=(4,) * len(level[0]),
                             dtype=level[1])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="napari_emparsl.core.n5attrs"):
        vol = Volume.open(tmp_path / "p.n5", "vol")
    assert vol.levels == tuple(f"vol/s{i}" for i in range(kept))
    assert [a.ndim for a in vol.pyramid] == [3] * kept
    assert ("left out" in caplog.text) == (kept < 3 if s2 else kept < 2)
    assert container_tree(tmp_path / "p.n5")[1]["levels"] == [f"s{i}" for i in range(kept)]


def test_a_symlink_loop_in_a_container_is_listed_once(tmp_path):
    """A `latest -> .` link inside a container made walk_tree recurse until the OS gave up
    (latest/latest/…/raw, listed dozens of times, or a RecursionError)."""
    from napari_emparsl.core.volume import openable_keys

    path = tmp_path / "loop.n5"
    save_array(path, "raw", np.full((2, 4, 4), 7, np.uint8))
    os.symlink(".", path / "latest")
    os.symlink("..", path / "raw" / "up")  # inside a dataset: chunk folders are not walked
    assert openable_keys(path) == ["raw"]
    assert [n["key"] for n in container_tree(path)] == ["", "raw"]
    assert Volume.open(path).key == "raw"  # the only dataset, found without a key
    assert int(Volume.open(path, "latest/raw").data.sum().compute()) == 7 * 32


def test_a_paintera_label_multiset_is_refused_on_opening(tmp_path):
    """Paintera's label multisets (varlength chunks) opened as uint8 and failed on reading with
    a message implying damaged files; refused on opening, in one sentence."""
    import struct

    path = tmp_path / "paintera.n5"
    (path / "labels" / "data" / "s0" / "0" / "0").mkdir(parents=True)
    (path / "attributes.json").write_text('{"n5": "2.0.0"}')
    (path / "labels" / "attributes.json").write_text(
        json.dumps({"painteraData": {"type": "label"}})
    )
    (path / "labels" / "data" / "attributes.json").write_text(
        json.dumps({"multiScale": True, "resolution": [4, 4, 40], "offset": [0, 0, 0]})
    )
    (path / "labels" / "data" / "s0" / "attributes.json").write_text(
        json.dumps({"dataType": "uint8", "isLabelMultiset": True, "compression": {"type": "raw"},
                    "blockSize": [4, 4, 2], "dimensions": [4, 4, 2]})
    )  # fmt: skip
    payload = bytes(range(37))  # a varlength (mode 1) chunk
    (path / "labels" / "data" / "s0" / "0" / "0" / "0").write_bytes(
        struct.pack(">HHIIII", 1, 3, 4, 4, 2, len(payload)) + payload
    )
    message = (
        f"{path}:labels/data is a Paintera label multiset, which this version cannot read; "
        "export it as a plain label dataset (e.g. with `paintera-convert to-scalar`) and open "
        "that."
    )
    for key in ("labels/data", "labels"):  # the pyramid, or the only one in its group
        with pytest.raises(VolumeError) as err:
            Volume.open(path, key)
        assert str(err.value) == message
    with pytest.raises(VolumeError, match="is a Paintera label multiset"):
        Volume.open(path, "labels/data/s0")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"blockSize": [0, 32, 1]}, "has a blockSize of [0, 32, 1] in its attributes.json, not 3"),
        ({"blockSize": [32, 32]}, "has a blockSize of [32, 32] in its attributes.json, not 3"),
        ({"dimensions": [8, -8, 8]}, "has dimensions [8, -8, 8] in its attributes.json"),
        ({"dimensions": "8,8,8"}, "has dimensions '8,8,8' in its attributes.json"),
        ({"dataType": "complex64"}, "stores voxels of type 'complex64', which N5 readers"),
    ],
)
def test_dataset_attributes_z5py_cannot_open_are_one_sentence(tmp_path, change, said):
    """A blockSize of 0 killed the process (z5py divides by it: SIGFPE, napari gone without a
    word); negative dimensions were a MemoryError, an unknown dataType `map::at`. Checked in a
    process of its own, so that the old behaviour fails the test rather than ending the run."""
    import json
    import subprocess
    import sys

    save_array(tmp_path / "d.n5", "raw", np.zeros((8, 32, 32), np.uint8), chunks=(8, 32, 32))
    path = tmp_path / "d.n5" / "raw" / "attributes.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    script = (
        "import sys; from napari_emparsl.core.volume import Volume, VolumeError\n"
        "try: Volume.open(sys.argv[1], 'raw')\n"
        "except VolumeError as err: print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "d.n5")], capture_output=True, text=True
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    assert out.stdout.startswith(f"Dataset {tmp_path}/d.n5:raw {said}"), out.stdout
    assert out.stdout.count("\n") == 1


def test_a_run_on_an_input_with_no_voxels_is_one_sentence(tmp_path):
    """N5 allows an axis of length 0 (written here as another tool would): a run on it was an
    internal error (max() of an empty sequence); writing one killed the process (SIGFPE)."""
    import json

    from napari_emparsl.execution.runner import Run, RunError

    with pytest.raises(VolumeError, match=r"with 8×8×0 voxels: a dataset needs at least one"):
        save_array(tmp_path / "z.n5", "raw", np.zeros((8, 8, 0), np.uint8))
    save_array(tmp_path / "z.n5", "raw", np.zeros((8, 8, 8), np.uint8), chunks=(8, 8, 8))
    path = tmp_path / "z.n5" / "raw" / "attributes.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"dimensions": [0, 8, 8]}))
    run = Run(f"{tmp_path}/z.n5:raw", "unet3d-em", f"{tmp_path}/o.n5:p", site="threads")
    with pytest.raises(RunError, match=r"has no voxels \(its size is 8×8×0\); choose a"):
        run.prepare()
    assert not (tmp_path / "o.n5").exists()


def test_a_dataset_inside_a_dataset_is_one_sentence(tmp_path):
    """`--output s.n5:raw/pred` where raw is a dataset: z5py's "Incompatible object (Dataset)
    already exists" came out as an internal error."""
    save_array(tmp_path / "s.n5", "raw", np.ones((8, 8, 8), np.uint8))
    with pytest.raises(VolumeError) as err:
        save_array(tmp_path / "s.n5", "raw/pred", np.zeros((8, 8, 8), np.uint8))
    assert str(err.value) == (
        f"{tmp_path}/s.n5:raw is a dataset, which cannot hold raw/pred; choose a name beside "
        f"it, e.g. {tmp_path}/s.n5:pred."
    )
    assert sorted(p.name for p in (tmp_path / "s.n5" / "raw").iterdir()) == ["0", "attributes.json"]


def test_every_writing_has_its_own_id_and_pyramids_refuse_what_z5py_dies_of(tmp_path):
    """write_pyramid (the sample's writer) set no write id, so a resume after `sample
    --overwrite` was not refused; and an axis of 0 voxels killed the process there (SIGFPE)."""
    from napari_emparsl.core.sample import make_sample, write_sample

    data = np.ones((8, 16, 16), np.uint8)
    first = write_pyramid(tmp_path / "p.n5", "raw", data, chunks=(8, 8, 8), levels=2)
    again = write_pyramid(tmp_path / "p.n5", "raw", data, chunks=(8, 8, 8), levels=2,
                          overwrite=True)  # fmt: skip
    assert first.write_id and again.write_id and first.write_id != again.write_id
    level = Volume.open(tmp_path / "p.n5", "raw/s1")  # a level opened alone carries it too
    assert level.write_id == again.write_id
    ids = set()
    for _ in range(2):
        write_sample(str(tmp_path / "s.n5"), make_sample((8, 16, 16)), overwrite=True)
        ids.add(Volume.open(tmp_path / "s.n5", "raw").write_id)
    assert len(ids) == 2 and None not in ids
    with pytest.raises(VolumeError, match=r"with 0×8×8 voxels: a dataset needs at least one"):
        write_pyramid(tmp_path / "z.n5", "raw", np.zeros((0, 8, 8)), chunks=(4, 4, 4), levels=1)
    with pytest.raises(VolumeError, match=r"p.n5:raw is a dataset|p.n5:raw/s0 is a dataset"):
        write_pyramid(tmp_path / "p.n5", "raw/s0/x", data, chunks=(8, 8, 8), levels=1)


def test_whole_numbers_written_as_floats_are_dimensions(tmp_path):
    """`"dimensions": [8.0, …]` is read by z5py; the new attribute check refused it."""
    import json

    save_array(tmp_path / "f.n5", "raw", np.ones((8, 8, 8), np.uint8), chunks=(4, 4, 4))
    path = tmp_path / "f.n5" / "raw" / "attributes.json"
    attrs = json.loads(path.read_text())
    attrs |= {"dimensions": [8.0] * 3, "blockSize": [4.0] * 3}
    path.write_text(json.dumps(attrs))
    assert Volume.open(tmp_path / "f.n5", "raw").data.compute().sum() == 512


@pytest.mark.parametrize("order", ["C", "F", None])
def test_cosem_transform_gives_voxel_size_unit_and_offset(tmp_path, order):
    """OpenOrganelle (COSEM) N5: each level carries a `transform` (axes, scale, translate,
    units, in C order unless it says F). Its translate is the offset (before: 0, so a run's
    output and anything placed by world coordinates sat off the data); its scale is absolute
    per level, half a voxel shifted on coarser levels."""
    import z5py

    def transform(scale, translate):
        tx = {"axes": ["z", "y", "x"], "scale": scale, "translate": translate,
              "units": ["nm", "nm", "nm"]}  # fmt: skip
        if order == "F":
            tx = {k: v[::-1] for k, v in tx.items()}
        if order is not None:
            tx["ordering" if order == "F" else "order"] = order
        return tx

    path = tmp_path / "jrc.n5"
    f = z5py.File(str(path), "w")
    g = f.create_group("em/fibsem-uint8")
    g.attrs.update({"axes": ["x", "y", "z"], "units": ["nm"] * 3, "scales": [[1] * 3, [2] * 3],
                    "pixelResolution": {"dimensions": [4.0, 4.0, 5.24], "unit": "nm"}})  # fmt: skip
    levels = [((5.24, 4.0, 4.0), (100.0, 40.0, 20.0)), ((10.48, 8.0, 8.0), (102.62, 42.0, 22.0))]
    for i, (scale, translate) in enumerate(levels):
        shape = (16 >> i, 64 >> i, 64 >> i)
        ds = g.create_dataset(f"s{i}", shape=shape, chunks=(8, 16, 16), dtype="uint8")
        ds.attrs["transform"] = transform(list(scale), list(translate))
    vol = Volume.open(path, "em/fibsem-uint8")
    assert vol.is_multiscale and vol.unit == "nm"
    assert vol.voxel_size == pytest.approx((5.24, 4.0, 4.0))
    assert vol.offset == pytest.approx((100.0, 40.0, 20.0))
    assert vol.level_voxel_sizes[1] == pytest.approx((10.48, 8.0, 8.0))
    level = Volume.open(path, "em/fibsem-uint8/s1")
    assert level.offset == pytest.approx((102.62, 42.0, 22.0))
    assert level.voxel_size == pytest.approx((10.48, 8.0, 8.0))


def test_a_transform_that_does_not_fit_is_passed_over(tmp_path):
    """A `transform` of another length than the dataset's axes (or with a zero scale) is not
    the dataset's: the other conventions are read, as before."""
    import z5py

    path = tmp_path / "bad.n5"
    f = z5py.File(str(path), "w")
    ds = f.create_dataset("raw", shape=(4, 8, 8), chunks=(4, 8, 8), dtype="uint8")
    ds.attrs["resolution"] = [2, 2, 3]
    for bad in ({"axes": ["y", "x"], "scale": [1, 1], "translate": [0, 0]},
                {"axes": ["z", "y", "x"], "scale": [0, 1, 1], "translate": [5, 5, 5]}):  # fmt: skip
        ds.attrs["transform"] = bad
        vol = Volume.open(path, "raw")
        assert vol.voxel_size == (3.0, 2.0, 2.0) and vol.offset == (0.0, 0.0, 0.0)


def test_a_dataset_written_anew_while_open_is_said_not_a_crash(tmp_path):
    """A dataset open (a napari layer) written anew with another shape or chunks — by `emparsl
    import --overwrite` or a layer saved over it — crashed the reading process (z5py's handle
    kept the old chunk size: heap corruption, SIGABRT / SIGSEGV). Now a read says it changed,
    or reads it as it is now where its shape and type are the same. In a subprocess: the crash
    would take the test run with it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np
        from napari_emparsl.core.volume import Volume, save_array
        path = {str(tmp_path / "c.n5")!r}
        save_array(path, "raw", np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16),
                   chunks=(4, 8, 8))
        v = Volume.open(path, "raw")
        print(float(np.asarray(v.data[3]).sum()))
        save_array(path, "raw", np.ones((20, 40, 40), np.float32), chunks=(20, 40, 40),
                   overwrite=True)
        try:
            np.asarray(v.data[3])
        except Exception as err:
            print(type(err).__name__, err)
        save_array(path, "raw", np.full((8, 16, 16), 2, np.float32), chunks=(8, 16, 16),
                   overwrite=True)
        print(float(np.asarray(v.data[3]).sum()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    first, said, again = res.stdout.strip().splitlines()
    assert float(first) == float(np.arange(768, 1024).sum())
    assert said == (
        f"VolumeError {tmp_path}/c.n5:raw was written anew since it was opened (now 20×40×40 "
        "float32, was 8×16×16 float32); open it again (remove its layer first)."
    )
    assert float(again) == 2.0 * 16 * 16
