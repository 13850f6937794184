"""The runs panel: runs found in opened outputs, reopening, provenance of the block under the cursor."""

from __future__ import annotations

from napari_emparsl._napari.runs_widget import RunsWidget
from napari_emparsl.cli import main

PLUGIN = "napari-emparsl"


def test_runs_found_and_provenance(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, make_run_output
):
    from napari_emparsl._napari import runs_widget

    monkeypatch.setattr(runs_widget, "SESSION_OUTPUTS", [])  # only this test's runs
    make_run_output("64,64,128", "64,64,64")
    viewer = make_napari_viewer()
    widget = RunsWidget(viewer)
    viewer.open(str(tmp_path / "s.n5" / "pred"), plugin=PLUGIN)  # an output with a ledger
    output = f"{tmp_path}/s.n5:pred"
    assert output in widget.outputs()
    qtbot.waitUntil(lambda: widget.runs.native.count() == 1)  # ledgers are read off the Qt thread
    label = widget.runs.native.item(0).text()
    assert "pred — stopped, 1/2 done, 0 failed — unet3d-em on threads" in label  # whole plan
    import datetime  # … and when it ran (its last run's start, to the minute)

    when = label.rsplit(" — ", 1)[1]
    ran = datetime.datetime.strptime(when, "%Y-%m-%d %H:%M")
    assert abs((datetime.datetime.now() - ran).total_seconds()) < 600
    widget.runs.value = [output]
    # voxel (4, 4, 4) is in block 0 (done); voxel (4, 4, 100) in block 1 (not computed)
    import hashlib

    from napari_emparsl.core.models.loaders import resolve_model

    sha = hashlib.sha256(open(resolve_model("unet3d-em"), "rb").read()).hexdigest()
    # the model file's hash, whose first 12 digits tell it apart
    assert widget.provenance_at((4 * 8, 4 * 8, 4 * 8)).startswith(
        f"block 0 done: model {sha[:12]}…"
    )
    assert "site threads" in widget.provenance_at((32, 32, 32))
    assert "(cpu), at " in widget.provenance_at((32, 32, 32))  # where the model ran
    assert widget.provenance_at((4 * 8, 4 * 8, 100 * 8)) == "block 1: not computed yet"
    # a run writing it now (here: paused after planning, in this process; or `emparsl run`)
    from napari_emparsl.core.events import BlockDone
    from napari_emparsl.execution.runner import Run

    other = Run(f"{tmp_path}/s.n5:raw", "unet3d-em", output, site="threads", block=(64, 64, 64))
    events = other.events()
    next(events)
    shown = widget.refreshed
    widget.refresh()
    qtbot.waitUntil(lambda: widget.refreshed > shown)
    assert "pred — running, 1/2 done" in widget.runs.native.item(0).text()
    for event in events:  # that run computes block 1: the list follows it by itself
        if isinstance(event, BlockDone):
            break
    qtbot.waitUntil(
        lambda: "pred — running, 2/2 done" in widget.runs.native.item(0).text(), timeout=30_000
    )
    events.close()  # that run ends (as a closed generator): the list sees it, and stops looking
    qtbot.waitUntil(
        lambda: "pred — complete, 2/2 done" in widget.runs.native.item(0).text(), timeout=30_000
    )
    shown = widget.refreshed
    qtbot.wait(2 * runs_widget.FOLLOW_MS)
    assert widget.refreshed == shown
    # the rest, from the command line: the panel reads only the ledger lines appended since
    assert main(["run", "--input", f"{tmp_path}/s.n5:raw", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/s.n5:pred", "--site", "threads", "--block", "64,64,64"]) == 0  # fmt: skip
    assert widget.provenance_at((4 * 8, 4 * 8, 100 * 8)).startswith("block 1 done: model ")
    shown = widget.refreshed
    widget.refresh()
    qtbot.waitUntil(lambda: widget.refreshed > shown)
    assert "pred — complete, 2/2 done, 0 failed" in widget.runs.native.item(0).text()
    assert widget.runs.value == [output]  # the selection survives a refresh
    # open already (at the start of this test): its layer is selected, not a second copy
    # added (before: "pred [1]")
    [opened] = [lay for lay in viewer.layers if lay.name == "pred"]
    viewer.add_points()  # selected now
    assert widget.open_output() == [] and viewer.layers.selection.active is opened
    viewer.layers.remove(opened)
    [layer] = widget.open_output()
    assert layer._type_string == "labels"


def test_open_output_removed_since_it_was_listed_is_one_sentence(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, make_run_output
):
    """ "Open output" on a run whose output was deleted meanwhile: a notification of one
    sentence (it was napari's traceback of an EmitLoopError) and the list drops it."""
    import shutil

    from napari.utils.notifications import notification_manager

    from napari_emparsl._napari import runs_widget

    monkeypatch.setattr(runs_widget, "SESSION_OUTPUTS", [])
    make_run_output()
    viewer = make_napari_viewer()
    widget = RunsWidget(viewer)
    viewer.open(str(tmp_path / "s.n5" / "pred"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: widget.runs.native.count() == 1)
    widget.runs.value = [f"{tmp_path}/s.n5:pred"]
    shutil.rmtree(tmp_path / "s.n5" / "pred")
    messages: list[str] = []

    def note(n):
        messages.append(str(n.message))

    notification_manager.notification_ready.connect(note)
    try:
        widget.open_btn.clicked.emit()
    finally:
        notification_manager.notification_ready.disconnect(note)
    assert messages == [
        f"There is no dataset 'pred' in {tmp_path}/s.n5; available: labels/cells, "
        "labels/classes, raw."
    ]
    qtbot.waitUntil(lambda: widget.runs.native.count() == 0)
    assert [layer.name for layer in viewer.layers] == ["pred"]  # nothing added
    # and the panel let go of it (a day of runs kept every output, and looked for them all)
    assert widget._outputs == {}


def test_outputs_deleted_since_are_forgotten(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                            make_run_output):  # fmt: skip
    """Outputs of this session's runs deleted from disk are dropped from the session's list
    and the panel's (both grew by one per output for the whole session)."""
    import shutil

    from napari_emparsl._napari import runs_widget

    monkeypatch.setattr(runs_widget, "SESSION_OUTPUTS", [])
    make_run_output()
    output = f"{tmp_path}/s.n5:pred"
    runs_widget.run_going(output)
    viewer = make_napari_viewer()
    widget = RunsWidget(viewer)
    qtbot.waitUntil(lambda: widget.runs.native.count() == 1)
    assert list(widget._outputs) == [output] and runs_widget.SESSION_OUTPUTS == [output]
    shutil.rmtree(tmp_path / "s.n5" / "pred")
    widget.refresh()
    qtbot.waitUntil(lambda: widget.runs.native.count() == 0)
    assert widget._outputs == {} and runs_widget.SESSION_OUTPUTS == []
