"""Run: plan → skip what the ledger marks done → submit to Parsl → events; retries, cancel.

The runner is the coordinator: it alone writes the output's ledger. It keeps a bounded window
of blocks in flight (a few per worker), so its memory stays flat however large the volume.
Parsl runs on the run's own DataFlowKernel (never the global ``parsl.load``), so several runs
and sites can live in one process (the napari GUI).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import posixpath
import queue
import shutil
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_emparsl import __version__
from napari_emparsl.core.blockwise import (
    BlockJob,
    BlockOutputError,
    BlockResult,
    process_batch,
    run_model_on_array,
    warm_up,
)
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.events import (
    BlockDone,
    BlockFailed,
    BlockStarted,
    Cancelled,
    Finished,
    Planned,
    RunEvent,
)
from napari_emparsl.core.geometry import (
    OPEN_END,
    Block,
    Roi,
    align_up,
    block_grid,
    check_no_shared_chunks,
    plan_blocks,
    size_text,
    size_values,
)
from napari_emparsl.core.ledger import Ledger, OutputLock, written_blocks
from napari_emparsl.core.models.loaders import (
    BUILTIN_MODELS,
    describe_model,
    file_hash,
    load_model,
    misnamed_description,
    missing_description,
    resolve_model,
    stated_keys,
)
from napari_emparsl.core.models.spec import ModelError, ModelSpec, resolution_mismatch
from napari_emparsl.core.n5attrs import (
    VolumeError,
    find_container_root,
    looks_like_labels,
    pyramid_levels,
    read_attrs,
)
from napari_emparsl.core.paths import spec_text
from napari_emparsl.core.volume import (
    UNFINISHED,
    Volume,
    finite_values,
    hidden_output,
    output_level_factors,
    parse_spec,
    stale_levels,
    suggest_output,
    volume_stats,
)
from napari_emparsl.execution.sites import (
    SiteProfile,
    load_site,
    machine_capacity,
    new_run_dir,
    python_app,
    start_kernel,
    task_error,
)

__all__ = ["Run", "RunError", "parse_roi"]


class RunError(UserError, ValueError):
    """A run that cannot start, said in one sentence."""


def _as_roi(roi: Any) -> Roi | None:
    """A region as the CLI text "z0:z1,y0:y1,x0:x1", a Roi, or (in a notebook) numpy-style
    slices or (start, stop) pairs, one per axis."""
    if roi is None or isinstance(roi, Roi):
        return roi
    if isinstance(roi, str):
        return parse_roi(roi)
    try:
        pairs = [
            (r.start or 0, r.stop) if isinstance(r, slice) and r.step in (None, 1) else tuple(r)
            for r in roi
        ]
        text = ",".join(f"{int(a)}:{'' if b is None else int(b)}" for a, b in pairs)
    except (TypeError, ValueError):
        raise RunError(
            "A region is z0:z1,y0:y1,x0:x1 (or numpy slices, or (start, stop) pairs, one per "
            f"axis), not {roi!r}."
        ) from None
    return parse_roi(text)


def parse_roi(text: str) -> Roi:
    """``"z0:z1,y0:y1,x0:x1"`` -> Roi; as in numpy, an empty start is 0 and an empty end (or a
    lone ``:``) the volume's end."""
    try:
        parts = [p.strip().split(":") for p in text.strip().strip("[]()").split(",")]
        begin = [int(a) if a.strip() else 0 for a, _ in parts]
        end = [int(b) if b.strip() else OPEN_END for _, b in parts]
    except ValueError:
        raise RunError(
            f"A region is z0:z1,y0:y1,x0:x1 (e.g. 0:64,100:300,: — an empty end is the volume's), "
            f"not {text!r}."
        ) from None
    if any(v < 0 for v in (*begin, *end)):  # numpy would count from the end: not taken as 0
        raise RunError(
            f"The region {text} has a negative bound; give positions counted from 0 (e.g. "
            "56:64 for the last 8 of 64 slices, or 56: to the end)."
        )
    if any(e <= b for b, e in zip(begin, end, strict=True)):
        raise RunError(f"The region {text} is empty; each end must be larger than its start.")
    return Roi.from_bounds(begin, end)


def _out_chunks(block: Sequence[int], scale: Sequence[int]) -> tuple[int, ...]:
    """Per axis, the largest divisor of block×scale that is at most 64, so that any block works
    on the output — or the whole block where that divisor is under 16 (a block of 67 voxels
    had chunks of 1: thousands of files per block). Blocks of one slice (2D models) have
    chunks of up to 512 in y and x, as many voxels as 64³ (1×64×64 were 16 KiB files)."""
    out = []
    flat = len(block) == 3 and block[0] * scale[0] == 1
    for axis, (b, s) in enumerate(zip(block, scale, strict=True)):
        n = b * s
        cap = 512 if flat and axis > 0 else 64
        best = max(d for d in range(1, min(cap, n) + 1) if n % d == 0)
        out.append(best if best >= min(16, n) else n)
    return tuple(out)


def _norm(volume: Volume, spec: ModelSpec) -> tuple[float, float]:
    """Global normalization (same for every block, so there are no seams)."""
    if spec.normalize == "none":
        return 0.0, 1.0
    if spec.normalize == "fixed":
        return spec.norm_values
    if spec.normalize == "zscore":
        mean, std = volume_stats(volume)
        return mean, std + spec.norm_eps if spec.norm_eps else std
    sample = finite_values(volume.sample(written_only=True))
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, list(spec.percentiles))
    span = float(hi - lo)
    if spec.norm_eps:  # a bioimage.io package's (high - low + eps), as it describes it
        return float(lo), span + spec.norm_eps
    if span <= 1e-6 * max(1.0, abs(float(lo))):  # nearly constant: 1e-6 made rare voxels 1e8
        span = float(sample.std()) or 1.0
    return float(lo), span


#: batch small blocks until a task reads about this many voxels
_BATCH_VOXELS = 2**18


def _own_halo_fits(spec: ModelSpec) -> bool:
    """Whether the model's own halo leaves voxels to write in its fixed input size (if any)."""
    return all(not n or n - 2 * h >= 1 for n, h in zip(spec.fixed, spec.halo, strict=True))


def _fixed_size_block(
    spec: ModelSpec,
    block: Sequence[int],
    halo: Sequence[int],
    spatial: Sequence[int],
    given: bool,
) -> tuple[int, ...]:
    """The block along the axes where the model takes one ``fixed`` input size n: n − 2 × halo
    (each read is then exactly n), unless ``given``; a given block, or a halo, with which a
    read would not be n (larger: the model cannot take it) is refused in one sentence."""
    fixed = spec.fixed
    if not any(fixed):
        return tuple(block)
    size = "×".join(str(n) if n else "any" for n in fixed)

    def fits(h: Sequence[int]) -> bool:
        return all(not n or n - 2 * v >= 1 for n, v in zip(fixed, h, strict=True))

    if not fits(halo):
        # the model's own where it fits, else a quarter of the size: blocks of half of it (at
        # just under half, the blocks were of 1 or 2 voxels: thousands of forwards)
        quarter = [n // 4 if n else v for n, v in zip(fixed, halo, strict=True)]
        good = spec.halo if fits(spec.halo) else quarter
        raise RunError(
            f"The model takes inputs of exactly {size} voxels (z×y×x), which leave no voxels to "
            f"write with a halo of {','.join(map(str, halo))} on each side; use a halo below "
            f"half of that size, e.g. --halo {','.join(map(str, good))}."
        )
    fit = tuple(n - 2 * h if n else b for n, h, b in zip(fixed, halo, block, strict=True))
    if not given:
        return fit
    reads, bad = [], False
    for n, b, h, s in zip(fixed, block, halo, spatial, strict=True):
        if b < s:  # several blocks along the axis: each reads b + 2 × halo
            read = b + 2 * h
            bad |= bool(n) and read != n
        else:  # one block over the whole axis (mirrored beyond its ends with edge reflect)
            read = s + (2 * h if spec.edge == "reflect" else 0)
            bad |= bool(n) and read > n
        reads.append(read)
    if bad:
        raise RunError(
            f"The model takes inputs of exactly {size} voxels (z×y×x), but blocks of "
            f"{','.join(map(str, block))} with a halo of {','.join(map(str, halo))} read "
            f"{'×'.join(map(str, reads))}; give blocks of that size less twice the halo, e.g. "
            f"--block {','.join(map(str, fit))} (or no block: that is the default)."
        )
    return tuple(block)


_HELD_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP held back (and handled right after) while a block is
    recorded done and counted: one arriving between the two made an interrupted run say one
    block fewer done than its ledger holds. Their handlers are swapped for one that notes the
    signal (the system's signal mask cannot do it: any other thread of the process takes a
    signal one thread blocks). In the main thread only, where Python handles signals; a signal
    ignored (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before: dict[int, Any] = {}
    for signum in _HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if handler in (signal.SIG_IGN, None):
            continue
        before[signum] = handler
        signal.signal(signum, lambda s, _frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        for signum in caught:  # as it would have been handled: now
            handler = before[signum]
            if callable(handler):
                handler(signum, None)
            else:  # the default: end the process as that signal does
                os.kill(os.getpid(), signum)


#: distinct block errors per run whose traceback goes to the log file (a wrong setting fails
#: every block the same way: one traceback says it)
_LOGGED_ERRORS = 20


def _log_traceback(output: str, block_id: int, result: BlockResult, logged: set[str]) -> None:
    """The traceback of a block's first failure with each distinct error, to the log file
    (``~/.cache/napari-emparsl/emparsl.log``): messages give the error's one line."""
    if not result.detail or result.error in logged or len(logged) >= _LOGGED_ERRORS:
        return
    logged.add(result.error)
    from napari_emparsl.core.paths import log_details

    log_details(f"block {block_id} of {output} failed on {result.worker}", result.detail)


def _path_text(value: Any, name: str, what: str) -> str:
    """``value`` as text (a ``pathlib.Path`` as its path); UserError for anything else."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        return value
    raise UserError(f"The {name} must be {what}, given as text or a path, not {value!r}.")


def _options_given(options: Any) -> dict[str, Any]:
    """Model options as given to :class:`Run`: a mapping, or the CLI's / panel's ``key=value``
    texts (a list of them, or one text of them separated by ``;``)."""
    from napari_emparsl.core.models.spec import parse_options

    if options is None:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    if isinstance(options, str):
        options = [item.strip() for item in options.split(";") if item.strip()]
    if isinstance(options, (list, tuple)) and all(isinstance(o, str) for o in options):
        return parse_options(list(options))
    raise UserError(
        f"The model options must be a dict such as {{'halo': 8}} (or 'key=value' texts), not "
        f"{options!r}."
    )


def _auto_batch(block: Sequence[int], halo: Sequence[int], shape: Sequence[int]) -> int:
    """Blocks per task: several small blocks (2D slices, small tiles) share one forward call.
    Sized by what a whole block reads with the run's halo (the model's own, or --halo's: with
    the model's, a run's larger halo made batches of ~8× the voxels meant for one forward; one
    block of the plan could be one cut short at the volume's edge, which reads less)."""
    read = math.prod(min(b, n) + 2 * h for b, h, n in zip(block, halo, shape, strict=True))
    return max(1, min(16, _BATCH_VOXELS // max(1, read)))


_NOT_BEGUN = "not begun: the run was cancelled"


_TRIAL_VOXELS = 2 * 64**3  # the largest input tried on zeros before planning (1×512×512 2D)
#: loaded models (weakly: the loader's cache lets go of old ones) and the descriptions with
#: which each passed the trial
_TRIED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _try_on_zeros(module: Any, spec: ModelSpec) -> None:
    """Refuse, before any block, a model whose output does not fit its description (channels
    or classes, scale, 2D or 3D, one tensor): a small input of zeros shows it in milliseconds.
    Before, every block failed with the same sentence, each retried, through the whole run.
    A model that fails on zeros of this size for another reason is left to its blocks (a U-Net
    may need more voxels than this trial gives it)."""
    size = [m * max(1, 16 // m) for m in spec.multiple]
    if spec.spatial_dims == 2:
        size[0] = 1
    key = repr(sorted(spec.to_dict().items()))
    if key in _TRIED.get(module, ()):  # once per loaded model and description (a preview's
        return  # 0.1–0.2 s in napari)
    shape = spec.input_size(size)
    if math.prod(shape) > _TRIAL_VOXELS:  # a model of a fixed, large size: a forward of seconds
        return  # and gigabytes in the coordinator (napari's process): left to its blocks
    x = np.zeros((spec.in_channels, *shape), np.float32)
    try:
        run_model_on_array(module, spec, x)
    except BlockOutputError as err:  # our own sentences: what the model gave, what to set
        raise RunError(str(err)) from None
    except Exception:  # its blocks will say why, with the real size of a block
        pass
    _TRIED.setdefault(module, set()).add(key)


def _undescribed(model: str, options: Mapping[str, Any], spec: ModelSpec) -> str | None:
    """A warning for a model file run with defaults its sidecar should have given (kind, halo,
    classes): without one it ran silently as a labels model with no halo — seams — also where
    its description lay beside it under another name. None for built-in models, packages and
    described files."""
    from napari_emparsl.core.models.bioimageio import find_package

    path = resolve_model(model)
    if model in BUILTIN_MODELS or not os.path.isfile(path) or find_package(path) is not None:
        return None
    missing = [k for k in missing_description(model, options) if k != "architecture"]
    if not missing:
        return None
    name, sidecar = os.path.basename(path), os.path.basename(path) + ".yaml"
    keys = ", ".join(missing)
    aside = misnamed_description(model)
    if aside:
        head = (
            f"The model {name} has no description of its {keys} ({aside} beside it is not "
            f"read: a model's description is named {sidecar})"
        )
    elif not any(os.path.isfile(path + ext) for ext in (".yaml", ".yml")):
        head = f"The model {name} has no description of its {keys} (no {sidecar} beside it)"
    else:
        head = f"The description of the model {name} does not give its {keys}"
    runs = []
    if "kind" in missing:
        runs.append(f"as a {spec.kind} model")
    if "halo" in missing:
        runs.append(
            "with no halo (blocks may differ from one whole-volume forward near their edges)"
        )
    return (
        f"{head}, so it runs {' and '.join(runs) or 'with defaults'}; describe it in {sidecar} "
        f"(`emparsl describe-model {model}` prints a description to edit) or with --model-option."
    )


def _id_range(blocks: Sequence[Block]) -> str:
    ids = sorted(b.id for b in blocks)
    return "none" if not ids else f"{ids[0]}–{ids[-1]}" if len(ids) > 1 else str(ids[0])


def _whole(value: Any) -> bool:
    """A whole number (not a bool, a float or a string of one)."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _CancelledWhilePreparing(Exception):
    """Cancel came before the plan was made: the run ends before it changes anything."""


class _SiteStarter:
    """Starts a site's DataFlowKernel in the background, and warms its workers up.

    Starting HTEX workers and loading torch and the model in each takes seconds; done while the
    coordinator loads the model and measures the volume's statistics, the first blocks start
    sooner. Warm-up failures are ignored: the blocks themselves report the model's errors.
    """

    def __init__(self, profile: SiteProfile, model: str, options: Mapping[str, Any]) -> None:
        self.profile = profile
        self.run_dir = new_run_dir()
        self._dfk = None
        self._error: BaseException | None = None
        # waited on instead of the thread's join(): a join interrupted by Ctrl-C or SIGTERM (in
        # the run's dfk()) marks the thread ended in Python 3.11 while it still runs (CPython's
        # bpo-45274 handling), and close() then removed the run folder under the starting
        # interchange, which printed a traceback after the run's last line or lived on
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._start, args=(model, dict(options)), name="emparsl-site-start", daemon=True
        )
        self._thread.start()

    def _start(self, model: str, options: dict[str, Any]) -> None:
        try:
            self._dfk = start_kernel(self.profile, self.run_dir)
            if self.profile.kind != "threads":  # threads share the coordinator's loaded model
                warm = python_app(warm_up, self._dfk, self.profile)
                for _ in range(self.profile.worker_count):
                    warm(
                        model,
                        options,
                        self.profile.worker_threads,
                        self.profile.workers_keep_memory,
                        self.profile.device,
                    )
        except BaseException as err:  # raised in the run's thread by dfk()
            self._error = err
        finally:
            self._started.set()

    def dfk(self):
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self._dfk

    def close(self) -> None:
        self._started.wait()  # the site up (or failed): then it can be shut down
        if self._dfk is not None:
            self._dfk.cleanup()
            self._dfk = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


@dataclass
class _Plan:
    blocks: list[Block]
    done_before: set[int]
    spec: ModelSpec
    norm: tuple[float, float]
    out_voxels: dict[int, int]
    levels: int = 1


def _overlap(a: str, b: str) -> bool:
    """Keys of one container where one is, holds or lies inside the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _check_input_written(src: Volume, blocks: Sequence[Block]) -> None:
    """Refuse an input that is a run's output (or one of its levels) whose blocks are not all
    written where this run reads: unwritten chunks read as zeros, and the chained run would
    compute — and mark done — blocks of nothing. A region inside what is done may run."""
    written = written_blocks(src.root, src.key) if blocks else None
    if written is None:
        return
    lo = np.min([blk.read_roi.begin for blk in blocks], axis=0)
    hi = np.max([blk.read_roi.end for blk in blocks], axis=0)
    missing, total = written.missing(lo, hi)
    if missing:
        raise RunError(
            f"The input {spec_text(src.root, src.key)} is the output of a run that is not finished: "
            f"{missing} of the {total} blocks this run reads are not written yet (they would "
            f"read as zeros); finish that run first (see `emparsl status {src.root}:"
            f"{written.key}`), or choose a region inside what it has done."
        )


# description keys that change nothing a block writes: a resume may differ in them (the
# preferred block: the run's own block is compared, a 2D model's default changed to 1×512×512;
# class colours added to a model's description since)
_NOT_IN_OUTPUT = ("voxel_size", "block", "colors")


class _Clipping:
    """What a uint8 image output clipped over a run's blocks (its model's values outside
    ``out_range``, written as 0 or 255): said when the run finishes, where it is more than 1 %
    of what was written (the default out_range [0, 1] clipped 71 % of a restoration model's
    output without a word)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec, self.clipped, self.written = spec, 0, 0
        self.low, self.high = math.inf, -math.inf

    def add(self, result: BlockResult, voxels: int) -> None:
        self.written += voxels * (self.spec.out_channels if self.spec.kind == "image" else 1)
        if result.clipped and result.model_range is not None:
            self.clipped += result.clipped
            self.low = min(self.low, result.model_range[0])
            self.high = max(self.high, result.model_range[1])

    def warnings(self) -> tuple[str, ...]:
        if not self.written or self.clipped <= 0.01 * self.written:
            return ()
        lo, hi = self.spec.out_range
        share = 100 * self.clipped / self.written
        # blocks that clipped nothing lay within [lo, hi]: the output's range is at most this
        low, high = min(self.low, lo), max(self.high, hi)
        # a range to give, rounded outwards (rounded to the nearest, it could clip again)
        step = 10 ** (math.floor(math.log10(max(high - low, 1e-30))) - 1)
        wide = (math.floor(low / step) * step, math.ceil(high / step) * step)
        return (
            f"{share:.1f} % of the values written lay outside out_range [{lo:g}, {hi:g}] (the "
            f"blocks that clipped gave {self.low:.3g} to {self.high:.3g}) and were written as 0 "
            "or 255; set out_range to "
            f"the range of the model's output (e.g. --model-option out_range={wide[0]:g},"
            f"{wide[1]:g}) and write it again with --overwrite.",
        )


def _changes(last: Mapping[str, Any], src: Volume, spec: ModelSpec, block, halo) -> list[str]:
    """What differs between an output's last run and this one, in words ("block 64×64×64,
    not 32×32×32"); empty when this run may resume it."""

    def size(v: Any) -> str:  # sizes as 64×64×64; ranges as [-1, 1]; the rest as they read
        if isinstance(v, list | tuple) and v and all(isinstance(x, int) for x in v):
            return "×".join(map(str, v))
        if isinstance(v, list | tuple):
            return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v).join("[]")
        return str(v)

    changed = []
    if last.get("input") != f"{src.root}:{src.key}":
        was = str(last.get("input"))
        changed.append(f"the input {was.removesuffix(':')}, not {spec_text(src.root, src.key)}")
    # a key the output's run did not know of (an older version) had its default value then
    old = ModelSpec().to_dict() | (last.get("spec") or {})
    new = spec.to_dict()
    keys = [
        k
        for k in dict.fromkeys([*new, *old])
        if old.get(k) != new.get(k) and k not in _NOT_IN_OUTPUT
    ]
    if keys:
        changed.append(
            "a model description with "
            + ", ".join(f"{k}: {size(old.get(k))}, not {size(new.get(k))}" for k in keys)
        )
    for what, now in (("block", block), ("halo", halo)):
        said = what in keys and (size(old.get(what)), size(new.get(what))) == (
            size(last.get(what)),
            size(now),
        )  # the description's change already says it
        if last.get(what) != list(now) and not said:
            changed.append(f"{what} {size(last.get(what))}, not {size(now)}")
    return changed


def _model_changed(last: Mapping[str, Any], name: str, model_file: str, sha256: str) -> list[str]:
    """Another model than the output's last run's, in words; none for the same file changed
    (a fix: resuming with it is how failed blocks are computed again) or the same weights found
    elsewhere (a package installed anew)."""
    was_file, was_sha = last.get("model_file"), last.get("model_sha256")
    if not was_file or not was_sha or was_sha == sha256:
        return []
    if os.path.realpath(str(was_file)) == os.path.realpath(model_file):
        return []
    return [f"the model {last.get('model')}, not {name}"]


def _refuse_missing_folder(root: str, output: str) -> None:
    """The output's container is made in a folder that is there: a mistyped folder
    (``/data/projcet/out.n5``) was made, with every folder above it, without a word. The
    folder of suggested outputs (``~/emparsl-predictions``) is made as needed."""
    parent = os.path.dirname(os.path.abspath(root))
    suggested = os.path.join(os.path.expanduser("~"), "emparsl-predictions")
    if os.path.isdir(parent) or parent.startswith(suggested + os.sep) or parent == suggested:
        return
    there = parent
    while not os.path.isdir(there) and os.path.dirname(there) != there:
        if os.path.exists(there):  # a file where a folder of the path should be
            raise RunError(
                f"{there} is a file, not a folder, so the output {output} cannot be made "
                "there; choose an output path in a folder."
            )
        there = os.path.dirname(there)
    if not os.access(there, os.W_OK):  # nothing can be made there: said as such when made
        return
    raise RunError(
        f"The folder {parent} does not exist, so the output {output} cannot be made there; "
        "create the folder first, or check the path."
    )


def _refuse_output_over_input(output: str, key: str, src: Volume) -> None:
    """The output must not be, hold or lie inside the input, nor inside the input's pyramid
    when the input is one level of it (data.n5:raw/s0 is part of data.n5:raw)."""
    group = src.key
    parent = posixpath.dirname(src.key)
    if parent:
        directory = os.path.join(src.root, parent)
        if posixpath.basename(src.key) in pyramid_levels(directory, read_attrs(directory)):
            group = parent
    if key == src.key:
        raise RunError(f"The output {output} is the input; choose another dataset name.")
    if src.key.startswith(key + "/"):
        raise RunError(
            f"The output {output} holds the input ({src.key}); choose another dataset name."
        )
    if _overlap(key, group):
        what = "pyramid" if group != src.key or len(src.levels) > 1 else "dataset"
        raise RunError(
            f"The output {output} lies inside the input's {what} {group}; choose a dataset name "
            "outside it."
        )


class Run:
    """One inference run from an N5 input to an N5 output.

    Parameters mirror ``emparsl run``. Iterate :meth:`events` (or call :meth:`execute`) to run;
    :meth:`cancel` from another thread stops it cleanly. ``block_ids`` restricts the run to
    those blocks of its plan (the run panel's Retry failed: only the failed ones).
    """

    def __init__(
        self,
        input: str,
        model: str,
        output: str | None = None,
        *,
        site: str | SiteProfile = "local",
        roi: Roi | str | None = None,
        block: Sequence[int] | str | None = None,
        halo: Sequence[int] | str | None = None,
        model_options: Mapping[str, Any] | str | Sequence[str] | None = None,
        overwrite: bool = False,
        retries: int = 2,
        in_flight_per_worker: int = 2,
        batch: int | None = None,
        block_ids: Iterable[int] | None = None,
    ):
        # what a notebook may pass that is none of these: one sentence, not a TypeError
        input = _path_text(input, "input", "a volume, as DATA.n5:DATASET")
        model = _path_text(model, "model", "a built-in model's name or a model file's path")
        if output is not None:
            output = _path_text(output, "output", "a dataset to write, as OUT.n5:DATASET")
        if not isinstance(site, SiteProfile):
            site = _path_text(site, "site", "a site's name (local, threads) or a profile's path")
        model_options = _options_given(model_options)
        self.input_root, self.input_key = parse_spec(input)
        # no output: suggested from the input once it is open (predictions/<name> beside it)
        self._suggest_output = output is None
        self.output_root, self.output_key = parse_spec(output) if output is not None else ("", "")
        root, sub = find_container_root(self.output_root) if self.output_root else ("", "")
        if sub:  # a folder inside a container (data.n5/raw:pred): the key is from the root
            self.output_root = root
            self.output_key = "/".join(p for p in (sub, self.output_key) if p)
        self.model = model  # (a notebook's pathlib.Path as its text: the ledger records JSON)
        self.model_options = model_options
        self.site = site
        self.roi = _as_roi(roi)
        # as the CLI takes them ("16,32,32", "64": read in prepare), (z, y, x), or one number
        # for every axis (64, as "64"; it was a TypeError)
        block, halo = (str(v) if _whole(v) else v for v in (block, halo))
        self.block = tuple(block) if block is not None and not isinstance(block, str) else block
        self.halo = tuple(halo) if halo is not None and not isinstance(halo, str) else halo
        self.overwrite = overwrite
        # (retries: checked with the plan, as the CLI's)
        for name, value, least, optional in (("in_flight_per_worker", in_flight_per_worker, 1, False),
                                             ("batch", batch, 1, True)):  # fmt: skip
            if (value is not None or not optional) and (not _whole(value) or value < least):
                raise UserError(f"{name} must be a whole number ≥ {least} (got {value!r}).")
        self.retries = retries
        self.in_flight_per_worker = in_flight_per_worker
        self.batch = batch  # blocks per task; None: by block size (_auto_batch)
        # only these blocks of the plan (the panel's Retry failed); None: every block
        if block_ids is not None:
            if isinstance(block_ids, (str, bytes)) or not isinstance(block_ids, Iterable):
                raise UserError(
                    f"block_ids must be a list of block ids (got {block_ids!r}); None runs "
                    "every block."
                )
            ids = list(block_ids)  # read once: a generator is used up by reading it
            if not all(_whole(i) and i >= 0 for i in ids):
                raise UserError(f"block_ids must be block ids, whole numbers ≥ 0 (got {ids!r}).")
        self.block_ids = frozenset(ids) if block_ids is not None else None
        self._cancel = threading.Event()
        self._src: Volume | None = None
        self._provenance: dict[str, Any] | None = None
        self._done_ids: set[int] = set()  # of the whole output, this run's blocks included
        self._resumed_summary: Any = None  # the output's ledger as read to resume it
        self.blocks: dict[int, Block] = {}  # the plan's, once planned: where each block writes
        self._lock: OutputLock | None = None
        self.callbacks: list[Callable[[RunEvent], None]] = []
        self.warnings: tuple[str, ...] = ()  # what the run notes before it starts (Planned)

    # ------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop submitting; running blocks are abandoned and the executor is shut down."""
        self._cancel.set()

    def done_in_plan(self) -> int:
        """Blocks of this run's plan recorded done (earlier runs' and this one's): what a resume
        skips, counted without reading the ledger again (the coordinator records each block
        before its event)."""
        return len(self._done_ids & set(self.blocks)) if self.blocks else 0

    def blocks_left(self) -> int | None:
        """Blocks of the whole volume's plan (not only this run's region) not done yet, from
        the ledger read at planning and this run's results; None before the run has planned."""
        if self._src is None or self._provenance is None:
            return None
        shape = self._src.spatial_shape
        total = math.prod(block_grid(shape, self._provenance["block"]))
        return total - len(self._done_ids)

    @property
    def output(self) -> str:
        return f"{self.output_root}:{self.output_key}"

    def prepare(self, on_checked: Callable[[], None] | None = None) -> _Plan:
        """Validate everything, create or reopen the output, plan; nothing is computed.

        ``on_checked`` is called once the cheap checks (site, input, model description) passed,
        before the slower ones (loading the model, the volume's statistics).
        """
        self.warnings = ()
        if not isinstance(self.retries, int) or self.retries < 0:
            raise RunError(f"Retries are a count of 0 or more, not {self.retries!r}.")
        for name, least in (("block", 1), ("halo", 0)):
            value = getattr(self, name)
            if isinstance(value, str):  # as typed on the command line: "16,32,32", "64"
                try:
                    sizes = size_values(value)
                except ValueError:
                    sizes = []
                if len(sizes) in (1, 3):
                    value = tuple(sizes * 3 if len(sizes) == 1 else sizes)
                    setattr(self, name, value)
            if value is not None and (
                isinstance(value, str)
                or len(value) != 3
                or not all(isinstance(v, numbers.Integral) and v >= least for v in value)
            ):
                shown = repr(value) if isinstance(value, str) else tuple(value)
                raise RunError(
                    f"The {name} is three whole numbers z,y,x of at least {least}, not {shown}."
                )
        if not self.output_key and not self._suggest_output:
            given = f", not {self.output_root}" if self.output_root.strip(" :") else " (none given)"
            raise RunError(f"Give the output as OUT.n5:DATASET{given}.")
        self.profile = self.site if isinstance(self.site, SiteProfile) else load_site(self.site)
        src = Volume.open(self.input_root, self.input_key)
        given_key, self.input_key = self.input_key, src.key
        if self._suggest_output:
            self.output_root, self.output_key = parse_spec(suggest_output(src.root, src.key))
        if UNFINISHED in src.attrs:
            raise RunError(
                f"The input {spec_text(src.root, src.key)} is {src.attrs[UNFINISHED]} (it is still being "
                "written, or its writer was stopped, so parts of it are missing); wait for it to "
                "finish, or write it again, e.g. with `emparsl import … --overwrite`."
            )
        if not all(src.shape):
            raise RunError(
                f"The input {spec_text(src.root, src.key)} has no voxels (its size is {'×'.join(map(str, src.shape))}); "
                "choose a dataset with data."
            )
        _refuse_missing_folder(self.output_root, self.output)
        if os.path.realpath(src.root) == os.path.realpath(self.output_root):
            _refuse_output_over_input(self.output, self.output_key, src)
        hidden = hidden_output(self.output_root, self.output_key)
        if hidden:  # it would be written, and then neither listed nor opened
            instead = suggest_output(self.output_root, src.key)  # in the container asked for
            if hidden_output(*parse_spec(instead)) or instead == self.output:
                instead = suggest_output(self.output_root, "")  # beside the container
            raise RunError(
                f"The output {self.output} would lie inside {hidden}; choose a name outside it, "
                f"e.g. {instead}."
            )
        stale = stale_levels(self.output_root, self.output_key)
        if stale:  # its pyramid's other levels would show the old data
            raise RunError(
                f"The output {stale}; choose another output name, e.g. "
                f"{suggest_output(self.output_root, src.key)}."
            )
        spec = describe_model(self.model, self.model_options)
        if "c" in src.axes and src.axes[0] != "c":  # Fiji's hyperstacks: z, c, y, x
            raise RunError(
                f"The input {spec_text(src.root, src.key)} has its channel axis between its others (axes "
                f"{', '.join(src.axes)}); emparsl runs on channels first (c, z, y, x): save it so "
                "(e.g. with numpy's moveaxis and z5py) and run on that."
            )
        channels = src.shape[src.axes.index("c")] if "c" in src.axes else 1
        if channels != spec.in_channels:
            raise RunError(
                f"The model expects {spec.in_channels} input channel(s) but {spec_text(src.root, src.key)} has "
                f"{channels}; choose a model made for {channels}-channel volumes, or a dataset "
                f"with {spec.in_channels} (if the model's description is wrong, correct "
                "in_channels there)."
            )
        spatial = src.spatial_shape
        if len(spatial) != 3:
            hint = (
                " (a 2D image is a volume of one slice: save it as a TIFF and `emparsl import` "
                "it, which writes it as 1×Y×X)"
                if len(spatial) == 2
                else ""
            )
            what = (
                f"{len(spatial)} spatial axes"
                if set(src.axes) <= {"z", "y", "x", "c"}
                else f"{len(src.shape)} axes ({', '.join(src.axes)})"  # a time axis, or unnamed
            )
            raise RunError(
                f"The input {spec_text(src.root, src.key)} has {what}; emparsl runs on 3D volumes (z, y, "
                f"x, and at most one channel axis){hint}."
            )
        undescribed = _undescribed(self.model, self.model_options, spec)
        if undescribed:
            self.warnings += (undescribed,)
        stated = stated_keys(self.model, self.model_options)
        self.warnings += tuple(f"The model's {said}" for said in spec.unused(stated))
        note = resolution_mismatch(spec, src.voxel_size, src.unit)
        if note:
            name = self.model if self.model in BUILTIN_MODELS else os.path.basename(self.model)
            self.warnings += (
                f"The model {name} was {note} ({spec_text(src.root, src.key)}): expect poorer results; "
                "resample the volume to about the model's voxel size, or use a model trained "
                "on data like it.",
            )
        if looks_like_labels(src.key, src.attrs, str(src.dtype)):  # a typo, or a group's only
            # dataset (my.n5:labels opens labels/sparse): the model would run on label ids
            opened = f" (opened for {self.input_root}:{given_key})" if (
                given_key.strip("/") != src.key.strip("/")
            ) else ""  # fmt: skip
            self.warnings += (
                f"The input {spec_text(src.root, src.key)}{opened} looks like a label volume "
                f"({src.dtype}), not an image: check the input, the model runs on what it is "
                "given.",
            )
        if self.roi is not None and self.roi.ndim == 3 and max(self.roi.end) >= OPEN_END:
            self.roi = Roi.from_bounds(  # "z0:" ends where the volume does
                self.roi.begin,
                [
                    n if e >= OPEN_END and b < n else e
                    for b, e, n in zip(self.roi.begin, self.roi.end, spatial, strict=True)
                ],
            )
        if self.roi is not None and self.roi.ndim == 3:
            ends = [min(e, n) for e, n in zip(self.roi.end, spatial, strict=True)]
            begins = self.roi.begin
            if list(ends) != list(self.roi.end) and all(
                b < e for b, e in zip(begins, ends, strict=True)
            ):  # partly outside (wholly outside is refused when planning)
                clipped = Roi.from_bounds(begins, ends)
                self.warnings += (
                    f"The region {self.roi} reaches beyond the volume "
                    f"({'×'.join(map(str, spatial))}); it was cut to {clipped}.",
                )
                self.roi = clipped
        if self._cancel.is_set():
            raise _CancelledWhilePreparing
        if on_checked is not None:  # the cheap checks passed: the site may start meanwhile
            on_checked()
        # a model file is loaded here to fail clearly, not in every worker. A built-in model as
        # shipped (no options that could change its architecture) loads (tests): on a site of
        # worker processes the coordinator then needs no torch, whose import (seconds of CPU)
        # would slow the starting workers
        builtin = self.model in BUILTIN_MODELS and not self.model_options
        if self.profile.kind != "threads" and builtin:
            path = resolve_model(self.model)
            model_file, model_sha256 = path, file_hash(path)
        else:
            loaded = load_model(self.model, self.model_options)
            _try_on_zeros(loaded.module, loaded.spec)
            # the file given (a model cached from another file with the same weights has that
            # file's path)
            model_file, model_sha256 = os.path.abspath(resolve_model(self.model)), loaded.sha256
        resumed = self._resumed() if self.block is None or self.halo is None else {}
        block = self.block or resumed.get("block") or spec.block
        halo = self.halo or resumed.get("halo") or spec.halo
        if spec.spatial_dims == 2:
            if self.block is not None and block[0] != 1:  # was changed without a word
                self.warnings += (
                    f"The model is a 2D model, which computes one slice at a time: the block "
                    f"{size_text(block)} is {size_text((1, *block[1:]))}.",
                )
            if self.halo is not None and halo[0] != 0:  # likewise: no context across slices
                self.warnings += (
                    f"The model is a 2D model, which takes no context from the slices above and "
                    f"below: the halo {size_text(halo)} is {size_text((0, *halo[1:]))}.",
                )
            block, halo = (1, *block[1:]), (0, *halo[1:])
        # every read begins on the model's pooling grid (its size multiple), as in one
        # whole-volume forward: a given halo is rounded up (more context), a given block that
        # is off the grid is refused when planning (the model's default is rounded up)
        if self.block is None:
            block = align_up(block, spec.multiple)
        aligned = align_up(halo, spec.multiple)
        context = tuple(spec.halo if spec.spatial_dims == 3 else (0, *spec.halo[1:]))
        short = any(h < c for h, c in zip(aligned, context, strict=True))
        if self.halo is not None and (aligned != tuple(halo) or short):
            said = size_text(aligned)
            if aligned != tuple(halo):
                what = (
                    f"The halo {size_text(halo)} was rounded up to {said} (a multiple of the "
                    f"model's size multiple {size_text(spec.multiple)})"
                )
                what += ", still" if short else ""
            else:
                what = f"The halo {said} is"
            self.warnings += (
                f"{what}, so that blocks compute what one whole-volume forward computes (no seams)."
                if not short
                else f"{what} smaller than the context the model declares "
                f"({size_text(context)}): blocks may differ slightly from one whole-volume "
                "forward near their edges (faster, not exact); "
                + (
                    "leave the halo out for an exact result."
                    if _own_halo_fits(spec)
                    else "its fixed input size leaves no room for that whole context."
                ),
            )
        halo = aligned
        block = _fixed_size_block(spec, block, halo, spatial, given=self.block is not None)
        block = tuple(min(b, n) for b, n in zip(block, spatial, strict=True))
        out_shape = tuple(n * s for n, s in zip(spatial, spec.scale, strict=True))
        # from here until the run ends, no other run may look at or write this output
        self._lock = OutputLock(self.output_root, self.output_key)
        self._lock.acquire()
        try:
            return self._plan(src, spec, spatial, block, halo, out_shape, model_file, model_sha256)
        except BaseException:
            self.release(failed=True)
            raise

    def _resumed(self) -> dict[str, tuple[int, int, int]]:
        """The block and halo of the output's last run where it is resumed (those not given
        here): the same command resumes it also after the model's default changed (a 2D
        model's block, 1×64×64 in earlier versions, is 1×512×512 now). One read of the
        ledger's last run record."""
        if self.overwrite or not self.output_root:
            return {}
        last = Ledger(self.output_root, self.output_key).last_run_record()
        try:  # the same model file (changed or not): another model's defaults are its own
            if last.get("model_file") != os.path.abspath(resolve_model(self.model)):
                return {}
        except UserError:
            return {}
        out = {}
        for what, least in (("block", 1), ("halo", 0)):
            value = last.get(what)
            if (
                isinstance(value, list)
                and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and min(value) >= least
            ):
                out[what] = tuple(value)
        return out

    def release(self, failed: bool = False) -> None:
        """Let go of the output (its lock); a run does when it ends, however it ends.
        ``failed``: while preparing — the lock file and folders made for it go again."""
        if self._lock is not None:
            self._lock.release(remove=failed)
            self._lock = None

    def _plan(self, src, spec, spatial, block, halo, out_shape, model_file, model_sha256) -> _Plan:
        existing = self._existing_output(
            src, spec, block, halo, out_shape, (str(model_file), model_sha256)
        )
        out_chunks = existing.chunks[-3:] if existing else _out_chunks(block, spec.scale)
        from napari_emparsl.core.geometry import GeometryError

        try:
            blocks = list(
                plan_blocks(
                    spatial,
                    block,
                    halo,
                    out_chunks=out_chunks,
                    scale=spec.scale,
                    roi=self.roi,
                    edge=spec.edge,
                    grid=spec.multiple,
                    fixed=spec.fixed,
                )
            )
        except GeometryError as err:
            raise RunError(str(err)) from None
        if self.block_ids is not None:
            unknown = sorted(self.block_ids - {b.id for b in blocks})
            if unknown:  # before: nothing computed, and "Finished" said
                raise RunError(
                    f"{'Block id' if len(unknown) == 1 else 'Block ids'} "
                    f"{', '.join(map(str, unknown[:10]))}{' …' if len(unknown) > 10 else ''} "
                    f"{'is' if len(unknown) == 1 else 'are'} not in this run's plan of "
                    f"{len(blocks)} blocks (ids {_id_range(blocks)}): they were listed with "
                    "another block size, halo or region; run again without them."
                )
            blocks = [b for b in blocks if b.id in self.block_ids]
        check_no_shared_chunks(blocks, out_chunks)
        _check_input_written(src, blocks)
        if existing is not None:
            levels = [f[-3:] for f in existing.level_factors()]
            level_chunks = [c[-3:] for c in existing.level_chunks()]
        else:  # coarser levels each block writes too: napari shows big outputs from them
            out_vs = tuple(v / s for v, s in zip(src.voxel_size, spec.scale, strict=True))
            out_block = tuple(b * s for b, s in zip(block, spec.scale, strict=True))
            levels = output_level_factors(out_shape, out_vs, out_block)
            level_chunks = [
                tuple(
                    math.gcd(c, b // f) for c, b, f in zip(out_chunks, out_block, fac, strict=True)
                )
                for fac in levels
            ]
        for fac, chunks in zip(levels[1:], level_chunks[1:], strict=True):
            check_no_shared_chunks(blocks, chunks, factor=fac)
        norm = _norm(src, spec)
        if self._cancel.is_set():  # cancelled while preparing: nothing replaced nor recorded
            raise _CancelledWhilePreparing
        if existing is None:  # only now, when everything checked out
            self._create_output(src, spec, out_shape, out_chunks, levels, level_chunks)
        elif spec.colors and existing.attrs.get("class_colors") != list(spec.colors):
            # colours the model declares now (changed, or new since the output was made)
            existing.set_attrs({"class_colors": list(spec.colors)})
        ledger = Ledger(self.output_root, self.output_key)
        # read once, under the output's lock, when it was checked for resuming (a second whole
        # read of a ledger of a million blocks took ~25 s and GBs more)
        summary = self._resumed_summary if existing is not None else None
        if summary is None and ledger.exists():
            summary = ledger.summary()
        done = set(summary.done) if summary is not None else set()
        self._resumed_summary = None
        self._provenance = {
            "input": f"{src.root}:{src.key}",
            "input_written": src.write_id,
            "model": self.model,
            "model_file": model_file,
            "model_sha256": model_sha256,
            "model_options": self.model_options,
            "spec": spec.to_dict(),
            "block": list(block),
            "halo": list(halo),
            "site": self.site if isinstance(self.site, str) else self.site.name,
            "version": __version__,
            "roi": str(self.roi) if self.roi else None,
            "normalization": [float(v) for v in norm],  # what every block subtracts, divides by
        }
        self._ledger = ledger
        self._src = src
        todo = sum(1 for b in blocks if b.id not in done)
        ledger.start_run(self._provenance | {"planned": len(blocks), "todo": todo})
        out_voxels = {b.id: b.out_write_roi.size for b in blocks}
        return _Plan(blocks, done, spec, norm, out_voxels, len(levels))

    def _existing_output(
        self, src: Volume, spec: ModelSpec, block, halo, out_shape, model: tuple[str, str]
    ) -> Volume | None:
        """The output to resume, None for a new one; refuses outputs it must not touch.
        ``model``: this run's model file and its hash."""
        ledger = Ledger(self.output_root, self.output_key)
        exists = os.path.exists(os.path.join(self.output_root, self.output_key))
        if exists and not self.overwrite:
            if not ledger.exists():
                raise RunError(
                    f"The output {self.output} exists and was not written by emparsl; pass --overwrite "
                    "to replace it, or choose another name."
                )
            # a changed model file (a fix) may resume: the ledger records each run's hash
            summary = self._resumed_summary = ledger.summary()
            last = summary.last_run
            was = last.get("input_written")
            if was and was != src.write_id and last.get("input") == f"{src.root}:{src.key}":
                raise RunError(
                    f"The input {spec_text(src.root, src.key)} was written again since the output "
                    f"{self.output} was begun, so its blocks done so far hold what the input "
                    "held then; pass --overwrite to compute the output anew, or choose another "
                    "output name."
                )
            changed = _changes(last, src, spec, block, halo)
            other = _model_changed(last, str(self.model), *model)
            if other:  # another model: its description differs in every way, and says no more
                changed = [c for c in changed if not c.startswith("a model description")] + other
            if changed and not summary.done:  # a fix after every block failed: say so first
                raise RunError(
                    f"The output {self.output} was begun with {'; '.join(changed)}, but no block "
                    "of it is done, so nothing is lost by starting again: pass --overwrite to "
                    "compute it with this one (or choose another output name)."
                )
            if changed:
                raise RunError(
                    f"The output {self.output} was made with {'; '.join(changed)}; give the same "
                    "to resume it, pass --overwrite to start again, or choose another output name."
                )
            existing = Volume.open(self.output_root, self.output_key)
            if tuple(existing.shape[-3:]) != tuple(out_shape):  # the input changed since
                have, want = ("×".join(map(str, s)) for s in (existing.shape[-3:], out_shape))
                raise RunError(
                    f"The output {self.output} has {have} voxels, but this input "
                    f"({spec_text(src.root, src.key)}) gives {want}: the input changed since; pass "
                    "--overwrite to start again, or choose another output name."
                )
            # the blocks' own hashes, not the last run's: a run with nothing left to compute
            # records the new file too, and the warning stopped while no block was its
            older = sum(
                1 for r in summary.done.values() if r.get("model_sha256", model[1]) != model[1]
            )
            if older:
                self.warnings += (
                    f"The model file {os.path.basename(model[0])} changed since it computed "
                    f"blocks of this output ({older}/{len(summary.done)} of the blocks done): "
                    "they keep what the earlier file computed (the ledger records each block's "
                    "model hash); pass --overwrite to compute all with this one.",
                )
            return existing
        return None

    def _create_output(
        self, src: Volume, spec: ModelSpec, out_shape, chunks, levels=None, level_chunks=None
    ) -> Volume:
        dtype = spec.label_dtype if spec.kind == "labels" else spec.out_dtype
        vs = tuple(v / s for v, s in zip(src.voxel_size, spec.scale, strict=True))
        # voxel centres: an input voxel centred at x covers x ± v/2; its s output voxels are
        # centred at x - v/2 + v/s * (k + 1/2), so the output grid starts (v/s - v)/2 further
        origin = tuple(
            o + (w - v) / 2 for o, v, w in zip(src.offset[-3:], src.voxel_size, vs, strict=True)
        )
        shape = out_shape
        if spec.kind == "image" and spec.out_channels > 1:
            shape, chunks = (spec.out_channels, *out_shape), (1, *chunks)
            levels = [(1, *f) for f in levels] if levels else None
            level_chunks = [(1, *c) for c in level_chunks] if level_chunks else None
        attrs: dict[str, Any] = {"layer_type": spec.kind}
        if spec.kind == "image" and spec.out_dtype == "uint8":  # what 0 and 255 stand for
            attrs["value_range"] = [float(v) for v in spec.out_range]
        if spec.classes:
            attrs["class_names"] = list(spec.classes)
        if spec.colors:  # how napari draws each class (the reader and the run panel)
            attrs["class_colors"] = list(spec.colors)
        return Volume.create(
            self.output_root, self.output_key, shape, dtype, chunks,
            voxel_size=vs, unit=src.unit, attrs=attrs, overwrite=self.overwrite,
            offset=origin if any(origin) else None, levels=levels, level_chunks=level_chunks,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------

    def events(self) -> Iterator[RunEvent]:
        """Run, yielding events as blocks finish. Raises RunError/VolumeError before starting."""
        try:
            yield from self._events()
        finally:
            self.release()

    def _events(self) -> Iterator[RunEvent]:
        starter: list[_SiteStarter] = []

        def start_site() -> None:  # workers start (and load the model) while we prepare
            starter.append(_SiteStarter(self.profile, self.model, self.model_options))

        try:
            plan = self.prepare(on_checked=start_site)
        except BaseException as err:
            if starter:
                starter[0].close()
            if isinstance(err, _CancelledWhilePreparing):
                yield self._emit(Cancelled(0, 0))
                return
            if isinstance(err, (VolumeError, ModelError)):
                raise RunError(str(err)) from None
            raise
        site = starter[0]
        profile = self.profile
        self.blocks = {b.id: b for b in plan.blocks}  # for displays: where each block writes
        self._done_ids = set(plan.done_before)
        todo = [b for b in plan.blocks if b.id not in plan.done_before]
        total = len(plan.blocks)
        done = total - len(todo)
        try:
            yield self._emit(
                Planned(
                    total,
                    len(todo),
                    self.output,
                    sum(plan.out_voxels[b.id] for b in todo),
                    plan.levels,
                    self.warnings,
                )
            )
        except BaseException:
            site.close()
            raise
        t0 = time.perf_counter()
        if not todo:
            site.close()
            yield self._emit(Finished(done, 0, total, 0.0))
            return

        failed_final: set[int] = set()
        try:
            dfk = site.dfk()
            results: queue.Queue = queue.Queue()
            task = process_batch
            if profile.kind == "threads":  # same process: a block can say when it starts

                def process_batch_reporting(jobs: list[BlockJob]) -> list[BlockResult]:
                    worker = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
                    if self._cancel.is_set():  # queued when the run was cancelled: not begun
                        return [
                            BlockResult(j.block.id, False, worker, error=_NOT_BEGUN) for j in jobs
                        ]
                    results.put(("started", ([j.block.id for j in jobs], worker)))
                    return process_batch(jobs)

                task = process_batch_reporting
            app = python_app(task, dfk, profile)
            size = self.batch or _auto_batch(
                self._provenance["block"], self._provenance["halo"], self._src.spatial_shape
            )
            pending = [todo[i : i + size] for i in range(0, len(todo), size)][::-1]
            attempts: dict[int, int] = {}
            logged: set[str] = set()  # the errors whose traceback the log file has, this run
            in_flight = 0
            window = max(1, profile.worker_count * self.in_flight_per_worker)
            # fewer batches than workers (a preview of one block, a small volume): the idle
            # workers' cores go to the batches there are (the built-in model's 128³ block on
            # two cores: 1.8–2.0 s of compute with one thread, 0.9–1.1 s with two)
            threads = profile.worker_threads * max(1, profile.worker_count // len(pending))
            # ... never more than this machine's cores (a profile may ask more workers)
            threads = max(profile.worker_threads, min(threads, machine_capacity()[0]))

            def submit(batch: list[Block]) -> None:
                nonlocal in_flight
                jobs = []
                for blk in batch:
                    attempts[blk.id] = attempts.get(blk.id, 0) + 1
                    jobs.append(
                        BlockJob(
                            self._src.root,
                            self._src.key,
                            self.output_root,
                            self.output_key,
                            blk,
                            self.model,
                            self.model_options,
                            plan.norm,
                            threads,
                            profile.workers_keep_memory,
                            profile.device,
                            self._src.write_id,
                        )
                    )
                fut = app(jobs)
                fut.add_done_callback(lambda f, b=batch: results.put((b, f)))
                in_flight += 1

            clip = _Clipping(plan.spec)

            def finished(blk: Block, result: BlockResult) -> RunEvent:
                """A block written: recorded done (a resume skips it), and its event."""
                nonlocal done
                with _interrupts_held():  # recorded and counted, or neither
                    self._ledger.record(result, attempts[blk.id], str(blk.write_roi))
                    self._done_ids.add(blk.id)
                clip.add(result, plan.out_voxels[blk.id])
                done += 1
                return self._emit(BlockDone(result, done, total, plan.out_voxels[blk.id]))

            while pending or in_flight:
                while pending and in_flight < window and not self._cancel.is_set():
                    submit(pending.pop())
                if self._cancel.is_set():
                    # running blocks end (threads) or are abandoned (worker processes); those
                    # that finished meanwhile were written: recorded, not computed again
                    site.close()
                    while True:
                        try:
                            batch, fut = results.get_nowait()
                        except queue.Empty:
                            break
                        if batch == "started":
                            continue
                        for blk, result in zip(batch, self._results_of(batch, fut), strict=True):
                            if result.ok:
                                yield finished(blk, result)
                    if done == total:  # the last blocks finished as it was cancelled
                        elapsed = time.perf_counter() - t0
                        yield self._emit(Finished(done, 0, total, elapsed, clip.warnings()))
                    else:
                        yield self._emit(Cancelled(done, total))
                    return
                try:
                    batch, fut = results.get(timeout=0.2)
                except queue.Empty:
                    continue
                if batch == "started":
                    for block_id in fut[0]:
                        yield self._emit(BlockStarted(block_id, fut[1]))
                    continue
                in_flight -= 1
                for blk, result in zip(batch, self._results_of(batch, fut), strict=True):
                    if result.ok:
                        yield finished(blk, result)
                        continue
                    if result.error == _NOT_BEGUN:  # cancelled before it began: not a failure
                        continue
                    self._ledger.record(result, attempts[blk.id], str(blk.write_roi))
                    _log_traceback(self.output, blk.id, result, logged)
                    final = attempts[blk.id] > self.retries
                    yield self._emit(BlockFailed(blk.id, result.error, attempts[blk.id], final))
                    if final:
                        failed_final.add(blk.id)
                    elif not self._cancel.is_set():
                        pending.append([blk])  # retried on its own
            if self._cancel.is_set() and done + len(failed_final) < total:
                # cancelled as the last block failed with retries left: it was not retried
                yield self._emit(Cancelled(done, total))
                return
            yield self._emit(
                Finished(done, len(failed_final), total, time.perf_counter() - t0, clip.warnings())
            )
        except BaseException:  # an error, Ctrl-C, or the caller stopped iterating: blocks still
            self._cancel.set()  # queued (threads) are not begun while the site shuts down
            raise
        finally:
            site.close()

    def _results_of(self, batch: list[Block], fut) -> list[BlockResult]:
        try:
            return fut.result()
        except Exception as err:  # the worker died, Parsl lost the task, or no worker started
            error = task_error(err, self.site if isinstance(self.site, str) else self.site.name)
            return [BlockResult(b.id, False, "?", error=error) for b in batch]

    def _emit(self, event: RunEvent) -> RunEvent:
        for cb in self.callbacks:
            cb(event)
        return event

    def execute(self, callback: Callable[[RunEvent], None] | None = None) -> RunEvent:
        """Run to the end; returns the last event (Finished or Cancelled)."""
        last: RunEvent | None = None
        if callback:
            self.callbacks.append(callback)
        try:
            for event in self.events():
                last = event
        finally:
            if callback:
                self.callbacks.remove(callback)
        assert last is not None
        return last
