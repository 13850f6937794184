"""process_block: the one function sent to workers.

A worker reads its block's read ROI from the input N5, normalizes it with the run's global
statistics (per-block statistics would make seams), pads it (reflect at the volume edge, then
up to the model's size multiple), runs the model, crops the halo / maps the output scale,
post-processes (argmax or threshold for labels), writes its chunk-aligned write ROI into the
output N5, and returns a small :class:`BlockResult`. No image data travels back through Parsl.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_emparsl.core.geometry import Block

__all__ = ["BlockJob", "BlockResult", "process_block", "run_model_on_array"]


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs, small and picklable."""

    input_root: str
    input_key: str
    output_root: str
    output_key: str
    block: Block
    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    norm: tuple[float, float] = (0.0, 1.0)  # subtract, divide (global, from the coordinator)
    threads: int = 1


@dataclass(frozen=True)
class BlockResult:
    block_id: int
    ok: bool
    worker: str
    t_read: float = 0.0
    t_compute: float = 0.0
    t_write: float = 0.0
    out_min: float = 0.0
    out_max: float = 0.0
    histogram: tuple[int, ...] = ()
    error: str = ""
    detail: str = ""  # traceback, for the log


def _pad_reflect(arr: np.ndarray, pads: list[tuple[int, int]]) -> np.ndarray:
    if not any(a or b for a, b in pads):
        return arr
    # reflect needs more voxels than the pad; fall back to symmetric/edge on tiny axes
    if all(max(a, b) < n for (a, b), n in zip(pads, arr.shape, strict=True)):
        return np.pad(arr, pads, mode="reflect")
    if all(max(a, b) <= n for (a, b), n in zip(pads, arr.shape, strict=True)):
        return np.pad(arr, pads, mode="symmetric")
    return np.pad(arr, pads, mode="edge")


def run_model_on_array(module: Any, spec: Any, x: np.ndarray) -> np.ndarray:
    """Forward a normalized (C, z, y, x) float32 array; returns (C_out, z*s, y*s, x*s) float32.

    Pads the end of each spatial axis up to the model's size multiple and crops it back.
    2D models run with z as the batch axis.
    """
    import torch

    spatial = x.shape[1:]
    mult = spec.multiple
    extra = [(-n) % m for n, m in zip(spatial, mult, strict=True)]
    if any(extra):
        x = np.pad(
            x,
            [(0, 0)] + [(0, e) for e in extra],
            mode="reflect" if min(spatial) > max(extra) else "edge",
        )
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x))
        if spec.spatial_dims == 3:
            y = module(t[None])[0]
        else:
            y = module(t.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # (z, C, y, x) batches
        y = y.float().numpy()
    out = tuple(n * s for n, s in zip(spatial, spec.scale, strict=True))
    return y[(slice(None), *(slice(0, n) for n in out))]


def postprocess(y: np.ndarray, spec: Any) -> np.ndarray:
    """Labels: argmax over class logits (or threshold of one channel); images: float32."""
    if spec.kind == "labels":
        if y.shape[0] == 1:
            return (y[0] > spec.threshold).astype(spec.label_dtype)
        return np.argmax(y, axis=0).astype(spec.label_dtype)
    return (y[0] if y.shape[0] == 1 else y).astype(np.float32)


def process_block(job: BlockJob) -> BlockResult:
    """Read → normalize → model → crop → write one block; never raises (errors are returned)."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    blk = job.block
    t0 = time.perf_counter()
    t_read = t_compute = 0.0
    try:
        import torch

        from napari_emparsl.core.models.loaders import load_model
        from napari_emparsl.core.volume import Volume

        if torch.get_num_threads() != job.threads:
            torch.set_num_threads(max(1, job.threads))
        loaded = load_model(job.model, job.model_options)
        spec = loaded.spec
        src = Volume.open(job.input_root, job.input_key)
        region = blk.read_roi.to_slices()
        has_c = "c" in src.axes
        data = src.read(((slice(None),) if has_c else ()) + region)
        x = data.astype(np.float32, copy=False)
        if not has_c:
            x = x[None]
        x = _pad_reflect(x, [(0, 0), *list(zip(blk.pad_before, blk.pad_after, strict=True))])
        t_read = time.perf_counter() - t0

        t1 = time.perf_counter()
        x = (x - np.float32(job.norm[0])) / np.float32(job.norm[1])
        y = run_model_on_array(loaded.module, spec, x)
        # crop the halo (and the reflect padding) on the output grid
        start = [
            (w - (r - p)) * s
            for w, r, p, s in zip(
                blk.write_roi.begin, blk.read_roi.begin, blk.pad_before, spec.scale, strict=True
            )
        ]
        crop = tuple(slice(b, b + n) for b, n in zip(start, blk.out_write_roi.shape, strict=True))
        out = postprocess(y[(slice(None), *crop)], spec)
        t_compute = time.perf_counter() - t1

        t2 = time.perf_counter()
        dst = Volume.open(job.output_root, job.output_key)
        offset = blk.out_write_roi.begin
        if out.ndim == len(offset) + 1:
            offset = (0, *offset)
        dst.write(out, offset)
        t_write = time.perf_counter() - t2
        if spec.kind == "labels":
            hist = tuple(
                int(c) for c in np.bincount(out.ravel(), minlength=max(len(spec.classes), 2))
            )
        else:
            hist = tuple(int(c) for c in np.histogram(out, bins=16)[0])
        return BlockResult(
            blk.id, True, worker, t_read, t_compute, t_write,
            float(out.min()), float(out.max()), hist,
        )  # fmt: skip
    except BaseException as err:  # a block's failure is data for the coordinator, never a crash
        if isinstance(err, KeyboardInterrupt):
            raise
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        # TorchScript wraps the model's own error: its last line says what went wrong
        message = (lines[-1] if "TorchScript" in lines[0] else lines[0])[:300] if lines else ""
        return BlockResult(
            blk.id,
            False,
            worker,
            t_read,
            t_compute,
            error=f"{type(err).__name__}: {message}",
            detail=traceback.format_exc(limit=8),
        )
