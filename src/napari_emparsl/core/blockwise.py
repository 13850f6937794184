"""process_block: the one function sent to workers.

A worker reads its block's read ROI from the input N5, normalizes it with the run's global
statistics (per-block statistics would make seams), pads it (reflect at the volume edge when the
model's ``edge`` is ``reflect``, then up to its size multiple), runs the model, crops the halo /
maps the output scale, post-processes (argmax or threshold for labels), writes its chunk-aligned write ROI into the
output N5, and returns a small :class:`BlockResult`. No image data travels back through Parsl.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import Block, Roi

__all__ = [
    "BlockJob",
    "BlockResult",
    "keep_freed_memory",
    "process_batch",
    "process_block",
    "run_model_on_array",
    "run_model_on_batch",
    "warm_up",
    "worker_device",
]


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
    # the worker is a process of its own that only runs blocks: it keeps the memory it frees
    keep_memory: bool = False
    device: str = "cpu"  # the site's choice: cpu | cuda | auto (a GPU where torch sees one)
    # the input's write id (volume.WRITE_ID) when the run planned it: a block that finds it
    # changed read data written anew during the run (an import, a save), and fails
    input_written: str | None = None


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
    device: str = ""  # where the model ran: cpu, cuda:0, ...
    threads: int = 0  # torch's intra-op threads in the worker that computed it
    model_loads: int = 0  # models that worker's process has loaded from file so far
    # uint8 image outputs: voxels of the model's output outside its out_range (written as 0 or
    # 255), and the range of that output (min, max) where some were
    clipped: int = 0
    model_range: tuple[float, float] | None = None


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
    """Forward one normalized (C, z, y, x) float32 array; see :func:`run_model_on_batch`."""
    return run_model_on_batch(module, spec, [x])[0]


def _pad_end(x: np.ndarray, extra: Sequence[int]) -> np.ndarray:
    """Pad the end of each axis by ``extra``: mirrored where the axis is longer than that, else
    its edge value repeated."""
    for axis, e in enumerate(extra):
        if e:
            mode = "reflect" if x.shape[axis] > e else "edge"
            width = [(0, 0)] * x.ndim
            width[axis] = (0, e)
            x = np.pad(x, width, mode=mode)
    return x


def _one_tensor(out: Any) -> Any:
    """The model's output, which must be one tensor (not a tuple, list or dict of them)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    what = (
        f"a {type(out).__name__} of {len(out)}"
        if isinstance(out, (tuple, list, dict))
        else f"a {type(out).__name__}"
    )
    raise BlockOutputError(
        f"The model returned {what}, not one tensor; export it so that its forward returns the "
        "output tensor alone (e.g. a wrapper whose forward returns net(x)[0])."
    )


_SIZE_MISMATCH = ("Sizes of tensors must match", "must match the size of tensor")
_WRONG_DIMS = re.compile(r"Expected (\d)D \(unbatched\) or (\d)D \(batched\) input to conv(\d)d")
_WRONG_CHANNELS = re.compile(r"to have (\d+) channels, but got (\d+) channels instead")


def conv_dims(module: Any) -> int | None:
    """2 or 3: the dimensions of the model's convolutions (their weights' axes), where all of
    them have the same; else None."""
    kinds = {p.dim() for p in module.parameters() if p.dim() in (4, 5)}
    return kinds.pop() - 2 if len(kinds) == 1 else None


def _other_dims(module: Any, spec: Any, dims: int | None = None) -> ValueError | None:
    """The sentence for a model whose convolutions are not of the dimensions its description
    says (``spatial_dims``); None where they are, or cannot be told."""
    dims = conv_dims(module) or dims
    if dims is None or dims == spec.spatial_dims:
        return None
    return BlockOutputError(
        f"The model is a {dims}D model (its convolutions are conv{dims}d), but its "
        f"description says spatial_dims: {spec.spatial_dims}; set spatial_dims: {dims}."
    )


def _dims_hint(err: RuntimeError, module: Any, spec: Any) -> ValueError | None:
    """torch's refusals that mean the description is wrong, said so: a model of other
    dimensions (``spatial_dims``), a model given another number of channels (``in_channels``)."""
    m = _WRONG_DIMS.search(str(err))
    other = _other_dims(module, spec, int(m.group(3))) if m else None  # torch's own refusal
    if other is not None:
        return other
    m = _WRONG_CHANNELS.search(str(err))
    if m and int(m.group(2)) == spec.in_channels:
        return BlockOutputError(
            f"The model takes {m.group(1)} input channel(s), not the {spec.in_channels} its "
            f"description says; set in_channels: {m.group(1)} (and give it a volume with "
            f"{m.group(1)} channel(s))."
        )
    return None


def _size_hint(err: RuntimeError, size: Sequence[int], spec: Any) -> RuntimeError:
    """A U-Net given a size its poolings cannot halve fails deep inside (torch.cat of a skip
    connection): say what to set instead (the error itself stays the block's message)."""
    if not any(s in str(err) for s in _SIZE_MISMATCH):
        return err
    first = error_line(err).split(": ", 1)[-1].split(". ")[0][:110]  # its first sentence
    return RuntimeError(
        f"{first} — the model cannot take {'×'.join(map(str, size))} voxels (multiple "
        f"{list(spec.multiple)}): a U-Net needs sizes divisible by 2^depth; set multiple to "
        + (
            "that in y and x (multiple=1,4,4 for a 2D U-Net of depth 2, 1,16,16 for depth 4)."
            if spec.spatial_dims == 2
            else "that on each axis (multiple=4,4,4 for a U-Net of depth 2, 16,16,16 for depth 4)."
        )
    )


def run_model_on_batch(module: Any, spec: Any, xs: list[np.ndarray]) -> list[np.ndarray]:
    """Forward same-shaped normalized (C, z, y, x) float32 arrays in one call.

    Pads the end of each spatial axis up to the model's input size (``min_size``, ``multiple``)
    and crops it back; returns (C_out, z*s, y*s, x*s) float32 arrays, after the model's
    ``activation``. 3D models get the arrays as a batch; 2D models get every z slice of every
    array as one batch.
    """
    import torch

    spatial = xs[0].shape[1:]
    extra = [t - n for n, t in zip(spatial, spec.input_size(spatial), strict=True)]
    if any(extra):  # reflect where the axis is long enough, else repeat the edge (per axis:
        # a 2D model's z of one slice, never padded, chose "edge" for all of them before)
        xs = [_pad_end(x, [0, *extra]) for x in xs]
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # in the model's own float type: a float16 / bfloat16 model refused float32 input in every
    # block ("Input type (float) and bias type (c10::Half) should be the same")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
        t = t.to(device=device, dtype=dtype)  # (N, C, z, y, x)
        # a 3D model described as 2D may even take a batch of slices for one unbatched volume
        # without a word, if their counts agree: refused from its weights. (Not the other way:
        # a 3D model may run 2D convolutions slice by slice itself; a 2D model given 3D blocks
        # fails in torch, said below.)
        if spec.spatial_dims == 2 and conv_dims(module) == 3:
            raise _other_dims(module, spec)
        try:
            if spec.spatial_dims == 3:
                y = _one_tensor(module(t))
            else:
                n, c, z = t.shape[:3]
                flat = t.permute(0, 2, 1, 3, 4).reshape(n * z, c, *t.shape[3:])
                out = _one_tensor(module(flat))
                if out.ndim != 4 or out.shape[0] != n * z:  # a 3D model took the batch of
                    # slices for one unbatched volume (its reshape failed in every block)
                    raise (
                        _other_dims(module, spec) if conv_dims(module) == 3 else None
                    ) or BlockOutputError(
                        f"The model's output for a batch of {n * z} 2D slices "
                        f"({'×'.join(map(str, flat.shape))}) is "
                        f"{'×'.join(map(str, out.shape))}, not one 2D output per slice: is it a "
                        "3D model? Set spatial_dims: 3 in its description."
                    )
                y = out.reshape(n, z, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        except RuntimeError as err:
            raise _dims_hint(err, module, spec) or _size_hint(err, t.shape[2:], spec) from err
        if spec.activation == "sigmoid":
            y = torch.sigmoid(y)
        elif spec.activation == "softmax":
            y = torch.softmax(y, dim=1)
        y = y.float().cpu().contiguous().numpy()
    if y.ndim != 5 or y.shape[1] != spec.n_outputs:  # labels: an argmax would hide it
        got = f"{y.shape[1]} channel(s)" if y.ndim == 5 else f"an array of {y.ndim - 1} axes"
        said = (
            f"{len(spec.classes)} classes ({', '.join(spec.classes)})"
            if spec.kind == "labels" and spec.classes
            else f"{spec.out_channels} output channel(s)"
        )
        what = "classes" if spec.kind == "labels" and spec.classes else "out_channels"
        todo = f"set {what} to what the model produces"
        if spec.kind == "labels" and spec.classes and y.ndim == 5 and y.shape[1] == 1:
            # one class would be refused: one channel is thresholded, with no classes
            todo = (
                "a labels model of one channel is thresholded (threshold, 0.5 by default) "
                "into 0 and 1: remove its classes (classes= empty), or export one logit per class"
            )
        if spec.kind == "labels" and not spec.classes and y.ndim == 5 and y.shape[1] > 1:
            # a labels model described by nothing (no classes): as the panel asks, its classes
            todo = (
                f"name its {y.shape[1]} classes with classes (one name per channel, e.g. "
                f"classes={','.join(f'c{i}' for i in range(y.shape[1]))}), or set kind: image "
                f"and out_channels: {y.shape[1]} for an image model"
            )
        raise BlockOutputError(
            f"The model's output has {got} but its description says {said}; {todo}."
        )
    padded = [n + e for n, e in zip(spatial, extra, strict=True)]
    expected = [n * s for n, s in zip(padded, spec.scale, strict=True)]
    if list(y.shape[2:]) != expected:  # else the crop below would write a wrong-sized block
        got, given = "×".join(map(str, y.shape[2:])), "×".join(map(str, padded))
        smaller = all(g <= e for g, e in zip(y.shape[2:], expected, strict=True))
        # the scale it has (its output a few voxels short of input × scale on each axis):
        # shrinking, not scaling, is what is wrong
        scaled = all(
            round(g / p) == s for g, p, s in zip(y.shape[2:], padded, spec.scale, strict=True)
        )
        raise BlockOutputError(
            f"The model's output is {got} voxels for an input of {given}, but its scale "
            f"{list(spec.scale)} says {'×'.join(map(str, expected))}; "
            + (
                "emparsl needs an output of input × scale voxels: a model whose valid "
                "convolutions shrink its output needs 'same' padding to run here."
                if smaller and (scaled or all(s == 1 for s in spec.scale))
                else "set the scale (and halo, multiple) the model really has."
            )
        )
    out_shape = tuple(n * s for n, s in zip(spatial, spec.scale, strict=True))
    return [yi[(slice(None), *(slice(0, n) for n in out_shape))] for yi in y]


def _argmax0(y: np.ndarray) -> np.ndarray:
    """``np.argmax(y, axis=0)`` (first maximum wins), as a running maximum over whole planes.

    numpy's argmax over the first axis walks the array with a stride of one plane: 29 ms for 3
    classes of 128³, against ~6 ms for a few contiguous passes. Not for many channels or NaNs
    (a NaN is the maximum for numpy): those take numpy's own.
    """
    if y.shape[0] > 16 or y.dtype.kind != "f":
        return np.argmax(y, axis=0)
    best = y[0].copy()
    index = np.zeros(y.shape[1:], np.uint8)
    for c in range(1, y.shape[0]):
        higher = y[c] > best
        index[higher] = c
        np.maximum(best, y[c], out=best)
    if np.isnan(best).any():
        return np.argmax(y, axis=0)
    return index


def postprocess(y: np.ndarray, spec: Any) -> np.ndarray:
    """Labels: argmax over class logits (or threshold of one channel); images: float32, or
    uint8 with the model's ``out_range`` mapped to 0..255 (rounded, clipped)."""
    if spec.kind == "labels":
        if y.shape[0] == 1:
            return (y[0] > spec.threshold).astype(spec.label_dtype)
        return _argmax0(y).astype(spec.label_dtype, copy=False)
    y = y[0] if y.shape[0] == 1 else y
    if spec.out_dtype == "uint8":
        lo, hi = spec.out_range
        y = (y.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(255 / (hi - lo))
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return y.astype(np.float32)


class BlockOutputError(ValueError):
    """A block's model output that is not what its description says, or that cannot be
    written (NaN): emparsl's own sentence, shown without an exception type."""


class NoDevice(UserError, RuntimeError):
    """The site asks for a GPU where torch sees none (its sentence, shown without a type)."""


class BlockWriteError(UserError, OSError):
    """A block's write that met a full disk or a folder it may not write to, in a sentence."""


def error_line(err: BaseException) -> str:
    """``Type: message`` of an error, on one line (at most ~300 characters of message); the
    sentence alone for emparsl's own (a user's problem, said as such: "ValueError: The model's
    output holds …" showed a type that told nothing)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if isinstance(err, (UserError, BlockOutputError)) and lines:
        return lines[0]
    if lines and "TorchScript" in lines[0]:
        # TorchScript wraps the model's own error: its last line says what went wrong, and of
        # which type ("builtins.ValueError: …", "RuntimeError: …")
        last = lines[-1].removeprefix("builtins.")[:300]
        named = re.match(r"^[A-Za-z_.]*(Error|Exception|Warning): ", last)
        return last if named else f"{type(err).__name__}: {last}"
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _failure(blk_id: int, worker: str, err: BaseException, t_read: float = 0.0) -> BlockResult:
    return BlockResult(
        blk_id, False, worker, t_read,
        error=error_line(err),
        detail="".join(traceback.format_exception(err, limit=8))[-4000:],
    )  # fmt: skip


def _fill_far_edge(blk: Block, spec: Any, shape: Sequence[int]) -> Block:
    """With ``edge: none``, a block that ends at the volume's far edge reads more of the volume
    before it instead of being padded (mirrored) at that edge up to the model's input size: the
    model meets the edge as in one whole-volume forward, also where the block does not divide
    the volume. The read still begins on the model's pooling grid (a multiple of its size
    multiple), as the whole-volume forward's does; what that leaves short of the input size is
    padded at the far edge, as in the whole-volume forward."""
    begin, end = list(blk.read_roi.begin), blk.read_roi.end
    for i, (b, e, n) in enumerate(zip(begin, end, shape, strict=True)):
        if e == n:
            extra = spec.input_size_axis(i, e - b) - (e - b)
            step = spec.multiple[i]
            begin[i] = max(0, (b - extra) // step * step) if b % step == 0 else max(0, b - extra)
    if begin == list(blk.read_roi.begin):
        return blk
    return dataclasses.replace(blk, read_roi=Roi.from_bounds(begin, end))


def normalized(data: np.ndarray, subtract: float, divide: float) -> np.ndarray:
    """``(data - subtract) / divide`` as float32, as every block, training tile and exported
    test input is normalized. 32- and 64-bit integers and float64 are normalized in float64,
    then cast: cast first, values of a large offset lost their detail (float32 steps by 1 from
    1.7e7, by 256 at 3e9: a uint32 volume of 3e9 + 0..100 reached the model as one constant)."""
    if data.dtype.itemsize > 2 and data.dtype != np.float32:
        wide = data.astype(np.float64)  # in place from here: one float64 copy, not three
        wide -= subtract
        wide /= divide
        return wide.astype(np.float32)
    return (data.astype(np.float32, copy=False) - np.float32(subtract)) / np.float32(divide)


def _written_now(job: BlockJob) -> str | None:
    """The input's write id (volume.WRITE_ID) as its attributes.json says now: read directly,
    not by opening the volume again (~13× cheaper, a file read per block); one more try a
    moment later where the file was read as it was being rewritten."""
    from napari_emparsl.core.n5attrs import read_attrs
    from napari_emparsl.core.volume import WRITE_ID

    directory = os.path.join(job.input_root, job.input_key)
    try:
        return read_attrs(directory).get(WRITE_ID)
    except UserError:
        time.sleep(0.05)
        return read_attrs(directory).get(WRITE_ID)  # (still unreadable: its own sentence)


def _written_now_or_none(job: BlockJob) -> str | None:
    try:
        return _written_now(job)
    except UserError:  # gone or unreadable: not the writing planned with either
        return None


def _written_again(job: BlockJob) -> UserError:
    from napari_emparsl.core.paths import spec_text

    return UserError(
        f"The input {spec_text(job.input_root, job.input_key)} was written again during the run "
        "(an import or a save over it), so the blocks done before hold what it held then; once "
        "that writing has finished, run again with --overwrite."
    )


def _read_block(job: BlockJob, spec: Any = None) -> tuple[np.ndarray, Block]:
    """The block's input, normalized, and the block as read (see :func:`_fill_far_edge`)."""
    from napari_emparsl.core.volume import Volume

    blk = job.block
    try:
        src = Volume.open(job.input_root, job.input_key)
        has_c = "c" in src.axes
        if spec is not None and spec.edge == "none":
            blk = _fill_far_edge(blk, spec, src.shape[-blk.read_roi.ndim :])
        data = src.read(((slice(None),) if has_c else ()) + blk.read_roi.to_slices())
    except Exception:  # read as the input was being written anew: said so, not its symptom
        if job.input_written is not None and _written_now_or_none(job) != job.input_written:
            raise _written_again(job) from None
        raise
    # asked after the read: what was read is of the writing the run planned with (a block of
    # the input written anew meanwhile would mix two inputs into one output)
    if job.input_written is not None and _written_now(job) != job.input_written:
        raise _written_again(job)
    x = normalized(data, *job.norm)
    if not has_c:
        x = x[None]
    # (normalized before the padding, which an affine map commutes with: the same values)
    x = _pad_reflect(x, [(0, 0), *zip(blk.pad_before, blk.pad_after, strict=True)])
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(x).all():
        # NaN / infinite voxels (masked or padded float data) enter the model as 0 once
        # normalized (zscore: the volume's mean): otherwise they would spread through every
        # convolution of the block
        np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return x, blk


def _clipped(y: np.ndarray, spec: Any) -> tuple[int, tuple[float, float] | None]:
    """Voxels of an image model's output that a uint8 output clips (outside its out_range),
    and the output's range where there are any; (0, None) for other outputs."""
    if spec.kind != "image" or spec.out_dtype != "uint8":
        return 0, None
    lo, hi = spec.out_range
    low, high = float(y.min()), float(y.max())
    half = (hi - lo) / 510  # within half a step of the range: 0 or 255 all the same
    if low >= lo - half and high <= hi + half:
        return 0, None
    return int(np.count_nonzero((y < lo - half) | (y > hi + half))), (low, high)


def _write_block(
    job: BlockJob, spec: Any, y: np.ndarray, blk: Block
) -> tuple[np.ndarray, float, float, tuple[int, tuple[float, float] | None]]:
    """Crop the halo (and reflect padding) of ``blk`` (the block as read) on the output grid,
    post-process, write; also what a uint8 output clipped (:func:`_clipped`)."""
    from napari_emparsl.core.volume import Volume

    start = [
        (w - (r - p)) * s
        for w, r, p, s in zip(
            blk.write_roi.begin, blk.read_roi.begin, blk.pad_before, spec.scale, strict=True
        )
    ]
    crop = tuple(slice(b, b + n) for b, n in zip(start, blk.out_write_roi.shape, strict=True))
    t0 = time.perf_counter()
    y = y[(slice(None), *crop)]
    # one quick pass (~2 ms for 3 × 128³): NaN and ±inf carry through a sum; counted only then
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf: said below, not by numpy
        total = y.sum()
    bad = 0 if np.isfinite(total) else int(y.size - np.count_nonzero(np.isfinite(y)))
    if bad:
        raise BlockOutputError(
            f"The model's output holds {bad} NaN or infinite value(s) in this block, so it was "
            "not written; check the model (and its normalization) on this region."
        )
    clipped = _clipped(y, spec)
    out = postprocess(y, spec)
    t_post = time.perf_counter() - t0  # compute: the model's output made into the result
    t0 = time.perf_counter()
    dst = Volume.open(job.output_root, job.output_key)
    offset = blk.out_write_roi.begin
    if out.ndim == len(offset) + 1:
        offset = (0, *offset)
    try:
        dst.write(out, offset, sync=True)  # on disk before the ledger records the block done
        if dst.is_multiscale:  # the block's part of each coarser level (whole chunks, planned so)
            dst.write_levels(out, offset, labels=spec.kind == "labels", sync=True)
    except Exception as err:
        why = _why_write_failed(job.output_root, out.nbytes)
        if why is None:
            raise
        raise BlockWriteError(why) from err
    return out, t_post, time.perf_counter() - t0, clipped


def _why_write_failed(root: str, nbytes: int) -> str | None:
    """What a failed chunk write most likely met, in one sentence (z5 says only "failed to
    write chunk file"): a full disk or a folder it may not write to; None when neither."""
    import shutil

    from napari_emparsl.core.importer import human_size

    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free < nbytes:
        return (
            f"The disk holding {root} is full ({human_size(free)} free, the block needs up to "
            f"{human_size(nbytes)}), so the block was not written; free space there, then run "
            "again to compute the failed blocks."
        )
    if not os.access(root, os.W_OK):
        return (
            f"This worker may not write into {root} (its permissions), so the block was not "
            "written; make it writable for the user the workers run as, then run again."
        )
    return None


def _nonzero_range(hist: tuple[int, ...]) -> tuple[float, float]:
    """Smallest and largest label present, from the block's label counts (no pass over it)."""
    present = [i for i, c in enumerate(hist) if c]
    return (float(present[0]), float(present[-1])) if present else (0.0, 0.0)


_KEEPING_MEMORY = False


def keep_freed_memory() -> bool:
    """Make this process keep the memory it frees for its next block (glibc); True if done.

    A forward allocates its activations (hundreds of MB for a 128³ block) afresh. glibc serves
    allocations that big with ``mmap`` and unmaps them when freed, so every block paid the kernel
    again for fresh zeroed pages: a third of a 128³ block's time on a CPU (2.25 s -> 1.46 s per
    block, ``docs/development.md``). A worker process that only runs blocks keeps that memory
    instead (no ``mmap``, no trimming of the heap): its peak is the same, it just stays there
    until the worker ends. Not done in the coordinator nor in napari's process (the ``threads``
    site), whose freed memory should go back to the system.
    """
    global _KEEPING_MEMORY
    if _KEEPING_MEMORY:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator's default stays
        ok = False
    _KEEPING_MEMORY = ok
    return ok


def worker_device(request: str) -> str:
    """The torch device this worker runs models on, for the site's ``device`` setting.

    ``cpu``; ``cuda`` or ``auto`` with a GPU that torch sees: ``cuda:N``, the worker's rank in
    its Parsl pool modulo the GPUs it sees, so a node's workers share its GPUs out (in-process
    ``threads`` workers all take ``cuda:0``); ``auto`` without one: ``cpu``; ``cuda`` without one
    raises :class:`NoDevice` (the block fails with that sentence).
    """
    if request == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if request == "cuda":
            raise NoDevice(
                f"The site asks for a GPU (device: cuda), but torch on {socket.gethostname()} sees "
                "no CUDA device; set device: auto or cpu in the site profile, or run it where "
                "a GPU is."
            )
        return "cpu"
    rank = os.environ.get("PARSL_WORKER_RANK", "0")
    return f"cuda:{int(rank) % torch.cuda.device_count() if rank.isdigit() else 0}"


def warm_up(
    model: str,
    options: dict[str, Any],
    threads: int,
    keep_memory: bool = False,
    device: str = "cpu",
) -> str:
    """Load torch and the model into this worker before its first block; never raises."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if keep_memory:
        keep_freed_memory()
    try:
        import torch

        import napari_emparsl.core.volume  # noqa: F401  (z5py: the first read's imports)
        from napari_emparsl.core.models.loaders import load_model

        if torch.get_num_threads() != threads:
            torch.set_num_threads(max(1, threads))
        loaded = load_model(model, options, worker_device(device))
        spec = loaded.spec
        # one small forward: torch's kernels and thread pool are set up before the first block
        size = [m * max(1, 16 // m) for m in spec.multiple]
        if spec.spatial_dims == 2:
            size[0] = 1
        run_model_on_array(loaded.module, spec, np.zeros((spec.in_channels, *size), np.float32))
    except Exception:
        pass  # the blocks report it
    return worker


def process_block(job: BlockJob) -> BlockResult:
    """Read → normalize → model → crop → write one block; never raises (errors are returned)."""
    return process_batch([job])[0]


def process_batch(jobs: list[BlockJob]) -> list[BlockResult]:
    """Process several blocks with one model call per group of equal input shapes.

    Small blocks (2D slices, thin edge blocks) keep a CPU or GPU busier in one batched forward
    than in many small ones. Each block still gets its own result; one block's failure does not
    fail the others. Never raises.
    """
    worker = f"{socket.gethostname()}:{os.getpid()}"
    results: dict[int, BlockResult] = {}
    if jobs[0].keep_memory:
        keep_freed_memory()
    try:
        import torch

        from napari_emparsl.core.models.loaders import load_model, models_loaded

        first = jobs[0]
        if torch.get_num_threads() != first.threads:
            torch.set_num_threads(max(1, first.threads))
        device = worker_device(first.device)
        loaded = load_model(first.model, first.model_options, device)
        threads, loads = torch.get_num_threads(), models_loaded()
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            raise
        return [_failure(j.block.id, worker, err) for j in jobs]
    spec = loaded.spec
    inputs: dict[int, tuple[np.ndarray, float]] = {}
    as_read: dict[int, Block] = {}
    for job in jobs:
        t0 = time.perf_counter()
        try:
            x, as_read[job.block.id] = _read_block(job, spec)
            inputs[job.block.id] = (x, time.perf_counter() - t0)
        except Exception as err:
            results[job.block.id] = _failure(job.block.id, worker, err, time.perf_counter() - t0)
    groups: dict[tuple[int, ...], list[BlockJob]] = {}
    for job in jobs:
        if job.block.id in inputs:
            groups.setdefault(inputs[job.block.id][0].shape, []).append(job)
    for group in groups.values():
        t1 = time.perf_counter()
        try:
            ys = run_model_on_batch(loaded.module, spec, [inputs[j.block.id][0] for j in group])
        except Exception:
            # one bad block must not fail its neighbours: fall back to one call each
            ys = []
            for j in group:
                try:
                    ys.append(run_model_on_array(loaded.module, spec, inputs[j.block.id][0]))
                except Exception as err:
                    ys.append(err)
        t_compute = (time.perf_counter() - t1) / len(group)
        for job, y in zip(group, ys, strict=True):
            bid, t_read = job.block.id, inputs[job.block.id][1]
            if isinstance(y, Exception):
                results[bid] = _failure(bid, worker, y, t_read)
                continue
            try:
                out, t_post, t_write, (clipped, model_range) = _write_block(
                    job, spec, y, as_read[bid]
                )
            except Exception as err:
                results[bid] = _failure(bid, worker, err, t_read)
                continue
            t0 = time.perf_counter()  # the block's statistics count as writing its result
            if spec.kind == "labels":
                n = max(len(spec.classes), spec.n_outputs, 2)
                hist = tuple(int(c) for c in np.bincount(out.ravel(), minlength=n))
                lo, hi = _nonzero_range(hist)
            else:
                hist = tuple(int(c) for c in np.histogram(out, bins=16)[0])
                lo, hi = float(out.min()), float(out.max())
            t_write += time.perf_counter() - t0
            results[bid] = BlockResult(
                bid, True, worker, t_read, t_compute + t_post, t_write, lo, hi, hist,
                device=device, threads=threads, model_loads=loads, clipped=clipped,
                model_range=model_range,
            )  # fmt: skip
    return [results[j.block.id] for j in jobs]
