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
    from napari_emparsl.core.blockwise import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    faults = []
    for i in range(4):  # 256 MB of activations, freed, then the same again (the next blocks)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(64 * 2**20)
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[1:]))  # the best of the later blocks (small objects may split a freed one)
    """
)


def _faults_of_second_block(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_that_keeps_memory_reuses_it_for_the_next_block():
    default = _faults_of_second_block("default")
    kept = _faults_of_second_block("keep")
    # 256 MB in 4 KiB pages is 65,536 page faults when the memory went back to the system
    assert default > 30_000
    assert kept < 1_000


def test_only_worker_processes_keep_memory():
    assert load_site("local").workers_keep_memory
    assert not load_site("threads").workers_keep_memory
    off = load_site("local").model_copy(update={"keep_freed_memory": False})
    assert not off.workers_keep_memory
