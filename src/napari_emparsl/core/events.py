"""Frozen RunEvent dataclasses: what a run reports to the CLI progress bar and to napari."""

from __future__ import annotations

from dataclasses import dataclass

from napari_emparsl.core.blockwise import BlockResult

__all__ = [
    "BlockDone",
    "BlockFailed",
    "BlockStarted",
    "Cancelled",
    "Finished",
    "Planned",
    "RunEvent",
]


@dataclass(frozen=True)
class RunEvent:
    pass


@dataclass(frozen=True)
class Planned(RunEvent):
    total: int  # blocks in the plan
    todo: int  # not done yet (the rest were done by an earlier run or preview)
    output: str  # OUT.n5:KEY
    voxels_todo: int
    levels: int = 1  # the output's pyramid levels (> 1: coarser ones each block writes too)
    warnings: tuple[str, ...] = ()  # e.g. the volume's voxels are not those the model knows


@dataclass(frozen=True)
class BlockStarted(RunEvent):
    """A worker began computing a block. Only where the site tells: the in-process ``threads``
    site does; HTEX-based sites report finished tasks only."""

    block_id: int
    worker: str


@dataclass(frozen=True)
class BlockDone(RunEvent):
    result: BlockResult
    done: int  # done so far, this run and earlier ones
    total: int
    voxels: int  # output voxels this block wrote


@dataclass(frozen=True)
class BlockFailed(RunEvent):
    block_id: int
    error: str
    attempt: int
    final: bool  # no retry left


@dataclass(frozen=True)
class Finished(RunEvent):
    done: int
    failed: int
    total: int
    seconds: float
    warnings: tuple[str, ...] = ()  # what the blocks showed (a uint8 output's clipped values)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.done == self.total


@dataclass(frozen=True)
class Cancelled(RunEvent):
    done: int
    total: int
