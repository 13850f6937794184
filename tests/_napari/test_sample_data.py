"""napari sample data: the synthetic EM volume with classes and cells, opened from N5 so that
it can be run on at once."""

from __future__ import annotations

import numpy as np

from napari_emparsl.core.sample import make_sample


def test_open_sample(make_napari_viewer, tmp_path, monkeypatch):
    import time

    from qtpy.QtCore import QTimer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    # the first opening writes the container (seconds): Qt's events go on meanwhile (a 10 ms
    # timer ticks; on a blocked event loop it would fire at most once, after)
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    t0 = time.perf_counter()
    layers = viewer.open_sample("napari-emparsl", "synthetic_em")
    took = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff([t0, *ticks])
    print(f"first opening {took:.1f} s, {len(ticks)} ticks, longest gap {gaps.max() * 1e3:.0f} ms")
    # ticks during the call: Qt's events went on (a blocked loop gives none, the timer stops
    # before any event is processed)
    assert len(ticks) >= 2
    names = [layer.name for layer in layers]
    assert names == ["sample raw", "sample classes", "sample cells"]
    raw, classes, cells = layers
    container = tmp_path / "cache" / "napari-emparsl" / "sample-seed0.n5"
    # lazy multiscale layers over the sample's N5 container in the user's cache
    for layer, key in zip(layers, ("raw", "labels/classes", "labels/cells"), strict=True):
        assert layer.metadata["emparsl"] == {"path": str(container), "key": key}
        assert layer.multiscale and len(layer.data) == 3
    assert raw._type_string == "image" and raw.data[0].dtype == np.uint8
    assert raw.data[0].shape == (128, 256, 256) and tuple(raw.scale) == tuple(classes.scale)
    assert viewer.dims.axis_labels == ("z", "y", "x")  # the sliders say z, not -3
    expected = make_sample(seed=0)
    np.testing.assert_array_equal(np.asarray(raw.data[0][60]), expected.raw[60])
    assert classes._type_string == "labels" and classes.opacity == 0.5
    assert list(classes.features["class"]) == list(expected.class_names)
    assert cells._type_string == "labels" and not cells.visible
    assert len(np.unique(np.asarray(cells.data[0][60]))) > 10
    # opened again: the container is reused as it is (nothing rewritten), temp folders gone
    stamp = (container / "raw" / "s0" / "attributes.json").stat().st_mtime_ns
    viewer.layers.clear()
    viewer.open_sample("napari-emparsl", "synthetic_em")
    assert (container / "raw" / "s0" / "attributes.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in container.parent.iterdir()) == ["sample-seed0.n5"]
    # a container missing a dataset (deleted by hand) is moved aside, not deleted, and written
    # whole again
    import shutil

    shutil.rmtree(container / "labels" / "cells")
    viewer.layers.clear()
    assert len(viewer.open_sample("napari-emparsl", "synthetic_em")) == 3
    kept = sorted(p.name for p in container.parent.iterdir())
    assert kept[0] == "sample-seed0.n5" and kept[1].startswith("sample-seed0.n5.incomplete-")


def test_sample_without_a_writable_cache(tmp_path, monkeypatch, caplog):
    """A cache folder that cannot be made (here: under a file; a read-only home alike): the
    sample goes to the temporary folder, said in the log, and the menu still opens it."""
    import os
    import tempfile

    from napari_emparsl._napari.sample_data import make_sample_data

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    layers = make_sample_data()
    where = tmp_path / "tmp" / f"napari-emparsl-{os.getuid()}" / "sample-seed0.n5"
    assert [meta["metadata"]["emparsl"]["path"] for _, meta, _ in layers] == [str(where)] * 3
    assert "could not write the sample to" in caplog.text


def test_viewer_closed_while_the_sample_is_written(make_napari_viewer, tmp_path, monkeypatch):
    """Closed during the first opening's writing (Qt's events go on then): one sentence, not
    napari's IndexError from layers added to a closed viewer, and the sample is kept whole."""
    import pytest
    from qtpy.QtCore import QTimer

    from napari_emparsl._napari.sample_data import _whole
    from napari_emparsl.core.errors import UserError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    QTimer.singleShot(0, viewer.close)  # at the first event processed: while writing
    with pytest.raises(UserError, match="The viewer was closed while the sample was being"):
        viewer.open_sample("napari-emparsl", "synthetic_em")
    assert _whole(tmp_path / "cache" / "napari-emparsl" / "sample-seed0.n5")


def test_sample_nowhere_to_write_is_one_sentence(tmp_path, monkeypatch):
    """Neither the cache nor the temporary folder can be written: one sentence saying both
    places and what to do (napari shows it as the notification's text)."""
    import tempfile

    import pytest

    from napari_emparsl._napari.sample_data import make_sample_data
    from napari_emparsl.core.errors import UserError

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "file" / "tmp"))
    with pytest.raises(UserError) as caught:
        make_sample_data()
    message = str(caught.value)
    assert message.startswith(f"Could not write the EM sample to {tmp_path}/file/cache/")
    assert "nor to" in message and "set XDG_CACHE_HOME" in message and "\n" not in message
