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
    qtbot.wait(100)
    QApplication.processEvents()
    assert label.height() >= label.heightForWidth(label.width())
    assert label.height() // label.fontMetrics().lineSpacing() > lines  # more lines, all shown
