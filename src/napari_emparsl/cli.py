"""`emparsl` command line: the same core as the napari plugin, for scripts and clusters.

Errors about the user's input end in one sentence on stderr and exit code 2; an unexpected
internal error prints one sentence pointing at the log file, which holds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence

from napari_emparsl import __version__
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import size_values
from napari_emparsl.core.n5attrs import VolumeError
from napari_emparsl.core.paths import log_details, log_path, std_fds_open

log = logging.getLogger("napari_emparsl")


def _zyx(values: tuple, text: str, example: str) -> tuple:
    """Three values z,y,x, or one for all three axes."""
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"expected three values z,y,x like {example} (or one for all axes), not {text!r}"
        )
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(size_values(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,64,64, not {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, not {text!r}")
    return _zyx(values, text, "64,64,64")


def _ints0(text: str) -> tuple[int, ...]:
    try:
        values = tuple(size_values(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 16,16,16, not {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"a halo cannot be negative, not {text!r}")
    return _zyx(values, text, "16,16,16")


def _scalar(parse, ok, expected: str, bad: str):
    """An argparse type: ``parse`` the text (else "expected …"), then check it with ``ok``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{bad}, not {text!r}")
        return value

    return convert


_count = _scalar(int, lambda v: v >= 0, "a whole number", "cannot be negative")
_positive = _scalar(
    float, lambda v: math.isfinite(v) and v > 0, "a number", "must be a positive number"
)
# the sample's cells are laid out in nm: a huge anisotropy overflowed (an internal error)
_anisotropy = _scalar(float, lambda v: 0 < v <= 100, "a number", "must be above 0 and at most 100")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(size_values(text, float))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 40,4,4, not {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"voxel sizes must be positive, not {text!r}")
    return _zyx(values, text, "40,4,4")


# ----------------------------------------------------------------------------------------------
# commands


def cmd_info(args: argparse.Namespace) -> int:
    from napari_emparsl.core.volume import Volume, container_tree, parse_spec

    path, key = parse_spec(args.path)
    tree = container_tree(path)
    volume = None
    group = key and any(n["key"] == key and n["kind"] == "group" for n in tree)
    if group:  # a group of datasets (labels/): what it holds
        tree = [n for n in tree if n["key"] == key or n["key"].startswith(key + "/")]
        from napari_emparsl.core.n5attrs import find_container_root, read_attrs

        root = find_container_root(path)[0]
        if isinstance(read_attrs(os.path.join(root, key)).get("painteraData"), dict):
            with contextlib.suppress(VolumeError):  # a label multiset: the tree says so
                volume = Volume.open(path, key)  # a Paintera source: its data, as runs take it
    elif key or any(n["key"] == "" and n["kind"] != "group" for n in tree):
        volume = Volume.open(path, key)
    info = volume.info() if volume is not None else None
    if volume is not None:  # a run's output (or a level of it): how much of it is written
        from napari_emparsl.core.ledger import LedgerUnreadable, written_blocks

        try:
            written = written_blocks(volume.root, volume.key)
        except LedgerUnreadable as err:  # the dataset is shown all the same; said why not that
            print(f"emparsl: note: {err}", file=sys.stderr)
            written = None
        if written is not None:
            info["run_blocks"] = {"written": int(written.done.sum()), "total": written.done.size}
    if args.json:
        out = {"tree": tree}
        if info is not None:
            out["dataset"] = info
        print(json.dumps(out, indent=2))
        return 0
    print(f"{os.path.abspath(path)}{':' + key if key else ''}")
    if not key or group:
        _print_tree(tree)
    if info is not None:
        _print_volume(info)
    return 0


def _print_tree(tree: list[dict]) -> None:
    for node in tree:
        depth = node["key"].count("/") + 1 if node["key"] else 0
        name = node["key"].rsplit("/", 1)[-1] or "/"
        pad = "  " * depth
        if node["kind"] == "dataset" and "shape" not in node:  # its metadata unreadable
            print(f"{pad}{name}  (cannot be read: {node.get('unreadable', '')})")
        elif node["kind"] == "dataset":
            shape = "×".join(map(str, node["shape"]))
            chunks = "×".join(map(str, node["chunks"]))
            unfinished = f"  (unfinished: {node['unfinished']})" if "unfinished" in node else ""
            if "unreadable" in node:
                unfinished += f"  ({node['unreadable']})"
            print(
                f"{pad}{name}  {shape} {node['dtype']}  chunks {chunks}  {node['compression']}"
                + unfinished
            )
        elif node["kind"] == "multiscale":
            unfinished = f"  (unfinished: {node['unfinished']})" if "unfinished" in node else ""
            folder = f"{name}/" if node["key"] else "/"  # the root: "/", not "//"
            print(f"{pad}{folder}  pyramid: {', '.join(node['levels'])}{unfinished}")
        elif node["key"]:
            print(f"{pad}{name}/")


def _print_volume(info: dict) -> None:
    print()
    print(f"dataset      {info['key'] or '/'}  ({info['kind']})")
    print(f"shape        {' × '.join(map(str, info['shape']))}  ({', '.join(info['axes'])})")
    print(f"dtype        {info['dtype']}")
    print(f"chunks       {' × '.join(map(str, info['chunks']))}")
    print(f"compression  {info['compression']}")
    if "unfinished" in info:
        print(f"unfinished   {info['unfinished']}: parts of it are missing; write it again")
    if "run_blocks" in info:
        done, total = info["run_blocks"]["written"], info["run_blocks"]["total"]
        state = "complete" if done == total else "the rest read as zeros; see `emparsl status`"
        print(f"run          {done} of {total} blocks written ({state})")
    vs = " × ".join(f"{v:g}" for v in info["voxel_size"])
    print(f"voxel size   {vs} {info['unit']}")
    if any(info.get("offset", ())):  # where voxel 0 lies (COSEM, OME-NGFF, Paintera, ImageJ)
        print(f"offset       {' × '.join(f'{v:g}' for v in info['offset'])} {info['unit']}")
    if len(info["levels"]) > 1:
        print(f"pyramid      {len(info['levels'])} levels")
        width = max(14, *(len(lv["key"]) for lv in info["levels"]))  # long keys: a column still
        for lv in info["levels"]:
            shape = "×".join(map(str, lv["shape"]))
            vs = "×".join(f"{v:g}" for v in lv["voxel_size"])
            print(f"  {lv['key']:<{width}} {shape:<16} voxel {vs} {info['unit']}")


SAMPLE_BYTES_PER_VOXEL = 40  # the sample generator's peak: 1.2 GB for 128×512×512 voxels


def _free_memory() -> int | None:
    """Bytes of memory available (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cmd_sample(args: argparse.Namespace) -> int:
    from napari_emparsl.core.importer import human_size
    from napari_emparsl.core.paths import user_path
    from napari_emparsl.core.sample import make_sample, write_sample
    from napari_emparsl.core.volume import Volume

    args.output = user_path(args.output)  # "~/s.n5": in the home folder, not a folder named ~
    if os.path.exists(args.output) and not args.overwrite:
        raise VolumeError(
            f"{args.output} already exists; pass --overwrite to replace it, or choose another path."
        )
    need = SAMPLE_BYTES_PER_VOXEL * math.prod(args.shape)  # it is generated in memory
    free = _free_memory()
    if free is not None and need > free:
        raise VolumeError(
            f"A sample of {'×'.join(map(str, args.shape))} voxels needs about {human_size(need)} "
            f"of memory to generate and this machine has {human_size(free)} free; choose a "
            "smaller --shape."
        )
    t0 = time.perf_counter()
    sample = make_sample(tuple(args.shape), seed=args.seed, anisotropy=args.anisotropy)
    t_gen = time.perf_counter() - t0
    write_sample(args.output, sample, overwrite=args.overwrite)
    shape = "×".join(map(str, sample.raw.shape))
    levels = len(Volume.open(args.output, "raw").levels)  # fewer where the sample is small
    print(
        f"Wrote the synthetic EM sample (seed {args.seed}, {shape} voxels, generated in "
        f"{t_gen:.1f} s) to {args.output}: raw, labels/classes, labels/cells, "
        + (f"{levels} pyramid levels each." if levels > 1 else "no pyramid (too small).")
    )
    return 0


def _bar_interval() -> float:
    """Seconds between progress bar updates: a terminal's bar moves at once; in a batch job's
    log (not a terminal) each update is another line, so once every 10 s."""
    return 0.1 if sys.stderr.isatty() else 10.0


class _LogLines:
    """A progress bar's stream where stderr is not a terminal (a batch job's log): each state
    of the bar its own line. tqdm redraws its line with a carriage return, which in a file made
    one physical line of every state (`tail`, `grep` and editors showed only the last, or all
    run together)."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)  # tqdm draws unicode bars where it may

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()  # the redraw and its padding; a clear is empty
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _bar_file():
    """Where a progress bar draws: stderr itself on a terminal, else one line per state."""
    return sys.stderr if sys.stderr.isatty() else _LogLines(sys.stderr)


def cmd_import(args: argparse.Namespace) -> int:
    with _stop_on_signals():
        return _import(args)


def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_emparsl.core.importer import Estimate, iter_import

    bar = None
    complete = False  # the last slab written: a signal then stops nothing
    steps = iter_import(
        args.source,
        args.output,
        chunks=args.chunks,
        compression=args.compression,
        voxel_size=args.voxel_size,
        unit=args.unit,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
    )
    try:
        for step in steps:
            if isinstance(step, Estimate):
                print(f"Estimate: {step.summary()}.")
                if step.voxel_size is not None:
                    size = "×".join(f"{v:g}" for v in step.voxel_size)
                    print(f"Voxel size: {size} {step.unit} ({step.voxel_from}).")
                for w in step.warnings:
                    print(f"Warning: {w}", file=sys.stderr)
                if args.dry_run:
                    steps.close()
                    print("Dry run: nothing written.")
                    return 0
                continue
            done, total = step
            complete = done == total
            if bar is None:
                bar = tqdm(
                    total=total,
                    unit="slab",
                    desc="import",
                    file=_bar_file(),
                    mininterval=_bar_interval(),
                )
            bar.update(done - bar.n)
    except KeyboardInterrupt as stop:
        steps.close()  # removes what the import wrote, unless it is complete
        if not complete:
            if bar is not None:
                bar.close()
            print(f"emparsl: import {_how_stopped(stop)}; nothing of it was kept.", file=sys.stderr)
            return _stop_code(stop)
    if bar is not None:
        bar.close()
    print(f"Imported {args.source} into {args.output}.")
    return 0


class _Stopped(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, `kill`) or SIGHUP (the terminal closed) during a
    run: stopped as Ctrl-C stops it, so the site shuts down and the output can be resumed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGHUP raise :class:`_Stopped` in the main thread while a run goes on;
    a second one while the run shuts down is ignored (the shutdown is what it asks for)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise _Stopped(signum)

    # a signal the caller ignores stays ignored: `nohup emparsl run … &` must outlive its
    # terminal (nohup ignores SIGHUP)
    signals = [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _how_stopped(stop: KeyboardInterrupt) -> str:
    if isinstance(stop, _Stopped):
        import signal

        return f"stopped by {signal.Signals(stop.signum).name}"
    return "interrupted"


def _stop_code(stop: KeyboardInterrupt) -> int:
    """The shell's exit status for a process ended by that signal (Ctrl-C: 130)."""
    return 128 + stop.signum if isinstance(stop, _Stopped) else 130


def cmd_run(args: argparse.Namespace) -> int:
    with _stop_on_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_emparsl.core.events import BlockDone, BlockFailed, Cancelled, Finished, Planned
    from napari_emparsl.core.models.spec import parse_options
    from napari_emparsl.execution.runner import Run

    run = Run(
        args.input,
        args.model,
        args.output,
        site=args.site,
        roi=args.roi,
        block=args.block,
        halo=args.halo,
        model_options=parse_options(args.model_option or []),
        overwrite=args.overwrite,
        retries=args.retries,
    )
    bar = None
    voxels = failed = 0
    t0 = time.perf_counter()
    last = None
    failures: dict[tuple[bool, str], list[int]] = {}
    progress: tuple[int, int] | None = None  # blocks done, of the plan
    events = run.events()
    try:
        for event in events:
            last = event
            if isinstance(event, Planned):
                t0 = time.perf_counter()  # the rate of blocks, not of preparing the model
                skipped = event.total - event.todo
                progress = (skipped, event.total)
                if not event.todo:  # nothing left: no "resuming", no rate of 0 voxels/s
                    print(
                        (  # of a region, its blocks, not the whole output
                            # as cut to the volume ("0:1,0:8,:" of a 16×64×64 volume is
                            # 0:1,0:8,0:64), not as typed
                            f"The region {run.roi or args.roi} of {event.output} is done already "
                            f"({event.total}/{event.total} of its blocks): nothing to compute "
                            "(`emparsl status` counts the whole volume's; --overwrite replaces "
                            "the whole output, then computes this region)."
                        )
                        if args.roi
                        else f"{event.output} is complete already ({event.total}/{event.total} "
                        "blocks done): nothing to compute (--overwrite computes it again)."
                    )
                    for warning in event.warnings:
                        print(f"Warning: {warning}", file=sys.stderr)
                    continue
                levels = event.levels - 1
                print(
                    f"Planned {_n(event.total, 'block')} into {event.output}"
                    + (f" ({skipped} already done, resuming)" if skipped else "")
                    + (
                        f", which each also write {_n(levels, 'coarser level')} for viewing"
                        if levels
                        else ""
                    )
                    + f"; site {args.site}."
                )
                for warning in event.warnings:
                    print(f"Warning: {warning}", file=sys.stderr)
                bar = tqdm(
                    total=event.total,
                    initial=skipped,
                    unit="block",
                    desc="run",
                    file=_bar_file(),
                    mininterval=_bar_interval(),
                    # workers start, then compute: seconds without a finished block
                    postfix="starting the site, first blocks running",
                )
            elif isinstance(event, BlockDone):
                progress = (event.done, event.total)
                voxels += event.voxels
                bar.set_postfix_str(_bar_words(voxels, t0, failed), refresh=False)  # update() draws
                bar.update(1)
            elif isinstance(event, BlockFailed):
                if event.final:  # handled: the bar counts it, and says how many failed
                    failed += 1
                    bar.set_postfix_str(_bar_words(voxels, t0, failed), refresh=False)
                    bar.update(1)
                # each distinct error once (a wrong setting fails every block the same way)
                ids = failures.setdefault((event.final, event.error), [])
                ids.append(event.block_id)
                if len(ids) == 1:
                    what = (
                        "failed" if event.final else f"failed (attempt {event.attempt}, retrying)"
                    )
                    tqdm.write(f"block {event.block_id} {what}: {event.error}", file=sys.stderr)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: stop the site, say how to resume
        run.cancel()
        events.close()
        if bar is not None:
            bar.close()
        if progress and run.blocks:  # the ledger's count (a block may be recorded done before
            # its event reached this loop, and it is what a resume skips), as the run kept it:
            # reading a ledger of millions of blocks again took longer than a scheduler waits
            progress = (run.done_in_plan(), progress[1])
        at = f" at {progress[0]}/{progress[1]} blocks done" if progress else ""
        if failed:
            at += f" ({failed} failed, retried by a resume)"
        how = _how_stopped(stop)
        print(
            f"emparsl: {how}{at}; finished blocks stay done, run the same command again to resume.",
            file=sys.stderr,
        )
        return _stop_code(stop)
    finally:
        if bar is not None:
            bar.close()
    if isinstance(last, Finished) and bar is None:  # complete already: said above
        return 0
    if isinstance(last, Finished):
        print(
            f"Finished: {last.done}/{last.total} blocks done, {last.failed} failed, "
            f"{last.seconds:.1f} s ({voxels / max(last.seconds, 1e-9) / 1e6:.2f} Mvoxel/s)."
        )
        for warning in last.warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        if last.failed:
            for (final, _), ids in failures.items():
                if final and len(ids) > 1:
                    print(
                        f"  {'block' if len(ids) == 2 else 'blocks'} {_id_list(sorted(ids[1:]))} "
                        f"failed with the same error as block {ids[0]}",
                        file=sys.stderr,
                    )
            print(
                f"emparsl: error: {_n(last.failed, 'block')} failed; see `emparsl status {run.output}` "
                f"(their tracebacks are in {log_path()}) and run the same command again to "
                "retry them.",
                file=sys.stderr,
            )
        return 0 if last.ok else 1
    if isinstance(last, Cancelled):
        print(f"Cancelled after {last.done}/{last.total} blocks; run the same command to resume.")
    return 1


def _id_list(ids: list, most: int = 8) -> str:
    """'0, 1, 2' or, for many, the first ``most`` and how many more."""
    shown = ", ".join(str(i) for i in ids[:most])
    return shown if len(ids) <= most else f"{shown} and {len(ids) - most} more"


_SHOWN_ERRORS = 10  # distinct errors `emparsl status` prints before it counts the rest


def _n(count: int, word: str) -> str:
    """``1 block``, ``2 blocks``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _outputs_inside(root: str, key: str) -> list[str]:
    """The datasets with a ledger (run outputs) in the container or group ``root:key``."""
    from napari_emparsl.core.ledger import Ledger
    from napari_emparsl.core.volume import container_tree

    try:
        nodes = container_tree(os.path.join(root, key) if key else root)
    except (UserError, OSError):
        return []
    return [
        f"{root}:{n['key']}"
        for n in nodes
        if n["kind"] != "group" and Ledger(root, n["key"]).exists()
    ]


def cmd_status(args: argparse.Namespace) -> int:
    from napari_emparsl.core.ledger import Ledger, lock_holder, whole_plan_blocks
    from napari_emparsl.core.volume import Volume, parse_spec

    root, key = parse_spec(args.output)
    ledger = Ledger(root, key)
    level = re.fullmatch(r"(.+)/s\d+", key)
    if (
        not ledger.exists()
        and level
        and (
            Ledger(root, level.group(1)).exists()
            or (os.path.isdir(root) and lock_holder(root, level.group(1)) is not None)
        )
    ):  # a level of a run's output (OUT.n5:pred/s0): the run's ledger (or its start)
        key = level.group(1)
        ledger = Ledger(root, key)
    holder = None if ledger.exists() or not os.path.isdir(root) else lock_holder(root, key)
    if holder is not None:  # a writer's first moments: it holds the output, has no ledger yet
        return _status_starting(args, f"{root}:{key}", holder)  # (an import: none ever)
    if not ledger.exists() and not os.path.exists(os.path.join(root, key)):
        missing = root if not os.path.exists(root) else f"{root}:{key}"
        raise VolumeError(f"{missing} does not exist; check the path.")
    if not ledger.exists():
        inside = _outputs_inside(root, key)
        if inside:  # a container or group: the run outputs in it
            shown = ", ".join(inside[:5]) + (
                f" and {len(inside) - 5} more" if len(inside) > 5 else ""
            )
            raise VolumeError(
                f"{root}:{key}".rstrip(":") + f" holds run outputs: {shown}; give one, e.g. "
                f"`emparsl status {inside[0]}`."
            )
        raise VolumeError(
            (f"{root}:{key}" if key else root)
            + " has no emparsl ledger; it was not written by `emparsl run`: give a run's output, "
            f"OUT.n5:DATASET (`emparsl info {root}` lists the datasets there)."
        )
    summary = ledger.summary()
    last = summary.last_run
    try:  # the whole volume's blocks, not only those of the last run's region
        out_shape = Volume.open(root, key).shape
        planned = whole_plan_blocks(out_shape, last)
    except VolumeError:  # the output's own attributes unreadable: what its last run planned
        out_shape, planned = None, int(last.get("planned", 0))
    if planned:  # block ids outside the plan (a record edited by hand) are not its blocks
        for blocks in (summary.done, summary.failed):
            for bid in [b for b in blocks if not 0 <= b < planned]:
                del blocks[bid]
    done_times = [  # a record without its timings (damaged, edited by hand) is left out
        sum(float(r[k]) for k in ("t_read", "t_compute", "t_write"))
        for r in summary.done.values()
        if all(
            isinstance(r.get(k), int | float) and math.isfinite(r[k])
            for k in ("t_read", "t_compute", "t_write")
        )
    ]
    running = lock_holder(root, key)
    # no run record readable (the first one torn by a crash): how many blocks is unknown, and
    # the output is not said to be complete
    known = bool(summary.runs)
    pending = max(0, planned - len(summary.done) - len(summary.failed)) if known else None
    out = {
        "output": f"{root}:{key}",
        # running (a writer holds it now), complete, failed (some blocks; none running), or
        # incomplete (blocks pending: stopped, crashed, or runs of a region only)
        "state": "running" if running is not None
        else "failed" if summary.failed
        else "incomplete" if pending or not known
        else "complete",
        "blocks": planned if known else None,
        "done": len(summary.done),
        "failed": len(summary.failed),
        "pending": pending,
        # the last run's region (--roi), its blocks' counts: None for a run of the whole volume
        "region": _region_counts(out_shape, last, summary),
        "mean_block_seconds": round(sum(done_times) / len(done_times), 3) if done_times else None,
        "failed_blocks": {str(k): v.get("error", "") for k, v in sorted(summary.failed.items())},
        "provenance": {k: last.get(k) for k in (
            "input", "model", "model_sha256", "model_options", "block", "halo", "roi", "site",
            "version"
        )},
        "runs": len(summary.runs),
        "running": running,  # the run writing it now: pid, host, since
        # where the model ran (blocks of runs before the ledger recorded it: none)
        "devices": sorted({r["device"] for r in summary.done.values() if r.get("device")}),
        # the model file (hash) each done block was computed with: the last run's file may
        # have changed since (blocks of runs before the ledger recorded it: none)
        "block_models": dict(
            Counter(r["model_sha256"] for r in summary.done.values() if r.get("model_sha256"))
        ),
        "last_run": _throughput(summary),
    }  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{out['output']}: {out['done']}/{planned} blocks done, {out['failed']} failed, {out['pending']} pending"
        if known
        else f"{out['output']}: {out['done']} blocks done, {out['failed']} failed; its run's "
        "record cannot be read, so how many blocks it has is not known"
    )
    if out["region"] is not None:
        r = out["region"]
        print(
            f"the last run's region {r['roi']}: {r['done']}/{r['blocks']} blocks done, "
            f"{r['failed']} failed, {r['pending']} pending"
        )
    if out["running"] is not None:
        who = out["running"]
        writer = _WRITER_WORDS.get(who.get("what", "run"), "a run")
        print(
            f"{writer} is writing it now: process {who.get('pid', '?')} on "
            f"{who.get('host', '?')}, since {who.get('since', '?')}"
        )
    if out["mean_block_seconds"] is not None:
        print(f"mean block time {out['mean_block_seconds']} s (read + compute + write)")
    if out["last_run"]:
        t = out["last_run"]
        print(
            f"last run: {_n(t['blocks_done'], 'block')} done in {t['seconds']:.1f} s from its start "
            f"({t['blocks_per_second']:.2f} blocks/s, {t['voxels_per_second'] / 1e6:.2f} "
            "Mvoxel/s written)"
        )
    by_error: dict[str, list[str]] = {}
    for bid, err in out["failed_blocks"].items():
        by_error.setdefault(err, []).append(bid)
    # errors that differ only in their numbers (a region, a memory size) come in one line per
    # block: 100,000 lines for a ledger of as many failures; the first few, then a count
    shown = list(by_error.items())[:_SHOWN_ERRORS]
    for err, ids in shown:
        which = f"block {ids[0]}" if len(ids) == 1 else f"{len(ids)} blocks ({_id_list(ids)})"
        print(f"  {which} failed: {err}")
    if len(by_error) > len(shown):
        rest = sum(len(ids) for _, ids in list(by_error.items())[len(shown) :])
        print(
            f"  and {rest} more {'block' if rest == 1 else 'blocks'} failed with "
            f"{_n(len(by_error) - len(shown), 'other error')}; `emparsl status --json` lists "
            "every one"
        )
    prov = out["provenance"]
    print(f"input {str(prov['input']).removesuffix(':')}, model {prov['model']} (sha256 {str(prov['model_sha256'])[:12]}…)"
          + (f", options {_options_text(prov['model_options'])}" if prov["model_options"] else "")
          + f", block {prov['block']}, halo {prov['halo']}, site {prov['site']}, emparsl {prov['version']}"
          + (f", on {', '.join(out['devices'])}" if out["devices"] else ""))  # fmt: skip
    others = {h: n for h, n in out["block_models"].items() if h != prov["model_sha256"]}
    if others and known:  # (no run record: no last run's model to compare with)
        hashes = ", ".join(f"{str(h)[:12]}…" for h in others)
        count = sum(others.values())
        print(
            f"{_n(count, 'block')} of the {out['done']} done {'was' if count == 1 else 'were'} "
            f"computed with another model file (sha256 {hashes}) than the last run's, which "
            "changed since; `emparsl run … --overwrite` computes them all with the file as it is now"
        )
    return 0


#: who holds an output's lock, as `status` says it (its "what")
_WRITER_WORDS = {"import": "an import", "napari save": "a save from napari"}


def _status_starting(args: argparse.Namespace, output: str, holder: dict) -> int:
    """`status` of an output a run holds but has no ledger of yet (its first second or so: the
    model loads, the volume is planned, the output is made); it said the output did not exist,
    or was not written by `emparsl run`. An import or a napari save writing a dataset (they
    keep no ledger): running, said as theirs."""
    run = holder.get("what", "run") == "run"
    if args.json:
        print(json.dumps({  # the keys of every state's answer: unknown yet, or none
            "output": output, "state": "starting" if run else "running", "blocks": None,
            "done": 0, "failed": 0,
            "pending": None, "region": None, "mean_block_seconds": None, "failed_blocks": {},
            "provenance": None, "runs": 0, "running": holder, "devices": [],
            "block_models": {}, "last_run": None,
        }, indent=2))  # fmt: skip
        return 0
    who = f"(process {holder.get('pid', '?')} on {holder.get('host', '?')}, since " + (
        f"{holder.get('since', '?')})"
    )
    if run:
        print(f"{output}: a run is starting on it {who}; no block written yet.")
        return 0
    writer = _WRITER_WORDS.get(holder.get("what"), "another writer")
    print(
        f"{output}: {writer} is writing it now {who}; it keeps no run ledger (`emparsl info "
        f"{output}` shows what is written)."
    )
    return 0


def _region_counts(out_shape, last: dict, summary) -> dict | None:
    """Blocks done / failed / pending of the last run's region (``--roi``) in an output of
    ``out_shape``, or None for a run of the whole volume (or one whose region, or output,
    cannot be read back)."""
    from napari_emparsl.core.geometry import block_ids
    from napari_emparsl.core.ledger import plan_shape
    from napari_emparsl.execution.runner import parse_roi

    if not last.get("roi") or "block" not in last or out_shape is None:
        return None
    try:
        shape = plan_shape(out_shape, last)
        ids = block_ids(shape, last["block"], parse_roi(str(last["roi"])))
    except (UserError, ValueError, TypeError):
        return None
    done = sum(1 for i in ids if i in summary.done)
    failed = sum(1 for i in ids if i in summary.failed)
    return {
        "roi": str(last["roi"]),
        "blocks": len(ids),
        "done": done,
        "failed": failed,
        "pending": len(ids) - done - failed,
    }


def _options_text(options: object) -> str:
    """Model options as typed on the command line: ``kind=image; halo=[8, 8, 8]``."""
    if not isinstance(options, dict):
        return str(options)
    return "; ".join(f"{k}={v}" for k, v in options.items())


def _throughput(summary) -> dict[str, float] | None:
    """Blocks and voxels the last run wrote per second of its wall time (from its start to its
    last finished block), from the ledger's time stamps; None when it finished none."""
    from napari_emparsl.execution.runner import parse_roi

    start = summary.last_run.get("time")
    if not isinstance(start, (int, float)):
        return None
    times, voxels = [], 0
    for rec in summary.done.values():
        at = rec.get("time")
        if not isinstance(at, (int, float)) or at < start:
            continue
        times.append(at)
        try:
            voxels += parse_roi(str(rec["roi"])).size
        except (KeyError, UserError):
            pass  # an old or damaged record: its block counts, its voxels do not
    if not times:
        return None
    seconds = round(max(max(times) - start, 1e-3), 3)
    return {
        "blocks_done": len(times),
        "seconds": seconds,
        "blocks_per_second": round(len(times) / seconds, 3),
        "voxels_per_second": round(voxels / seconds, 1),
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    import dask.array as da
    import numpy as np

    from napari_emparsl.core.ledger import written_blocks
    from napari_emparsl.core.units import grid_difference
    from napari_emparsl.core.volume import UNFINISHED, Volume, parse_spec

    pred = Volume.open(*parse_spec(args.prediction))
    truth = Volume.open(*parse_spec(args.truth))
    if pred.shape != truth.shape:
        raise VolumeError(
            f"The prediction ({'×'.join(map(str, pred.shape))}) and the ground truth "
            f"({'×'.join(map(str, truth.shape))}) differ in shape; "
            "compare datasets of the same volume."
        )
    for what, vol in (("prediction", pred), ("ground truth", truth)):
        if vol.attrs.get(UNFINISHED):  # its missing chunks would count as class 0
            raise VolumeError(
                f"The {what} {vol.root}:{vol.key} is {vol.attrs[UNFINISHED]}, so parts of it are "
                "missing; wait for it to finish, or write it again."
            )
        if vol.dtype.kind not in "iub":
            raise VolumeError(
                f"The {what} {vol.root}:{vol.key} holds {vol.dtype.name} values, not class labels; "
                "evaluate a labels output (integers) against labels of the same classes."
            )
        if vol.attrs.get("layer_type") == "image" and written_blocks(vol.root, vol.key):
            raise VolumeError(  # a run's output: the image model's kind is known (uint8 out)
                f"The {what} {vol.root}:{vol.key} is the output of an image model (intensities), "
                "not class labels; evaluate a labels model's output against labels of the same "
                "classes."
            )
    grid = grid_difference(pred, truth)
    if grid:  # same shape, another place or voxel size: compared voxel to voxel all the same
        print(
            f"Warning: the prediction and the ground truth lie on different grids ({grid}); "
            "the Dice compares them voxel by voxel: check that they show the same region.",
            file=sys.stderr,
        )
    names = pred.class_names or truth.class_names
    n = max(len(names), 2)
    p, t = pred.data, truth.data.rechunk(pred.data.chunks)
    # a run's unfinished output (either side; two runs compared): its written blocks only
    unfinished = []
    for what, vol in (("prediction", pred), ("ground truth", truth)):
        written = written_blocks(vol.root, vol.key)
        if written is not None and not written.complete:
            if not written.done.any():
                raise VolumeError(
                    f"The {what} {vol.root}:{vol.key} is the output of a run that has written "
                    f"no block yet; see `emparsl status {vol.root}:{written.key}`."
                )
            unfinished.append((what, written))
    mask = None
    if unfinished:

        def chunk_written(x, block_info=None):  # a chunk of the prediction's: written by both?
            where = tuple(zip(*block_info[0]["array-location"], strict=True))
            return np.full(x.shape, all(w.written(*where) for _, w in unfinished), bool)

        mask = da.map_blocks(chunk_written, p, dtype=bool)
    sums = []
    for c in range(n):
        pc, tc = p == c, t == c
        if mask is not None:
            pc, tc = pc & mask, tc & mask
        sums += [da.sum(pc & tc), da.sum(pc), da.sum(tc)]
    if mask is not None:
        sums.append(da.sum(mask))
    *values, p_max, t_max = da.compute(*sums, p.max(), t.max())
    if mask is not None:
        share = values.pop() / math.prod(pred.shape)
        said = " and ".join(
            f"the {what} is the output of a run that is not finished "
            f"({int(w.done.sum())} of {w.done.size} blocks written)"
            for what, w in unfinished
        )
        over = "those blocks" if len(unfinished) == 1 else "the blocks written in both"
        print(
            f"emparsl: note: {said}; the Dice is over {over} only ({share:.0%} of the volume).",
            file=sys.stderr,
        )
    for what, vol, top in (("prediction", pred, p_max), ("ground truth", truth, t_max)):
        if top >= n:  # an image, or instance labels: the Dice of classes 0…n-1 means little
            print(
                f"emparsl: note: the {what} {vol.root}:{vol.key} holds values up to {top} but "
                f"there are {n} classes (0–{n - 1}); is it labels of the same classes?",
                file=sys.stderr,
            )
    dice = {}
    for c in range(n):
        inter, ps, ts = values[3 * c : 3 * c + 3]
        dice[names[c] if c < len(names) else str(c)] = (
            round(2 * inter / (ps + ts), 4) if ps + ts else 1.0
        )
    if args.json:
        print(json.dumps({"dice": dice}))
    else:
        print(
            "Dice against the ground truth: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
        )
    return 0


def cmd_describe_model(args: argparse.Namespace) -> int:
    import yaml

    from napari_emparsl.core.models.loaders import describe_model, missing_description
    from napari_emparsl.core.models.spec import parse_options

    options = parse_options(args.model_option or [])
    spec = describe_model(args.model, options)
    missing = missing_description(args.model, options)  # refuses a file that is no model
    described = spec.to_dict()
    if described.get("architecture") is None:  # a TorchScript file or a package: no class to
        described.pop("architecture", None)  # build (a sidecar would not take null)
        if not described.get("arch_options"):
            described.pop("arch_options", None)
    print(yaml.safe_dump(described, sort_keys=False, default_flow_style=None), end="")
    if missing:
        print(
            f"Not described: {', '.join(missing)} (set them in its sidecar or with "
            "--model-option); the values above are defaults.",
            file=sys.stderr,
        )
    return 0


def cmd_check_model(args: argparse.Namespace) -> int:
    from napari_emparsl.core.models.spec import parse_options
    from napari_emparsl.execution.check import check_model

    result = check_model(args.model, parse_options(args.model_option or []))
    print(f"{args.model}: {result.sentence()}")
    return 0 if result.ok else 1


def cmd_export_model(args: argparse.Namespace) -> int:
    from napari_emparsl.core.models.export import export_package
    from napari_emparsl.core.models.spec import parse_options
    from napari_emparsl.core.volume import Volume, parse_spec

    test = None
    if args.test_input:
        test = Volume.open(*parse_spec(args.test_input))  # read as far as the test takes
    done = export_package(
        args.model,
        args.output,
        parse_options(args.model_option or []),
        name=args.name,
        authors=args.author or ("emparsl user",),
        test_input=test,
        overwrite=args.overwrite,
    )
    shape = "×".join(map(str, done.test_shape[2:]))
    if done.mirrored_from:  # fewer sections (say) than the model takes
        given = "×".join(map(str, done.mirrored_from))
        shape += f" (the {given} test input given, mirrored to the size the model takes)"
    print(
        f"Wrote {done.path} ({done.bytes / 1e6:.1f} MB): TorchScript weights, rdf.yaml (bioimage.io "
        f"0.5) and a {shape} test input with its output; check it with `emparsl check-model "
        f"{done.path}`, and complete authors, cite and license in its rdf.yaml before sharing it."
    )
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    from napari_emparsl.core.paths import user_path
    from napari_emparsl.execution.sites import list_sites, load_site

    if args.action == "list" and args.name:  # (was ignored: a typo for show?)
        raise VolumeError(
            f"`emparsl sites list` takes no name; `emparsl sites show {args.name}` shows that "
            "profile."
        )
    if args.action == "list":
        invalid = 0
        for name, path in list_sites().items():
            try:  # one broken profile does not hide the others
                profile = load_site(name)
            except UserError as err:
                invalid += 1
                print(f"{name:<12} invalid: {err}")
                continue
            n = profile.worker_count
            workers = _n(n, "worker") + (" (auto)" if profile.workers == "auto" else "")
            print(f"{name:<12} {profile.kind:<8} {workers}  ({path})")
        folder = os.environ.get("EMPARSL_SITES")
        if folder and not os.path.isdir(user_path(folder)):  # a typo would hide your profiles
            print(
                f"emparsl: note: EMPARSL_SITES is {folder}, which is no folder: no profiles of "
                "yours are listed from it.",
                file=sys.stderr,
            )
        return 2 if invalid else 0
    if not args.name:
        raise VolumeError(f"Name the site, e.g. `emparsl sites {args.action} local`.")
    profile = load_site(args.name)
    if args.action == "test":
        from napari_emparsl.execution.sites import check_site

        print(f"Site {profile.name}: first result after {check_site(profile):.1f} s.")
        return 0
    # (as written: characters beyond the BMP as \ud83d\ude00 came back from YAML as lone halves)
    print(json.dumps(profile.model_dump(), indent=2, ensure_ascii=False))
    made = [f"workers auto: {profile.worker_count}"] if profile.workers == "auto" else []
    if profile.threads_per_worker == "auto":
        made.append(f"threads_per_worker auto: {profile.worker_threads}")
    if made:  # on stderr: the profile on stdout stays JSON for scripts
        print(f"({'; '.join(made)} on this machine)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# entry point


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a command line is one line: what is wrong and where
    to read the options (argparse prints its whole usage block above it, which hid the line in
    a batch job's log); an unknown option is named before the required ones it also lacks
    (``emparsl run --inputs …`` said only that --input was missing)."""

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is None and args is not None:
            unknown = self._unknown_options(list(args))
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)

    def _unknown_options(self, args: list[str]) -> list[str]:
        takes = {s: a.nargs != 0 for a in self._actions for s in a.option_strings}
        unknown = []
        value_next = False  # the token after an option that takes one is its value
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            # argparse's own abbreviations (--over for --overwrite) stay allowed
            matches = [k for k in takes if k == name or k.startswith(name)] if name else []
            if value_next or " " in arg or not name.startswith("--"):
                value_next = False  # a value ("--my model" as --name's), as argparse reads it
                continue
            if not matches:
                unknown.append(name)
            value_next = "=" not in arg and any(takes[k] for k in matches)
        return unknown

    def error(self, message: str):  # argparse's hook
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="emparsl",
        description="Run AI on volume EM in N5 containers, locally or on a cluster.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="show the datasets of an N5 container")
    info.add_argument("path", help="PATH.n5 or PATH.n5:DATASET")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    sample = sub.add_parser("sample", help="write the synthetic EM sample (with ground truth)")
    sample.add_argument("output", help="OUT.n5 to create")
    sample.add_argument("--seed", type=_count, default=0)
    sample.add_argument("--shape", type=_ints, default=(128, 256, 256), help="z,y,x voxels")
    sample.add_argument(
        "--anisotropy", type=_anisotropy, default=1.0, help="z voxel size / xy size (up to 100)"
    )
    sample.add_argument("--overwrite", action="store_true")
    sample.set_defaults(func=cmd_sample)

    imp = sub.add_parser(
        "import", help="convert a TIFF stack, a folder of TIFF/PNG slices or HDF5 to N5"
    )
    imp.add_argument("source", help="stack.tif, a folder of slices, or file.h5[:DATASET]")
    imp.add_argument("output", help="OUT.n5:DATASET (DATASET defaults to raw)")
    imp.add_argument("--chunks", type=_ints, default=(64, 64, 64), help="z,y,x (default 64,64,64)")
    imp.add_argument(
        "--compression", default="gzip", choices=["gzip", "raw", "bzip2", "xz"], help="default gzip"
    )
    imp.add_argument(
        "--voxel-size",
        type=_floats,
        default=None,
        help="z,y,x in nm (or in --unit), e.g. 40,4,4; default: as the files record it",
    )
    imp.add_argument(
        "--unit",
        default=None,
        help="unit of --voxel-size: nm (default), um (µm), mm or angstrom; recorded in nm",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    imp.add_argument("--dry-run", action="store_true", help="print the estimate, write nothing")
    imp.set_defaults(func=cmd_import)

    run = sub.add_parser("run", help="run a model over a volume, block by block, on a compute site")
    run.add_argument("--input", required=True, help="IN.n5:DATASET")
    run.add_argument("--model", required=True, help="a model file or a built-in name (unet3d-em)")
    run.add_argument(
        "--output",
        help="OUT.n5:DATASET (default: predictions/NAME in the input's container, or in a "
        "container of its name in ~/emparsl-predictions where that is read-only)",
    )
    run.add_argument("--site", default="local", help="site name or profile file (default local)")
    run.add_argument("--roi", default=None, help="z0:z1,y0:y1,x0:x1 (default: whole volume)")
    run.add_argument(
        "--block", type=_ints, default=None, help="Z,Y,X write block (default: model's)"
    )
    run.add_argument("--halo", type=_ints0, default=None, help="Z,Y,X context (default: model's)")
    run.add_argument(
        "--model-option", action="extend", nargs="+", metavar="KEY=VALUE",
        help="override the sidecar (several after one flag, or the flag repeated)",
    )  # fmt: skip
    run.add_argument(
        "--retries", type=_count, default=2, help="retries of a failed block (default 2)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="blocks done/failed/pending and provenance of an output")
    status.add_argument("output", help="OUT.n5:DATASET")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    ev = sub.add_parser("evaluate", help="per-class Dice of a labels output against ground truth")
    ev.add_argument("prediction", help="OUT.n5:DATASET")
    ev.add_argument("truth", help="GT.n5:DATASET")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.set_defaults(func=cmd_evaluate)

    for name, func, what, model in (
        ("describe-model", cmd_describe_model,
         "print what a model declares, as emparsl runs it (a sidecar's keys)",
         "a built-in name, a model file or a bioimage.io package"),
        ("check-model", cmd_check_model,
         "run a bioimage.io model on its test input here, and compare with its test output",
         "a bioimage.io package: .zip, folder or rdf.yaml"),
    ):  # fmt: skip
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("model", help=model)
        cmd.add_argument("--model-option", action="extend", nargs="+", metavar="KEY=VALUE")
        cmd.set_defaults(func=func)

    export = sub.add_parser(
        "export-model",
        help="write a model as a bioimage.io package (.zip) to share or run elsewhere",
    )
    export.add_argument("model", help="a built-in name, a model file or a bioimage.io package")
    export.add_argument("output", help="OUT.zip")
    export.add_argument("--model-option", action="extend", nargs="+", metavar="KEY=VALUE")
    export.add_argument("--name", help="the model's name (default: the file name)")
    export.add_argument("--author", action="append", help="an author (repeat for several)")
    export.add_argument(
        "--test-input", metavar="IN.n5:DATASET",
        help="the package's test input: a small volume, cut to a size the model takes "
        "(default: a synthetic sample)",
    )  # fmt: skip
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zip")
    export.set_defaults(func=cmd_export_model)

    sites = sub.add_parser("sites", help="list, show or test compute site profiles")
    sites.add_argument("action", choices=["list", "show", "test"])
    sites.add_argument(
        "name", nargs="?", help="a profile's name (see `sites list`) or a YAML file, for show/test"
    )
    sites.set_defaults(func=cmd_sites)
    for parser in (p, *sub.choices.values()):  # "--block -32,32,32" is a (bad) value, not an option
        parser._negative_number_matcher = re.compile(r"^-\d[\d.,x]*$")
    return p


#: options whose value may begin with "-" (a negative bound, said in one sentence there):
#: argparse takes "--roi -8:,:,:" for an option without its value
_VALUE_OPTIONS = ("--roi", "--block", "--halo", "--voxel-size")


def _join_values(argv: Sequence[str]) -> list[str]:
    """``--roi -8:`` as ``--roi=-8:``, for the options above."""
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        if args[i] in _VALUE_OPTIONS and i + 1 < len(args) and args[i + 1].startswith("-"):
            if not args[i + 1].startswith("--"):
                out.append(f"{args[i]}={args[i + 1]}")
                i += 2
                continue
        out.append(args[i])
        i += 1
    return out


def _options_last(argv: Sequence[str]) -> list[str]:
    """``--model-option k=v …`` moved to the end: it takes one or more values, and before a
    command's paths it took them too (``describe-model --model-option halo=1 m.pt`` said the
    model was missing). Its values are the KEY=VALUE words right after it."""
    out, options, args = [], [], list(argv)
    i = 0
    while i < len(args):
        if args[i] == "--model-option":
            j = i + 1
            while j < len(args) and "=" in args[j] and not args[j].startswith("-"):
                j += 1
            if j > i + 1:
                options += args[i:j]
                i = j
                continue
        out.append(args[i])
        i += 1
    return out + options


def _parsable(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv``, or, where only that parses, ``argv`` with its model options last (see
    :func:`_options_last`; a value without ``=`` after them stays theirs: its own sentence)."""
    import contextlib
    import io

    moved = _options_last(argv)
    if moved == argv:
        return argv
    for candidate in (argv, moved):
        try:
            with (
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                parser.parse_args(candidate)
        except SystemExit:
            continue
        return candidate
    return argv  # argparse says what is wrong with it as given


def _bar_words(voxels: int, t0: float, failed: int) -> str:
    """The progress bar's words after its counts: voxels written per second (once a block is
    done), and how many blocks failed."""
    words = []
    if voxels:
        words.append(f"{voxels / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f} Mvox/s")
    if failed:
        words.append(f"{failed} failed")
    return ", ".join(words)


def _usable_std_streams() -> None:
    """A batch job may start a command with stdin, stdout or stderr closed, or with an output
    encoding that cannot show ×, — or “ ” (``PYTHONIOENCODING=ascii``): the closed ones go to
    /dev/null, and what cannot be encoded is replaced (it crashed ``status``, ``info``, and
    ``sample`` after writing the sample)."""
    std_fds_open()
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):  # not a text stream of its own (a test's capture)
            pass


# exit codes a batch script tells apart (sysexits.h): the output is being written by another
# run, import or napari save (try the same command later); a fault of emparsl's own
EXIT_BUSY = 75  # EX_TEMPFAIL
EXIT_INTERNAL = 70  # EX_SOFTWARE


def _os_advice(err: OSError) -> str:
    """What to do about an operating system's refusal, by its kind."""
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there, or write elsewhere"
    if err.errno == errno.EROFS:
        return "the disk is read-only: write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "check the path's permissions"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder: check the path"
    return "check the path and free space"


def main(argv: Sequence[str] | None = None) -> int:
    _usable_std_streams()
    parser = build_parser()
    args = parser.parse_args(
        _parsable(parser, _join_values(sys.argv[1:] if argv is None else argv))
    )
    from napari_emparsl.core.ledger import OutputBusy

    try:
        return int(args.func(args) or 0)
    except OutputBusy as err:  # another writer holds the output: the same command, later
        print(f"emparsl: error: {err}", file=sys.stderr)
        return EXIT_BUSY
    except UserError as err:
        print(f"emparsl: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # whoever read the output stopped (`emparsl info … | head`): nothing of ours went wrong,
        # and nothing is said; stdout goes nowhere, or Python's own flush at exit would fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"emparsl: error: {err.strerror or err}{where}; {_os_advice(err)}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"emparsl: {_how_stopped(stop)}.", file=sys.stderr)
        return _stop_code(stop)
    except Exception as err:
        path = log_details(f"emparsl {' '.join(argv or sys.argv[1:])}", traceback.format_exc())
        where = f"the details are in {path}" if path else "the details could not be logged"
        print(
            f"emparsl: internal error ({type(err).__name__}: {str(err)[:200]}); "
            f"{where}; please report them.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
