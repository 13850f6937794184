"""Dock widget: runs of this session and runs found in opened outputs, with provenance.

A run is known by its output dataset and the ledger beside it: status and progress, site, model,
when. Selecting one and moving the mouse over the viewer shows the provenance of the block under
the cursor (model hash, site, worker, time).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from magicgui.widgets import Container, Label, PushButton, Select

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import plan_blocks
from napari_emparsl.core.ledger import Ledger
from napari_emparsl.core.volume import Volume, parse_spec

__all__ = ["SESSION_OUTPUTS", "RunsWidget", "remember_output"]

#: outputs of runs started in this session (OUT.n5:KEY)
SESSION_OUTPUTS: list[str] = []


def remember_output(output: str) -> None:
    if output not in SESSION_OUTPUTS:
        SESSION_OUTPUTS.append(output)


def describe_run(output: str) -> str:
    root, key = parse_spec(output)
    summary = Ledger(root, key).summary()
    last = summary.last_run
    when = datetime.datetime.fromtimestamp(last.get("time", 0)).strftime("%Y-%m-%d %H:%M")
    planned = int(last.get("planned", 0))
    return (
        f"{os.path.basename(root)}:{key} — {len(summary.done)}/{planned} done, "
        f"{len(summary.failed)} failed — {last.get('model')} on {last.get('site')} — {when}"
    )


class RunsWidget(Container):
    """List of runs; open an output; provenance of the block under the cursor."""

    def __init__(self, viewer: Any):
        super().__init__(labels=True)
        self._viewer = viewer
        self.runs = Select(
            label="runs", choices=[], tooltip="runs of this session and of opened outputs"
        )
        self.refresh_btn = PushButton(text="Refresh", tooltip="look for runs again")
        self.open_btn = PushButton(
            text="Open output", tooltip="add the selected run's output as a layer"
        )
        self.provenance = Label(label="under cursor", value="")
        self.extend([self.runs, self.refresh_btn, self.open_btn, self.provenance])
        self.refresh_btn.changed.connect(self.refresh)
        self.open_btn.changed.connect(self.open_output)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.refresh()

    def outputs(self) -> list[str]:
        found = list(SESSION_OUTPUTS)
        for layer in self._viewer.layers:
            src = (layer.metadata or {}).get("emparsl")
            if src:
                spec = f"{src['path']}:{src['key']}"
                if spec not in found:
                    found.append(spec)
        return [o for o in found if Ledger(*parse_spec(o)).exists()]

    def refresh(self, *_: Any) -> None:
        self.runs.choices = [(describe_run(o), o) for o in self.outputs()]

    def open_output(self, *_: Any) -> list[Any]:
        from napari_emparsl._napari.reader import layer_data

        added = []
        for output in self.runs.value or []:
            data, meta, kind = layer_data(Volume.open(*parse_spec(output)))
            added.append(getattr(self._viewer, f"add_{kind}")(data, **meta))
        return added

    def provenance_at(self, world_point: Any) -> str:
        """Provenance of the block of the selected run at a world position (nm)."""
        selected = self.runs.value or []
        if len(selected) != 1:
            return ""
        root, key = parse_spec(selected[0])
        try:
            out = Volume.open(root, key)
        except UserError as err:
            return str(err)
        summary = Ledger(root, key).summary()
        last = summary.last_run
        spatial = tuple(float(p) for p in world_point)[-3:]
        voxel = tuple(
            int((p - o) // v) for p, o, v in zip(spatial, out.offset, out.voxel_size, strict=True)
        )
        if any(v < 0 or v >= n for v, n in zip(voxel, out.shape[-3:], strict=True)):
            return ""
        scale = last.get("spec", {}).get("scale", [1, 1, 1])
        in_shape = tuple(n // s for n, s in zip(out.shape[-3:], scale, strict=True))
        in_voxel = tuple(v // s for v, s in zip(voxel, scale, strict=True))
        block_grid = last["block"]
        ids = [
            b.id
            for b in plan_blocks(in_shape, block_grid, last["halo"], scale=scale, out_chunks=out.chunks[-3:],
                                 roi=_point_roi(in_voxel))
        ]  # fmt: skip
        if not ids:
            return ""
        rec = summary.done.get(ids[0]) or summary.failed.get(ids[0])
        if rec is None:
            return f"block {ids[0]}: not computed yet"
        when = datetime.datetime.fromtimestamp(rec["time"]).strftime("%H:%M:%S")
        return (
            f"block {ids[0]} {rec['status']}: model {str(rec.get('model_sha256', ''))[:12]}…, "
            f"site {rec.get('site')}, worker {rec.get('worker')}"
            + (f" ({rec['device']})" if rec.get("device") else "")
            + f", at {when}"
        )

    def _on_mouse_move(self, viewer: Any, event: Any) -> None:
        self.provenance.value = self.provenance_at(viewer.cursor.position)


def _point_roi(voxel: tuple[int, ...]):
    from napari_emparsl.core.geometry import Roi

    return Roi(tuple(voxel), (1,) * len(voxel))
