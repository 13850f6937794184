"""Disk full while writing: the block is failed, never marked done (real tmpfs, needs root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from napari_emparsl.core.volume import Volume, save_array


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _records(ledger) -> list[dict]:
    out = []
    for line in ledger.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line the full disk cut short
            continue
        if rec.get("type") == "block":
            out.append(rec)
    return out


def test_disk_full_blocks_fail_not_done(tmp_path, tiny_disk, conv_model):
    data = np.random.default_rng(0).random((32, 64, 64)).astype(np.float32)  # 8 blocks of 64 KiB
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 32, 32))
    out = f"{tiny_disk}/out.n5:pred"
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", conv_model, "--output", out, "--site", "threads", "--block", "16,32,32", "--retries", "0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    # the failed blocks say why (z5 itself says only "failed to write chunk file")
    ledger = tiny_disk / "out.n5" / "pred" / "emparsl-ledger.jsonl"
    records = _records(ledger)
    done = [r for r in records if r["status"] == "done"]
    failed = [r for r in records if r["status"] == "failed"]
    assert 1 <= len(done) < 8 and failed, records
    # (emparsl's own sentence, without an exception type)
    assert failed[0]["error"].startswith(f"The disk holding {tiny_disk}/out.n5 is full (")
    assert f"block {failed[0]['id']} failed: The disk holding" in res.stderr
    # the run stopped where the ledger could not be written, and says so in one sentence
    last = [line for line in res.stderr.splitlines() if line.startswith("emparsl: ")][-1]
    assert last.startswith(f"emparsl: error: The ledger of {out} could not be written (No space "
                           "left on device), so the run stopped;"), last  # fmt: skip
    assert last.endswith("then run it again to compute the rest."), last
    # every block the ledger calls done is really written; the others are not claimed
    import torch

    with torch.inference_mode():
        full = torch.jit.load(conv_model)(torch.from_numpy(data)[None, None])[0, 0].numpy()
    written = Volume.open(tiny_disk / "out.n5", "pred")
    interior = (slice(2, -2),) * 3

    def check(recs: list[dict]) -> None:
        for rec in recs:
            (z0, z1), (y0, y1), (x0, x1) = (map(int, r.split(":")) for r in rec["roi"].split(","))
            got = written.read((slice(z0, z1), slice(y0, y1), slice(x0, x1)))
            np.testing.assert_allclose(
                got[interior], full[z0:z1, y0:y1, x0:x1][interior], atol=1e-4
            )

    check(done)
    # space freed: the same command computes the rest, not what was done
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_disk)], check=True)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    after = [r for r in _records(ledger) if r["status"] == "done"]
    assert sorted(r["id"] for r in after) == list(range(8))  # each block done once
    check(after)


def test_disk_full_during_an_import_is_one_sentence_and_keeps_nothing(tmp_path, tiny_disk):
    """z5's "failed to write chunk file" was an internal error ("please report them")."""
    import tifffile

    data = np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8)  # 64 KiB
    tifffile.imwrite(tmp_path / "r.tif", np.concatenate([data] * 4))  # 256 KiB, incompressible
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "import", str(tmp_path / "r.tif"),
           f"{tiny_disk}/o.n5:raw", "--chunks", "8,64,64", "--compression", "raw"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 2, res.stderr
    last = [line for line in res.stderr.splitlines() if line.startswith("emparsl: ")][-1]
    assert last.startswith("emparsl: error: The import could not write slices ") and (
        f": the disk holding {tiny_disk}/o.n5 is full (" in last
    ), last
    assert last.endswith("free); nothing of it was kept; free space there, or import elsewhere.")
    assert not (tiny_disk / "o.n5").exists()
