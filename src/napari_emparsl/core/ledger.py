"""The done-ledger and provenance of an output dataset (written by the coordinator only).

An append-only JSON-lines file inside the output dataset folder (N5 readers ignore it):

- a ``run`` record per run: input, model file and hash, model options, block, halo, site,
  package version, time;
- a ``block`` record per finished attempt: id, status (done | failed), attempt, worker,
  timings, output statistics, error.

A block is done only after its write returned, so a crash mid-write leaves it not done and the
next run computes it again. A torn last line (crash while appending) is ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from napari_emparsl.core.blockwise import BlockResult
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import block_grid
from napari_emparsl.core.volume import LOCK_SUFFIX

__all__ = [
    "LEDGER_NAME",
    "Ledger",
    "LedgerFollower",
    "LedgerSummary",
    "LedgerUnwritable",
    "OutputBusy",
    "OutputLock",
    "WrittenBlocks",
    "lock_holder",
    "whole_plan_blocks",
    "written_blocks",
]

LEDGER_NAME = "emparsl-ledger.jsonl"

log = logging.getLogger(__name__)


@dataclass
class LedgerSummary:
    runs: list[dict[str, Any]] = field(default_factory=list)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)  # failed and not done since

    @property
    def last_run(self) -> dict[str, Any]:
        return self.runs[-1] if self.runs else {}


class OutputGone(UserError):
    """The output's folder disappeared during a run (deleted by hand, or its disk unmounted)."""


class LedgerUnreadable(UserError):
    """A ledger that exists and cannot be read (permissions, a folder of its name, EIO)."""


class LedgerUnwritable(UserError):
    """The ledger could not be appended to (a full disk, a folder made read-only)."""


class Ledger:
    """Read and append the ledger of one output dataset."""

    def __init__(self, output_root: str, output_key: str):
        self.path = os.path.join(output_root, output_key, LEDGER_NAME)
        self._root, self._key = output_root, output_key
        self._run_fields: dict[str, Any] = {}

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def summary(self) -> LedgerSummary:
        """The ledger read whole; one that exists and cannot be read (its permissions, a
        folder of its name, a disk error) raises :class:`LedgerUnreadable` — read as empty, it
        was "complete", and a resume advised --overwrite, losing the blocks done."""
        follower = LedgerFollower(self._root, self._key)
        out = follower.summary()
        if follower.error is not None:
            err = follower.error
            raise LedgerUnreadable(
                f"The ledger of {self._root}:{self._key} ({self.path}) cannot be read "
                f"({err.strerror or err}); make it readable (check its permissions and disk), "
                "then try again — the output's blocks are kept."
            )
        return out

    def last_run_record(self) -> dict[str, Any]:
        """The last run's record (``{}`` for none, or a ledger that cannot be read), found from
        the end without parsing the block records (a resume's defaults: its block and halo)."""
        import mmap
        import re

        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                starts = [match.start() for match in re.finditer(rb'(?m)^\{"type":\s*"run"', m)]
                for at in reversed(starts):  # the last one whole (a crash may tear the last)
                    end = m.find(b"\n", at)
                    try:
                        record = json.loads(m[at : end if end >= 0 else len(m)])
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        return record
        except (OSError, ValueError):
            pass
        return {}

    def _append(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        # its attributes, not just its folder: a worker's chunk write recreates the folders
        if not os.path.exists(os.path.join(os.path.dirname(self.path), "attributes.json")):
            raise OutputGone(
                f"The output {self._root}:{self._key} was removed while the run wrote it (its "
                "folder is gone); the run stopped — run it again to start the output anew."
            )
        try:
            with open(self.path, "a+b") as f:
                # a line torn by a crash (kill -9 mid-write) must not swallow the next record
                size = f.tell()  # append mode starts at the end
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        text = "\n" + text
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise LedgerUnwritable(
                f"The ledger of {self._root}:{self._key} could not be written "
                f"({err.strerror or err}), so the run stopped; the blocks it recorded before "
                "stay done — free space there (or fix the folder), then run it again to compute "
                "the rest."
            ) from err

    def start_run(self, provenance: dict[str, Any]) -> None:
        self._append([{"type": "run", "time": time.time(), **provenance}])
        # every block record repeats what made it, so provenance survives later runs
        self._run_fields = {k: provenance[k] for k in ("model_sha256", "site") if k in provenance}

    def record(self, result: BlockResult, attempt: int, roi: str) -> None:
        rec = asdict(result)
        rec.pop("detail", None)
        self._append(
            [
                {
                    "type": "block",
                    "id": result.block_id,
                    "status": "done" if result.ok else "failed",
                    "attempt": attempt,
                    "roi": roi,
                    "time": time.time(),
                    **self._run_fields,
                    **{k: v for k, v in rec.items() if k not in ("block_id", "ok")},
                }
            ]
        )


#: what a block's record says that no reader of a summary uses: not kept in memory (a
#: ledger of a million blocks held ~2.7 GB of records, the histogram the largest part)
_NOT_KEPT = ("histogram", "out_min", "out_max", "model_loads", "clipped", "model_range")


def _apply(out: LedgerSummary, rec: dict[str, Any]) -> None:
    if rec.get("type") == "run":
        out.runs.append(rec)
    elif rec.get("type") == "block":
        for key in _NOT_KEPT:
            rec.pop(key, None)
        try:
            bid = int(rec["id"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return  # a record edited by hand or damaged: that block is simply not done
        for key in ("device", "model_sha256", "error", "worker"):  # (as readers print them)
            if rec.get(key) is not None and not isinstance(rec[key], str):
                rec[key] = str(rec[key])
        if rec.get("status") == "done":
            out.done[bid] = rec
            out.failed.pop(bid, None)
        elif bid not in out.done:
            out.failed[bid] = rec


_HEAD = 256  # bytes of a ledger's start compared between reads


class LedgerFollower:
    """A ledger's summary kept current by reading only the lines appended since the last call.

    For displays that ask often (the runs panel asks on every mouse move): a ledger of 10⁵
    blocks takes 1–2 s to read whole. A ledger replaced (``--overwrite``) or shortened is read
    again from its start; a line still being written is left for the next call.
    """

    def __init__(self, output_root: str, output_key: str):
        self.path = os.path.join(output_root, output_key, LEDGER_NAME)
        self._reset(None)

    def _reset(self, ident: tuple[int, int] | None) -> None:
        self.error: OSError | None = None  # why a ledger that exists could not be read
        self._summary = LedgerSummary()
        self._offset = 0
        self._ident = ident
        self._head = b""
        self.generation = getattr(self, "generation", -1) + 1  # ledgers seen (a new one: +1)

    def summary(self) -> LedgerSummary:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                # a new file may get the old one's inode: its first run record tells them apart
                head = f.read(_HEAD)
                ident = (st.st_dev, st.st_ino)
                if (
                    ident != self._ident
                    or st.st_size < self._offset
                    or head[: len(self._head)] != self._head
                ):
                    self._reset(ident)
                    self._head = head
                f.seek(self._offset)
                for line in f:  # line by line: a ledger of 10⁵ blocks is tens of MB
                    if not line.endswith(b"\n"):
                        break  # still being written: read next time
                    self._offset += len(line)
                    try:
                        rec = json.loads(line.decode("utf-8"))
                    except ValueError:
                        continue  # a line torn by a crash: that block is simply not done
                    if isinstance(rec, dict):
                        _apply(self._summary, rec)
        except FileNotFoundError:  # no ledger (yet, or any more)
            self._reset(None)
        except OSError as err:  # there, and unreadable: no summary of it (see Ledger.summary)
            self._reset(None)
            self.error = err
        return self._summary


def _triple(value: Any) -> list[int] | None:
    """Three positive whole numbers as a run record holds them, or None (a record damaged or
    edited by hand: a word, a null, zeros)."""
    if isinstance(value, list) and len(value) == 3 and all(type(n) is int and n > 0 for n in value):
        return value
    return None


def run_spec(last_run: dict[str, Any]) -> dict[str, Any]:
    """A run record's model description ({} where it holds none, or no mapping)."""
    spec = last_run.get("spec")
    return spec if isinstance(spec, dict) else {}


def run_scale(last_run: dict[str, Any]) -> list[int]:
    """A run record's output scale per axis ([1, 1, 1] where it says none usable)."""
    return _triple(run_spec(last_run).get("scale", [1, 1, 1])) or [1, 1, 1]


def run_block(last_run: dict[str, Any]) -> list[int] | None:
    """A run record's block (None where it says none usable)."""
    return _triple(last_run.get("block"))


def whole_plan_blocks(output_shape: Sequence[int], last_run: dict[str, Any]) -> int:
    """Blocks of the whole volume's plan for an output of ``output_shape`` — not only of its
    last run's region (a preview, ``--roi``) — from the block and scale that run recorded."""
    block = run_block(last_run)
    if block is None:  # a record damaged or edited by hand: what it planned, if it says
        planned = last_run.get("planned", 0)
        return planned if type(planned) is int and planned >= 0 else 0
    return math.prod(block_grid(plan_shape(output_shape, last_run), block))


def plan_shape(output_shape: Sequence[int], last_run: dict[str, Any]) -> list[int]:
    """The input's spatial shape the runs of an output of ``output_shape`` planned on (the
    output divided by the model's scale, as the last run recorded it)."""
    scale = run_scale(last_run)
    return [n // s for n, s in zip(list(output_shape)[-3:], scale, strict=True)]


@dataclass
class WrittenBlocks:
    """Which blocks of a run's output are written, for reading that output (or one of its
    coarser levels) as a dataset: its unwritten chunks read as zeros."""

    key: str  # the run's output, which holds the ledger
    done: Any  # numpy bool array, one flag per block of the run's plan (the whole volume's)
    step: tuple[int, ...]  # a block's size on the output's finest grid
    factor: tuple[int, ...]  # the dataset's voxel in voxels of the finest grid
    shape: tuple[int, ...]  # the finest grid's shape

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def _index(self, begin: Sequence[int], end: Sequence[int]) -> tuple[slice, ...]:
        """Blocks a region [begin, end) of the dataset (spatial axes) touches."""
        return tuple(
            slice(b * f // t, -(-min(e * f, n) // t))
            for b, e, f, t, n in zip(begin, end, self.factor, self.step, self.shape, strict=True)
        )

    def missing(self, begin: Sequence[int], end: Sequence[int]) -> tuple[int, int]:
        """(unwritten, all) blocks a region of the dataset touches."""
        need = self.done[self._index(begin, end)]
        return int(need.size - need.sum()), int(need.size)

    def written(self, begin: Sequence[int], end: Sequence[int]) -> bool:
        """Whether every block a region of the dataset touches is written."""
        return self.missing(begin, end)[0] == 0


def written_blocks(root: str, key: str) -> WrittenBlocks | None:
    """The written blocks of ``root:key`` when it is a run's output or one of its levels
    (``KEY/sN``); None for any other dataset."""
    import re

    import numpy as np

    from napari_emparsl.core.volume import Volume

    candidates = [(key, 0)]
    match = re.fullmatch(r"(.+)/s(\d+)", key)
    if match:
        candidates.append((match.group(1), int(match.group(2))))
    for out_key, level in candidates:  # noqa: B007 (the pair found is used below)
        ledger = Ledger(root, out_key)
        if ledger.exists():
            break
    else:
        return None
    summary = ledger.summary()
    last = summary.last_run
    block = run_block(last)
    if block is None:
        return None
    made = Volume.open(root, out_key)
    factor = tuple(made.level_factors()[level][-3:]) if level else (1, 1, 1)
    scale = run_scale(last)
    step = tuple(int(b) * int(s) for b, s in zip(block, scale, strict=True))
    shape = tuple(made.level(0).shape[-3:] if made.is_multiscale else made.shape[-3:])
    done = np.zeros([-(-n // t) for n, t in zip(shape, step, strict=True)], bool)
    for rec in summary.done.values():
        try:
            begin = [int(part.split(":")[0]) for part in str(rec["roi"]).split(",")]
            done[tuple(b * s // t for b, s, t in zip(begin, scale, step, strict=True))] = True
        except (KeyError, ValueError, IndexError):
            continue  # a record without a usable region counts as not written
    return WrittenBlocks(out_key, done, step, factor, shape)


class OutputBusy(UserError):
    """Another run is writing the same output dataset; ``holder``: what its lock file says
    (``pid``, ``host``, ``since``, ``what``; empty where it said nothing readable)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class OutputLock:
    """Held by a run's coordinator from before it looks at its output until the run ends, so
    two runs (two terminals, or the GUI and a terminal) never write one output at once.

    An advisory ``flock`` on a file in the output container's root (``OUT.n5/.pred`` +
    ``.emparsl-lock`` for ``OUT.n5:pred``: N5 readers see folders only). The system lets go of
    it when its process ends, however it ends (a ``kill -9`` leaves nothing to clean up). On a
    file system without locks the run goes on unlocked, as before, with a warning in the log.
    """

    def __init__(self, output_root: str, output_key: str, what: str = "run"):
        self.path = _lock_path(output_root, output_key)
        self.parent, self.output = os.path.dirname(self.path), f"{output_root}:{output_key}"
        self.what = what  # who holds it, as another writer is told: run, import, napari save
        self._file: Any = None
        self._made: str | None = None  # the outermost folder made to hold the lock file
        self._new_file = False  # the lock file was made by this lock (not an earlier run's)

    def acquire(self) -> None:
        for _ in range(5):
            if self._acquire():
                return
        # removed under us again and again: take it as it is now (the next check is the run's)
        self._acquire(recheck=False)

    def _acquire(self, recheck: bool = True) -> bool:
        """One try; False where the file locked is no longer the one at the path (its holder
        removed it as it let go: holding the old one, two runs would each hold "the lock")."""
        try:
            import fcntl
        except ImportError:  # not on Windows
            return True
        made = None
        d = self.parent
        while d and not os.path.exists(d):
            made, d = d, os.path.dirname(d)
        try:
            os.makedirs(self.parent, exist_ok=True)
            existed = os.path.exists(self.path)  # an earlier run's: kept by a refused one
            f = open(self.path, "a+", encoding="utf-8")  # held for the run
        except OSError as err:  # a file in the way, no permission: the output's checks say so
            log.info("could not lock %s (%s)", self.path, err)
            return True
        self._made = made or self._made  # a second try finds the folders a first one made
        self._new_file = not existed
        try:
            for wait in (0.05, 0.1, 0.2, 0.0):  # `emparsl status` looks for a few µs: not a run
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        raise
                    time.sleep(wait)
        except BlockingIOError:
            f.seek(0)
            text = f.read()
            f.close()
            self._made = None
            try:
                holder = json.loads(text)
            except ValueError:
                holder = {}
            raise OutputBusy(
                f"The output {self.output} is being written by {_writer(text)}{_holder(text)}; "
                "wait for it to end (or cancel it), or choose another output name.",
                holder if isinstance(holder, dict) else {},
            ) from None
        except OSError as err:  # a file system without locks: go on, unlocked
            log.warning("could not lock %s (%s); running without a lock", self.path, err)
            f.close()
            return True
        if recheck:
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except OSError:  # removed meanwhile
                same = False
            if not same:
                f.close()
                return False
        f.seek(0)
        f.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        f.write(json.dumps({**info, "what": self.what}))
        f.flush()
        self._file = f
        return True

    @property
    def held(self) -> bool:
        """Whether this holds the lock (not where the file system has no locks)."""
        return self._file is not None

    def release(self, remove: bool = False) -> None:
        """Let go; ``remove``: the lock file goes too, with the folders made to hold it if
        nothing else came into them (a run refused while preparing leaves its output's
        container as it found it; a saved layer keeps no lock file)."""
        if self._file is None:
            return  # not held: someone else's lock is none of ours
        if remove and self._new_file:
            try:
                os.remove(self.path)  # while still held: a run starting now makes a new one
            except OSError:
                pass
            d = self.parent
            while self._made:  # each folder made here, inner first, if nothing else came into it
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == self._made:
                    break
                d = os.path.dirname(d)
        self._file.close()  # closing lets go of the flock
        self._file = None
        self._made = None


def _lock_path(output_root: str, output_key: str) -> str:
    """In the container's root, named after the whole key (``.labels%2Fpred.emparsl-lock``):
    nothing but the root is made for it, so a new container holds no stray folder."""
    name = urllib.parse.quote(output_key.strip("/"), safe="")
    if len(name.encode()) > 200:  # file names have at most 255 bytes: no lock at all, before
        import hashlib

        name = f"{name[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return os.path.join(output_root, f".{name}{LOCK_SUFFIX}")


_WRITERS = {"import": "an import (`emparsl import`)", "napari save": "a save from napari"}


def _writer(text: str) -> str:
    """Who holds a lock, by what its file says (a lock written before it said: a run)."""
    try:
        what = json.loads(text).get("what", "run")
    except (ValueError, AttributeError):
        what = "run"
    return _WRITERS.get(what, "another run")


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f" (process {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return ""


def lock_holder(output_root: str, output_key: str) -> dict[str, Any] | None:
    """The writer of this output now — ``{"pid", "host", "since", "what"}`` (run, import,
    napari save) as it recorded them (empty if it had not yet) — or None when none is. Looks without writing anything: a shared lock
    tried for a moment (a run starting meanwhile waits that moment out)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(_lock_path(output_root, output_key), encoding="utf-8")
    except OSError:
        return None  # never run, or not by a version that locks
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(f.read())
            except ValueError:
                return {}
            return info if isinstance(info, dict) else {}
        except OSError:
            return None  # no locks on this file system
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None
