"""The panels' sentence rows (status, estimate, info, provenance) line up with their fields."""

from __future__ import annotations

from qtpy.QtCore import QPoint
from qtpy.QtWidgets import QApplication

from napari_emparsl._napari.run_widget import RunWidget
from napari_emparsl._napari.runs_widget import RunsWidget
from napari_emparsl._napari.site_widget import SiteWidget
from napari_emparsl._napari.volume_widget import VolumeWidget


def _x(widget, panel) -> int:
    return widget.native.mapTo(panel.native, QPoint(0, 0)).x()


def test_short_sentences_start_where_the_fields_do(make_napari_viewer, qtbot):
    """A short text in a row of its own used to sit in the middle of the row, its label pushed
    to the right after it (`finished: 12/12 done` ~100 px right of the fields above)."""
    viewer = make_napari_viewer(show=True)
    run, runs = RunWidget(viewer), RunsWidget(viewer)
    volume, site = VolumeWidget(viewer), SiteWidget(viewer)
    rows = [
        (run, run.output, [run.status, run.estimate, run.model_info]),
        (runs, runs.runs, [runs.provenance]),
        (volume, volume.path, [volume.info]),
        (site, site.site, [site.message]),
    ]
    for panel, _, _ in rows:
        viewer.window.add_dock_widget(panel, area="right")
    for _, _, labels in rows:
        for label in labels:
            label.value = "done"
    qtbot.wait(50)
    QApplication.processEvents()
    for panel, field, labels in rows:
        for label in labels:
            assert abs(_x(label, panel) - _x(field, panel)) <= 16, (label.label, panel)
            assert label.native.height() >= label.native.fontMetrics().height()
    # a long sentence wraps onto more lines and is shown whole
    run.status.value = "the output was made with block 64×64×64, not 32×32×32; " * 3
    qtbot.wait(50)
    QApplication.processEvents()
    assert run.status.native.height() >= 2 * run.status.native.fontMetrics().height()
    assert run.status.native.width() <= run.native.width()


def test_wrapped_sentences_keep_their_lines_when_the_dock_narrows(make_napari_viewer, qtbot):
    """Qt does not lay a dock's rows out by height-for-width again when only the dock's width
    changes: the run panel's model info kept the height of 4 lines when it needed 6 after the
    dock was narrowed, and showed its middle lines only (seen in the docs' screenshot)."""
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer(show=True)
    run = RunWidget(viewer)
    dock = viewer.window.add_dock_widget(run, area="right")
    run.model_info.value = (
        "bioimage.io “EM membranes and mitochondria”: labels: background, membrane, "
        "mitochondria; 1 input channel(s); 3D; halo [24, 24, 24]; softmax"
    )
    qtbot.wait(50)
    label = run.model_info.native
    lines = label.height() // label.fontMetrics().lineSpacing()
    viewer.window._qt_window.resizeDocks([dock], [330], Qt.Orientation.Horizontal)

    def all_lines_shown() -> bool:  # more lines than before, all shown (the layout may take a
        QApplication.processEvents()  # few event-loop turns on a busy machine)
        return (label.height() >= label.heightForWidth(label.width())
                and label.height() // label.fontMetrics().lineSpacing() > lines)  # fmt: skip

    qtbot.waitUntil(all_lines_shown, timeout=5000)


def test_the_plugins_menu_opens_every_panel(make_napari_viewer, tmp_path, monkeypatch):
    """Each panel as a user opens it (Plugins > EM Parsl > …): napari finds it through the
    installed manifest, builds it with the viewer, and docks it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the sample's container
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    viewer = make_napari_viewer()
    panels = {
        "N5 volumes": VolumeWidget,
        "Run model (preview, full run)": RunWidget,
        "Compute sites": SiteWidget,
        "Runs": RunsWidget,
    }
    opened = {}
    for name, kind in panels.items():
        dock, widget = viewer.window.add_plugin_dock_widget("napari-emparsl", name)
        assert isinstance(widget, kind) and widget._viewer is viewer  # (before: a TypeError)
        assert name in dock.name
        opened[kind] = widget
    # the sample, as File > Open Sample > EM Parsl gives it, is offered to the panels: the
    # run panel's volume is the layer itself (not a proxy of it, which is a new object at
    # every access), the volume panel lists it among the layers open from N5
    layers = viewer.open_sample("napari-emparsl", "synthetic_em")
    raw = viewer.layers["sample raw"]
    assert layers[0] is raw
    run = opened[RunWidget]
    run.input.reset_choices()
    assert run.input.value is raw  # (before, the sample was in memory: no volume to run on)
    assert run.output.value.endswith("sample-seed0.n5:predictions/raw")
    assert "sample raw" in opened[VolumeWidget].layer.choices


def test_answers_arriving_after_the_viewer_closed_are_dropped(
    make_napari_viewer, qtbot, monkeypatch
):
    """A background thread's answer queued just before the viewer closed reached the panel
    after its fields were deleted: "wrapped C/C++ object of type QLineEdit has been deleted",
    raised in Qt's event loop (seen in CI at a test's teardown). Such answers are dropped.
    The relays go with their panels (children of the panels' widgets, deleted by Qt on its
    own thread; before, a thread that outlived its panel could hold a relay's last reference
    and destroy it on the wrong thread), and a thread answering after that says nothing."""
    import threading

    from napari_emparsl._napari.background import alive, in_background

    viewer = make_napari_viewer()
    run, runs = RunWidget(viewer), RunsWidget(viewer)
    volume, site = VolumeWidget(viewer), SiteWidget(viewer)
    for panel in (run, runs, volume, site):
        viewer.window.add_dock_widget(panel, area="right")
    qtbot.wait(20)
    # answers each handler would write into its fields, queued from a thread just before the
    # viewer closes, delivered (if at all) after napari deleted the fields
    answers = [
        (run._ledger_relay, (run._runs_started, {"output": "elsewhere.n5:pred"})),
        (run._site_relay, 1.0),
        (run._check_relay, ValueError("late")),
        (site._relay, 1.0),
        (volume._ledger_relay, (volume._described, "text", "")),
        (runs._relay, ([], runs._generation, False)),
    ]
    queued = threading.Thread(target=lambda: [r.answer.emit(a) for r, a in answers])
    queued.start()
    queued.join()
    viewer.close()
    qtbot.wait(300)  # pytest-qt fails the test on an exception raised in the event loop
    QApplication.processEvents()
    assert not any(alive(relay) for relay, _ in answers)
    # and each knows it: a thread's send after that emits nothing (a send under way when Qt
    # deleted the relay raced its deletion on another thread)
    assert all(relay._gone.is_set() for relay, _ in answers)
    raised: list = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    for relay, answer in answers:  # a thread that outlived its panel answers
        in_background(relay, lambda answer=answer: answer, "late answer")
    qtbot.waitUntil(
        lambda: (
            threading.active_count() == 1
            or not any(t.name == "late answer" for t in threading.enumerate())
        ),
        timeout=5000,
    )
    qtbot.wait(50)
    assert raised == []


def test_every_control_has_a_tooltip(make_napari_viewer):
    """What a user can set or click says what it does when the mouse rests on it."""
    from magicgui.widgets import Container, EmptyWidget, Label

    viewer = make_napari_viewer()
    missing = []

    def walk(panel, widget) -> None:
        if isinstance(widget, Container):
            for child in widget:
                walk(panel, child)
        elif not isinstance(widget, (Label, EmptyWidget)) and not widget.tooltip:
            missing.append(f"{type(panel).__name__}.{widget.name} ({widget.widget_type})")

    panels = [RunWidget(viewer), RunsWidget(viewer), VolumeWidget(viewer), SiteWidget(viewer)]
    for panel in panels:
        viewer.window.add_dock_widget(panel, area="right")  # as napari's menu opens them
        walk(panel, panel)
    assert missing == []
