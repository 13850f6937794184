"""Roi, Block and plan_blocks: the only tiling arithmetic of the package.

Vocabulary (after daisy): ``total_roi`` is the volume, a block's ``write_roi`` is the part of the
output it writes, its ``read_roi`` the input it reads (the write ROI grown by the halo).
All coordinates are input voxels in C order (z, y, x) unless a name says ``out``.

Edge policy::

        volume edge
            |
    ........|=================|======...      = write ROIs: whole output chunks,
    [ pad  ][halo|  write  |halo]                clipped at the volume's far edge
            ^ read ROI clipped here; with ``edge="reflect"`` the missing halo is
              reflect-padded in the worker, with ``edge="none"`` it is not read at all: the
              model meets the volume edge exactly as in one whole-volume forward (its own
              zero padding), which is also cheaper (no context computed outside the volume)

Write ROIs tile the volume on the output chunk grid, so no two blocks ever write the same chunk.
Block ids are row-major indices in the grid of the *whole* volume, so a block has the same id in
a preview (restricted to a region) and in the full run.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from napari_emparsl.core.errors import UserError

__all__ = ["Block", "GeometryError", "Roi", "plan_blocks", "size_values"]

OPEN_END = 2**62  # "10:" or ":" in a region: to the volume's end (clipped once it is known)

_SIZE_SEPARATORS = re.compile(r"[\s,x×*]+")


def size_values(text: str, kind: type = int) -> list:
    """Per-axis sizes as people write them: ``64,64,64``, ``64 64 64``, ``64x64x64`` or
    ``64×64×64`` (as this package prints them); ``kind`` converts each (ValueError if one
    does not)."""
    return [kind(part) for part in _SIZE_SEPARATORS.split(text.strip()) if part]


class GeometryError(UserError, ValueError):
    """A block/halo/ROI choice that cannot work, said in one sentence with what would."""


@dataclass(frozen=True)
class Roi:
    """An axis-aligned box: ``offset`` (begin) and ``shape``, in voxels."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Roi:
        return cls(
            tuple(int(b) for b in begin),
            tuple(int(e) - int(b) for b, e in zip(begin, end, strict=True)),
        )

    @property
    def begin(self) -> tuple[int, ...]:
        return self.offset

    @property
    def end(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return any(s <= 0 for s in self.shape)

    def grow(self, before: Sequence[int], after: Sequence[int] | None = None) -> Roi:
        after = before if after is None else after
        begin = tuple(b - g for b, g in zip(self.begin, before, strict=True))
        end = tuple(e + g for e, g in zip(self.end, after, strict=True))
        return Roi.from_bounds(begin, end)

    def intersect(self, other: Roi) -> Roi:
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin, strict=True))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        return Roi.from_bounds(begin, tuple(max(b, e) for b, e in zip(begin, end, strict=True)))

    def intersects(self, other: Roi) -> bool:
        return not self.intersect(other).empty

    def contains(self, other: Roi) -> bool:
        return all(a <= b for a, b in zip(self.begin, other.begin, strict=True)) and all(
            a >= b for a, b in zip(self.end, other.end, strict=True)
        )

    def scale(self, factors: Sequence[int]) -> Roi:
        return Roi(
            tuple(o * f for o, f in zip(self.offset, factors, strict=True)),
            tuple(s * f for s, f in zip(self.shape, factors, strict=True)),
        )

    def shift(self, by: Sequence[int]) -> Roi:
        return Roi(tuple(o + b for o, b in zip(self.offset, by, strict=True)), self.shape)

    def to_slices(self, relative_to: Sequence[int] | None = None) -> tuple[slice, ...]:
        base = relative_to or (0,) * self.ndim
        return tuple(
            slice(b - r, e - r) for b, e, r in zip(self.begin, self.end, base, strict=True)
        )

    def __str__(self) -> str:
        return ",".join(
            f"{b}:{e if e < OPEN_END else ''}" for b, e in zip(self.begin, self.end, strict=True)
        )


@dataclass(frozen=True)
class Block:
    """One unit of work: read ``read_roi`` (+ reflect padding), write ``write_roi``.

    ``pad_before``/``pad_after`` are the halo voxels that fall outside the volume and must be
    reflect-padded; ``out_write_roi`` is ``write_roi`` on the output grid (× scale).
    """

    id: int
    read_roi: Roi
    write_roi: Roi
    pad_before: tuple[int, ...]
    pad_after: tuple[int, ...]
    out_write_roi: Roi


def _check(
    shape: Sequence[int],
    block: Sequence[int],
    halo: Sequence[int],
    out_chunks: Sequence[int],
    scale: Sequence[int],
    grid: Sequence[int] | None = None,
    fixed: Sequence[int] | None = None,
) -> None:
    n = len(shape)
    for name, value in (
        ("block", block),
        ("halo", halo),
        ("output chunks", out_chunks),
        ("scale", scale),
    ):
        if len(value) != n:
            raise GeometryError(
                f"The {name} {size_text(value)} has {len(value)} axes but the volume has {n}."
            )
    if any(b < 1 for b in block) or any(h < 0 for h in halo) or any(s < 1 for s in scale):
        raise GeometryError(
            f"Block {size_text(block)} must be positive and halo {size_text(halo)} non-negative."
        )
    bad = [i for i in range(n) if (block[i] * scale[i]) % out_chunks[i] and block[i] < shape[i]]
    if bad:
        good = tuple(
            max(1, round(block[i] * scale[i] / out_chunks[i])) * out_chunks[i] // scale[i]
            if (out_chunks[i] % scale[i] == 0)
            else block[i]
            for i in range(n)
        )
        raise GeometryError(
            f"Block {size_text(block)} is not a whole number of output chunks {size_text(out_chunks)}"
            f"{' at scale ' + size_text(scale) if any(s != 1 for s in scale) else ''}; "
            f"use a multiple of the chunks, e.g. --block {','.join(map(str, good))}."
        )
    if grid is not None:
        _check_grid(shape, block, halo, grid)
    # (a model of one input size has its blocks at that size less the halo: no larger ones)
    fixed = fixed or (0,) * n
    small = [i for i in range(n) if block[i] < halo[i] and block[i] < shape[i] and not fixed[i]]
    if small:
        raise GeometryError(
            f"Block {size_text(block)} is smaller than the halo {size_text(halo)}; most of each read would be "
            "context: use blocks at least as large as the halo (ideally 2–4× larger)."
        )


def _check_grid(
    shape: Sequence[int], block: Sequence[int], halo: Sequence[int], grid: Sequence[int]
) -> None:
    """Blocks begin, and read their context, on the model's pooling grid (its size multiple),
    as one whole-volume forward does: a U-Net given a block shifted off that grid pools other
    voxels together and computes other values (seams of whole class flips)."""
    n = len(shape)
    off = [i for i in range(n) if block[i] % grid[i] and block[i] < shape[i]]
    if off:
        below = [max(g, b // g * g) for b, g in zip(block, grid, strict=True)]
        above = [-(-b // g) * g for b, g in zip(block, grid, strict=True)]
        raise GeometryError(
            f"Block {size_text(block)} does not line up with the model's size multiple "
            f"{size_text(grid)}: blocks that do not begin on a multiple of it compute other values "
            "than one whole-volume forward (visible seams); use a multiple of it, e.g. --block "
            f"{','.join(map(str, below))} or {','.join(map(str, above))}."
        )
    if any(h % g for h, g in zip(halo, grid, strict=True)):
        raise GeometryError(
            f"Halo {size_text(halo)} does not line up with the model's size multiple {size_text(grid)}; "
            f"use a multiple of it, e.g. --halo {','.join(map(str, align_up(halo, grid)))}."
        )


def size_text(values: Sequence[int]) -> str:
    """Sizes in messages as they are typed (``--block 8,30,32``), not Python's tuples."""
    return ",".join(str(int(v)) for v in values)


def align_up(values: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """``values`` (a halo, a default block) rounded up to multiples of ``grid`` (the model's
    size multiple): each block then reads from a voxel on the model's pooling grid (more
    context never hurts)."""
    return tuple(-(-int(v) // int(g)) * int(g) for v, g in zip(values, grid, strict=True))


def block_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-s // b) for s, b in zip(shape, block, strict=True))


def block_ids(shape: Sequence[int], block: Sequence[int], roi: Roi) -> list[int]:
    """The ids of the blocks of a plan of ``shape`` in blocks of ``block`` (as
    :func:`plan_blocks` numbers them) whose write ROI touches ``roi``, in id order."""
    block = tuple(min(int(b), int(s)) for b, s in zip(block, shape, strict=True))
    grid = block_grid(shape, block)
    roi = roi.intersect(Roi((0,) * len(shape), tuple(shape)))
    if roi.empty:
        return []
    strides = _strides(grid)
    return [_block_id(index, strides) for index in itertools.product(*_touched(roi, block))]


def _touched(roi: Roi, block: Sequence[int]) -> list[range]:
    """Per axis, the grid indices of the blocks of size ``block`` that ``roi`` touches."""
    return [range(b // bs, -(-e // bs)) for b, e, bs in zip(roi.begin, roi.end, block, strict=True)]


def _strides(grid: Sequence[int]) -> list[int]:
    return [math.prod(grid[i + 1 :]) for i in range(len(grid))]


def _block_id(index: Sequence[int], strides: Sequence[int]) -> int:
    """A block's id: its grid index in C order (as :func:`plan_blocks` and the ledger number)."""
    return sum(i * s for i, s in zip(index, strides, strict=True))


def plan_blocks(
    shape: Sequence[int],
    block: Sequence[int],
    halo: Sequence[int],
    *,
    out_chunks: Sequence[int] | None = None,
    scale: Sequence[int] | None = None,
    roi: Roi | None = None,
    edge: str = "reflect",
    grid: Sequence[int] | None = None,
    fixed: Sequence[int] | None = None,
) -> Iterator[Block]:
    """Blocks covering the volume (or those touching ``roi``), in id order.

    Parameters
    ----------
    shape
        Input volume shape (spatial axes).
    block
        Write ROI size in input voxels; ``block × scale`` must be a multiple of ``out_chunks``
        (except where one block covers the whole axis).
    halo
        Context read on each side (input voxels).
    out_chunks
        Output dataset chunks (defaults to ``block × scale``).
    scale
        Output voxels per input voxel per axis (2 for ×2 super-resolution in y, x).
    roi
        Only blocks whose write ROI intersects it (a preview region).
    edge
        ``"reflect"``: the halo beyond the volume edge is reflect-padded (``pad_before``/
        ``pad_after``); ``"none"``: no context beyond the edge (pads are 0).
    grid
        The model's size multiple (z, y, x): block and halo must be multiples of it (where a
        block does not cover its whole axis), so that every read begins on the model's pooling
        grid, as in one whole-volume forward (see :func:`align_up`).
    fixed
        The one input size of the model per axis (0: any): there a block smaller than its
        halo is what the model takes, not refused.

    Raises
    ------
    GeometryError
        When the block is not chunk-aligned, smaller than the halo, off the model's grid, or
        the ROI is outside.
    """
    n = len(shape)
    scale = tuple(scale) if scale is not None else (1,) * n
    block = tuple(min(int(b), int(s)) for b, s in zip(block, shape, strict=True))
    out_chunks = (
        tuple(out_chunks)
        if out_chunks is not None
        else tuple(b * f for b, f in zip(block, scale, strict=True))
    )
    halo = tuple(int(h) for h in halo)
    if edge not in ("reflect", "none"):
        raise GeometryError(f"The edge policy must be 'reflect' or 'none', not {edge!r}.")
    _check(shape, block, halo, out_chunks, scale, grid, fixed)
    total = Roi((0,) * n, tuple(shape))
    grid = block_grid(shape, block)
    if roi is not None:
        if roi.ndim != n:
            raise GeometryError(
                f"The region {roi} has {roi.ndim} range(s); give one per axis of the "
                f"{n}D volume, e.g. {','.join(f'0:{s}' for s in shape)}."
            )
        if not total.intersects(roi):
            raise GeometryError(
                f"The region {roi} is outside the volume 0:{',0:'.join(map(str, shape))}; "
                "choose a region inside it."
            )
        ranges = _touched(roi.intersect(total), block)
    else:
        ranges = [range(g) for g in grid]
    strides = _strides(grid)
    for index in itertools.product(*ranges):
        begin = tuple(i * b for i, b in zip(index, block, strict=True))
        write = Roi.from_bounds(
            begin, tuple(min(bg + b, s) for bg, b, s in zip(begin, block, shape, strict=True))
        )
        wanted = write.grow(halo)
        read = wanted.intersect(total)
        if edge == "reflect":
            pad_before = tuple(r - w for r, w in zip(read.begin, wanted.begin, strict=True))
            pad_after = tuple(w - r for r, w in zip(read.end, wanted.end, strict=True))
        else:
            pad_before = pad_after = (0,) * n
        yield Block(
            id=_block_id(index, strides),
            read_roi=read,
            write_roi=write,
            pad_before=pad_before,
            pad_after=pad_after,
            out_write_roi=write.scale(scale),
        )


def check_no_shared_chunks(
    blocks: Sequence[Block],
    out_chunks: Sequence[int],
    factor: Sequence[int] | None = None,
) -> None:
    """Assert that no two blocks write into the same output chunk (the z5py no-lock rule).

    With ``factor``, for a pyramid level of the output downsampled by it: each block writes
    ``begin // factor`` on, ``(end - begin) // factor`` voxels, and must begin on a multiple.
    """
    owner: dict[tuple[int, ...], int] = {}
    factor = tuple(factor) if factor is not None else (1,) * len(out_chunks)
    for blk in blocks:
        begin, end = blk.out_write_roi.begin, blk.out_write_roi.end
        if any(b % f for b, f in zip(begin, factor, strict=True)):
            raise AssertionError(f"block {blk.id} begins at {begin}, not a multiple of {factor}")
        lo = [b // f for b, f in zip(begin, factor, strict=True)]
        hi = [b // f + (e - b) // f for b, e, f in zip(begin, end, factor, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue  # nothing of this block at that level
        first = [b // c for b, c in zip(lo, out_chunks, strict=True)]
        last = [-(-e // c) for e, c in zip(hi, out_chunks, strict=True)]
        for idx in itertools.product(*(range(f, e) for f, e in zip(first, last, strict=True))):
            if idx in owner:
                raise AssertionError(
                    f"blocks {owner[idx]} and {blk.id} both write output chunk {idx}"
                    + (
                        f" of the level downsampled by {factor}"
                        if any(f > 1 for f in factor)
                        else ""
                    )
                )
            owner[idx] = blk.id
