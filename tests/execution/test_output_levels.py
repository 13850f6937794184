"""Outputs big enough to stall napari in 3D get coarser levels, written by the blocks themselves."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import napari_emparsl
from napari_emparsl.cli import main
from napari_emparsl.core.geometry import check_no_shared_chunks, plan_blocks
from napari_emparsl.core.volume import Volume, output_level_factors, save_array
from napari_emparsl.execution.runner import RunError


@pytest.mark.parametrize(
    ("shape", "voxel", "block", "expected"),
    [
        # small: one level, a plain dataset as before
        ((128, 128, 128), (8, 8, 8), (128, 128, 128), [(1, 1, 1)]),
        # the sample: 8.4 Mi voxels -> one coarser level of 1 Mi
        ((128, 256, 256), (8, 8, 8), (128, 128, 128), [(1, 1, 1), (2, 2, 2)]),
        # 1024³: down to 128³; each 128³ block still writes 16³ of the coarsest level
        ((1024,) * 3, (8, 8, 8), (128,) * 3, [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]),
        # 4096³: 256³ at factor 16 is still over 2 Mi, but a block would hold 4 voxels of the
        # next level (fewer than 8): stop
        (
            (4096,) * 3,
            (8, 8, 8),
            (128,) * 3,
            [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8), (16,) * 3],
        ),
        # anisotropic (CREMI-like, 40 nm z): z is left alone until y, x reach 32 nm, then
        # both are halved
        (
            (100, 1250, 1250),
            (40, 4, 4),
            (100, 128, 128),
            [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 16, 16)],
        ),
        # a 2D model's blocks are one slice deep: z is never downsampled
        ((128, 1024, 1024), (8, 8, 8), (1, 256, 256), [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)]),
        # blocks of 40: 40 / 4 = 10, 40 / 8 = 5 voxels per block (fewer than 8): stop at 256³
        ((1024,) * 3, (8, 8, 8), (40,) * 3, [(1, 1, 1), (2, 2, 2), (4, 4, 4)]),
        # blocks of 36: 36 / 4 = 9, but 36 is no multiple of 8: stop at 256³
        ((1024,) * 3, (8, 8, 8), (36,) * 3, [(1, 1, 1), (2, 2, 2), (4, 4, 4)]),
    ],
)
def test_level_factors_table(shape, voxel, block, expected):
    assert output_level_factors(shape, voxel, block) == expected


def test_level_chunks_owned_by_one_block():
    blocks = list(plan_blocks((64, 96, 96), (32, 32, 32), (0, 0, 0)))
    check_no_shared_chunks(blocks, (16, 16, 16), factor=(2, 2, 2))
    with pytest.raises(AssertionError, match="both write output chunk"):
        # 32 / 2 = 16 voxels per block at that level: a 32³ chunk there spans two blocks
        check_no_shared_chunks(blocks, (32, 32, 32), factor=(2, 2, 2))
    odd = list(plan_blocks((64, 96, 96), (24, 24, 24), (0, 0, 0)))
    with pytest.raises(AssertionError, match="not a multiple"):
        check_no_shared_chunks(odd, (4, 4, 4), factor=(16, 16, 16))


class TwoClass(nn.Module):
    """Voxel-wise: class 1 where the input is above its middle value."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1)


class TwoChannels(nn.Module):
    def forward(self, x):
        return torch.cat([x, 1.0 - x], dim=1)


@pytest.fixture
def big_volume(tmp_path):
    """64×192×192 (2.4 Mi voxels: one coarser level), z a little coarser than y, x."""
    rng = np.random.default_rng(5)
    data = rng.random((64, 192, 192), dtype=np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(32, 64, 64), voxel_size=(10, 8, 8))
    return f"{tmp_path}/in.n5:raw", data


def test_labels_output_levels_match_level_0_and_resume(tmp_path, save_model, big_volume):
    spec, data = big_volume
    model = save_model(
        TwoClass(), tmp_path / "two.pt", "kind: labels\nclasses: [low, high]\nblock: [32, 64, 64]\n"
    )
    out = f"{tmp_path}/out.n5"
    # part first (a preview), then the rest: each block writes its share of every level
    part = napari_emparsl.run(spec, model, f"{out}:seg", site="threads", roi="0:32,0:64,0:64")
    assert part.ok and part.done == 1
    vol = Volume.open(out, "seg")
    assert vol.is_multiscale and vol.levels == ("seg/s0", "seg/s1")
    assert vol.level_factors() == [(1, 1, 1), (2, 2, 2)]
    coarse = vol.level(1).compute()
    assert coarse.shape == (32, 96, 96)
    assert coarse[:16, :32, :32].any() and not coarse[16:].any() and not coarse[:, 32:].any()

    final = napari_emparsl.run(spec, model, f"{out}:seg", site="threads")
    assert final.ok and final.done == 18 and final.total == 18
    vol = Volume.open(out, "seg")
    fine, coarse = vol.level(0).compute(), vol.level(1).compute()
    np.testing.assert_array_equal(fine, (data > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(coarse, fine[::2, ::2, ::2])  # labels are never averaged
    assert vol.level_chunks()[1] == (16, 32, 32)  # whole chunks of one block each
    np.testing.assert_allclose(vol.level_voxel_sizes[1], (20, 16, 16))
    # a level opened alone lies where its voxels came from: labels keep each window's first
    assert Volume.open(out, "seg/s1").offset == (0.0, 0.0, 0.0)


def test_image_output_levels_are_means_also_with_channels(tmp_path, save_model, big_volume):
    spec, data = big_volume
    model = save_model(
        TwoChannels(), tmp_path / "two.pt", "kind: image\nout_channels: 2\nblock: [32, 64, 64]\n"
    )
    out = f"{tmp_path}/out.n5"
    assert napari_emparsl.run(spec, model, f"{out}:img", site="threads").ok
    vol = Volume.open(out, "img")
    assert vol.shape == (2, 64, 192, 192) and vol.level_factors()[1] == (1, 2, 2, 2)
    coarse = vol.level(1).compute()
    expected = np.stack([data, 1.0 - data]).astype(np.float64)
    expected = expected.reshape(2, 32, 2, 96, 2, 96, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(coarse, expected, atol=1e-6)
    # a mean's centre lies half a finest voxel on (10 × 8 × 8 nm voxels): opened alone (or
    # run on), the level lies where its voxels came from
    level = Volume.open(out, "img/s1")
    assert level.offset == (5.0, 4.0, 4.0) and level.voxel_size == (20.0, 16.0, 16.0)


class Times3(nn.Module):
    def forward(self, x):
        return 3 * x


def test_image_output_as_uint8_maps_its_range_and_resumes_an_older_output(
    tmp_path, save_model, big_volume
):
    """``out_dtype: uint8`` writes 4× less than float32: ``out_range`` becomes 0..255 (rounded,
    clipped), coarser levels are rounded means. An output whose ledger predates those keys
    resumes as what it was, float32."""
    import json

    spec, data = big_volume
    model = save_model(
        TwoChannels(), tmp_path / "two.pt", "kind: image\nout_channels: 2\nblock: [32, 64, 64]\n"
    )
    out = f"{tmp_path}/out.n5"
    as_uint8 = {"out_dtype": "uint8", "out_range": "0.2,0.8"}
    done = napari_emparsl.run(spec, model, f"{out}:img8", site="threads", model_options=as_uint8)
    assert done.ok and done.done == done.total == 2 * 3 * 3
    vol = Volume.open(out, "img8")
    assert vol.dtype == np.uint8 and vol.shape == (2, 64, 192, 192)
    expected = np.clip(np.rint((np.stack([data, 1.0 - data]) - 0.2) * (255 / 0.6)), 0, 255)
    fine = vol.level(0).compute()
    assert np.abs(fine.astype(int) - expected).max() <= 1  # float32 rounding at .5
    assert np.mean(fine == expected) > 0.999
    assert (fine == 0).any() and (fine == 255).any()  # clipped at both ends
    coarse = vol.level(1).compute()
    mean = fine.astype(np.float64).reshape(2, 32, 2, 96, 2, 96, 2).mean(axis=(2, 4, 6))
    assert coarse.dtype == np.uint8 and np.abs(coarse - np.round(mean)).max() <= 0.5

    # what 0 and 255 stand for is kept with the output; less than 1 % clipped: no warning
    # (the test's data lies in [0, 1]: 0.2..0.8 clips much more, said when the run finishes)
    assert vol.attrs["value_range"] == [0.2, 0.8]
    assert any("values written lay outside out_range [0.2, 0.8]" in w for w in done.warnings)
    with pytest.warns(UserWarning, match=r"% of the values written lay outside out_range \[0, 1\]"):
        wide = napari_emparsl.run(spec, save_model(Times3(), tmp_path / "x3.pt",
                                  "kind: image\nout_dtype: uint8\n"), f"{out}:x3", site="threads")  # fmt: skip
    [said] = wide.warnings
    assert said.startswith("66.") and re.search(
        r"\(the blocks that clipped gave [0-9.e-]+ to 3\)", said
    )
    assert "(e.g. --model-option out_range=0,3) and write it again with --overwrite." in said
    # the range the clipping blocks gave, not widened to out_range's own ends (a model of 0.5
    # to 3.5 was said to give "0 to 3.5")
    shifted = save_model(Times3(), tmp_path / "x3s.pt", "kind: image\nout_dtype: uint8\n")
    with pytest.warns(UserWarning):
        high = napari_emparsl.run(spec, shifted, f"{out}:x3s", site="threads",
                                  model_options={"out_range": "-2,-1"})  # fmt: skip
    [said] = high.warnings
    assert "(the blocks that clipped gave " in said and " to 3)" in said
    assert not said.split("gave ")[1].startswith("-2")
    fitting = {"out_range": "0,3"}
    done = napari_emparsl.run(spec, tmp_path / "x3.pt", f"{out}:x3fit", site="threads",
                              model_options=fitting)  # fmt: skip
    assert done.ok and done.warnings == ()

    # a float32 output started by a version that knew neither key
    assert napari_emparsl.run(spec, model, f"{out}:img", site="threads", roi="0:32,:,:").ok
    ledger = tmp_path / "out.n5" / "img" / "emparsl-ledger.jsonl"
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert any("out_dtype" in r.get("spec", {}) for r in records)
    for r in records:
        for key in ("out_dtype", "out_range"):
            r.get("spec", {}).pop(key, None)
    ledger.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        RunError, match=r"out_dtype: float32, not uint8, out_range: \[0, 1\], not \["
    ):
        napari_emparsl.run(spec, model, f"{out}:img", site="threads", model_options=as_uint8)
    final = napari_emparsl.run(spec, model, f"{out}:img", site="threads")
    assert final.ok and final.total == 18 and final.done == 18
    assert Volume.open(out, "img").dtype == np.float32


def test_2d_model_levels_keep_every_slice(tmp_path, conv2d_model, big_volume):
    spec, _ = big_volume
    out = f"{tmp_path}/out.n5"
    done = napari_emparsl.run(spec, conv2d_model, f"{out}:img", site="threads", block=(1, 96, 96))
    assert done.ok and done.total == 64 * 4
    vol = Volume.open(out, "img")
    assert vol.level_factors() == [(1, 1, 1), (1, 2, 2)]  # one-slice blocks: z never halved
    fine, coarse = vol.level(0).compute(), vol.level(1).compute()
    expected = fine.astype(np.float64).reshape(64, 96, 2, 96, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(coarse, expected, atol=1e-5)
    # one-slice blocks get chunks of a whole slice where it divides the block (1×96×96, not
    # 1×48×48: 1×64×64 chunks made a 2D model's output thousands of 16 KiB files)
    assert vol.chunks == (1, 96, 96)
    wide = napari_emparsl.run(spec, conv2d_model, f"{out}:wide", site="threads",
                              block=(1, 192, 192), roi="0:2,:,:")  # fmt: skip
    assert wide.ok and Volume.open(out, "wide").chunks == (1, 192, 192)


def test_cli_says_the_output_has_levels(tmp_path, save_model, big_volume, capsys):
    spec, _ = big_volume
    model = save_model(
        TwoClass(), tmp_path / "two.pt", "kind: labels\nclasses: [low, high]\nblock: [32, 64, 64]\n"
    )
    out = f"{tmp_path}/out.n5:seg"
    assert (
        main(["run", "--input", spec, "--model", model, "--output", out, "--site", "threads"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"Planned 18 blocks into {out}, which each also write 1 coarser level for" in printed
    assert main(["info", out]) == 0
    assert "seg/s1" in capsys.readouterr().out


def test_every_chunk_a_block_wrote_is_on_disk_before_the_block_is_recorded(
    tmp_path, save_model, big_volume, monkeypatch
):
    """The ledger is flushed to disk as each block is recorded done; the block's chunks were
    only in the system's cache (a machine losing power could come back with blocks recorded
    done over chunks that never reached the disk, and a resume skipped them). Each block now
    flushes its chunk files (every level, every channel) and their folders before it returns,
    so before the ledger records it: before, no chunk file was flushed."""
    import os

    from napari_emparsl.core.ledger import Ledger

    spec, _ = big_volume
    model = save_model(
        TwoChannels(), tmp_path / "two.pt", "kind: image\nout_channels: 2\nblock: [32, 64, 64]\n"
    )
    events: list[tuple[str, object]] = []  # ("flush", path) and ("record", block id), in order
    real_fsync, real_record = os.fsync, Ledger.record

    def fsync(fd):  # the real flush, noting what it flushed
        events.append(("flush", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def record(self, result, attempt, roi):
        events.append(("record", result.block_id))
        real_record(self, result, attempt, roi)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Ledger, "record", record)
    out = tmp_path / "out.n5"
    assert napari_emparsl.run(spec, model, f"{out}:img", site="threads").ok
    # the block of each chunk file: its chunk index (N5 order: x, y, z, channel) is the
    # block's place in the plan's grid of 2×3×3 blocks, at both levels
    ids = {
        tuple(b.write_roi.begin[i] // (32, 64, 64)[i] for i in range(3)): b.id
        for b in plan_blocks((64, 192, 192), (32, 64, 64), (0, 0, 0))
    }
    chunks: dict[int, set[str]] = {}
    for level in ("s0", "s1"):
        top = out / "img" / level
        for here, _, files in os.walk(top):
            for f in files:
                if f != "attributes.json":
                    x, y, z, _c = map(int, os.path.relpath(os.path.join(here, f), top).split("/"))
                    chunks.setdefault(ids[(z, y, x)], set()).add(os.path.join(here, f))
    assert sum(map(len, chunks.values())) == 2 * 18 * 2  # channels × blocks × levels
    flushed: set[object] = set()
    for what, value in events:
        if what == "flush":
            flushed.add(value)
        else:  # each block's chunks were on disk before its record
            assert chunks[value] <= flushed, f"block {value} recorded before its chunks"
    assert {v for w, v in events if w == "record"} == set(chunks)
