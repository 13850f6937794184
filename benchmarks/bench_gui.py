"""GUI figures under Xvfb: event-loop stalls during a full run, preview latency.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_gui.py [--async]

1. A 10 ms QTimer ticks while the run panel runs the built-in model over the sample on the
   `local` site; the longest gap between ticks is the worst event-loop stall (target < 50 ms).
2. Preview latency: click on "Preview region" (one block) until the output layer first shows
   data, vs that block's forward time (target <= 1.5x). Measured with the model already loaded
   (second preview), and cold (first preview of the session, includes loading the model).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QEventLoop, QTimer

from napari_emparsl._napari.run_widget import RunWidget
from napari_emparsl.cli import main as emparsl


def wait(widget: RunWidget, until) -> None:
    while not until():
        loop = QEventLoop()
        QTimer.singleShot(5, loop.quit)
        loop.exec_()


def main() -> None:
    import sys

    if "--async" in sys.argv:  # napari's experimental asynchronous slicing
        from napari.settings import get_settings

        get_settings().experimental.async_ = True
    out = {"async_slicing": "--async" in sys.argv}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "s.n5"
        emparsl(["sample", str(sample), "--shape", "128,256,256"])
        viewer = napari.Viewer(show=True)
        [raw] = viewer.open(str(sample / "raw"), plugin="napari-emparsl")
        widget = RunWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.input.reset_choices()
        widget.input.value = raw

        def idle() -> bool:
            return widget._run is None and widget.run_btn.enabled

        for label, z in (("cold", 10), ("warm", 100)):
            viewer.layers.selection.active = raw
            for lyr in [lyr for lyr in viewer.layers if lyr.name == "region"]:
                viewer.layers.remove(lyr)
            rect = np.array([[z, 10, 10], [z, 10, 50], [z, 50, 50], [z, 50, 10]]) * 8.0
            viewer.add_shapes([rect], shape_type="rectangle", name="region", units=("nm",) * 3)
            viewer.dims.set_point(0, z * 8)
            widget.block_seconds.clear()
            shown = []
            t0 = time.perf_counter()

            def on_data(_e, t0=t0, shown=shown):
                if not shown:
                    shown.append(time.perf_counter() - t0)

            widget.preview_btn.clicked.emit()
            wait(widget, lambda: widget._output_layer is not None)
            widget._output_layer.events.data.connect(on_data)
            wait(widget, idle)
            out[f"preview_{label}"] = {
                "click_to_first_block_s": round(shown[0], 3) if shown else None,
                "block_forward_s": round(widget.block_seconds[0], 3),
                "ratio": round(shown[0] / widget.block_seconds[0], 2) if shown else None,
            }

        refresh_ms: list[float] = []
        original = widget._refresh_output

        def timed_refresh() -> None:
            t = time.perf_counter()
            original()
            refresh_ms.append((time.perf_counter() - t) * 1000)

        widget._refresh_output = timed_refresh
        widget._timer.timeout.disconnect()
        widget._timer.timeout.connect(timed_refresh)
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        widget.site.value = "local"
        t0 = time.perf_counter()
        widget.run_btn.clicked.emit()
        wait(widget, idle)
        timer.stop()
        gaps = np.diff(ticks) * 1000
        out["full_run"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "status": widget.status.value,
            "ticks": len(ticks),
            "max_gap_ms": round(float(gaps.max()), 1),
            "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
            "median_gap_ms": round(float(np.median(gaps)), 1),
            "gaps_over_50ms": int((gaps > 50).sum()),
            "max_refresh_ms": round(max(refresh_ms), 1) if refresh_ms else None,
            "refreshes": len(refresh_ms),
        }
        viewer.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
