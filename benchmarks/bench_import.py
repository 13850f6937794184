"""Import throughput vs plain z5py writes, and the cost of opening a huge sparse dataset.

Ratios are measured inside one run (timings on shared machines are noisy):

    .venv/bin/python benchmarks/bench_import.py [--size 128]

1. ``emparsl import`` of a TIFF stack (read slabs from TIFF + gzip N5 writes through Volume)
   vs writing the same in-memory array with z5py directly (gzip, same chunks): the ratio
   import / z5py is the overhead of reading the source and of slab streaming.
2. ``Volume.open`` + building the dask pyramid of a (10^4)^3 sparse dataset (metadata only) and
   reading one chunk from the coarsest and from the finest level: wall time and memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import tifffile
import z5py

from napari_emparsl.core.importer import import_volume
from napari_emparsl.core.sample import make_sample
from napari_emparsl.core.volume import Volume


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_import(tmp: Path, size: int, chunks: tuple[int, int, int]) -> dict:
    raw = make_sample((size, 2 * size, 2 * size), seed=1).raw
    tif = tmp / "stack.tif"
    tifffile.imwrite(tif, raw, photometric="minisblack")

    def via_import() -> None:
        shutil.rmtree(tmp / "imp.n5", ignore_errors=True)
        import_volume(str(tif), f"{tmp}/imp.n5:raw", chunks=chunks)

    def via_z5py() -> None:
        shutil.rmtree(tmp / "z5.n5", ignore_errors=True)
        f = z5py.File(str(tmp / "z5.n5"), "a")
        ds = f.create_dataset(
            "raw", shape=raw.shape, chunks=chunks, dtype="uint8", compression="gzip"
        )
        ds[:] = raw

    t_imp = best_of(3, via_import)
    t_z5 = best_of(3, via_z5py)
    mb = raw.nbytes / 1e6
    return {
        "volume": list(raw.shape),
        "chunks": list(chunks),
        "MB": round(mb, 1),
        "import_s": round(t_imp, 3),
        "z5py_s": round(t_z5, 3),
        "import_MB_per_s": round(mb / t_imp, 1),
        "z5py_MB_per_s": round(mb / t_z5, 1),
        "ratio_import_over_z5py_time": round(t_imp / t_z5, 2),
    }


def bench_huge_open(tmp: Path) -> dict:
    root = tmp / "huge.n5"
    shape = (10_000,) * 3
    for level in range(7):
        f = 2**level
        Volume.create(root, f"em/s{level}", tuple(-(-s // f) for s in shape), "uint8", (64, 64, 64))
        p = root / "em" / f"s{level}" / "attributes.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | {"downsamplingFactors": [f, f, f]}))
    import psutil

    proc = psutil.Process()
    tracemalloc.start()
    t0 = time.perf_counter()
    vol = Volume.open(root, "em")
    pyramid = vol.pyramid
    t_open = time.perf_counter() - t0
    _, open_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    pyramid[-1][:64, :64, :64].compute()
    t_coarse = time.perf_counter() - t0
    t0 = time.perf_counter()
    pyramid[0][:64, :64, :64].compute()  # dask enumerates all 3.8M chunk keys here (cull)
    t_chunk = time.perf_counter() - t0
    rss_growth = proc.memory_info().rss - rss0
    return {
        "shape": list(shape),
        "levels": len(pyramid),
        "open_s": round(t_open, 4),
        "chunk_from_coarsest_level_s": round(t_coarse, 4),
        "chunk_from_finest_level_s": round(t_chunk, 4),
        "open_peak_python_MB": round(open_peak / 1e6, 3),
        "rss_growth_after_reads_MB": round(rss_growth / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="z size; y, x are twice that")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {
            "import_vs_z5py": bench_import(tmp, args.size, (64, 64, 64)),
            "huge_sparse_open": bench_huge_open(tmp),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
