"""The run dock widget driven as a user would, with a real viewer, real N5 and real Parsl."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import weakref

import numpy as np
import pytest
import yaml
from qtpy.QtCore import Qt

from napari_emparsl._napari.run_widget import RunWidget
from napari_emparsl.cli import main
from napari_emparsl.core.geometry import Roi, plan_blocks
from napari_emparsl.core.volume import Volume

PLUGIN = "napari-emparsl"


@pytest.fixture
def sample_path(tmp_path):
    path = tmp_path / "sample.n5"
    assert main(["sample", str(path), "--shape", "128,128,128", "--seed", "4"]) == 0
    return path


def _panel_on(viewer, path):
    """The run panel docked in ``viewer``, on the volume at ``path`` (opened as a layer)."""
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.input.reset_choices()
    widget.input.value = layer
    return widget


def _setup(viewer, sample_path):
    widget = _panel_on(viewer, sample_path / "raw")
    widget.model.value = "unet3d-em"
    widget.output.value = f"{sample_path}:pred"
    widget.block.value = "64"  # 8 blocks on the 128³ sample (the model's default 128³ is one)
    return widget


def _run_on_local_until_a_block_is_done(qtbot, viewer, sample_path):
    """The run panel on the sample, a full run on the local site, one block done."""
    widget = _setup(viewer, sample_path)
    widget.site.value = "local"
    widget.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    return widget


def _wait_idle(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: widget._run is None and widget.run_btn.enabled, timeout=timeout)


def _preview_rectangle(qtbot, viewer, widget, z: int):
    """Draw a rectangle on slice z, y 10:50, x 70:100 (world units: 8 nm voxels), go to z,
    click Preview and wait; the output layer."""
    viewer.dims.set_point(0, z * 8)
    corners = [[z, 10, 70], [z, 10, 100], [z, 50, 100], [z, 50, 70]]
    viewer.add_shapes([np.array(corners) * 8.0], shape_type="rectangle", name="region")
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    return widget._output_layer


def _block_records(container, key: str) -> list[int]:
    """The block ids an output's ledger records, in order, each time a block was recorded."""
    from napari_emparsl.core.ledger import Ledger

    lines = open(Ledger(str(container), key).path).read().splitlines()
    return [r["id"] for r in map(json.loads, lines) if r.get("type") == "block"]


def _blocks_with_data(arr: np.ndarray, block: int = 64) -> list[bool]:
    n = [s // block for s in arr.shape]
    return [
        bool(arr[z * block : (z + 1) * block, y * block : (y + 1) * block, x * block : (x + 1) * block].any())
        for z in range(n[0]) for y in range(n[1]) for x in range(n[2])
    ]  # fmt: skip


def test_preview_then_full_run_streams(make_napari_viewer, qtbot, sample_path, tmp_path):
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    out_layer = _preview_rectangle(qtbot, viewer, widget, 40)
    assert out_layer is not None and out_layer._type_string == "labels"
    # the class names: napari's status bar names the class under the cursor
    assert list(out_layer.features["class"]) == ["background", "membrane", "mitochondria"]
    # in the colours the model declares, as the ground truth's: membranes cyan, mitochondria
    # magenta (napari's own colours before)
    rgba = out_layer.colormap.map(np.array([0, 1, 2]))
    assert np.allclose(rgba, [[0, 0, 0, 0], [0, 229 / 255, 1, 1], [1, 0, 1, 1]], atol=1e-6), rgba
    assert out_layer.axis_labels == viewer.dims.axis_labels == ("z", "y", "x")  # not -3, -2, -1
    viewer.dims.set_point(0, 40 * 8)
    value = int(np.asarray(out_layer.data)[40, 20, 80])
    status = out_layer.get_status((40 * 8.0, 20 * 8.0, 80 * 8.0), world=True)
    assert f"class: {out_layer.features['class'][value]}" in str(status)
    preview = np.asarray(out_layer.data)
    # the preview ran exactly the blocks touching the rectangle: z-block 0, y-block 0, x-block 1
    assert _blocks_with_data(preview) == [False, True, False, False, False, False, False, False]
    # one block on the in-process site: it had the threads of every worker (one core of two
    # idled before)
    from napari_emparsl.execution.sites import load_site

    assert widget.block_threads == [load_site("threads").worker_count]
    # equal to the CLI's output for the same region
    assert main(["run", "--input", f"{sample_path}:raw", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/cli.n5:pred", "--site", "threads", "--roi", "40:41,10:50,70:100",
                 "--block", "64,64,64"]) == 0  # fmt: skip
    cli = Volume.open(tmp_path / "cli.n5", "pred").data.compute()
    np.testing.assert_array_equal(preview[40, 10:50, 70:100], cli[40, 10:50, 70:100])

    # previewing again, a region moved within the done block, computes nothing
    def block_records() -> list[int]:
        return _block_records(sample_path, "pred")

    assert block_records() == [1]
    viewer.layers.remove("region")
    _preview_rectangle(qtbot, viewer, widget, 30)
    assert block_records() == [1]
    viewer.dims.set_point(0, 40 * 8)

    # the full run on the local site skips the preview's block and streams the rest in; watch
    # what napari draws: the blocks of the displayed plane (z 40: blocks 0-3, block 1 is done)
    shown: list[list[bool]] = []

    def on_slice(_e):
        plane = np.asarray(out_layer._slice.image.raw)
        shown.append([bool(plane[y * 64 : (y + 1) * 64, x * 64 : (x + 1) * 64].any())
                      for y in range(2) for x in range(2)])  # fmt: skip

    out_layer.events.set_data.connect(on_slice)
    widget.site.value = "local"
    widget.run_btn.clicked.emit()
    # while it runs, what would change it cannot be changed; Cancel can be clicked
    settings = ("input", "model", "model_file", "model_file_btn", "model_options", "site",
                "output", "block", "halo", "replace", "preview_btn", "run_btn", "test_site_btn",
                "preview_on_site", "retry_btn")  # fmt: skip
    assert not any(getattr(widget, name).enabled for name in settings)
    assert widget.cancel_btn.enabled
    _wait_idle(qtbot, widget)
    assert all(getattr(widget, name).enabled for name in settings if name != "retry_btn")
    assert not widget.retry_btn.enabled  # nothing failed
    assert "finished: 8/8 done, 0 failed" in widget.status.value
    assert widget.activity_counts[-1] == (8, 8)  # napari's activity dock counted every block
    assert re.search(r"emparsl: .*:pred — \d+\.\d\d Mvoxel/s", widget.activity_texts[-1])
    assert any(1 < sum(s) < 4 for s in shown), shown  # some blocks drawn, others still empty
    assert shown[-1] == [True] * 4
    n5 = Volume.open(sample_path, "pred").data.compute()
    # what napari draws is the N5's plane (no stale cache), read by the run's thread, not Qt's
    np.testing.assert_array_equal(np.asarray(out_layer._slice.image.raw), n5[40])
    assert widget._live.plane_hits > 0
    final = np.asarray(out_layer.data)
    np.testing.assert_array_equal(final, n5)
    assert all(_blocks_with_data(final))
    # the preview's block was not computed again: each block computed once
    assert sorted(block_records()) == list(range(8))


def test_cancel_and_resume_equals_uninterrupted(
    make_napari_viewer, qtbot, sample_path, tmp_path, htex
):
    from napari_emparsl.core.ledger import Ledger

    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "local"
    cancelled = []

    def cancel_once(event):
        if type(event).__name__ == "BlockDone" and not cancelled:
            cancelled.append(True)
            widget.cancel_btn.clicked.emit()

    widget.run_btn.clicked.emit()
    widget._worker.yielded.connect(cancel_once)
    first_run, first_worker = weakref.ref(widget._run), weakref.ref(widget._worker)
    _wait_idle(qtbot, widget)
    assert "cancelled" in widget.status.value
    assert htex.gone(timeout=30)  # no worker, pool or interchange left behind
    qtbot.wait(50)
    gc.collect()
    assert first_run() is None  # an ended run (and its open N5 handles) is let go
    # and its napari worker (napari's task list kept every one, for the whole session)
    assert first_worker() is None
    tasks = viewer.window._task_status_manager._tasks
    assert [t.state()[2] for t in tasks.values()] == []
    ledger = Ledger(str(sample_path), "pred")
    done_before = set(ledger.summary().done)
    assert 1 <= len(done_before) < 8  # stopped mid-run, what finished kept
    widget.run_btn.clicked.emit()  # Run / resume
    _wait_idle(qtbot, widget)
    assert "finished: 8/8 done" in widget.status.value
    # the resume computed only the rest: each block once
    records = [json.loads(line) for line in open(ledger.path).read().splitlines()]
    assert sorted(r["id"] for r in records if r.get("type") == "block") == list(range(8))
    assert main(["run", "--input", f"{sample_path}:raw", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/ref.n5:pred", "--site", "threads", "--block", "64,64,64"]) == 0  # fmt: skip
    np.testing.assert_array_equal(
        Volume.open(sample_path, "pred").data.compute(),
        Volume.open(tmp_path / "ref.n5", "pred").data.compute(),
    )


def test_failing_model_shows_failed_blocks(make_napari_viewer, qtbot, sample_path, tmp_path):
    import torch

    class Fails(torch.nn.Module):
        def forward(self, x):
            if bool((x > 254.5).any()):
                raise RuntimeError("too bright for this model")
            return torch.cat([x, -x], dim=1)

    path = tmp_path / "fails.pt"
    torch.jit.save(torch.jit.script(Fails()), str(path))
    (tmp_path / "fails.pt.yaml").write_text(
        "kind: labels\nclasses: [a, b]\nnormalize: none\nblock: [64, 64, 64]\n"
    )
    import z5py

    finest = z5py.File(str(sample_path), "a")["raw/s0"]
    raw = np.minimum(finest[:], 250)
    raw[10, 10, 10] = raw[100, 10, 100] = 255  # blocks 0 and 1·4 + 0·2 + 1 = 5 fail
    finest[:] = raw
    for attrs in (sample_path / "raw").rglob("attributes.json"):  # an input not at the origin
        meta = json.loads(attrs.read_text())
        attrs.write_text(json.dumps(meta | {"offset": [800.0, 800.0, 800.0]}))
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.model_file.value = str(path)
    widget.output.value = f"{sample_path}:fails"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.failed_list.choices, widget.status.value
    assert all("too bright" in c for c in widget.failed_list.choices)
    boxes = viewer.layers["failed blocks"]
    # in the input's units: without, napari warned "Inconsistent units across layers" and
    # dropped the units (the scale bar's nm) from the whole view
    assert tuple(map(str, boxes.units)) == tuple(map(str, viewer.layers["raw"].units))
    assert viewer.layers.extent.units is not None
    assert widget.retry_btn.enabled
    # a box outlines each failed block the slice on screen passes through, on every slice
    raw = viewer.layers["raw"]
    plan = {b.id: b for b in plan_blocks((128, 128, 128), (64, 64, 64), (0, 0, 0))}
    ids = sorted(int(c.split(":")[0].split()[1]) for c in widget.failed_list.choices)
    assert ids == [0, 5]
    # a preview elsewhere (block 1, done) keeps the output's failed blocks listed (it emptied
    # the list, the boxes and Retry failed)
    viewer.dims.set_point(0, 800 + 40 * 8)
    corners = np.array([[40, 10, 70], [40, 10, 100], [40, 50, 100], [40, 50, 70]]) * 8.0 + 800
    viewer.add_shapes([corners], shape_type="rectangle", name="region")
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 1/1 done, 0 failed"
    assert sorted(int(c.split(":")[0].split()[1]) for c in widget.failed_list.choices) == ids
    assert widget.retry_btn.enabled
    viewer.layers.remove("region")

    def check_boxes(z: int) -> None:
        viewer.dims.set_point(0, 800 + z * 8)
        here = [i for i in ids if plan[i].write_roi.begin[0] <= z < plan[i].write_roi.end[0]]
        assert len(boxes.data) == len(here)
        for box, block_id in zip(boxes.data, here, strict=True):
            corners = np.array([raw.world_to_data(c) for c in box])
            roi = plan[block_id].write_roi
            for ax in (1, 2):
                assert (corners[:, ax].min(), corners[:, ax].max()) == pytest.approx(
                    (roi.begin[ax], roi.end[ax])
                )
            assert corners[:, 0] == pytest.approx([z] * 4)

    for z in (0, 5, 63, 64, 100, 127):  # before, one box per block, on its middle slice only
        check_boxes(z)
    # red rectangles 2 voxels wide: before, they were polygons 1 nm wide (the layer's default
    # for shapes added after it is made), too thin to be seen
    assert set(boxes.shape_type) == {"rectangle"} and set(boxes.edge_width) == {16.0}
    assert (boxes.edge_color == [1, 0, 0, 1]).all() and (boxes.face_color[:, 3] == 0).all()
    # the output opened again in a new panel (a later session, or after `emparsl run`): its
    # failed blocks come from its ledger — listed, outlined, Retry offered — and Run / resume
    # is offered with the block it was made with
    other = RunWidget(viewer)
    other.input.value = raw
    other.model_file.value = str(path)
    other.block.value = ""
    other.output.value = f"{sample_path}:fails"
    qtbot.waitUntil(lambda: len(other.failed_list.choices) == 2, timeout=10_000)
    # the lists stay when layers come and go (napari resets a docked panel's choices then:
    # the failed blocks' list emptied as soon as another layer was added)
    assert other.failed_list.choices == widget.failed_list.choices
    assert other.retry_btn.enabled and other.block.value == "64,64,64"
    assert other.status.value == (
        f"this output has a run at {8 - len(ids)}/8 blocks done, {len(ids)} failed: Run / "
        "resume continues it; Retry failed computes only the failed blocks"
    )
    # another output named: what was said of this one goes at once (its failed blocks could
    # otherwise be retried on that one before its ledger is read)
    other.output.value = f"{sample_path}:elsewhere"
    assert other.failed_list.choices == () and not other.retry_btn.enabled
    assert other.status.value == ""
    # … and the block filled in from its ledger goes back to what it was (the model's
    # default): a new output did not take the last one's block without a word
    assert other.block.value == ""
    other.close()
    # a run refused (another run holds the output) leaves the failed blocks as they were
    from napari_emparsl.execution.runner import Run

    holder = Run(f"{sample_path}:raw", str(path), f"{sample_path}:fails", site="threads",
                 block=(64, 64, 64)).events()  # fmt: skip
    next(holder)  # planned: it holds the output
    shown = widget.failed_list.choices
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "is being written by another run" in widget.status.value
    assert widget.failed_list.choices == shown and widget.retry_btn.enabled
    holder.close()

    # fix the model (same description, a new file), then Retry failed computes only those blocks
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], dim=1)

    torch.jit.save(torch.jit.script(Fixed()), str(path))
    from napari_emparsl.core.ledger import Ledger

    ledger = Ledger(str(sample_path), "fails")
    lines = open(ledger.path).read().splitlines(keepends=True)
    # a block whose record a crash lost: pending (neither done nor failed), for Retry to leave
    last = max(i for i, line in enumerate(lines) if json.loads(line).get("status") == "done")
    pending = json.loads(lines[last])["id"]
    before = "".join(lines[:last] + lines[last + 1 :])
    open(ledger.path, "w").write(before)
    widget.retry_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert not widget.failed_list.choices and len(boxes.data) == 0
    assert widget.status.value == f"retried {len(ids)} failed blocks: {len(ids)} done, 0 failed"
    assert not widget.retry_btn.enabled
    # only those ran (before, Retry was Run / resume: the pending block too)
    added = [json.loads(line) for line in open(ledger.path).read()[len(before) :].splitlines()]
    assert sorted(r["id"] for r in added if r.get("type") == "block") == ids
    summary = ledger.summary()
    assert len(summary.done) == 7 and pending not in summary.done and not summary.failed
    widget.run_btn.clicked.emit()  # Run / resume: the pending one
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 8/8 done, 0 failed" and widget.progress.value == 8


def test_model_info_estimate_and_site_test(
    make_napari_viewer, qtbot, sample_path, tmp_path, monkeypatch
):
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    assert "labels: background, membrane, mitochondria" in widget.model_info.value
    assert "halo [24, 24, 24]" in widget.model_info.value
    (tmp_path / "two.pt").write_bytes(
        (tmp_path / "two.pt").read_bytes() if (tmp_path / "two.pt").exists() else b""
    )
    import shutil

    from napari_emparsl.core.models.loaders import resolve_model

    shutil.copy(resolve_model("unet3d-em"), tmp_path / "two.pt")
    sidecar = (
        open(resolve_model("unet3d-em") + ".yaml")
        .read()
        .replace("in_channels: 1", "in_channels: 2")
    )
    (tmp_path / "two.pt.yaml").write_text(sidecar)
    # "…" beside the model file field opens a file dialog (answered here as a user would)
    from qtpy.QtWidgets import QFileDialog

    asked = []

    def answer(parent, title, folder, filters):
        asked.append((title, folder, filters))
        return str(tmp_path / "two.pt"), filters.split(";;")[0]

    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(answer))
    widget.model_file_btn.clicked.emit()
    assert asked and asked[0][0] == "Choose a model file" and "*.pt" in asked[0][2]
    assert widget.model_file.value == str(tmp_path / "two.pt")
    assert "the volume has 1 channel(s)" in widget.model_info.value
    widget.model_file_btn.clicked.emit()  # the dialog starts in the chosen file's folder
    assert asked[1][1] == str(tmp_path)
    # a size multiple the volume's slices cannot meet: said beside the model, before any run
    widget.model_options.value = "spatial_dims=2; halo=0,24,24"
    assert widget.model_info.value.startswith(
        "⚠ A 2D model runs slice by slice: its z halo must be 0 and its z multiple"
    )
    assert "multiple 4,4,4" in widget.model_info.value
    widget.model_options.value = "spatial_dims=2; halo=0,24,24; multiple=1,4,4"
    info = widget.model_info.value  # 2D now fits; the 2 input channels still do not
    assert "; 2D; halo [0, 24, 24]" in info and info.endswith("⚠ the volume has 1 channel(s)")
    widget.model_options.value = ""
    # a bioimage.io package (its rdf.yaml chosen): described from the package, nothing asked
    package = tmp_path / "zoo"
    package.mkdir()
    axes = [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}]
    space = [{"type": "space", "id": a, "size": {"min": 16, "step": 16}} for a in "zyx"]
    out = [{"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}, "halo": 8}
           for a in "zyx"]  # fmt: skip
    rdf = {"format_version": "0.5.4", "type": "model", "name": "zoo",
           "inputs": [{"id": "raw", "axes": axes + space}],
           "outputs": [{"id": "mask", "axes": axes + out, "postprocessing": [
               {"id": "sigmoid"}, {"id": "binarize", "kwargs": {"threshold": 0.5}}]}],
           "weights": {"torchscript": {"source": "weights.pt"}}}  # fmt: skip
    (package / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    widget.model_file.value = str(package / "rdf.yaml")
    info = widget.model_info.value
    assert info.startswith(
        "bioimage.io “zoo”: labels, 1 channel(s); 1 input channel(s); 3D; halo [8, 8, 8]; "
        "sigmoid > 0.5"
    )
    assert "not described" not in info and "⚠" not in info
    widget.model_file.value = ""
    # a 2D image: the panel says it will not run before a run says so
    from napari_emparsl.core.volume import save_array

    raw = widget.input.value
    save_array(sample_path, "plane", np.zeros((64, 64), np.uint8), chunks=(32, 32))
    [plane] = viewer.open(str(sample_path / "plane"), plugin=PLUGIN)
    widget.input.reset_choices()
    widget.input.value = plane
    assert "the volume has 2 spatial axes; runs need a 3D volume" in widget.model_info.value
    widget.input.value = raw
    assert "spatial axes" not in widget.model_info.value
    # voxels other than those the model was trained on: a warning beside the model, no refusal
    save_array(sample_path, "tem", np.zeros((8, 32, 32), np.uint8), voxel_size=(40, 4, 4))
    [tem] = viewer.open(str(sample_path / "tem"), plugin=PLUGIN)
    widget.input.reset_choices()
    typed, widget.output.value = widget.output.value, ""  # the output suggested, not typed
    widget.input.value = tem
    assert widget.model_info.value.endswith(
        " — ⚠ trained on 8×8×8 nm voxels; the volume has 40×4×4 nm: expect poorer results"
    )
    assert widget.output.value == f"{sample_path}:predictions/tem"  # follows the volume
    widget.input.value = raw
    assert "trained on" not in widget.model_info.value
    assert widget.output.value == f"{sample_path}:predictions/raw"
    widget.output.value = f"{tmp_path}/mine.n5:seg"  # typed: kept when the volume changes
    widget.input.value = tem
    assert widget.output.value == f"{tmp_path}/mine.n5:seg"
    widget.input.value = raw
    widget.output.value = ""  # emptied: suggested again
    widget.input.value = tem
    widget.input.value = raw
    assert widget.output.value == f"{sample_path}:predictions/raw"
    # a run on it says so in a notification too, once (a preview or run again would repeat it)
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.input.value = tem
        widget.output.value, widget.site.value = f"{tmp_path}/tem.n5:pred", "threads"
        for _ in range(2):
            widget.run_btn.clicked.emit()
            _wait_idle(qtbot, widget)
            qtbot.wait(200)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    warned = [str(n.message) for n in seen if "trained on 8×8×8 nm voxels" in str(n.message)]
    assert warned == [
        "The model unet3d-em was trained on 8×8×8 nm voxels; the volume has 40×4×4 nm "
        f"({sample_path}:tem): expect poorer results; resample the volume to about the "
        "model's voxel size, or use a model trained on data like it."
    ]
    widget.input.value = raw
    widget.site.value = "local"
    widget.output.value = typed
    # block and halo: empty means the model's defaults (shown); bad values get one sentence
    assert widget.block.native.placeholderText() == "128,128,128 (model default)"
    assert widget.halo.native.placeholderText() == "24,24,24 (model default)"
    widget.block.value = "64,abc"
    widget.run_btn.clicked.emit()
    assert widget._run is None and widget.run_btn.enabled
    assert widget.status.value.startswith("The block must be three whole numbers Z,Y,X")
    widget.block.value = "64"

    widget.site.value = "threads"
    viewer.dims.set_point(0, 8 * 8)
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.estimate.value.startswith("full run on threads: ~")
    # the preview of slice 8 (no region drawn) computed the 4 blocks of that slice; 4 are left
    from napari_emparsl.execution.sites import load_site

    workers = load_site("threads").worker_count  # workers: auto — one per core here
    assert "for 4 blocks" in widget.estimate.value and f"{workers} workers" in widget.estimate.value
    # a block's time, scaled to a full run's threads per worker (a preview of fewer blocks than
    # workers gives each more)
    site_threads = load_site("threads").worker_threads
    # the blocks' times are those their ledger records (read + compute + write), not zero nor
    # queue time
    from napari_emparsl.core.ledger import Ledger
    from napari_emparsl.core.volume import parse_spec

    done = Ledger(*parse_spec(typed)).summary().done.values()
    recorded = sorted(r["t_read"] + r["t_compute"] + r["t_write"] for r in done)
    assert len(recorded) == 4 and min(recorded) > 0
    np.testing.assert_allclose(sorted(widget.block_seconds), recorded, rtol=1e-6)
    timed = zip(widget.block_seconds, widget.block_threads, strict=True)
    per_block = float(np.mean([s * (t / site_threads) ** 0.9 for s, t in timed]))
    assert f"({per_block:.2f} s per block, {workers} workers)" in widget.estimate.value
    secs = per_block * 4 / workers  # under a minute: in seconds
    took = f"~{max(1, round(secs))} s" if secs < 60 else f"~{secs / 60:.1f} min"
    assert widget.estimate.value.startswith(f"full run on threads: {took} for 4 blocks")  # (was
    # "~0.0 min")
    # another site: the same preview, that site's workers
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "eight.yaml").write_text("kind: local\nworkers: 8\n")
    widget.site.reset_choices()
    widget.site.value = "eight"
    assert widget.estimate.value.startswith("full run on eight: ~")
    assert "for 4 blocks" in widget.estimate.value and "8 workers" in widget.estimate.value
    # another model, block, halo, input or output: the blocks timed say nothing of it (before,
    # one estimate averaged every preview of the session)
    widget.model_options.value = "halo=16"
    assert widget.estimate.value == "" and widget.block_seconds == []
    widget.model_options.value = ""
    # "preview on the chosen site": the preview runs there, not in this process
    from napari_emparsl.core.ledger import Ledger

    (tmp_path / "sites" / "one.yaml").write_text("kind: threads\nworkers: 1\n")
    widget.site.reset_choices()
    widget.site.value = "one"
    widget.preview_on_site.value = True
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert Ledger(str(sample_path), "pred").summary().last_run["site"] == "one"
    widget.preview_on_site.value = False
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert Ledger(str(sample_path), "pred").summary().last_run["site"] == "threads"
    # a profile that does not validate: Test site says which field, in one sentence
    (tmp_path / "sites" / "broken.yaml").write_text("kind: local\nworkers: zero\n")
    widget.site.reset_choices()
    widget.site.value = "broken"
    assert widget.estimate.value == ""
    widget.test_site_btn.clicked.emit()
    qtbot.waitUntil(lambda: "field 'workers'" in widget.status.value, timeout=30_000)
    assert "\n" not in widget.status.value and "Traceback" not in widget.status.value
    widget.site.value = "threads"
    widget.test_site_btn.clicked.emit()
    qtbot.waitUntil(lambda: "first result after" in widget.status.value, timeout=60_000)
    widget.run_btn.clicked.emit()  # the full run: the estimate was for it, and goes
    assert widget.estimate.value == ""
    assert widget.status.value.startswith("preparing")  # not the last run's status
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 8/8 done, 0 failed" and widget.estimate.value == ""
    # an output the engine refuses to make: one sentence, no traceback, no run
    widget.output.value = f"{tmp_path}/o.n5:a//b"
    widget.run_btn.clicked.emit()
    assert widget._run is None and widget.run_btn.enabled
    assert widget.status.value.startswith("The dataset name 'a//b' in ")


def test_closing_viewer_during_run_asks_and_stops_workers(
    make_napari_viewer, qtbot, sample_path, htex
):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    viewer = make_napari_viewer()
    widget = _run_on_local_until_a_block_is_done(qtbot, viewer, sample_path)
    asked = []

    def answer(button):
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            asked.append(box.text())
            box.button(button).click()
        else:
            QTimer.singleShot(50, lambda: answer(button))

    # "No": the viewer stays open and the run goes on
    QTimer.singleShot(50, lambda: answer(QMessageBox.StandardButton.No))
    assert not viewer.window._qt_window.close()
    assert len(asked) == 1 and "A run is going on" in asked[0]
    assert widget._run is not None and widget.cancel_btn.enabled and htex.pools()
    QTimer.singleShot(50, lambda: answer(QMessageBox.StandardButton.Yes))
    assert viewer.window._qt_window.close()
    assert len(asked) == 2
    # the window is deleted on close: napari's Window.close forgets it so, and the fixture's
    # teardown then does not close it a second time
    del viewer.window._qt_window
    assert widget._run is None
    assert htex.gone(timeout=30)  # signalled on close; they exit within moments


def test_viewer_close_during_run_stops_it_without_asking(
    make_napari_viewer, qtbot, sample_path, htex
):
    """`viewer.close()` (napari's console, a script, a test's end) tears the viewer down
    before its window closes, and cannot be refused: the run is stopped there without a
    question (before: the question came after the teardown — "No" left a broken window — and
    the run's events then reached deleted widgets: tracebacks in the event loop). Finished
    blocks stay done, no worker is left, and nothing reaches the panel afterwards."""
    from qtpy.QtWidgets import QApplication

    from napari_emparsl.core.ledger import Ledger, lock_holder

    viewer = make_napari_viewer()
    widget = _run_on_local_until_a_block_is_done(qtbot, viewer, sample_path)
    asked = []
    original = widget.confirm_close
    widget.confirm_close = lambda: asked.append(1) or original()
    viewer.close()
    assert not asked and widget._run is None and widget._viewer_closing
    assert htex.gone(timeout=30)
    assert widget._hooks == []  # let go of the viewer's events
    qtbot.wait(300)  # the panel's timers, late answers: pytest-qt fails on an exception
    QApplication.processEvents()
    assert len(Ledger(str(sample_path), "pred").summary().done) >= 1  # what finished stays done
    assert lock_holder(str(sample_path), "pred") is None  # the output is free for a resume


def test_a_preview_over_done_and_new_blocks_computes_the_new_only(
    make_napari_viewer, qtbot, sample_path
):
    """A rectangle over a block a preview computed and a block not yet computed: the second
    preview computes the new block alone (the ledger records each block once) and shows both."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    out_layer = _preview_rectangle(qtbot, viewer, widget, 40)  # block 1 (x 64:128)

    def block_records() -> list[int]:
        return _block_records(sample_path, "pred")

    assert block_records() == [1]
    viewer.layers.remove("region")
    corners = np.array([[30, 10, 20], [30, 10, 100], [30, 50, 100], [30, 50, 20]])  # x 20:100
    viewer.dims.set_point(0, 30 * 8)
    viewer.add_shapes([corners * 8.0], shape_type="rectangle", name="region")
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("finished: 2/2 done, 0 failed"), widget.status.value
    assert block_records() == [1, 0]  # block 1 not again
    shown = np.asarray(out_layer.data)
    assert _blocks_with_data(shown) == [True, True, False, False, False, False, False, False]
    np.testing.assert_array_equal(shown, Volume.open(sample_path, "pred").data.compute())


def test_preview_of_what_is_on_screen_2d_and_3d(make_napari_viewer, qtbot, sample_path):
    from napari_emparsl.core.ledger import Ledger

    viewer = make_napari_viewer(show=True)
    widget = _setup(viewer, sample_path)  # 64³ blocks on the 128³ sample (8 nm voxels)
    widget.site.value = "threads"
    qtbot.wait(100)
    height, width = viewer.canvas.size
    zoom = max(height, width) / (40 * 8)  # about 40 voxels across the canvas's longer side
    # 2D, no rectangle drawn: the visible part of the current slice
    viewer.dims.set_point(0, 20 * 8)
    camera = viewer.scene.camera
    camera.center = (20 * 8, 30 * 8, 100 * 8)
    camera.zoom = zoom
    roi = widget.preview_region()
    assert roi.begin[0] == 20 and roi.shape[0] == 1
    assert roi.begin[1] <= 30 < roi.end[1] and roi.begin[2] <= 100 < roi.end[2]
    assert 38 <= max(roi.shape[1:]) <= 42 and min(roi.shape[1:]) >= 10
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    ledger = Ledger(str(sample_path), "pred")
    assert set(ledger.summary().done) == {1}  # z-block 0, y-block 0, x-block 1
    # 3D: the visible box around the focal point, as deep as it is wide
    viewer.dims.ndisplay = 3
    camera.center = (90 * 8, 100 * 8, 30 * 8)
    camera.zoom = zoom
    qtbot.wait(50)
    roi = widget.preview_region()
    assert roi.begin[0] < 90 < roi.end[0] and 38 <= roi.shape[0] <= 46
    assert roi.begin[1] <= 100 < roi.end[1] and roi.begin[2] <= 30 < roi.end[2]
    assert roi.shape[1] < 128 and roi.shape[2] < 128
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert set(ledger.summary().done) == {1, 6}  # + z-block 1, y-block 1, x-block 0
    # panned away from the volume: one sentence, nothing computed (it previewed every block
    # of the slice); a rectangle drawn beside the volume likewise
    camera.center = (90 * 8, 100 * 8, 3000 * 8)
    qtbot.wait(50)
    widget.preview_btn.clicked.emit()
    assert widget.status.value == (
        "Nothing of the volume is on screen; pan to the part to preview, or draw a rectangle in "
        "a Shapes layer named 'region'."
    )
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, 5 * 8)  # the slice the rectangle is drawn on
    viewer.add_shapes([np.array([[5, 200, 200], [5, 200, 300], [5, 300, 300], [5, 300, 200]]) * 8.0],
                      shape_type="rectangle", name="region")  # fmt: skip
    widget.preview_btn.clicked.emit()
    assert widget.status.value.startswith("The last shape of the 'region' layer lies outside")
    assert set(ledger.summary().done) == {1, 6} and widget._run is None


def test_super_resolution_preview_is_an_image_layer_on_the_finer_grid(
    make_napari_viewer, qtbot, sample_path, tmp_path, superres_model
):
    model = superres_model  # ×2 in y, x (tests/conftest.py); here with a larger block
    (tmp_path / "sr.pt.yaml").write_text(
        "kind: image\nhalo: [2, 2, 2]\nscale: [1, 2, 2]\nnormalize: zscore\nblock: [32, 64, 64]\n"
    )
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.model_file.value = model
    widget.block.value = ""  # the model's 32×64×64
    widget.output.value = f"{sample_path}:sr"
    assert "image, 1 channel(s)" in widget.model_info.value
    assert "scale [1, 2, 2]" in widget.model_info.value
    widget.site.value = "threads"
    layer = _preview_rectangle(qtbot, viewer, widget, 40)
    assert widget.status.value == "finished: 1/1 done, 0 failed"
    raw = viewer.layers["raw"]
    # an Image layer on the output grid: 4 nm in y, x, covering the same space as the input (an
    # 8 nm voxel centred at 0 covers -4..4: its two 4 nm voxels are centred at -2 and 2)
    assert layer._type_string == "image" and layer.data.shape == (128, 256, 256)
    np.testing.assert_allclose(layer.scale, (8.0, 4.0, 4.0))
    np.testing.assert_allclose(layer.translate, (0.0, -2.0, -2.0))
    half_in, half_out = np.array([4.0, 4.0, 4.0]), np.array([4.0, 2.0, 2.0])
    np.testing.assert_allclose(layer.extent.world[0] - half_out, raw.extent.world[0] - half_in)
    np.testing.assert_allclose(layer.extent.world[1] + half_out, raw.extent.world[1] + half_in)
    # its data equals the CLI's for the same region; the contrast follows the computed values
    assert main(["run", "--input", f"{sample_path}:raw", "--model", model, "--output",
                 f"{tmp_path}/cli.n5:sr", "--site", "threads", "--roi", "40:41,10:50,70:100"]) == 0  # fmt: skip
    cli = Volume.open(tmp_path / "cli.n5", "sr").data.compute()
    # 8 Mi output voxels of 8×4×4 nm: a multiscale layer, y and x halved in its coarser level
    assert layer.multiscale and [d.shape for d in layer.data] == [(128, 256, 256), (128, 128, 128)]
    shown = np.asarray(layer.data[0])
    np.testing.assert_array_equal(shown[40, 20:100, 140:200], cli[40, 20:100, 140:200])
    lo, hi = layer.contrast_limits
    block = shown[32:64, 0:128, 128:256]  # the one block computed (output voxels)
    assert lo == pytest.approx(float(block.min())) and hi == pytest.approx(float(block.max()))
    assert not shown[:32].any()  # nothing else was computed


def test_big_output_is_multiscale_and_3d_shows_its_coarse_level(
    make_napari_viewer, qtbot, tmp_path
):
    # 64×256×256 (4 Mi voxels): the output gets a coarser level, which each block writes too
    sample = tmp_path / "big.n5"
    assert main(["sample", str(sample), "--shape", "64,256,256", "--seed", "6"]) == 0
    viewer = make_napari_viewer(show=True)  # napari picks a level when it draws
    widget = _setup(viewer, sample)
    layer = _preview_rectangle(qtbot, viewer, widget, 20)
    assert layer.multiscale and len(layer.data) == 2
    n5 = Volume.open(sample, "pred")
    assert n5.levels == ("pred/s0", "pred/s1")
    coarse = n5.level(1).compute()
    assert coarse[:32, :32, 32:64].any() and not coarse[:, 32:].any()  # the previewed block
    # the rest streams in, zoomed out: napari shows the coarse level, whose plane on screen the
    # run's thread keeps fresh (the Qt thread then only draws)
    viewer.scene.camera.zoom /= 4
    qtbot.waitUntil(lambda: layer.data_level == 1, timeout=10_000)
    widget.site.value = "threads"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "finished: 16/16 done" in widget.status.value
    fine, coarse = n5.level(0).compute(), n5.level(1).compute()
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), coarse[10])
    assert layer.data[1].plane_hits > 0
    np.testing.assert_array_equal(coarse, fine[::2, ::2, ::2])
    # in 3D napari draws the coarse level: the whole finest level is never read for it
    viewer.dims.ndisplay = 3
    qtbot.waitUntil(lambda: np.asarray(layer._slice.image.raw).ndim == 3, timeout=10_000)
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), coarse)
    # a run streamed in 3D: the coarse level is kept whole by the run's thread, and napari's
    # refreshes read it from memory (not from disk on the Qt thread)
    widget.replace.value = True
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "finished: 16/16 done" in widget.status.value
    layer = widget._output_layer
    assert layer.data[1].whole_hits > 0 and layer.data[0].whole_hits == 0
    assert layer.data[1]._whole is None  # dropped when the run ended
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), n5.level(1).compute())


def test_reopened_multiscale_output_resumes_in_its_layer(make_napari_viewer, qtbot, tmp_path):
    # a run started with the CLI (4 of 16 blocks), its output opened with the reader (a dask
    # multiscale layer), then resumed from the panel: the same layer streams the rest
    sample = tmp_path / "big.n5"
    assert main(["sample", str(sample), "--shape", "64,256,256", "--seed", "7"]) == 0
    assert main(["run", "--input", f"{sample}:raw", "--model", "unet3d-em", "--output",
                 f"{sample}:pred", "--site", "threads", "--roi", "0:64,0:128,0:128",
                 "--block", "64,64,64"]) == 0  # fmt: skip
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample)
    [opened] = viewer.open(str(sample / "pred"), plugin=PLUGIN)
    assert opened.multiscale and len(opened.data) == 2
    widget.site.value = "threads"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "finished: 16/16 done" in widget.status.value
    layer = widget._output_layer
    assert layer is opened and [lyr.name for lyr in viewer.layers].count("pred") == 1
    assert type(layer.data[0]).__name__ == "LiveN5Array"
    viewer.dims.set_point(0, 20 * 8)
    n5 = Volume.open(sample, "pred")
    planes = [n5.level(0)[20].compute(), n5.level(1)[10].compute()]
    assert planes[0][:128, :128].any() and planes[0][128:, 128:].any()  # the CLI's part, the rest

    def drawn() -> bool:  # the whole plane is in view: napari draws level 0 or 1 by its zoom
        shown = np.asarray(layer._slice.image.raw)
        return np.array_equal(shown, planes[layer.data_level])

    qtbot.waitUntil(drawn, timeout=10_000)


def test_a_model_that_does_not_fit_its_description_is_said_when_chosen(
    make_napari_viewer, qtbot, sample_path, tmp_path
):
    """A model file whose output does not fit its description: said beside the model once it
    is chosen (tried on zeros in the background, as a run does), not only when Preview or Run
    is clicked; a description that fits it clears the warning."""
    import torch

    m = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1))
    torch.jit.save(torch.jit.script(m.eval()), str(tmp_path / "one.pt"))
    (tmp_path / "one.pt.yaml").write_text("kind: labels\nclasses: [a, b, c]\nhalo: [2, 2, 2]\n")
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.model_file.value = str(tmp_path / "one.pt")
    assert widget.model_info.value.startswith("labels: a, b, c")
    qtbot.waitUntil(lambda: "⚠" in widget.model_info.value, timeout=60_000)
    assert widget.model_info.value.endswith(
        "— ⚠ The model's output has 1 channel(s) but its description says 3 classes (a, b, c); "
        "a labels model of one channel is thresholded (threshold, 0.5 by default) into 0 and 1: "
        "remove its classes (classes= empty), or export one logit per class."
    ), widget.model_info.value
    from napari_emparsl.core.models import loaders

    loads = loaders.models_loaded()
    for typed in ("kind=image; classes=; halo=1", "kind=image; classes=; halo=16",
                  "kind=image; classes="):  # as typed, each a description that parses  # fmt: skip
        widget.model_options.value = typed
    qtbot.waitUntil(lambda: widget.trials_answered == widget._trials, timeout=60_000)
    # its trial passed: nothing added; one load, of what was typed last (not one a keystroke)
    assert widget.model_info.value == "image, 1 channel(s); 1 input channel(s); 3D; halo [2, 2, 2]"
    assert loaders.models_loaded() == loads + 1


def test_model_without_description_is_asked_for_what_it_lacks(
    make_napari_viewer, qtbot, sample_path, tmp_path
):
    import torch

    # a TorchScript file with no .yaml beside it: the panel asks for what the run needs
    m = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1))
    torch.jit.save(torch.jit.script(m.eval()), str(tmp_path / "bare.pt"))
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.model_file.value = str(tmp_path / "bare.pt")
    assert "not described: set kind, halo, classes in model options" in widget.model_info.value
    widget.model_options.value = "kind=image; halo=2,2,2"
    assert "not described" not in widget.model_info.value
    assert widget.model_info.value.startswith("image, 1 channel(s)")
    assert "halo [2, 2, 2]" in widget.model_info.value
    # a state dict says nothing about its network either; telling one from a pickled module
    # needs torch, which the panel leaves to its preload: before it is done the panel does not
    # import it (~1.5 s of a frozen napari in a fresh process), and asks once it is
    torch.save(m.state_dict(), tmp_path / "weights.pt")
    qtbot.waitUntil(widget._preloaded.is_set, timeout=60_000)
    widget._preloaded.clear()  # as while napari's first panel is still importing torch
    widget.model_file.value = str(tmp_path / "weights.pt")
    assert widget.model_info.value == "image, 1 channel(s); 1 input channel(s); 3D; halo [2, 2, 2]"
    widget._preloaded.set()
    qtbot.waitUntil(lambda: "architecture" in widget.model_info.value, timeout=5_000)
    assert "architecture" in widget.model_info.value.split("not described: set ")[1]
    # the options reach the run: the preview computes with them
    widget.model_file.value = str(tmp_path / "bare.pt")
    widget.output.value = f"{sample_path}:bare"
    widget.site.value = "threads"
    widget.model_options.value = "kind=image; halo=2,2,2; normalize=zscore"
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("finished: 4/4 done"), widget.status.value
    out = Volume.open(sample_path, "bare")
    assert out.dtype == np.float32 and widget._output_layer._type_string == "image"
    # as uint8 without its out_range: what was clipped is said as the run finishes
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.output.value = f"{sample_path}:bare8"
        widget.model_options.value = "kind=image; halo=2,2,2; out_dtype=uint8"
        widget.preview_btn.clicked.emit()
        _wait_idle(qtbot, widget)
        qtbot.wait(100)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert widget.status.value.startswith("finished: 4/4 done"), widget.status.value
    [said] = [str(n.message) for n in seen if "lay outside out_range [0, 1]" in str(n.message)]
    assert "(e.g. model option out_range=" in said
    assert said.endswith("and write it again with “replace output”.")
    widget.model_options.value = "halo=oops"
    assert widget.model_info.value.startswith("⚠ The model option 'halo'")


def test_replace_output_starts_it_again(make_napari_viewer, qtbot, sample_path):
    """Another halo into the same output is refused in the panel's words; "replace output"
    starts the output again, once (it unticks itself when the run has started)."""
    from napari_emparsl.core.ledger import Ledger

    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    viewer.dims.set_point(0, 8 * 8)
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 4/4 done, 0 failed"
    widget.halo.value = "16"
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "was made with halo 24×24×24, not 16×16×16; give the same" in widget.status.value
    assert "tick “replace output” to start again" in widget.status.value
    assert "--overwrite" not in widget.status.value
    widget.replace.value = True
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 4/4 done, 0 failed" and not widget.replace.value
    summary = Ledger(str(sample_path), "pred").summary()
    assert [run["halo"] for run in summary.runs] == [[16, 16, 16]] and len(summary.done) == 4
    assert Volume.open(sample_path, "raw").shape == (128, 128, 128)  # the input untouched


def test_volume_moved_away_is_one_warning(make_napari_viewer, sample_path):
    """The volume's container moved after it was opened: the model description says so in
    one sentence instead of a traceback from the panel."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    sample_path.rename(sample_path.with_name("moved.n5"))
    widget.model_options.value = "normalize=zscore"  # the description is made again
    assert "labels: background, membrane, mitochondria" in widget.model_info.value
    assert f"⚠ {sample_path} does not exist; check the path." in widget.model_info.value


def test_image_not_from_n5_says_to_save_it_as_n5(make_napari_viewer, tmp_path):
    """A layer opened from a TIFF (here: made in memory) cannot be run on; the panel says why
    and how, and the N5 it is saved to is then a volume to run on."""
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((8, 32, 32), np.uint8), name="stack")
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.input.reset_choices()
    assert widget.input.choices == ()
    for button in (widget.preview_btn, widget.run_btn):
        widget.status.value = ""
        button.clicked.emit()
        assert widget.status.value.startswith(
            "The image layer 'stack' is not read from an N5 container, and runs read their "
            "blocks from N5: save it as N5 (File > Save Selected Layers…"
        )
    layer.save(str(tmp_path / "stack.n5"), plugin=PLUGIN)
    [opened] = viewer.open(str(tmp_path / "stack.n5"), plugin=PLUGIN)
    widget.input.reset_choices()
    assert widget.input.choices == (opened,)


def test_output_written_by_another_run_is_one_sentence(make_napari_viewer, qtbot, sample_path):
    """`emparsl run` (here: a run paused after planning, in this process) holds the output:
    Preview and Run / resume say so and leave it as it is."""
    import os

    from napari_emparsl.core.ledger import Ledger
    from napari_emparsl.execution.runner import Run

    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    other = Run(f"{sample_path}:raw", "unet3d-em", f"{sample_path}:pred", site="threads",
                block=(64, 64, 64)).events()  # fmt: skip
    next(other)  # planned: it holds the output now
    before = Ledger(str(sample_path), "pred").path
    size = os.path.getsize(before)
    for button in (widget.preview_btn, widget.run_btn):
        widget.status.value = ""
        button.clicked.emit()
        _wait_idle(qtbot, widget)
        assert widget.status.value == (  # the process holding it is this one: said so
            f"The output {sample_path}:pred is being written by another run in this napari (a "
            "run panel closed while it ran finishes its blocks under way first); the panel says "
            "when Run / resume can continue it."
        )
    assert os.path.getsize(before) == size  # nothing recorded by the refused runs
    other.close()  # that run stops (cancelled, as a closed generator): the output is free
    # … and the panel, looking again every 2 s, says so (before: the refusal stayed)
    qtbot.waitUntil(lambda: widget.status.value.startswith("this output has a run at 0/8 "),
                    timeout=10_000)  # fmt: skip
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("finished: ") and "0 failed" in widget.status.value


def test_unexpected_runtime_error_ends_the_run_in_one_sentence(
    make_napari_viewer, qtbot, sample_path, monkeypatch
):
    """superqt drops a RuntimeError raised in a thread worker (it takes it for the worker's
    deletion): no error, no end, and the panel said "preparing…" for ever. The run's thread
    carries it out as another type. Fault injection: no input makes the engine raise one."""
    from napari_emparsl.execution.runner import Run

    def prepare(self, on_checked=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(Run, "prepare", prepare)
    monkeypatch.setenv("XDG_CACHE_HOME", str(sample_path.parent / "cache"))
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget, timeout=30_000)
    log = sample_path.parent / "cache" / "napari-emparsl" / "emparsl.log"
    assert widget.status.value == (
        f"The run failed unexpectedly (RuntimeError: simulated failure); the details are in {log}."
    )
    text = log.read_text()  # the traceback, where the sentence says
    assert "napari: The run" in text and "Traceback" in text
    assert "RuntimeError: simulated failure" in text and "in prepare" in text


@pytest.mark.parametrize("channels", [2, 12])
def test_multichannel_volume_is_one_input(make_napari_viewer, qtbot, tmp_path, channels):
    """napari shows a multichannel volume as a layer per channel; the panel offers it once, as
    the whole volume, and a run on it reads every channel. Many channels (12, a 4-D dataset
    without axes, read as c, z, y, x) open as one layer with a channel slider (before: a layer
    each, 40 s frozen for 200), which previews and runs as well."""
    import torch
    import z5py
    from torch import nn

    from napari_emparsl.core.volume import save_array

    data = np.random.default_rng(0).random((channels, 16, 32, 32)).astype(np.float32)
    if channels == 2:
        save_array(tmp_path / "m.n5", "raw", data, chunks=(1, 16, 16, 16))
    else:  # as another tool writes it: no axes, no voxel size
        z5py.File(str(tmp_path / "m.n5"), "a").create_dataset(
            "raw", data=data, chunks=(1, 16, 16, 16), compression="gzip"
        )
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(nn.Conv3d(channels, 1, 3, padding=1)))
    torch.jit.save(model, str(tmp_path / "c2.pt"))
    (tmp_path / "c2.pt.yaml").write_text(
        f"kind: image\nin_channels: {channels}\nhalo: [2, 2, 2]\nblock: [16, 16, 16]\n"
    )
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "m.n5" / "raw"), plugin=PLUGIN)
    if channels == 2:
        assert [layer.name for layer in layers] == ["raw_c0", "raw_c1"]
    else:
        assert [layer.name for layer in layers] == ["raw"]
        [layer] = layers
        assert layer.ndim == 4 and tuple(layer.axis_labels) == ("c", "z", "y", "x")
        assert tuple(layer.scale) == (1.0, 1.0, 1.0, 1.0) and layer.data.shape == data.shape
        viewer.dims.set_current_step(0, 5)  # the channel slider
        viewer.dims.set_current_step(1, 9)
        qtbot.waitUntil(lambda: layer._slice.image.raw.shape == (32, 32), timeout=10000)
        np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), data[5, 9])
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.input.reset_choices()
    assert widget.input.choices == (layers[0],)
    name = "raw_c0" if channels == 2 else "raw"
    assert widget.input.native.itemText(0) == f"{name} (all {channels} channels)"
    widget.model_file.value = str(tmp_path / "c2.pt")
    widget.output.value = f"{tmp_path}/m.n5:out"
    widget.site.value = "threads"
    assert widget.model_info.value.startswith(f"image, 1 channel(s); {channels} input channel(s)")
    if channels == 12:  # the slice shown, whatever channel the slider is on
        assert widget.preview_region() == Roi.from_bounds((9, 0, 0), (10, 32, 32))
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value == "finished: 4/4 done, 0 failed"
    with torch.no_grad():  # the whole forward in memory: the same away from the border
        ref = model(torch.from_numpy(data)[None])[0, 0].numpy()
    out = Volume.open(tmp_path / "m.n5", "out").data.compute()
    inner = (slice(1, -1),) * 3  # (the engine reflects at the edge, the forward pads zeros)
    np.testing.assert_allclose(out[inner], ref[inner], atol=1e-5)


def test_check_a_bioimageio_package_from_the_panel(
    make_napari_viewer, qtbot, sample_path, tmp_path, write_package
):
    """The Check button (a bioimage.io package only) runs its test input in a thread and says
    whether the engine reproduces its test output; a package without test data is told in one
    sentence."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    assert not widget.check_model_btn.enabled  # the built-in model: no package, nothing to check
    folder = tmp_path / "zoo"
    axes = [{"type": "batch"}, {"type": "channel", "channel_names": ["c"]}]
    space = [{"type": "space", "id": a, "size": {"min": 8, "step": 8}} for a in "zyx"]
    same = [{"type": "space", "id": a, "size": {"tensor_id": "i", "axis_id": a}, "halo": 2}
            for a in "zyx"]  # fmt: skip
    rdf = {"format_version": "0.5.4", "type": "model", "name": "two convolutions",
           "inputs": [{"id": "i", "axes": axes + space,
                       "test_tensor": {"source": "test_input.npy"},
                       "preprocessing": [{"id": "zero_mean_unit_variance"}]}],
           "outputs": [{"id": "o", "axes": axes + same,
                        "test_tensor": {"source": "test_output.npy"},
                        "postprocessing": [{"id": "sigmoid"}]}],
           "weights": {"torchscript": {"source": "weights.pt"}}}  # fmt: skip
    x = np.random.default_rng(0).normal(9, 3, (1, 1, 8, 16, 16)).astype(np.float32)
    write_package(folder, x, rdf)
    widget.model_file.value = str(folder / "rdf.yaml")
    assert widget.check_model_btn.enabled
    widget.check_model_btn.clicked.emit()
    assert not widget.check_model_btn.enabled  # while it checks
    qtbot.waitUntil(lambda: widget.status.value.startswith("model check"), timeout=60_000)
    assert re.match(
        r"model check of “[^”]+”: Reproduces the package's test output: largest difference",
        widget.status.value,
    )
    assert widget.check_model_btn.enabled
    # another model chosen: the check spoke of the package, and goes (it stayed)
    widget.model_file.value = ""
    assert widget.status.value == ""
    widget.model_file.value = str(folder / "rdf.yaml")
    # without test tensors: said in one sentence, the panel still usable
    del rdf["inputs"][0]["test_tensor"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    widget.check_model_btn.clicked.emit()
    qtbot.waitUntil(lambda: "has no test input" in widget.status.value, timeout=60_000)
    assert widget.status.value == (
        f"The bioimage.io model {folder} has no test input and output to check it with."
    )
    assert widget.check_model_btn.enabled and widget.run_btn.enabled


def test_multichannel_image_output_streams_the_slice_on_screen(
    make_napari_viewer, qtbot, sample_path
):
    """An image output of several channels is a layer with a channel axis first: a finished
    block is on screen by its z, the third axis from the end (before, the channel index was
    taken for z: blocks below z 64 were taken as off screen and not drawn until the view
    moved)."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.model_options.value = "kind=image; classes=[]; out_channels=3"
    widget.output.value = f"{sample_path}:logits"
    viewer.dims.set_point(0, 100 * 8)  # slice 100: the second row of blocks in z
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    layer = widget._output_layer
    assert layer._type_string == "image" and layer.ndim == 4
    # in nm beside the raw volume: without units napari dropped them for every layer
    # ("Inconsistent units across layers") and the scale bar lost its unit
    assert [str(u) for u in layer.units] == ["pixel"] + ["nanometer"] * 3
    assert [str(u) for u in viewer.layers.units] == ["pixel"] + ["nanometer"] * 3
    # opened as one layer per channel (File > Open), then previewed again: the live layer
    # takes their place, not a second copy beside them
    viewer.layers.remove(layer)
    split = viewer.open(f"{sample_path}/logits", plugin=PLUGIN)
    assert [lyr.name for lyr in split] == ["logits_c0", "logits_c1", "logits_c2"]
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    layer = widget._output_layer
    assert [lyr.name for lyr in viewer.layers] == ["raw", "logits"] and layer.ndim == 4
    widget._run = type("R", (), {"blocks": {b.id: b for b in plan_blocks(
        (128, 128, 128), (64, 64, 64), (0, 0, 0))}})()  # fmt: skip
    try:
        viewer.dims.set_point(1, 100 * 8)
        assert [widget._on_screen(i) for i in range(8)] == [False] * 4 + [True] * 4
        viewer.dims.set_point(1, 10 * 8)
        assert [widget._on_screen(i) for i in range(8)] == [True] * 4 + [False] * 4
    finally:
        widget._run = None


def test_draw_region_with_the_mouse_then_preview(make_napari_viewer, qtbot, sample_path):
    """Draw region: the 'region' Shapes layer on the volume's grid, selected, in rectangle mode;
    a rectangle dragged with the mouse on the canvas is what Preview region computes."""
    from qtpy.QtCore import QPoint, Qt

    viewer = make_napari_viewer(show=True)  # the canvas takes mouse events
    widget = _setup(viewer, sample_path)
    viewer.dims.set_point(0, 40 * 8)
    region = widget.draw_region()
    assert region is viewer.layers["region"] and viewer.layers.selection.active is region
    assert region.mode == "add_rectangle" and tuple(region.scale) == (8.0, 8.0, 8.0)
    assert region.axis_labels == ("z", "y", "x")
    assert widget.status.value.startswith("Drag a rectangle on the slice shown")
    widget.region_btn.clicked.emit()  # again: the same layer, not a second one
    assert [lyr.name for lyr in viewer.layers].count("region") == 1
    # drag from 40 % to 60 % of the canvas, as a user does
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.waitUntil(lambda: canvas.width() > 100 and canvas.height() > 100, timeout=5_000)
    w, h = canvas.width(), canvas.height()
    start, end = QPoint(int(0.4 * w), int(0.4 * h)), QPoint(int(0.6 * w), int(0.6 * h))
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=start)
    for i in range(1, 11):
        qtbot.mouseMove(canvas, start + (end - start) * (i / 10))
        qtbot.wait(10)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=end)
    qtbot.waitUntil(lambda: len(region.data) == 1, timeout=5_000)
    roi = widget.preview_region()
    corners = region.data[0]  # voxels of the volume (the layer is on its grid)
    assert roi.begin[0] == 40 and roi.end[0] == 41
    lo, hi = np.floor(corners[:, 1:].min(axis=0)), np.ceil(corners[:, 1:].max(axis=0))
    assert tuple(roi.begin[1:]) == tuple(np.maximum(lo, 0).astype(int))
    assert tuple(roi.end[1:]) == tuple(np.minimum(hi, 128).astype(int))  # clipped to the volume
    assert 1 < roi.end[1] - roi.begin[1] < 128 and 1 < roi.end[2] - roi.begin[2] < 128
    widget.preview_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("finished: ")
    out = Volume.open(sample_path, "pred").data.compute()
    (z0, y0, x0), (z1, y1, x1) = roi.begin, roi.end
    assert out[z0:z1, y0:y1, x0:x1].any()  # the rectangle's blocks were computed


def test_a_block_the_display_cannot_read_yet_does_not_stop_the_run(
    make_napari_viewer, qtbot, sample_path, monkeypatch, caplog
):
    """The run's thread re-reads each finished block for the display; where that read fails
    (a network filesystem showing a chunk whole only a while later), the run goes on and the
    block stays done — the display reads it from the N5 when it draws (before: the run's thread
    ended, and the run was abandoned)."""
    from napari_emparsl._napari.live import LiveN5Array
    from napari_emparsl.core.volume import VolumeError

    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    original = LiveN5Array.block_written
    failures = []

    def not_yet(self, begin, end):
        if not failures:  # the first block's read fails
            failures.append((tuple(begin), tuple(end)))
            raise VolumeError("chunk 0/0/1 of pred/s0 is truncated or corrupt")
        return original(self, begin, end)

    monkeypatch.setattr(LiveN5Array, "block_written", not_yet)
    out_layer = _preview_rectangle(qtbot, viewer, widget, 40)
    assert failures and "could not show block" in caplog.text
    assert widget.status.value.startswith("finished: 1/1 done, 0 failed"), widget.status.value
    n5 = Volume.open(sample_path, "pred").data.compute()
    assert n5[:64, :64, 64:].any()  # the block was written
    # and is drawn: the plane napari shows (not the layer's data, read from the N5 itself)
    qtbot.waitUntil(
        lambda: np.array_equal(np.asarray(out_layer._slice.image.raw), n5[40]), timeout=10_000
    )
    assert np.asarray(out_layer._slice.image.raw)[:64, 64:].any()


def test_runs_panel_follows_a_run_into_an_open_output(
    make_napari_viewer, qtbot, sample_path, monkeypatch
):
    """A full run after a preview adds no layer (the preview's is there): the runs panel is told
    the run started, and follows it to the end (before: 'stopped' through the whole run)."""
    from napari_emparsl._napari import runs_widget
    from napari_emparsl._napari.runs_widget import RunsWidget

    monkeypatch.setattr(runs_widget, "SESSION_OUTPUTS", [])
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    runs = RunsWidget(viewer)
    _preview_rectangle(qtbot, viewer, widget, 40)
    qtbot.waitUntil(lambda: runs.runs.native.count() == 1, timeout=30_000)
    qtbot.waitUntil(lambda: "stopped, 1/8 done" in runs.runs.native.item(0).text(), timeout=30_000)
    seen = []

    def listed(_answer) -> None:  # what the list says after each refresh
        seen.append(runs.runs.native.item(0).text())

    runs._relay.answer.connect(listed)
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: "complete, 8/8 done" in runs.runs.native.item(0).text(), timeout=30_000)
    runs._relay.answer.disconnect(listed)
    assert any("— running, " in text for text in seen), seen


def test_closing_the_panels_lets_go_of_the_viewer_and_stops_the_run(
    make_napari_viewer, qtbot, sample_path, monkeypatch
):
    """The dock's ×: napari keeps a closed panel alive, unparented. The runs panel no longer
    reads ledgers on every mouse move; the run panel no longer follows the viewer, and its run
    stops (nothing could cancel it any more), said in a notification; a panel opened again from
    the menu starts afresh."""
    from napari.utils.notifications import notification_manager

    monkeypatch.setenv("XDG_CONFIG_HOME", str(sample_path.parent / "config"))
    viewer = make_napari_viewer(show=True)
    viewer.open(str(sample_path / "raw"), plugin=PLUGIN)
    run_dock, run = viewer.window.add_plugin_dock_widget(PLUGIN, "Run model (preview, full run)")
    runs_dock, runs = viewer.window.add_plugin_dock_widget(PLUGIN, "Runs")
    assert runs._on_mouse_move in viewer.mouse_move_callbacks
    hooks = len(viewer.layers.events.inserted.callbacks)
    qtbot.mouseClick(runs_dock.title.close_button, Qt.MouseButton.LeftButton)
    assert runs._on_mouse_move not in viewer.mouse_move_callbacks
    assert len(viewer.layers.events.inserted.callbacks) == hooks - 1
    run.input.reset_choices()
    run.model.value = "unet3d-em"
    run.output.value = f"{sample_path}:pred"
    run.block.value = "64"
    run.site.value = "threads"
    run.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: run.progress.value >= 1, timeout=120_000)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        qtbot.mouseClick(run_dock.title.close_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: run._run is None, timeout=120_000)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert "cancelled" in run.status.value, run.status.value
    assert any("The run panel was closed, so the run into" in str(n.message) for n in seen)
    assert len(viewer.layers.events.inserted.callbacks) == hooks - 2
    again = viewer.window.add_plugin_dock_widget(PLUGIN, "Run model (preview, full run)")[1]
    assert again is not run


def test_output_layers_are_told_by_their_source_not_their_name(
    make_napari_viewer, qtbot, sample_path, tmp_path
):
    """Two containers' outputs of one name (both suggested predictions/raw): each run shows in
    its own output's layer (before: the second run reused the first one's layer, which went on
    showing the first container)."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    first = _preview_rectangle(qtbot, viewer, widget, 40)
    other = tmp_path / "other.n5"
    assert main(["sample", str(other), "--shape", "128,128,128", "--seed", "5"]) == 0
    [raw2] = viewer.open(str(other / "raw"), plugin=PLUGIN)
    widget.input.reset_choices()
    widget.input.value = raw2
    widget.output.value = f"{other}:pred"
    widget.preview_btn.clicked.emit()  # the same rectangle
    _wait_idle(qtbot, widget)
    second = widget._output_layer
    assert second is not first and first.name == "pred" and second.name != "pred"
    assert second.metadata["emparsl"] == {"path": str(other), "key": "pred"}
    for layer, path in ((first, sample_path), (second, other)):
        n5 = Volume.open(path, "pred").data.compute()
        np.testing.assert_array_equal(np.asarray(layer.data), n5)
    assert not np.array_equal(np.asarray(first.data), np.asarray(second.data))


def test_a_unit_napari_does_not_know_makes_layers_without_units(
    make_napari_viewer, qtbot, tmp_path
):
    """An input in `voxel` units (no length): the output and failed-block layers were made
    with units=('voxel', …), which napari refuses with a traceback ("Could not find unit")."""
    import torch

    class Fails(torch.nn.Module):
        def forward(self, x):
            if bool((x > 254.5).any()):
                raise RuntimeError("too bright for this model")
            return torch.cat([-x, x], dim=1)  # class b where bright

    model = tmp_path / "fails.pt"
    torch.jit.save(torch.jit.script(Fails()), str(model))
    (tmp_path / "fails.pt.yaml").write_text("kind: labels\nclasses: [a, b]\nnormalize: none\n")
    raw = np.full((32, 64, 64), 100, np.uint8)
    raw[5, 5, 5] = 255  # the first of the 4 blocks fails
    from napari_emparsl.core.volume import save_array

    save_array(tmp_path / "v.n5", "raw", raw, chunks=(32, 32, 32), voxel_size=(2, 1, 1))
    for attrs in (tmp_path / "v.n5" / "raw").rglob("attributes.json"):
        meta = json.loads(attrs.read_text())
        if "pixelResolution" in meta:
            meta["pixelResolution"]["unit"] = "voxel"
        attrs.write_text(json.dumps(meta | ({"unit": "voxel"} if "unit" in meta else {})))
    viewer = make_napari_viewer()
    widget = _panel_on(viewer, tmp_path / "v.n5" / "raw")
    widget.site.value = "threads"
    widget.model_file.value = str(model)
    widget.output.value = f"{tmp_path}/v.n5:pred"
    widget.block.value = "32"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert len(widget.failed_list.choices) == 1, widget.status.value
    out, boxes = widget._output_layer, viewer.layers["failed blocks"]
    assert out in viewer.layers and tuple(out.scale) == (2.0, 1.0, 1.0)
    # napari's default (pixels) on all three
    assert out.units == boxes.units == widget.input.value.units
    assert np.asarray(out.data[:, :, 32:]).all() and not np.asarray(out.data[:, :32, :32]).any()


def test_regions_come_from_a_3d_volume_seen_as_z_slices(make_napari_viewer, qtbot, sample_path):
    """A 2D dataset: Preview and Draw region crashed (IndexError, ValueError); a transposed
    view previewed another region than the one on screen; Draw region in 3D set a mode napari
    ignores there. Engine messages speak of the panel's fields, not command-line options."""
    from napari.utils.notifications import notification_manager

    from napari_emparsl.core.volume import save_array

    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    save_array(sample_path, "img2d", np.zeros((64, 64), np.uint8))
    [flat] = viewer.open(str(sample_path / "img2d"), plugin=PLUGIN)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.input.reset_choices()
        widget.input.value = flat
        for button in (widget.preview_btn, widget.region_btn):
            button.clicked.emit()
            assert widget.status.value.startswith(
                "The layer 'img2d' is 2D; previews and runs need a 3D volume"
            ), widget.status.value
        viewer.layers.remove(flat)
        widget.input.reset_choices()
        widget.input.value = viewer.layers["raw"]
        viewer.dims.order = (1, 0, 2)  # transposed: y is the slider
        widget.preview_btn.clicked.emit()
        assert widget.status.value.startswith("Regions are read off the z-slice view")
        assert widget._run is None
        viewer.dims.order = (0, 1, 2)
        viewer.dims.ndisplay = 3
        widget.region_btn.clicked.emit()
        assert viewer.dims.ndisplay == 2 and viewer.layers["region"].mode == "add_rectangle"
        widget.block.value = "30"  # not a multiple of the model's 4: said with the field's name
        widget.run_btn.clicked.emit()
        _wait_idle(qtbot, widget)
        assert "e.g. block " in widget.status.value and "--" not in widget.status.value
        widget.block.value = "64"
        widget.model_options.value = "foo"
        widget.run_btn.clicked.emit()
        _wait_idle(qtbot, widget)
        assert widget.status.value.endswith("(e.g. halo=8,8,8; normalize=zscore).")
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert len(seen) >= 5 and not [n for n in seen if "Traceback" in str(n.message)]


def test_a_run_s_warnings_are_shown_in_the_panel_s_words():
    """The engine's warnings speak to the command line; shown in napari, they name the panel's
    fields instead (they were shown as the command line has them)."""
    from napari_emparsl._napari.run_widget import panel_words

    assert panel_words(
        "The model one.pt has no description of its halo (no one.pt.yaml beside it), so it runs "
        "with no halo; describe it in one.pt.yaml (…) or with --model-option."
    ).endswith("describe it in one.pt.yaml (…) or in the model options.")
    assert panel_words("…; pass --overwrite to compute all with this one.") == (
        "…; tick “replace output” to compute all with this one."
    )


def test_removing_the_input_layer_during_a_run_leaves_its_output_alone(
    make_napari_viewer, qtbot, sample_path, tmp_path
):
    """The input layer removed while its run goes on made the other open volume the input
    choice, which suggested that volume's output: the (disabled) output field changed, and the
    run's end looked for its output layer there ("There is no dataset 'pred' …", raised in
    Qt's event loop; the run's result never shown)."""
    import shutil

    other = tmp_path / "other.n5"
    shutil.copytree(sample_path, other)
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    second = viewer.open(str(other / "raw"), plugin=PLUGIN)[0]
    widget.input.reset_choices()
    widget.input.value = viewer.layers["raw"]
    widget._suggested = widget.output.value  # as if suggested: the field follows the input
    widget.site.value = "threads"
    widget.block.value = "128"  # one block
    output = widget.output.value
    widget.run_btn.clicked.emit()
    viewer.layers.remove(viewer.layers["raw"])
    assert widget.input.value is second
    _wait_idle(qtbot, widget)
    assert widget.output.value == output
    assert widget.status.value.startswith("finished: 1/1 done")
    assert widget._output_layer is not None and widget._output_layer.name == "pred"


def _fails_on_bright(path):
    """A labels model that raises on blocks holding a voxel above 254.5."""
    import torch

    class Fails(torch.nn.Module):
        def forward(self, x):
            if bool((x > 254.5).any()):
                raise RuntimeError("too bright for this model")
            return torch.cat([x, -x], dim=1)

    torch.jit.save(torch.jit.script(Fails()), str(path))
    path.with_name(path.name + ".yaml").write_text(
        "kind: labels\nclasses: [a, b]\nnormalize: none\nhalo: 0\nblock: [64, 64, 64]\n"
    )


def test_an_output_begun_with_a_relative_model_path_resumes_from_the_panel(
    make_napari_viewer, qtbot, sample_path, tmp_path, monkeypatch
):
    """`emparsl run --model models/fails.pt` in one folder, napari started in another: the
    panel said "(made with model models/fails.pt: choose it to resume)" with that very file
    chosen, and Run / resume after fixing it was refused ("… was made with the model
    models/fails.pt, not /…/models/fails.pt"). Also: the status follows the model chosen."""
    import z5py

    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "fails.pt"
    _fails_on_bright(model)
    finest = z5py.File(str(sample_path), "a")["raw/s0"]
    raw = np.minimum(finest[:], 250)
    raw[10, 10, 10] = 255  # block 0 fails
    finest[:] = raw
    monkeypatch.chdir(tmp_path)
    out = f"{sample_path}:fails"
    assert main(["run", "--input", f"{sample_path}:raw", "--model", "models/fails.pt",
                 "--output", out, "--site", "threads", "--retries", "0"]) == 1  # fmt: skip
    monkeypatch.chdir(sample_path.parent.parent)
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.output.value = out
    qtbot.waitUntil(lambda: "this output has a run at 7/8" in widget.status.value, timeout=20_000)
    assert "made with model models/fails.pt: choose it" in widget.status.value
    widget.model_file.value = str(model)  # the same file: the status says so at once
    assert widget.status.value.startswith("this output has a run at 7/8 blocks done, 1 failed:")
    import torch  # the model fixed, in the same file: Run / resume computes its failed block

    class Fine(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x], dim=1)

    torch.jit.save(torch.jit.script(Fine()), str(model))
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("finished: 8/8 done"), widget.status.value


def test_an_output_another_process_writes_is_not_offered_to_resume(
    make_napari_viewer, qtbot, sample_path, tmp_path
):
    """While another run wrote the output, the panel said "Run / resume continues it" (and
    then refused), and the volume panel "resume it from the run panel"."""
    from napari_emparsl._napari.volume_widget import VolumeWidget

    assert main(["run", "--input", f"{sample_path}:raw", "--model", "unet3d-em", "--output",
                 f"{sample_path}:pred", "--site", "threads", "--block", "64",
                 "--roi", "0:64,0:64,0:64"]) == 0  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", (  # another process holds it, as a run
        "import sys, time; from napari_emparsl.core.ledger import OutputLock; "
        f"lock = OutputLock({str(sample_path)!r}, 'pred'); lock.acquire(); print('held', flush=True); "
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    try:
        viewer = make_napari_viewer()
        widget = _setup(viewer, sample_path)
        widget.output.value = f"{sample_path}:pred"
        qtbot.waitUntil(lambda: "being written by another run now" in widget.status.value,
                        timeout=20_000)  # fmt: skip
        assert widget.status.value.endswith(
            "1/8 blocks done: wait for it to end, or choose another output"
        )
        volumes = VolumeWidget(viewer)
        volumes.path.value = str(sample_path)
        volumes.datasets.value = ["pred"]
        qtbot.waitUntil(lambda: "blocks done" in volumes.info.value, timeout=20_000)
        assert volumes.info.value.endswith(
            "run output: 1/8 blocks done, 0 failed — being written now"
        )
    finally:
        holder.kill()
        holder.wait()
    # once it ends, the panel looks again and offers it
    qtbot.waitUntil(lambda: "Run / resume continues it" in widget.status.value, timeout=20_000)


def test_model_info_names_a_misnamed_description_and_drops_old_defaults(
    make_napari_viewer, tmp_path, sample_path
):
    """A model file with its description beside it under a name that is not read looked like
    one without any; an unusable model kept the last model's block and halo as the defaults
    shown."""
    import torch

    model = tmp_path / "conv.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(model))
    (tmp_path / "conv.yaml").write_text("kind: image\nhalo: 2\n")
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    assert widget.halo.native.placeholderText() == "24,24,24 (model default)"
    widget.model_file.value = str(model)
    assert widget.model_info.value.endswith(
        "⚠ not described: set kind, halo, classes in model options (conv.yaml beside it is "
        "not read: a model's description is named conv.pt.yaml)"
    )
    (tmp_path / "notes.pt").write_text("not a model")
    widget.model_file.value = str(tmp_path / "notes.pt")
    assert widget.model_info.value.startswith("⚠ ")
    assert widget.block.native.placeholderText() == widget.halo.native.placeholderText() == ""


def test_the_region_is_the_rectangle_on_the_slice_shown(make_napari_viewer, sample_path):
    """A rectangle drawn on z 10 was still the region on z 100, where napari shows none; a
    rectangle drawn in the layer Draw region made was ignored where another layer was named
    'region' already (napari named it 'region [1]')."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    viewer.add_points(name="region")  # someone's own layer of that name
    viewer.dims.set_point(0, 10 * 8)
    drawn = widget.draw_region()
    assert drawn.name == "region [1]"
    drawn.add_rectangles(np.array([[10, 10, 70], [10, 10, 100], [10, 50, 100], [10, 50, 70]]))
    roi = widget.preview_region()
    assert (roi.begin, roi.end) == ((10, 10, 70), (11, 50, 100))
    viewer.dims.set_point(0, 100 * 8)  # no rectangle on this slice: what is on screen
    roi = widget.preview_region()
    assert roi.begin[0] == 100 and roi.end[0] == 101
    assert (roi.begin[1:], roi.end[1:]) != ((10, 70), (50, 100))


def test_the_same_weights_elsewhere_are_the_model_an_output_was_made_with(tmp_path):
    """A run resumes with the same weights found at another path (a package installed anew);
    the panel asked to choose the model it had been made with all the same."""
    import shutil

    import torch

    from napari_emparsl._napari.run_widget import _same_model
    from napari_emparsl.core.models.loaders import file_hash

    first = tmp_path / "a" / "m.pt"
    first.parent.mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3)), str(first))
    (tmp_path / "b").mkdir()
    moved = shutil.copy(first, tmp_path / "b" / "m.pt")
    sha = file_hash(str(first))
    assert _same_model(str(moved), str(first), str(first), sha)
    assert not _same_model(str(moved), str(first), str(first), "0" * 64)
    assert not _same_model("unet3d-em", str(first), str(first), sha)


def test_a_rectangle_on_voxel_edges_of_micrometre_voxels_is_those_voxels(
    make_napari_viewer, tmp_path
):
    """A rectangle drawn exactly on voxels 32:64 of 0.008 µm voxels mapped to 31.99999…: the
    region began at voxel 31 and the preview computed the blocks before it too (4 instead of
    1; seen on an OME-NGFF volume from Fiji)."""
    from napari_emparsl.core.volume import save_array

    data = np.zeros((16, 128, 128), np.uint8)
    save_array(tmp_path / "um.n5", "raw", data, voxel_size=(0.008,) * 3, unit="um",
               offset=(0.1, 0.3, 0.7))  # fmt: skip
    viewer = make_napari_viewer()
    widget = _panel_on(viewer, tmp_path / "um.n5" / "raw")
    z = 5
    corners = np.array([[z, 32, 32], [z, 32, 64], [z, 64, 64], [z, 64, 32]], float)
    world = corners * 0.008 + np.array([0.1, 0.3, 0.7])
    viewer.add_shapes([world], shape_type="rectangle", name="region", units=("µm",) * 3)
    viewer.dims.set_point(0, world[0, 0])
    roi = widget.preview_region()
    assert (roi.begin[1:], roi.end[1:]) == ((32, 32), (64, 64))


def test_the_tolerance_of_a_drawn_rectangle_holds_far_from_the_origin():
    from napari_emparsl._napari.run_widget import _ceil, _floor

    # 1e-3 voxel alone held up to ~32k voxels (a review)
    voxel = 0.008  # µm; napari keeps shapes in float32
    for i in (32, 32002, 150_001, 199_999):
        drawn = float(np.float32(i * voxel)) / voxel
        assert int(_floor(np.array([drawn]))[0]) == i and int(_ceil(np.array([drawn]))[0]) == i


PANELS_OPEN_SCRIPT = """
import sys, threading, time

importers = []

def hook(event, args):
    if event == "import" and args[0] == "torch" and not importers:
        importers.append(threading.current_thread().name)

sys.addaudithook(hook)
import napari

viewer = napari.Viewer(show=False)
opened = {}
for name in ("N5 volumes", "Run model (preview, full run)", "Compute sites", "Runs"):
    start = time.perf_counter()
    _, panel = viewer.window.add_plugin_dock_widget("napari-emparsl", name)
    opened[name] = time.perf_counter() - start
    if hasattr(panel, "_preloaded"):
        assert panel._preloaded.wait(120)
print("opened", opened, flush=True)
print("torch imported first by", importers, flush=True)
viewer.close()
"""


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display (run under xvfb-run)")
def test_opening_the_panels_leaves_torch_import_to_a_background_thread():
    # In a fresh process, as a user opens napari: importing torch takes 1.5-2.5 s here, and the
    # run panel describing its built-in model imported it on the Qt thread (napari froze as the
    # panel opened). The panel's preload imports it in the background.
    proc = subprocess.run(
        [sys.executable, "-c", PANELS_OPEN_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch imported first by ['emparsl-preload']" in proc.stdout, proc.stdout


def test_thousands_of_failed_blocks_are_listed_and_outlined_in_part(
    make_napari_viewer, qtbot, sample_path
):
    """A model failing on thousands of blocks: the list and the boxes were rebuilt whole twice
    a second (11,447 rows and boxes: seconds of a frozen napari each time); now the first 200
    rows and a row counting the rest, and the 400 boxes nearest the middle of the view."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    rois = {i: Roi((0, i // 40, i % 40), (64, 1, 1)) for i in range(1200)}  # 1-voxel columns
    failed = {i: "ValueError: too dark" for i in rois}
    viewer.dims.set_point(0, 8 * 8)  # slice 8: every box passes through it
    widget._set_failed(failed, rois, ((8.0, 8.0, 8.0), (0.0, 0.0, 0.0), "nm"))
    choices = widget.failed_list.choices
    assert len(choices) == 201 and choices[0] == "block 0: ValueError: too dark"
    assert choices[-1].startswith("… and 1000 more failed blocks (`emparsl status ")
    layer = viewer.layers["failed blocks"]
    assert len(layer.data) == 400
    centre = np.asarray(getattr(viewer, "scene", viewer).camera.center[-2:])
    drawn = sorted(float(np.sum((b[:, 1:].mean(axis=0) - centre) ** 2)) for b in layer.data)
    everything = sorted(
        float(np.sum(((np.array(r.begin[1:]) + 0.5) * 8.0 - centre) ** 2)) for r in rois.values()
    )
    assert drawn[-1] <= everything[399] + 1e-6  # the nearest ones
    assert widget.retry_btn.enabled


def test_a_preview_of_too_many_blocks_is_refused(make_napari_viewer, qtbot, sample_path):
    """A huge volume's whole slice on screen (nothing drawn, the default zoom) was a preview
    of 6,656 blocks computed in napari's own process without a word."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.block.value = "8"  # the slice on screen: 1 × 16 × 16 blocks
    viewer.dims.set_point(0, 60 * 8)
    widget.preview_btn.clicked.emit()
    assert widget.status.value == (
        "The region on screen touches 256 blocks, too many for a preview (it computes in "
        "napari's own process, at most 64): zoom in, or draw a smaller region (Draw region); "
        "Run computes the whole volume."
    )
    assert widget._run is None and not (sample_path / "pred").exists()


def test_crashed_cli_run_resumes_from_the_panel(
    make_napari_viewer, qtbot, sample_path, tmp_path, htex
):
    # `emparsl run` killed (-9) mid-run on the local site; its output opened in napari and
    # resumed from the run panel: the rest computed, what was done not again, the output equal
    # to an uninterrupted run
    import signal
    import time

    from napari_emparsl.core.ledger import Ledger

    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{sample_path}:raw",
           "--model", "unet3d-em", "--output", f"{sample_path}:pred", "--site", "local",
           "--block", "64,64,64"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = Ledger(str(sample_path), "pred")

    def done_ids() -> list[int]:
        if not os.path.exists(ledger.path):
            return []
        ids = []
        for line in open(ledger.path).read().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line the kill cut short
                continue
            if rec.get("type") == "block" and rec.get("status") == "done":
                ids.append(rec["id"])
        return ids

    deadline = time.time() + 120
    while not done_ids() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = done_ids()
    assert 1 <= len(before) < 8, before
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    [opened] = viewer.open(str(sample_path / "pred"), plugin=PLUGIN)  # the part done
    widget.site.value = "local"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "finished: 8/8 done, 0 failed" in widget.status.value
    assert widget._output_layer is opened  # the opened layer streamed the rest
    assert htex.gone(timeout=30)  # the killed run's workers too (its site's guard)
    after = done_ids()
    assert sorted(after) == list(range(8)) and set(before) <= set(after)  # each block once
    assert main(["run", "--input", f"{sample_path}:raw", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/ref.n5:pred", "--site", "threads", "--block", "64,64,64"]) == 0  # fmt: skip
    np.testing.assert_array_equal(
        Volume.open(sample_path, "pred").data.compute(),
        Volume.open(tmp_path / "ref.n5", "pred").data.compute(),
    )


def test_a_preview_ending_at_once_leaves_no_bar_for_the_next_run(
    make_napari_viewer, qtbot, sample_path, tmp_path, monkeypatch
):
    """A preview whose block fails at once ended while napari set its activity bar up (napari
    turns the event loop there): the bar stayed open, and the next run counted on it ("8 of
    1") instead of getting its own."""
    import napari.utils
    import torch
    from napari.utils import progress
    from qtpy.QtWidgets import QApplication

    class Slow(progress):
        """napari's bar, turning the event loop as it is set up until the run has ended (as
        napari's does for a moment: long enough, on a busy machine, for a run that ends at
        once)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for _ in range(200):
                if widget._run is None:
                    break
                QApplication.processEvents()
                qtbot.wait(10)

    monkeypatch.setattr(napari.utils, "progress", Slow)

    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("fails at once")

    path = tmp_path / "fails.pt"
    torch.jit.save(torch.jit.script(Fails()), str(path))
    (tmp_path / "fails.pt.yaml").write_text("kind: labels\nclasses: [a, b]\nnormalize: none\n")
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.model_file.value = str(path)
    widget.output.value = f"{sample_path}:fails"
    qtbot.waitUntil(widget._preloaded.is_set, timeout=60_000)

    def open_bars() -> list:
        return [b for b in progress._all_instances if "emparsl" in str(b.desc)]

    viewer.dims.set_point(0, 40 * 8)
    corners = [[40, 10, 70], [40, 10, 100], [40, 50, 100], [40, 50, 70]]
    viewer.add_shapes([np.array(corners) * 8.0], shape_type="rectangle", name="region")
    for _ in range(3):
        widget.preview_btn.clicked.emit()
        _wait_idle(qtbot, widget)
        assert widget.status.value == "finished: 0/1 done, 1 failed"
        qtbot.wait(100)  # the bar's delayed set-up, had it been left to come
        assert widget._activity is None and open_bars() == []
    monkeypatch.undo()  # the full run's bar as napari sets it up
    widget.model_file.value = ""
    widget.output.value = f"{sample_path}:pred"
    widget.run_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert "finished: 8/8 done" in widget.status.value
    assert widget.activity_counts[-1] == (8, 8) and open_bars() == []


def test_output_opened_again_during_a_run_shows_it_to_the_end(
    make_napari_viewer, qtbot, sample_path
):
    """The run's layer removed and the output opened again (File > Open) while the run goes
    on: that layer shows the run live and the whole output once it ended (napari's cache kept
    the blank blocks it read first, also after moving the slider)."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    viewer.dims.set_point(0, 100 * 8)
    widget.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    viewer.layers.remove(widget._output_layer)
    [opened] = viewer.open(str(sample_path / "pred"), plugin=PLUGIN)
    _wait_idle(qtbot, widget)
    assert "finished: 8/8 done" in widget.status.value
    n5 = Volume.open(sample_path, "pred").data.compute()
    assert widget._output_layer is opened
    for z in (100, 20, 100):  # the slider moved away and back
        viewer.dims.set_point(0, z * 8)
        qtbot.waitUntil(
            lambda z=z: np.array_equal(np.asarray(opened._slice.image.raw), n5[z]), timeout=10_000
        )


def test_a_resume_with_other_class_colours_recolours_the_layer_shown(
    make_napari_viewer, qtbot, sample_path
):
    """The output takes the colours its model declares now (a resume may change them); the
    layer already on screen kept the earlier ones until it was opened again."""
    viewer = make_napari_viewer()
    widget = _setup(viewer, sample_path)
    layer = _preview_rectangle(qtbot, viewer, widget, 40)
    assert np.allclose(layer.colormap.map(np.array([1]))[0], [0, 229 / 255, 1, 1], atol=1e-6)
    widget.model_options.value = "colors=transparent,red,#0000ff"
    viewer.layers.remove("region")
    again = _preview_rectangle(qtbot, viewer, widget, 40)  # nothing left to compute there
    assert again is layer and "finished" in widget.status.value, widget.status.value
    assert np.allclose(layer.colormap.map(np.array([1, 2])), [[1, 0, 0, 1], [0, 0, 1, 1]])
    assert Volume.open(sample_path, "pred").class_colors[1] == "#ff0000ff"


def test_the_runs_panel_says_how_a_run_ended_at_once(
    make_napari_viewer, qtbot, sample_path, monkeypatch
):
    """A run cancelled in the run panel: the runs panel said "running" until its next look
    (2 s later) while the run panel said "cancelled"; now it is told when the run ends."""
    from napari_emparsl._napari import runs_widget

    monkeypatch.setattr(runs_widget, "SESSION_OUTPUTS", [])
    monkeypatch.setattr(runs_widget, "FOLLOW_MS", 600_000)  # its own next look: not in this test
    viewer = make_napari_viewer()
    runs = runs_widget.RunsWidget(viewer)
    viewer.window.add_dock_widget(runs)
    widget = _setup(viewer, sample_path)
    widget.site.value = "threads"
    widget.run_btn.clicked.emit()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    qtbot.waitUntil(lambda: "running" in " ".join(_items(runs)), timeout=30_000)
    widget.cancel_btn.clicked.emit()
    _wait_idle(qtbot, widget)
    assert widget.status.value.startswith("cancelled")
    qtbot.waitUntil(lambda: "pred — stopped" in " ".join(_items(runs)), timeout=30_000)


def _items(runs) -> list[str]:
    return [runs.runs.native.item(i).text() for i in range(runs.runs.native.count())]
