"""GUI figures under Xvfb: event-loop stalls during a full run, preview latency.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_gui.py \
        [--async] [--cold] [--after-preview] [--preview-delay SECONDS]

1. A 10 ms QTimer ticks while the run panel runs the built-in model over the sample on the
   `local` site (64³ blocks: 32 of them stream in); the longest gap between ticks is the worst
   event-loop stall (target < 50 ms), with what ran on the Qt thread during the longest ones.
   With --cold no preview runs before: the full run adds the session's first Labels layer
   (the panel has 8 s to preload first). With --after-preview a preview of the same output
   (64³ blocks) runs first, as in the guide's workflow: the run then adds no layer.
2. Preview latency: click on "Preview region" (one block) until the output layer first shows
   data, vs that block's forward time (target <= 1.5x). Measured with the model already loaded
   (second preview), and cold (first preview of the session, includes loading the model),
   clicked as soon as the panel is open or, with --preview-delay, that many seconds later
   (the panel imports torch and loads the model in the background meanwhile).
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

        # the second rectangle lies in another block (128³ blocks), the model is loaded by then
        previews = (("cold", 10, 10), ("warm", 100, 140))
        if "--preview-delay" in sys.argv:  # the user clicks a while after opening the panel
            delay = float(sys.argv[sys.argv.index("--preview-delay") + 1])
            t_open = time.perf_counter()
            wait(widget, lambda: time.perf_counter() - t_open > delay)
            out["preview_delay_s"] = delay
        if "--cold" in sys.argv:
            previews = ()
            t_open = time.perf_counter()  # the panel preloads torch, the model, napari's layers
            wait(widget, lambda: time.perf_counter() - t_open > 8)
        out["full_run_first"] = "--cold" in sys.argv
        for label, z, x in previews:
            viewer.layers.selection.active = raw
            for lyr in [lyr for lyr in viewer.layers if lyr.name == "region"]:
                viewer.layers.remove(lyr)
            rect = np.array([[z, 10, x], [z, 10, x + 40], [z, 50, x + 40], [z, 50, x]]) * 8.0
            viewer.add_shapes([rect], shape_type="rectangle", name="region", units=("nm",) * 3)
            viewer.dims.set_point(0, z * 8)
            widget.block_seconds.clear()
            widget.block_threads.clear()
            shown = []
            t0 = time.perf_counter()

            def on_data(_e, t0=t0, shown=shown):
                if not shown:
                    shown.append(time.perf_counter() - t0)

            widget.preview_btn.clicked.emit()
            wait(widget, lambda: widget._output_layer is not None)
            widget._output_layer.events.set_data.connect(on_data)  # drawn
            wait(widget, idle)
            out[f"preview_{label}"] = {
                "click_to_first_block_s": round(shown[0], 3) if shown else None,
                "status": widget.status.value,
                "block_forward_s": round(widget.block_seconds[0], 3)
                if widget.block_seconds
                else None,
                "ratio": round(shown[0] / widget.block_seconds[0], 2)
                if shown and widget.block_seconds
                else None,
            }

        out["full_run_after_preview"] = "--after-preview" in sys.argv
        if "--after-preview" in sys.argv:  # the output layer exists before the run starts
            widget.site.value = "threads"
            widget.output.value = f"{sample}:stream64"
            widget.block.value = "64"
            viewer.layers.selection.active = raw
            widget.preview_btn.clicked.emit()
            wait(widget, idle)
        refresh_ms: list[float] = []
        spans: list[tuple[str, float, float]] = []  # what ran on the Qt thread, when
        original = widget._refresh_output
        original_event = widget._on_event

        def timed_refresh() -> None:
            t = time.perf_counter()
            original()
            refresh_ms.append((time.perf_counter() - t) * 1000)
            spans.append(("refresh", t, time.perf_counter()))

        def timed_event(event) -> None:
            t = time.perf_counter()
            original_event(event)
            spans.append((type(event).__name__, t, time.perf_counter()))

        widget._on_event = timed_event

        def timed(name: str, func):
            def run(*args):
                t = time.perf_counter()
                func(*args)
                spans.append((name, t, time.perf_counter()))

            return run

        from vispy.app.backends import _qt as vispy_qt

        # the canvas's own drawing (Qt then composites it into the window: not in any span)
        vispy_qt.CanvasBackendDesktop.paintGL = timed(
            "paintGL", vispy_qt.CanvasBackendDesktop.paintGL
        )
        widget._update_activity = timed("activity dock", widget._update_activity)
        widget._open_activity = timed("activity bar opens", widget._open_activity)
        widget._on_finished = timed("run finished", widget._on_finished)
        import gc

        gc_start: list[float] = []

        def on_gc(phase: str, info: dict) -> None:  # garbage collections hold the interpreter
            if phase == "start":
                gc_start.append(time.perf_counter())
            elif gc_start:
                spans.append((f"gc gen{info['generation']}", gc_start.pop(), time.perf_counter()))

        gc.callbacks.append(on_gc)

        widget._refresh_output = timed_refresh
        widget._timer.timeout.disconnect()
        widget._timer.timeout.connect(timed_refresh)
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        widget.site.value = "local"
        # a fresh output in 64³ blocks: 32 blocks stream in (the default 128³ makes only 4)
        widget.output.value = f"{sample}:stream64"
        widget.block.value = "64"
        t0 = time.perf_counter()
        widget.run_btn.clicked.emit()
        wait(widget, idle)
        timer.stop()
        gaps = np.diff(ticks) * 1000
        worst = []  # the longest gaps, with what ran on the Qt thread during each
        for i in np.argsort(gaps)[::-1][:5]:
            a, b = ticks[i], ticks[i + 1]
            inside = [f"{n} {1000 * (e - s):.0f} ms" for n, s, e in spans if s < b and e > a]
            worst.append(
                {"gap_ms": round(float(gaps[i]), 1), "at_s": round(a - t0, 2), "qt": inside}
            )
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
            "worst_gaps": worst,
        }
        viewer.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
