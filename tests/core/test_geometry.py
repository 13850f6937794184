"""plan_blocks: chunk-aligned write ROIs, halos, edges, ROI restriction, scales; hand-computed."""

from __future__ import annotations

import pytest

from napari_emparsl.core.geometry import (
    GeometryError,
    Roi,
    align_up,
    check_no_shared_chunks,
    plan_blocks,
)


def table(blocks):
    return [(b.id, str(b.write_roi), str(b.read_roi), b.pad_before, b.pad_after) for b in blocks]


def test_1d_edges_by_hand():
    # volume 0:10, block 4, halo 2
    #   id 0: write 0:4   read 0:6   (2 padded before)
    #   id 1: write 4:8   read 2:10
    #   id 2: write 8:10  read 6:10  (clipped at the edge; 2 padded after)
    assert table(plan_blocks((10,), (4,), (2,))) == [
        (0, "0:4", "0:6", (2,), (0,)),
        (1, "4:8", "2:10", (0,), (0,)),
        (2, "8:10", "6:10", (0,), (2,)),
    ]


def test_1d_edges_without_padding_by_hand():
    # edge="none": same ROIs, nothing padded; the model sees the volume edge as in a whole forward
    assert table(plan_blocks((10,), (4,), (2,), edge="none")) == [
        (0, "0:4", "0:6", (0,), (0,)),
        (1, "4:8", "2:10", (0,), (0,)),
        (2, "8:10", "6:10", (0,), (0,)),
    ]
    with pytest.raises(GeometryError, match="'reflect' or 'none'"):
        list(plan_blocks((10,), (4,), (2,), edge="zero"))


def test_3d_ids_row_major_and_roi_keeps_ids():
    # volume 8×8×12, block 4×4×4 -> grid 2×2×3, id = z*6 + y*3 + x
    blocks = list(plan_blocks((8, 8, 12), (4, 4, 4), (1, 1, 1)))
    assert [b.id for b in blocks] == list(range(12))
    assert str(blocks[5].write_roi) == "0:4,4:8,8:12"  # z=0, y=1, x=2
    # region 5:6, 1:2, 4:9 touches z-block 1, y-block 0, x-blocks 1 and 2 -> ids 7, 8
    sub = list(
        plan_blocks((8, 8, 12), (4, 4, 4), (1, 1, 1), roi=Roi.from_bounds((5, 1, 4), (6, 2, 9)))
    )
    assert [b.id for b in sub] == [7, 8]
    assert [b.write_roi for b in sub] == [blocks[7].write_roi, blocks[8].write_roi]


def test_block_not_dividing_volume_covers_everything_once():
    blocks = list(plan_blocks((10, 13, 7), (4, 4, 4), (2, 3, 1)))
    covered = {}
    for b in blocks:
        for z in range(b.write_roi.begin[0], b.write_roi.end[0]):
            for y in range(b.write_roi.begin[1], b.write_roi.end[1]):
                for x in range(b.write_roi.begin[2], b.write_roi.end[2]):
                    assert (z, y, x) not in covered
                    covered[(z, y, x)] = b.id
    assert len(covered) == 10 * 13 * 7
    for b in blocks:  # read = write + halo, minus what is padded
        grown = b.write_roi.grow((2, 3, 1))
        assert b.read_roi == grown.intersect(Roi((0, 0, 0), (10, 13, 7)))
        assert all(p >= 0 for p in b.pad_before + b.pad_after)


def test_super_resolution_output_grid():
    # ×2 in y, x: input block 4×8×8 writes output 4×16×16 (whole 4×16×16 output chunks)
    blocks = list(
        plan_blocks((8, 16, 16), (4, 8, 8), (1, 2, 2), out_chunks=(4, 16, 16), scale=(1, 2, 2))
    )
    assert str(blocks[7].out_write_roi) == "4:8,16:32,16:32"  # id 7 = z1, y1, x1
    check_no_shared_chunks(blocks, (4, 16, 16))


def test_2d_model_on_3d_volume():
    blocks = list(plan_blocks((3, 10, 10), (1, 10, 10), (0, 4, 4)))
    assert [str(b.write_roi) for b in blocks] == ["0:1,0:10,0:10", "1:2,0:10,0:10", "2:3,0:10,0:10"]
    assert all(b.read_roi.shape[0] == 1 and b.pad_before == (0, 4, 4) for b in blocks)


def test_misaligned_block_says_what_would_work():
    with pytest.raises(
        GeometryError, match=r"not a whole number of output chunks 8,8,8.*--block 16,16,8"
    ):
        list(plan_blocks((64, 64, 64), (12, 20, 8), (0, 0, 0), out_chunks=(8, 8, 8)))


def test_block_smaller_than_halo_refused():
    with pytest.raises(GeometryError, match="smaller than the halo"):
        list(plan_blocks((64, 64, 64), (8, 8, 8), (16, 16, 16)))


def test_roi_outside_refused():
    with pytest.raises(GeometryError, match="outside the volume"):
        list(
            plan_blocks((8, 8, 8), (4, 4, 4), (0, 0, 0), roi=Roi.from_bounds((9, 0, 0), (12, 4, 4)))
        )
    # a region with too few ranges is not "outside": it says what to give
    with pytest.raises(GeometryError) as err:
        list(plan_blocks((8, 8, 8), (4, 4, 4), (0, 0, 0), roi=Roi.from_bounds((0, 0), (1, 1))))
    assert str(err.value) == (
        "The region 0:1,0:1 has 2 range(s); give one per axis of the 3D volume, e.g. 0:8,0:8,0:8."
    )


def test_no_shared_chunks_detects_overlap():
    blocks = list(plan_blocks((16, 16, 16), (8, 8, 8), (2, 2, 2), out_chunks=(8, 8, 8)))
    check_no_shared_chunks(blocks, (8, 8, 8))
    with pytest.raises(AssertionError, match="both write output chunk"):
        check_no_shared_chunks(blocks, (16, 16, 16))


def test_many_blocks_plan_quickly():
    blocks = plan_blocks((1000, 1000, 1000), (32, 32, 32), (8, 8, 8))
    assert sum(1 for _ in blocks) == 32**3  # 32768 blocks, lazily planned


def test_random_plans_keep_every_invariant():
    """600 seeded random geometries (shape, output chunks, ×1/×2 scale, block, halo, edge,
    region): the write ROIs tile the output once, each starts on a chunk and is a block long
    (shorter only at the far edge), the read ROI is the write ROI grown by the halo and clipped
    with the rest padded (reflect) or not (none), no two blocks share a chunk, and a region's
    plan is exactly the blocks whose write ROI touches it, with the same ids."""
    import math

    import numpy as np

    rng = np.random.default_rng(7)
    planned = 0
    for _ in range(600):
        shape = tuple(int(v) for v in rng.integers(1, 30, 3))
        f = int(rng.choice([1, 2]))
        scale = (1, f, f)
        chunks = tuple(int(v) for v in rng.integers(1, 9, 3))
        block = tuple(
            c // math.gcd(c, s) * int(rng.integers(1, 4))
            for c, s in zip(chunks, scale, strict=True)
        )
        halo = tuple(int(rng.integers(0, b + 1)) for b in block)
        edge = str(rng.choice(["reflect", "none"]))
        kwargs = {"out_chunks": chunks, "scale": scale, "edge": edge}
        try:
            blocks = list(plan_blocks(shape, block, halo, **kwargs))
        except GeometryError:
            continue  # e.g. a block clipped to a short axis that is no longer chunk-aligned
        planned += 1
        out_shape = tuple(n * s for n, s in zip(shape, scale, strict=True))
        written = np.zeros(out_shape, np.int32)
        for b in blocks:
            w, o, r = b.write_roi, b.out_write_roi, b.read_roi
            written[o.to_slices()] += 1
            for ax in range(3):
                blk = min(block[ax], shape[ax])
                assert w.begin[ax] % blk == 0 and w.end[ax] == min(w.begin[ax] + blk, shape[ax])
                assert (o.begin[ax], o.end[ax]) == (w.begin[ax] * scale[ax], w.end[ax] * scale[ax])
                assert o.begin[ax] % chunks[ax] == 0
                assert r.begin[ax] == max(0, w.begin[ax] - halo[ax])
                assert r.end[ax] == min(shape[ax], w.end[ax] + halo[ax])
                before = halo[ax] - (w.begin[ax] - r.begin[ax])
                after = halo[ax] - (r.end[ax] - w.end[ax])
                expected = (before, after) if edge == "reflect" else (0, 0)
                assert (b.pad_before[ax], b.pad_after[ax]) == expected
        assert (written == 1).all()
        assert [b.id for b in blocks] == list(range(len(blocks)))
        check_no_shared_chunks(blocks, chunks)
        lo = [int(rng.integers(0, n)) for n in shape]
        roi = Roi.from_bounds(
            lo, [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True)]
        )
        touching = [
            b.id
            for b in blocks
            if all(
                b.write_roi.begin[ax] < roi.end[ax] and roi.begin[ax] < b.write_roi.end[ax]
                for ax in range(3)
            )
        ]
        sub = list(plan_blocks(shape, block, halo, roi=roi, **kwargs))
        assert [b.id for b in sub] == touching
        assert [b.write_roi for b in sub] == [blocks[i].write_roi for i in touching]
    assert planned > 300  # most random geometries are valid plans


def test_blocks_and_halo_on_the_models_grid():
    # a U-Net pooling by 4: blocks begin, and read, on multiples of 4, as a whole forward does
    blocks = list(plan_blocks((40, 50, 50), (8, 20, 24), (4, 8, 12), grid=(4, 4, 4)))
    assert all(c % 4 == 0 for b in blocks for c in (*b.read_roi.begin, *b.write_roi.begin))
    with pytest.raises(GeometryError, match=r"Block 8,18,24 does not line up with the "
                       r"model's size multiple 4,4,4.*--block 8,16,24 or 8,20,24\.$"):  # fmt: skip
        list(plan_blocks((40, 50, 50), (8, 18, 24), (4, 8, 12), grid=(4, 4, 4)))
    # a block covering its whole axis begins at 0 whatever its size; 2D models: z grid 1
    assert len(list(plan_blocks((10, 50, 50), (10, 20, 20), (0, 4, 4), grid=(4, 4, 4)))) == 9
    assert len(list(plan_blocks((10, 50, 50), (1, 20, 20), (0, 4, 4), grid=(1, 4, 4)))) == 90
    with pytest.raises(GeometryError, match=r"Halo 0,6,4 .* --halo 0,8,4\.$"):
        list(plan_blocks((10, 50, 50), (1, 20, 20), (0, 6, 4), grid=(1, 4, 4)))
    assert align_up((0, 6, 24), (1, 4, 4)) == (0, 8, 24)


def test_block_ids_of_a_region_are_the_plans():
    """`block_ids` (what `emparsl status` counts of a run's region) numbers blocks as the
    planner does, also at the volume's far edge and for a region past it."""
    from napari_emparsl.core.geometry import block_ids

    shape, block = (10, 37, 50), (4, 16, 16)
    for roi in (
        Roi.from_bounds((0, 0, 0), (1, 1, 1)),
        Roi.from_bounds((3, 15, 17), (9, 33, 49)),
        Roi.from_bounds((8, 32, 48), (20, 90, 90)),  # beyond the far edge: clipped
        Roi.from_bounds((0, 0, 0), shape),
    ):
        planned = [b.id for b in plan_blocks(shape, block, (0, 0, 0), roi=roi)]
        assert block_ids(shape, block, roi) == planned and planned
    assert len(block_ids(shape, block, Roi.from_bounds((0, 0, 0), shape))) == 3 * 3 * 4
    assert block_ids(shape, block, Roi.from_bounds((20, 0, 0), (30, 5, 5))) == []
