"""LiveN5Array: reads straight from N5, keeps only the watched plane, re-read per written block."""

from __future__ import annotations

import numpy as np

from napari_emparsl._napari.live import LiveN5Array
from napari_emparsl.core.volume import Volume, save_array


def test_reads_follow_writes_and_the_kept_plane_is_fresh(tmp_path):
    out = Volume.create(tmp_path / "o.n5", "pred", (8, 16, 16), "uint8", (4, 8, 8))
    live = LiveN5Array(str(tmp_path / "o.n5"), "pred")
    assert live.shape == (8, 16, 16) and live.dtype == np.uint8 and live.ndim == 3
    assert not np.asarray(live).any()
    # no cache across writes: a block written by a worker shows on the next read
    out.write(np.full((4, 8, 8), 3, np.uint8), (0, 0, 0))
    assert live[2, 0, 0] == 3 and live[(slice(2, 3), slice(None), slice(None))].shape == (1, 16, 16)
    # the watched plane is kept once a block touching it was written (read off the Qt thread)
    live.watch(2)
    out.write(np.full((4, 8, 8), 5, np.uint8), (0, 8, 8))
    assert live.block_written((0, 8, 8), (4, 16, 16)) and live.plane_hits == 0
    plane = np.asarray(live[(slice(2, 3), slice(None), slice(None))])
    assert live.plane_hits == 1 and plane[0, 12, 12] == 5 and plane[0, 0, 0] == 3
    assert live[2, 1:3, 9].tolist() == [0, 0] and live.plane_hits == 2
    # a key of slices alone is a lazy box (napari crops a multiscale level over every axis
    # before it picks the plane): indexing it further reads only what is asked, here the plane
    box = live[:, 8:16, 8:16]
    assert not isinstance(box, np.ndarray) and box.shape == (8, 8, 8) and live.plane_hits == 2
    assert box[2, 4, 4] == 5 and box[2].shape == (8, 8) and live.plane_hits == 4
    assert np.asarray(box[4:6]).shape == (2, 8, 8) and live.plane_hits == 4
    # other planes, fancy keys and blocks elsewhere go to disk
    # a later block re-reads only its own box of the kept plane (a few chunks, not a plane of
    # the whole volume): what another writer put elsewhere in the plane is not picked up
    out.write(np.full((4, 8, 8), 6, np.uint8), (0, 0, 8))
    out.write(np.full((4, 8, 8), 9, np.uint8), (0, 8, 0))  # no block reported there
    assert live.block_written((0, 0, 8), (4, 8, 16))
    assert live[2, 0, 12] == 6 and live[2, 12, 0] == 0 and live[2, 12, 12] == 5
    assert not live.block_written((4, 0, 0), (8, 8, 8))
    assert live[5].shape == (16, 16) and live.plane_hits == 7
    assert live[[0, 2], 0, 0].tolist() == [3, 3]
    # moving away drops the kept plane: coming back never shows what was kept before
    live.watch(6)
    out.write(np.full((4, 8, 8), 7, np.uint8), (0, 8, 8))
    live.watch(2)
    assert live[2, 12, 12] == 7 and live.plane_hits == 7


def test_image_output_with_channels(tmp_path):
    out = Volume.create(tmp_path / "o.n5", "img", (2, 4, 8, 8), "float32", (1, 4, 8, 8))
    out.write(np.ones((2, 4, 8, 8), np.float32), (0, 0, 0, 0))
    live = LiveN5Array(str(tmp_path / "o.n5"), "img")
    live.watch(1)
    assert live.block_written((0, 0, 0), (4, 8, 8))
    assert live[:, 1].shape == (2, 8, 8) and live.plane_hits == 1
    assert float(live[1, 1, 2, 2]) == 1.0


def test_follow_keeps_the_plane_napari_reads(tmp_path):
    out = Volume.create(tmp_path / "o.n5", "pred", (8, 16, 16), "uint8", (4, 8, 8))
    live = LiveN5Array(str(tmp_path / "o.n5"), "pred")
    assert live[3].shape == (16, 16)  # read before following: remembered
    live.follow(True)  # e.g. a run starts: the plane read last is watched
    out.write(np.full((4, 8, 8), 2, np.uint8), (0, 0, 0))
    assert live.block_written((0, 0, 0), (4, 8, 8)) and live[3, 0, 0] == 2
    assert live.plane_hits == 1
    live[6, 0:4, 0:4]  # napari moved (or picked another level's plane): that one is watched now
    assert not live.block_written((0, 0, 0), (4, 8, 8))
    out.write(np.full((4, 8, 8), 4, np.uint8), (4, 8, 8))
    assert live.block_written((4, 8, 8), (8, 16, 16)) and live[6, 9, 9] == 4
    assert live.plane_hits == 2
    live[:, 2]  # a y-plane (another dims order) is not a plane blocks are kept for
    assert live.block_written((4, 8, 8), (8, 16, 16))  # still plane 6
    live.follow(False)  # the run ended: nothing kept, every read goes to disk
    assert not live.block_written((4, 8, 8), (8, 16, 16)) and live[6, 9, 9] == 4
    assert live.plane_hits == 2


def test_kept_whole_for_a_3d_view(tmp_path):
    """A 3D view draws a whole (coarse) level: kept in memory while a run writes it, read whole
    with the first block, then each block's box re-read (off the Qt thread), reads from memory."""
    out = Volume.create(tmp_path / "o.n5", "img", (2, 8, 16, 16), "float32", (1, 4, 8, 8))
    live = LiveN5Array(str(tmp_path / "o.n5"), "img")
    live.keep_whole(True)
    out.write(np.ones((2, 4, 8, 8), np.float32), (0, 0, 0, 0))
    assert np.asarray(live)[:, :4, :8, :8].all() and live.whole_hits == 0  # nothing kept yet
    assert live.block_written((0, 0, 0), (4, 8, 8))
    whole = np.asarray(live)
    assert live.whole_hits == 1 and whole.shape == (2, 8, 16, 16) and whole.sum() == 2 * 256
    out.write(np.full((2, 4, 8, 8), 2, np.float32), (0, 4, 8, 8))
    out.write(np.full((2, 4, 8, 8), 3, np.float32), (0, 0, 8, 0))  # no block reported there
    assert live.block_written((4, 8, 8), (8, 16, 16))
    assert float(live[1, 6, 12, 12]) == 2 and float(live[0, 2, 12, 4]) == 0
    assert live.whole_hits == 3
    whole[:] = 9  # what a reader got is its own copy
    assert float(live[0, 0, 0, 0]) == 1
    live.keep_whole(False)  # the run ended, or a 2D view: every read goes to disk
    assert float(live[0, 2, 12, 4]) == 3 and live.whole_hits == 4


def test_a_reversed_slice_is_empty_as_in_numpy(tmp_path):
    """``live[4:2]``: shape (0, …) as numpy gives (before: a negative shape)."""
    save_array(tmp_path / "o.n5", "x", np.zeros((6, 7, 8), np.uint8))
    live = LiveN5Array(str(tmp_path / "o.n5"), "x")
    assert live[4:2].shape == (0, 7, 8) == np.zeros((6, 7, 8))[4:2].shape


def test_an_index_out_of_range_raises_as_in_numpy(tmp_path):
    """``live[6]`` of 6 planes, ``live[0][9]``: IndexError, as numpy (before: a plane of 0s
    read from beyond the dataset, or a region with indices past its end)."""
    import pytest

    data = np.arange(6 * 7 * 8, dtype=np.uint16).reshape(6, 7, 8)
    save_array(tmp_path / "o.n5", "x", data)
    live = LiveN5Array(str(tmp_path / "o.n5"), "x")
    for key in (6, -7, (0, 7), (slice(None), slice(None), 8)):
        with pytest.raises(IndexError):
            live[key]
        with pytest.raises(IndexError):
            data[key]
    with pytest.raises(IndexError):
        live[1:3][2]
    np.testing.assert_array_equal(np.asarray(live[-1]), data[-1])
    np.testing.assert_array_equal(np.asarray(live[1:3][1, 2]), data[1:3][1, 2])


def test_a_huge_plane_is_not_kept(tmp_path, monkeypatch):
    """The plane on screen of a huge output is not read whole into memory (16384²: 268 MB,
    2.3 s in its chunks' full depth, for the first block under it): the block is still said to
    change what is shown, and napari reads the part it shows from disk."""
    from napari_emparsl._napari import live as live_module

    out = Volume.create(tmp_path / "o.n5", "pred", (8, 16, 16), "uint8", (4, 8, 8))
    monkeypatch.setattr(live_module, "_MOST_KEPT_PLANE", 255)  # as a plane of 16 × 16 is big
    live = LiveN5Array(str(tmp_path / "o.n5"), "pred")
    live.watch(2)
    out.write(np.full((4, 8, 8), 5, np.uint8), (0, 8, 8))
    assert live.block_written((0, 8, 8), (4, 16, 16))
    assert live._plane is None and live[2, 12, 12] == 5 and live.plane_hits == 0
    monkeypatch.setattr(live_module, "_MOST_KEPT_PLANE", 256)  # one of 16 × 16 is kept
    assert live.block_written((0, 8, 8), (4, 16, 16)) and live._plane is not None
