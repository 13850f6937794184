"""The volume panel: tree of a container, lazy opening, recent paths, ledger status, errors."""

from __future__ import annotations

import shutil

import dask.array as da

from napari_emparsl._napari.dataset_tree import item_texts
from napari_emparsl._napari.volume_widget import VolumeWidget, recent_paths
from napari_emparsl.cli import main


def test_browse_and_open(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "32,64,64"]) == 0
    viewer = make_napari_viewer()
    widget = VolumeWidget(viewer)
    widget.path.value = str(tmp_path / "s.n5")
    assert list(widget.datasets.choices) == ["labels/cells", "labels/classes", "raw"]
    # a tree: groups hold their datasets, a pyramid its levels; columns say shape, dtype,
    # chunks, voxel size and levels (of a pyramid's finest level), the tooltip all of it
    tree = widget.datasets
    raw = tree.item("raw")
    assert item_texts(raw) == ["raw", "32×64×64", "uint8", "32×64×64", "8×8×8 nm", "3 levels"]
    assert raw.toolTip(0) == (
        "raw  32×64×64 uint8, chunks 32×64×64, voxel 8×8×8 nm, pyramid of 3 levels"
    )
    assert [raw.child(i).text(0) for i in range(raw.childCount())] == ["s0", "s1", "s2"]
    assert item_texts(raw.child(2))[1:5] == ["8×16×16", "uint8", "8×16×16", "32×32×32 nm"]
    labels = tree.item("labels")
    assert [labels.child(i).text(0) for i in range(labels.childCount())] == ["cells", "classes"]
    assert labels.isExpanded() and not raw.isExpanded()
    # a group or a single level of a pyramid is not opened on its own: not selectable
    tree.value = ["labels", "raw/s1", "labels/cells"]
    assert tree.value == ["labels/cells"]
    tree.value = "raw"  # one key alone, as magicgui's own lists take it
    assert tree.value == ["raw"]
    assert str(tmp_path / "s.n5") in recent_paths()
    recent = tmp_path / "config" / "napari-emparsl" / "recent.json"
    kept = recent.read_text()  # a recent-paths file that is no list (edited by hand): none,
    recent.write_text("5")  # not a TypeError in the panel
    assert recent_paths() == []
    recent.write_text(kept)
    widget.datasets.value = ["raw"]
    assert widget.info.value == "32×64×64 uint8, chunks 32×64×64, voxel 8×8×8 nm, 3 level(s)"
    [layer] = widget.open_selected()
    assert (
        layer.multiscale and isinstance(layer.data[0], da.Array) and tuple(layer.scale) == (8, 8, 8)
    )
    # typed as people do: "~" for the home folder, a pasted path in quotes
    monkeypatch.setenv("HOME", str(tmp_path))
    widget.path.value = "'~/s.n5' "
    assert list(widget.datasets.choices) == ["labels/cells", "labels/classes", "raw"]


def test_run_output_offers_resume_and_errors_are_sentences(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, make_run_output
):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    make_run_output()
    viewer = make_napari_viewer()
    widget = VolumeWidget(viewer)
    widget.path.value = str(tmp_path / "s.n5")
    widget.datasets.value = ["pred"]
    # the ledger is read off the Qt thread: the panel says so meanwhile
    assert widget.info.value.endswith("run output: reading its ledger…")
    # the region's one block done, out of the whole volume's 1 × 2 × 2
    qtbot.waitUntil(lambda: "run output: 1/4 blocks done, 0 failed" in widget.info.value)
    assert widget.info.value.endswith(" — resume it from the run panel")
    # an answer for a dataset no longer selected is dropped
    widget.datasets.value = ["raw"]
    widget.datasets.value = ["pred"]
    widget.datasets.value = ["raw"]
    qtbot.wait(300)
    assert widget.info.value == "32×64×64 uint8, chunks 32×64×64, voxel 8×8×8 nm, 3 level(s)"
    # a complete run's output is not offered for resuming
    assert main(["run", "--input", f"{tmp_path}/s.n5:raw", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/s.n5:pred", "--site", "threads", "--block", "32,32,32"]) == 0  # fmt: skip
    widget.datasets.value = ["pred"]
    qtbot.waitUntil(lambda: "run output: 4/4 blocks done, 0 failed — complete" in widget.info.value)
    widget.path.value = str(tmp_path / "missing.n5")
    assert widget.info.value.endswith("does not exist; check the path.")


def test_unfinished_import_is_marked(make_napari_viewer, tmp_path, monkeypatch):
    """A dataset an import is still writing (or that a killed import left) says so in the tree
    and the info line: parts of it are missing."""
    import numpy as np
    import tifffile

    from napari_emparsl.core.importer import iter_import

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    tifffile.imwrite(tmp_path / "s.tif", np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    steps = iter_import(str(tmp_path / "s.tif"), f"{tmp_path}/o.n5:raw", chunks=(2, 8, 8))
    next(steps), next(steps)  # the estimate, then the first of two slabs
    widget = VolumeWidget(make_napari_viewer())
    widget.path.value = str(tmp_path / "o.n5")
    item = widget.datasets.item("raw")
    assert item_texts(item)[:3] == ["raw  (unfinished)", "4×8×8", "uint8"]
    assert item.toolTip(0).endswith(
        f"; unfinished: an import of {tmp_path}/s.tif that has not finished"
    )
    widget.datasets.value = ["raw"]
    assert widget.info.value.endswith("that has not finished): parts of it are missing")
    list(steps)  # the import completes
    widget.refresh()
    assert item_texts(widget.datasets.item("raw"))[:3] == ["raw", "4×8×8", "uint8"]


def test_typed_paths_and_lists_that_stay(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import Qt

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "16,32,32"]) == 0
    viewer = make_napari_viewer(show=True)
    widget = VolumeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    line = widget.path.native
    line.activateWindow()
    line.setFocus()
    qtbot.waitUntil(line.hasFocus, timeout=5_000)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        # typed letter by letter: every prefix is no container, said in the info line only
        # (before, each keystroke was an error notification)
        qtbot.keyClicks(line, str(tmp_path / "s.n5"))
        assert list(widget.datasets.choices) == ["labels/cells", "labels/classes", "raw"]
        assert seen == []
        line.clear()
        qtbot.keyClicks(line, str(tmp_path / "nope.n5"))
        assert "does not exist" in widget.info.value and seen == []
        qtbot.keyClick(line, Qt.Key.Key_Return)  # typing done: said once, as a notification
        assert len(seen) == 1 and "nope.n5" in str(seen[0].message)
        qtbot.keyClick(line, Qt.Key.Key_Return)
        assert len(seen) == 1
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    # the recent list gets the containers chosen or typed (Return), not each folder typed on
    # the way (before: s.n5/raw/s0/0, s.n5/raw/s0, … each a recent path), most recent first
    assert widget.recent.choices == ("",)  # typed, never confirmed
    line.clearFocus()  # chosen elsewhere (Browse, the recent list, a layer)
    assert main(["sample", str(tmp_path / "t.n5"), "--shape", "16,32,32"]) == 0
    widget.path.value = str(tmp_path / "t.n5" / "raw" / "s0")
    widget.path.value = str(tmp_path / "s.n5")
    assert widget.recent.choices == ("", str(tmp_path / "s.n5"), str(tmp_path / "t.n5"))
    # Open adds layers, and napari then resets a docked panel's choices: the list stays
    # (before, it emptied as soon as its datasets were opened)
    # chosen with the mouse, as people do: a click, then a ctrl-click adds a second row
    tree = widget.datasets.native
    for key, modifier in (("raw", Qt.KeyboardModifier.NoModifier),
                          ("labels/classes", Qt.KeyboardModifier.ControlModifier)):  # fmt: skip
        rect = tree.visualItemRect(widget.datasets.item(key))
        qtbot.mouseClick(tree.viewport(), Qt.MouseButton.LeftButton, modifier, rect.center())
    assert widget.datasets.value == ["labels/classes", "raw"]
    assert widget.info.value == "2 datasets selected: Open selected adds each as a layer."
    assert len(widget.open_selected()) == 2
    # a double-click opens a dataset; a group's row only folds (a click first, as a mouse
    # sends it: Qt's item views take a double-click on the row the press went to)
    for key in ("labels/cells", "labels"):
        rect = tree.visualItemRect(widget.datasets.item(key))
        qtbot.mouseClick(tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        qtbot.mouseDClick(tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert [lyr.name for lyr in viewer.layers] == ["labels_classes", "raw", "labels_cells"]
    assert not widget.datasets.item("labels").isExpanded() and widget.datasets.value == []
    assert list(widget.datasets.choices) == ["labels/cells", "labels/classes", "raw"]


def test_a_layer_already_open_from_n5(make_napari_viewer, tmp_path, monkeypatch):
    from napari_emparsl._napari.reader import read_layers

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "32,64,64"]) == 0
    viewer = make_napari_viewer()
    viewer.add_points()  # not from N5: not offered
    widget = VolumeWidget(viewer)
    viewer.window.add_dock_widget(widget)  # napari refreshes a docked panel's lists
    # opened another way (File > Open, a drop on the viewer): the panel offers its layers
    for data, meta, kind in read_layers(str(tmp_path / "s.n5")):
        getattr(viewer, f"add_{kind}")(data, **meta)
    assert list(widget.layer.choices) == ["", "raw", "labels_cells", "labels_classes"]
    widget.layer.value = "labels_classes"
    assert widget.path.value == str(tmp_path / "s.n5")
    assert widget.datasets.value == ["labels/classes"]
    assert widget.info.value.startswith("32×64×64 uint8, chunks 32×64×64, voxel 8×8×8 nm")
    # another path typed, then the same layer chosen again: shown again (before: no change)
    widget.path.value = str(tmp_path)
    widget.layer.value = "labels_classes"
    assert widget.path.value == str(tmp_path / "s.n5")
    assert widget.datasets.value == ["labels/classes"]
    # opening it again (also through a symlink to the container) selects the layer open already
    (tmp_path / "link.n5").symlink_to(tmp_path / "s.n5")
    widget.path.value = str(tmp_path / "link.n5")
    widget.datasets.value = ["labels/classes", "raw"]
    viewer.layers.selection.active = viewer.layers["raw"]
    assert widget.open_selected() == [] and len(viewer.layers) == 4
    assert viewer.layers.selection.active.name == "raw"
    assert widget.info.value == "raw is open already, as the layer 'raw'."
    viewer.layers.remove("raw")
    assert list(widget.layer.choices) == ["", "labels_cells", "labels_classes"]
    [again] = widget.open_selected()  # the other one is still open
    assert again.name == "raw" and len(viewer.layers) == 4


def test_a_folder_inside_a_container_and_recent_again(make_napari_viewer, tmp_path, monkeypatch):
    """A group or dataset folder typed or chosen (s.n5/labels): its datasets are listed with
    keys from the container's root, and describing and opening them works (before: 'no dataset
    labels/labels/classes'); a recent container chosen again after another one is listed
    again (before: the list still held it, so choosing it was no change)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("s.n5", "t.n5"):
        assert main(["sample", str(tmp_path / name), "--shape", "16,32,32"]) == 0
    viewer = make_napari_viewer()
    widget = VolumeWidget(viewer)
    widget.path.value = str(tmp_path / "s.n5" / "labels")
    assert list(widget.datasets.choices) == ["labels/cells", "labels/classes"]
    widget.datasets.value = ["labels/classes"]
    assert widget.info.value.startswith("16×32×32 uint8, chunks")
    [layer] = widget.open_selected()
    assert layer.metadata["emparsl"] == {"path": str(tmp_path / "s.n5"), "key": "labels/classes"}
    assert widget.open_selected() == [] and "is open already" in widget.info.value
    widget.path.value = str(tmp_path / "s.n5" / "raw")  # a pyramid's folder
    assert list(widget.datasets.choices) == ["raw"]
    widget.datasets.value = ["raw"]
    assert [lyr.name for lyr in widget.open_selected()] == ["raw"]
    # recent: s.n5, then t.n5 typed, then s.n5 chosen again from the list
    widget.path.value = str(tmp_path / "s.n5")
    widget.path.value = str(tmp_path / "t.n5")
    widget.recent.reset_choices()
    widget.recent.value = str(tmp_path / "s.n5")
    assert widget.path.value == str(tmp_path / "s.n5") and widget.recent.value == ""
    widget.path.value = str(tmp_path / "t.n5")
    widget.recent.value = str(tmp_path / "s.n5")
    assert widget.path.value == str(tmp_path / "s.n5")
    # one entry per container however reached (a symlink and its target were two); one
    # deleted since is not offered
    (tmp_path / "link.n5").symlink_to(tmp_path / "s.n5")
    widget.path.value = str(tmp_path / "link.n5")
    assert [p for p in recent_paths() if p.endswith(("s.n5", "link.n5"))] == [
        str(tmp_path / "link.n5")
    ]  # fmt: skip
    shutil.rmtree(tmp_path / "t.n5")
    widget.recent.reset_choices()
    assert str(tmp_path / "t.n5") not in widget.recent.choices


def test_a_label_multiset_is_listed_greyed_not_offered(make_napari_viewer, tmp_path, monkeypatch):
    """A Paintera label multiset was a selectable uint8 pyramid: selecting it raised an error
    notification, and Open the same again. Now it says it cannot be read and is not offered;
    the raw beside it is."""
    import json

    import numpy as np

    from napari_emparsl.core.volume import save_array

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    root = tmp_path / "paintera.n5"
    save_array(root, "raw/data/s0", np.zeros((4, 8, 8), np.uint8))
    save_array(root, "neurons/data/s0", np.zeros((4, 8, 8), np.uint8))
    for source, kind in (("raw", "raw"), ("neurons", "label")):
        (root / source / "attributes.json").write_text(json.dumps({"painteraData": {"type": kind}}))
    meta = root / "neurons" / "data" / "s0" / "attributes.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"isLabelMultiset": True}))
    widget = VolumeWidget(make_napari_viewer())
    widget.path.value = str(root)
    item = widget.datasets.item("neurons/data")
    assert item_texts(item)[0] == "data  (cannot be read)" and item.isDisabled()
    assert "a Paintera label multiset, which this version cannot read" in item.toolTip(0)
    assert widget.datasets.native._openable == ["raw/data"]
