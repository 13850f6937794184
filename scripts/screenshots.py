"""Take the documentation screenshots from the running app (run under Xvfb):

xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
SHARED = REPO.parent / "shared" / "data"


def settle(viewer: napari.Viewer, n: int = 20) -> None:
    for _ in range(n):
        QApplication.processEvents()


def shot(viewer: napari.Viewer, name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # an earlier step's notification over the canvas
    settle(viewer)
    viewer.screenshot(str(IMAGES / name), canvas_only=False, flash=False)
    print(f"wrote {IMAGES / name}")


def main() -> int:
    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-emparsl")
    viewer.window.resize(1400, 900)

    with tempfile.TemporaryDirectory() as tmp:
        from napari_emparsl.cli import main as emparsl

        sample = Path(tmp) / "sample.n5"
        emparsl(["sample", str(sample)])
        layers = viewer.open(str(sample), plugin="napari-emparsl")
        for layer in layers:
            if layer.name == "labels_cells":
                layer.visible = False
            if layer.name == "labels_classes":
                layer.opacity = 0.35
        # show the section with the most mitochondria
        import numpy as np

        from napari_emparsl.core.volume import Volume

        classes = Volume.open(sample, "labels/classes").data.compute()
        z = int(np.argmax((classes == 2).sum(axis=(1, 2))))
        viewer.dims.set_point(0, z * 8)
        viewer.reset_view()
        shot(viewer, "napari_sample.png")
        viewer.layers.clear()

        # the volume panel on the sample container
        from napari_emparsl._napari.volume_widget import VolumeWidget

        vw = VolumeWidget(viewer)
        vdock = viewer.window.add_dock_widget(vw, name="N5 volumes")
        vw.path.value = str(sample)
        vw.datasets.value = ["raw"]  # info: dtype, voxel size, levels
        vw.datasets.item("raw").setExpanded(True)  # its pyramid levels
        settle(viewer, 40)
        # the panel alone (a window grab may skip repainting its list)
        vw.native.grab().save(str(IMAGES / "volume_panel.png"))
        print(f"wrote {IMAGES / 'volume_panel.png'}")
        vw.datasets.value = ["raw"]
        vw.open_selected()
        viewer.dims.set_point(0, z * 8)
        viewer.reset_view()
        shot(viewer, "volume_widget.png")
        viewer.window.remove_dock_widget(vdock)
        viewer.layers.clear()

        # the site panel (its form comes from the profile schema)
        from napari_emparsl._napari.site_widget import SiteWidget

        sw = SiteWidget(viewer)
        sdock = viewer.window.add_dock_widget(sw, name="Compute sites")
        sw.site.value = "local"
        sw.test()  # Test site: the local site starts, runs a no-op task, stops
        while not sw.test_btn.enabled:  # not a busy loop: the site needs the cores to start
            settle(viewer, 1)
            time.sleep(0.05)
        settle(viewer, 20)
        sw.native.grab().save(str(IMAGES / "site_panel.png"))
        print(f"wrote {IMAGES / 'site_panel.png'}")
        viewer.window.remove_dock_widget(sdock)

        # the run widget after a preview of a drawn region and a full run
        from qtpy.QtCore import QEventLoop, QTimer

        from napari_emparsl._napari.run_widget import RunWidget

        [raw] = viewer.open(str(sample / "raw"), plugin="napari-emparsl")
        widget = RunWidget(viewer)
        dock = viewer.window.add_dock_widget(widget, name="EM Parsl: run")
        widget.native.setMaximumWidth(460)  # leave the canvas most of the window
        widget.input.reset_choices()
        widget.input.value = raw
        widget.site.value = "threads"
        widget.block.value = "64"  # 32 blocks: the preview computes a few of them
        viewer.dims.set_point(0, z * 8)
        # Draw region, then the rectangle a user drags (voxels: the layer is on the volume's grid)
        region = widget.draw_region()
        region.add_rectangles(
            np.array([[z, 40, 60], [z, 40, 200], [z, 150, 200], [z, 150, 60]], float),
            edge_color="yellow",
            face_color="transparent",
            edge_width=2,
        )

        def wait_idle() -> None:
            while widget._run is not None or not widget.run_btn.enabled:
                loop = QEventLoop()
                QTimer.singleShot(100, loop.quit)
                loop.exec_()

        widget.preview_btn.clicked.emit()
        wait_idle()
        viewer.reset_view()
        shot(viewer, "run_widget_preview.png")
        widget.run_btn.clicked.emit()
        wait_idle()
        shot(viewer, "run_widget_full.png")

        # a bioimage.io package (the built-in model, exported) chosen and checked
        from napari_emparsl.core.models.export import export_package

        package = Path(tmp) / "membranes.zip"
        export_package("unet3d-em", str(package), name="EM membranes and mitochondria")
        widget.model_file.value = str(package)
        widget.check_model_btn.clicked.emit()
        while not widget.status.value.startswith("model check"):
            loop = QEventLoop()
            QTimer.singleShot(100, loop.quit)
            loop.exec_()
        settle(viewer)
        widget.native.grab().save(str(IMAGES / "run_widget_package.png"))
        print(f"wrote {IMAGES / 'run_widget_package.png'}")
        widget.model_file.value = ""

        # a model that fails on the brightest blocks: failed blocks listed and outlined
        import torch

        class Fails(torch.nn.Module):
            def __init__(self, limit: float) -> None:
                super().__init__()
                self.limit = limit

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if bool((x > self.limit).any()):
                    raise RuntimeError("a voxel brighter than this model was trained on")
                return torch.cat([-x, x], dim=1)

        raw_s0 = Volume.open(sample, "raw").data.compute()
        maxima = sorted(
            raw_s0[a : a + 64, b : b + 64, c : c + 64].max()
            for a in range(0, raw_s0.shape[0], 64)
            for b in range(0, raw_s0.shape[1], 64)
            for c in range(0, raw_s0.shape[2], 64)
        )
        fails = Path(tmp) / "bright.pt"
        torch.jit.save(torch.jit.script(Fails(float(maxima[-4]) - 0.5)), str(fails))
        fails.with_name("bright.pt.yaml").write_text(
            "kind: labels\nclasses: [background, foreground]\nnormalize: none\nhalo: [0, 0, 0]\n"
        )
        widget.model_file.value = str(fails)
        first_output, widget.output.value = widget.output.value, f"{sample}:bright"
        widget.run_btn.clicked.emit()
        wait_idle()
        viewer.layers["bright"].visible = False  # the boxes over the raw data
        failed = min(widget._failed_rois.values(), key=lambda roi: roi.begin)
        viewer.dims.set_point(0, (failed.begin[0] + 20) * 8)
        shot(viewer, "run_widget_failed.png")
        widget.model_file.value = ""
        for name in ("bright", "failed blocks"):
            viewer.layers.remove(name)
        widget.output.value = first_output

        # the runs panel, that run selected, the mouse over a mitochondrion
        from napari_emparsl._napari.runs_widget import RunsWidget

        rw = RunsWidget(viewer)
        rdock = viewer.window.add_dock_widget(rw, name="Runs")
        rw.native.setMinimumWidth(760)
        while not rw.runs.choices:  # the ledgers are read in the background
            settle(viewer)
        rw.runs.value = [widget.output.value]
        rw.provenance.value = rw.provenance_at((z * 8, 100 * 8, 120 * 8))
        settle(viewer, 20)
        rw.native.grab().save(str(IMAGES / "runs_panel.png"))
        print(f"wrote {IMAGES / 'runs_panel.png'}")
        viewer.window.remove_dock_widget(rdock)
        viewer.window.remove_dock_widget(dock)
        viewer.layers.clear()

        if SHARED.is_dir():
            cremi = SHARED / "cremi_C_crop" / "cremi_C_crop.n5"
            viewer.open(str(cremi), plugin="napari-emparsl")
            viewer.dims.set_point(0, 4 * 40)
            viewer.reset_view()
            shot(viewer, "napari_cremi.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
