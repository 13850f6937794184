"""Block workers keep the memory a forward frees, so the next block needs no fresh pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from napari_emparsl.execution.sites import load_site

PROBE = textwrap.dedent(
    """
    import resource, sys
    import torch
    torch.set_num_threads(1)  # as in a worker
    from napari_emparsl.core.blockwise import keep_freed_memory
    from napari_emparsl.core.models.loaders import load_model
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    net = load_model("unet3d-em").module
    x = torch.rand(1, 1, 96, 96, 96)
    faults = []
    with torch.inference_mode():
        for _ in range(4):  # one block after another
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[1:]))  # the blocks after the first: fresh pages, or memory reused
    """
)


def _faults_of_later_blocks(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_that_keeps_memory_reuses_it_for_the_next_block():
    default = _faults_of_later_blocks("default")
    kept = _faults_of_later_blocks("keep")
    # with the allocator's defaults each 96³ block of the built-in model faults in ~100,000-
    # 125,000 fresh 4 KiB pages (its activations, given back to the system after each block;
    # ~180,000 before its weights were stored channels-last); a worker that keeps freed memory
    # faults in few (12,000-28,000 over three blocks, as measured)
    assert default > 200_000
    assert kept < default / 5


def test_only_worker_processes_keep_memory():
    assert load_site("local").workers_keep_memory
    assert not load_site("threads").workers_keep_memory
    off = load_site("local").model_copy(update={"keep_freed_memory": False})
    assert not off.workers_keep_memory
