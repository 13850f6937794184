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


def test_disk_full_blocks_fail_not_done(tmp_path, tiny_disk, conv_model):
    data = np.random.default_rng(0).random((32, 64, 64)).astype(np.float32)  # 8 blocks of 64 KiB
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 32, 32))
    out = f"{tiny_disk}/out.n5:pred"
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", conv_model, "--output", out, "--site", "threads", "--block", "16,32,32", "--retries", "0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "failed to write chunk file" in res.stderr or "No space left on device" in res.stderr
    # every block the ledger calls done is really written; the others are not claimed
    ledger = tiny_disk / "out.n5" / "pred" / "emparsl-ledger.jsonl"
    done = []
    for line in ledger.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "block" and rec["status"] == "done":
            done.append(rec)
    assert len(done) < 8
    import torch

    with torch.inference_mode():
        full = torch.jit.load(conv_model)(torch.from_numpy(data)[None, None])[0, 0].numpy()
    written = Volume.open(tiny_disk / "out.n5", "pred")
    for rec in done:
        z0, z1 = (int(v) for v in rec["roi"].split(",")[0].split(":"))
        y0, y1 = (int(v) for v in rec["roi"].split(",")[1].split(":"))
        x0, x1 = (int(v) for v in rec["roi"].split(",")[2].split(":"))
        got = written.read((slice(z0, z1), slice(y0, y1), slice(x0, x1)))
        interior = (slice(2, -2),) * 3
        np.testing.assert_allclose(got[interior], full[z0:z1, y0:y1, x0:x1][interior], atol=1e-4)
