"""Fixtures of the panels' tests: real N5 files made with the real commands."""

from __future__ import annotations

import pytest

from napari_emparsl.cli import main


@pytest.fixture
def make_run_output(tmp_path):
    """``make_run_output(shape, block)``: a sample ``s.n5`` of ``shape`` voxels and a run output
    ``s.n5:pred`` of which only the block at the origin is done (``threads`` site); its
    container's path."""

    def make(shape: str = "32,64,64", block: str = "32,32,32"):
        assert main(["sample", str(tmp_path / "s.n5"), "--shape", shape]) == 0
        assert main(["run", "--input", f"{tmp_path}/s.n5:raw", "--model", "unet3d-em", "--output",
                     f"{tmp_path}/s.n5:pred", "--site", "threads", "--roi", "0:8,0:8,0:8",
                     "--block", block]) == 0  # fmt: skip
        return tmp_path / "s.n5"

    return make
