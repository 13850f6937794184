"""napari writers: Image and Labels layers round-trip through N5."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_emparsl.core.volume import Volume, VolumeError

PLUGIN = "napari-emparsl"


def test_labels_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((10, 70, 80), np.uint32)
    labels[2:5, 10:40, 20:30] = 12345
    layer = viewer.add_labels(labels, name="my seg", scale=(40, 4, 4))
    written = layer.save(str(tmp_path / "out.n5"), plugin=PLUGIN)
    assert written and written[0].endswith("my_seg")
    vol = Volume.open(tmp_path / "out.n5", "my_seg")
    assert vol.is_labels and vol.dtype == np.uint32 and vol.voxel_size == (40.0, 4.0, 4.0)
    assert vol.unit == "pixel"  # the layer had no units: none is made up (before: nm)
    assert vol.compression == "gzip"
    np.testing.assert_array_equal(vol.data.compute(), labels)
    [reopened] = viewer.open(str(tmp_path / "out.n5"), plugin=PLUGIN)
    assert reopened._type_string == "labels" and tuple(reopened.scale) == (40.0, 4.0, 4.0)
    assert str(reopened.units[0]) == "pixel"
    # a layer in nm keeps nm
    viewer.add_image(np.ones((4, 8, 8), np.uint8), name="em", scale=(8, 8, 8), units="nm")
    viewer.layers["em"].save(str(tmp_path / "out.n5"), plugin=PLUGIN)
    assert Volume.open(tmp_path / "out.n5", "em").unit in ("nm", "nanometer")
    # a layer with a channel axis first (as the run panel shows a multichannel output): the
    # spatial axes' unit, not the channel axis's "pixel"
    viewer.add_image(np.ones((2, 4, 8, 8), np.float32), name="mc", scale=(1, 8, 8, 8),
                     units=("pixel", "nm", "nm", "nm"))  # fmt: skip
    viewer.layers["mc"].save(str(tmp_path / "out.n5"), plugin=PLUGIN)
    assert Volume.open(tmp_path / "out.n5", "mc").unit in ("nm", "nanometer")


def test_writer_takes_a_typed_home_path(tmp_path, monkeypatch):
    """Called with "~/…" (a script, a console), not into a folder named "~"."""
    from napari_emparsl._napari.writer import write_labels

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    written = write_labels("~/w.n5", np.ones((4, 8, 8), np.uint8), {"name": "lab"})
    assert written == [str(tmp_path / "home" / "w.n5" / "lab")]
    assert not (tmp_path / "~").exists() and Volume.open(written[0]).shape == (4, 8, 8)


def test_image_round_trip_dask_and_dataset_path(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = da.random.default_rng(0).random((16, 96, 96), chunks=(8, 32, 32)).astype(np.float32)
    layer = viewer.add_image(data, name="prob", scale=(10, 5, 5))
    layer.save(str(tmp_path / "out.n5" / "pred" / "prob"), plugin=PLUGIN)
    vol = Volume.open(tmp_path / "out.n5", "pred/prob")
    assert not vol.is_labels and vol.dtype == np.float32 and vol.voxel_size == (10.0, 5.0, 5.0)
    np.testing.assert_array_equal(vol.data.compute(), data.compute())


def test_writer_refuses_to_overwrite_its_own_source(make_napari_viewer, small_n5):
    path, data = small_n5
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    with pytest.raises(VolumeError, match="is the dataset this layer reads from"):
        layer.save(str(path / "raw"), plugin=PLUGIN)
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)


def test_writer_waits_for_no_run(make_napari_viewer, tmp_path, small_n5):
    """Saving over a run's output is refused and changes nothing; a layer saved before is not
    replaced while a run holds it (its lock); saving leaves no lock file behind."""
    import os

    from napari_emparsl.execution.runner import Run

    path, _ = small_n5
    run = Run(f"{path}:raw", "unet3d-em", f"{tmp_path}/o.n5:pred", site="threads").events()
    next(run)  # planned: the run holds o.n5:pred
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.ones((20, 40, 50), np.uint8), name="pred")
    before = Volume.open(tmp_path / "o.n5", "pred").data.compute()
    # a run's output is not replaced by a layer saved (before: replaced once the run ended)
    with pytest.raises(VolumeError, match="exists already and is not a layer saved from napari"):
        layer.save(str(tmp_path / "o.n5"), plugin=PLUGIN)
    np.testing.assert_array_equal(Volume.open(tmp_path / "o.n5", "pred").data.compute(), before)
    run.close()
    # a layer saved before is not replaced while a run holds it (the run's lock, taken here
    # as a run takes it)
    from napari_emparsl.core.ledger import OutputBusy, OutputLock

    layer.save(str(tmp_path / "o.n5" / "mine"), plugin=PLUGIN)
    held = OutputLock(str(tmp_path / "o.n5"), "mine")
    held.acquire()
    try:
        with pytest.raises(OutputBusy, match="is being written by another run"):
            layer.save(str(tmp_path / "o.n5" / "mine"), plugin=PLUGIN)
    finally:
        held.release(remove=True)
    layer.save(str(tmp_path / "new.n5"), plugin=PLUGIN)
    assert sorted(os.listdir(tmp_path / "new.n5")) == ["attributes.json", "pred"]


def test_writer_replaces_only_a_layer_saved_before(tmp_path):
    """Nothing asks before a dataset is replaced (napari hands over w.n5/seg.n5, which does not
    exist; Qt's dialog enters an existing folder): an existing w.n5/seg — a whole pyramid too —
    was replaced without a word. Only a layer saved here before is replaced now."""
    from napari_emparsl._napari.writer import write_labels
    from napari_emparsl.core.volume import write_pyramid

    data = np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16)
    write_pyramid(tmp_path / "w.n5", "seg", data, chunks=(8, 8, 8), levels=2, labels=True)
    for given, meta in ((tmp_path / "w.n5" / "seg.n5", {}), (tmp_path / "w.n5", {"name": "seg"})):
        with pytest.raises(VolumeError) as err:
            write_labels(str(given), np.zeros((8, 16, 16), np.uint8), meta)
        assert str(err.value) == (
            f"{tmp_path}/w.n5:seg exists already and is not a layer saved from napari; save "
            "under another name, or remove it first."
        )
    kept = Volume.open(tmp_path / "w.n5", "seg")
    assert len(kept.levels) == 2 and kept.data.compute().tolist() == data.tolist()
    # a layer saved, edited, saved again under its name: replaced
    assert write_labels(str(tmp_path / "w.n5"), np.ones((4, 4, 4), np.uint8), {"name": "mine"})
    assert write_labels(str(tmp_path / "w.n5" / "mine.n5"), np.full((4, 4, 4), 2, np.uint8), {})
    assert Volume.open(tmp_path / "w.n5", "mine").data.compute().min() == 2


def test_a_layer_is_not_saved_where_nothing_would_list_it(tmp_path):
    """Saved inside a pyramid group (or a Paintera source), a layer was written and then never
    listed nor opened: refused in one sentence."""
    from napari_emparsl._napari.writer import write_labels
    from napari_emparsl.core.volume import write_pyramid

    write_pyramid(tmp_path / "p.n5", "raw", np.zeros((8, 64, 64), np.uint8), chunks=(8, 32, 32))
    with pytest.raises(VolumeError) as err:
        write_labels(str(tmp_path / "p.n5" / "raw" / "edited"), np.zeros((8, 64, 64), np.uint32),
                     {"name": "edited"})  # fmt: skip
    assert str(err.value) == (
        f"{tmp_path}/p.n5:raw/edited would lie inside the pyramid raw, where nothing but its "
        "levels is listed or opened; save it under a name outside it."
    )
    assert not (tmp_path / "p.n5" / "raw" / "edited").exists()


def test_a_multiscale_layer_is_saved_as_its_finest_level(make_napari_viewer, tmp_path):
    """A pyramid opened from N5 (the sample's raw), saved: a TypeError ("list indices must be
    integers or slices, not tuple": napari hands its MultiScaleData, not a list), and an empty
    dataset marked unfinished left behind."""
    from napari_emparsl.cli import main

    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "32,128,128"]) == 0
    viewer = make_napari_viewer()
    [raw] = viewer.open(str(tmp_path / "s.n5" / "raw"), plugin=PLUGIN)
    assert raw.multiscale
    written = raw.save(str(tmp_path / "w.n5" / "copy"), plugin=PLUGIN)
    assert written == [str(tmp_path / "w.n5" / "copy")]
    copy, source = Volume.open(tmp_path / "w.n5", "copy"), Volume.open(tmp_path / "s.n5", "raw")
    np.testing.assert_array_equal(copy.data.compute(), source.data.compute())
    assert copy.voxel_size == source.voxel_size


def test_a_dataset_another_layer_reads_is_not_written_anew(make_napari_viewer, tmp_path):
    """A layer saved over a dataset another layer reads (opened from it): that layer's reads
    then crashed napari (SIGABRT). Refused in one sentence; the data stays."""
    viewer = make_napari_viewer()
    first = viewer.add_image(np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16),
                             name="prob")  # fmt: skip
    first.save(str(tmp_path / "c.n5"), plugin=PLUGIN)
    [opened] = viewer.open(str(tmp_path / "c.n5" / "prob"), plugin=PLUGIN)
    opened.name = "prob opened"
    viewer.layers.remove(first)
    second = viewer.add_image(np.ones((20, 40, 40), np.float32), name="prob")
    with pytest.raises(VolumeError) as err:
        second.save(str(tmp_path / "c.n5"), plugin=PLUGIN)
    assert str(err.value) == (
        f"{tmp_path}/c.n5:prob is open as the layer 'prob opened'; save under another name, or "
        "remove that layer first."
    )
    assert np.asarray(opened.data[3]).sum() == np.arange(768, 1024).sum()
    viewer.layers.remove(opened)  # gone: saved over, as a layer saved before may be
    assert second.save(str(tmp_path / "c.n5"), plugin=PLUGIN)
    assert Volume.open(tmp_path / "c.n5", "prob").shape == (20, 40, 40)


def test_a_folder_named_with_n5_in_it_is_no_container(tmp_path):
    """Saved to proj.n5backup/out.n5: written to proj.n5backup/out/ (the .n5 that napari adds
    inside a container was cut because the path had ".n5" anywhere above)."""
    from napari_emparsl._napari.writer import write_image

    (tmp_path / "proj.n5backup").mkdir()
    written = write_image(str(tmp_path / "proj.n5backup" / "out.n5"), np.ones((2, 4, 4)),
                          {"name": "raw"})  # fmt: skip
    assert written == [str(tmp_path / "proj.n5backup" / "out.n5" / "raw")]
    # napari's appended extension inside a container is still cut: out.n5/seg.n5 is seg
    written = write_image(str(tmp_path / "out.n5" / "seg.n5"), np.ones((2, 4, 4)), {"name": "x"})
    assert written == [str(tmp_path / "out.n5" / "seg")]


def test_a_time_axis_stays_a_time_axis(make_napari_viewer, tmp_path):
    """A t, z, y, x layer saved: its time axis was written as channels ("axes" x, y, z, c) and
    reopened as three channel layers."""
    viewer = make_napari_viewer()
    data = np.arange(3 * 4 * 8 * 8, dtype=np.uint8).reshape(3, 4, 8, 8)
    layer = viewer.add_image(data, name="time", scale=(1, 50, 5, 5),
                             units=("pixel", "nm", "nm", "nm"), axis_labels=("t", "z", "y", "x"))  # fmt: skip
    layer.save(str(tmp_path / "t.n5"), plugin=PLUGIN)
    vol = Volume.open(tmp_path / "t.n5", "time")
    assert vol.axes == ("t", "z", "y", "x") and vol.voxel_size == (50.0, 5.0, 5.0)
    [reopened] = viewer.open(str(tmp_path / "t.n5" / "time"), plugin=PLUGIN)
    assert reopened.data.shape == (3, 4, 8, 8) and reopened.axis_labels == ("t", "z", "y", "x")
    np.testing.assert_array_equal(np.asarray(reopened.data), data)


def test_several_layers_are_saved_at_once(make_napari_viewer, tmp_path):
    """Save Selected Layers with an Image and a Labels layer selected: each is a dataset of the
    container (before: napari found no writer for them); two layers that would be saved as one
    dataset save neither."""
    viewer = make_napari_viewer()
    em = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    seg = (em > 100).astype(np.uint8)
    viewer.add_image(em, name="em", scale=(8, 8, 8), units="nm")
    viewer.add_labels(seg, name="my seg", scale=(8, 8, 8))
    viewer.layers.selection.update(viewer.layers)  # both selected, as in the menu's use
    written = viewer.layers.save(str(tmp_path / "both.n5"), selected=True, plugin=PLUGIN)
    assert sorted(written) == [str(tmp_path / "both.n5" / k) for k in ("em", "my_seg")]
    image, labels = (
        Volume.open(tmp_path / "both.n5", "em"),
        Volume.open(tmp_path / "both.n5", "my_seg"),
    )
    assert not image.is_labels and labels.is_labels and image.voxel_size == (8.0, 8.0, 8.0)
    np.testing.assert_array_equal(image.data.compute(), em)
    np.testing.assert_array_equal(labels.data.compute(), seg)
    # into a group the path names (napari hands several layers' writer "copy.n5" as given)
    viewer.layers.save(str(tmp_path / "both.n5" / "copy.n5"), selected=False, plugin=PLUGIN)
    np.testing.assert_array_equal(Volume.open(tmp_path / "both.n5", "copy/em").data.compute(), em)
    # two names that are one dataset: neither is written
    viewer.add_image(em, name="my_seg")
    from napari_emparsl._napari.writer import write_layers

    with pytest.raises(VolumeError, match="would both be saved as .*:my_seg; rename one"):
        write_layers(
            str(tmp_path / "two.n5"), [layer.as_layer_data_tuple() for layer in viewer.layers]
        )
    assert not (tmp_path / "two.n5" / "em").exists()
    # a type N5 cannot store, in the second layer: the first is not written either (it was)
    half = [layer.as_layer_data_tuple() for layer in viewer.layers][:1]
    half.append((em.astype(np.float16), {"name": "half"}, "image"))
    with pytest.raises(VolumeError, match="N5 cannot store float16 data"):
        write_layers(str(tmp_path / "three.n5"), half)
    assert not (tmp_path / "three.n5" / "em").exists()
