"""Every kind of bad N5 input gets one clear sentence and leaves the files untouched."""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

import numpy as np
import pytest

from napari_emparsl.core.volume import Volume, VolumeError, save_array


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def one_sentence(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    assert text.endswith(".") and len(text) < 400
    return text


def test_missing_path(tmp_path):
    with pytest.raises(VolumeError) as err:
        Volume.open(tmp_path / "nope.n5")
    assert "does not exist" in one_sentence(err.value)


def test_not_a_container(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(VolumeError) as err:
        Volume.open(tmp_path / "plain")
    assert "not an N5 or zarr container" in one_sentence(err.value)
    (tmp_path / "file.n5").write_text("not a folder")
    with pytest.raises(VolumeError, match="is a file"):
        Volume.open(tmp_path / "file.n5")


def test_missing_key_lists_available(small_n5):
    path, _ = small_n5
    with pytest.raises(VolumeError) as err:
        Volume.open(path, "rwa")
    assert "no dataset 'rwa'" in one_sentence(err.value) and "available: raw" in str(err.value)


def test_corrupt_attributes(small_n5):
    path, _ = small_n5
    attrs = path / "raw" / "attributes.json"
    attrs.write_text(attrs.read_text()[:25])
    before = digest(path)
    with pytest.raises(VolumeError) as err:
        Volume.open(path, "raw")
    assert "corrupt or truncated" in one_sentence(err.value) and "attributes.json" in str(err.value)
    assert digest(path) == before


def test_truncated_chunk_is_named(small_n5):
    path, _ = small_n5
    chunk = path / "raw" / "1" / "2" / "0"  # N5 order x/y/z: chunk (z=0, y=2, x=1)
    chunk.write_bytes(chunk.read_bytes()[:30])
    before = digest(path)
    vol = Volume.open(path, "raw")  # opening is fine: nothing read yet
    vol.data[8:, :, :].compute()  # other chunks read fine
    with pytest.raises(VolumeError) as err:
        vol.data[:8, 32:, 16:32].compute()
    assert str(chunk) in one_sentence(err.value)
    with pytest.raises(VolumeError, match="truncated or corrupt"):
        vol.read()
    assert digest(path) == before


def test_garbage_chunk_is_named(small_n5):
    path, _ = small_n5
    chunk = path / "raw" / "0" / "0" / "0"
    chunk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(VolumeError, match=str(chunk)):
        Volume.open(path, "raw").data.compute()


def test_unsupported_compression(small_n5):
    path, _ = small_n5
    attrs = path / "raw" / "attributes.json"
    attrs.write_text(attrs.read_text().replace('"gzip"', '"zstd-java"'))
    with pytest.raises(VolumeError) as err:
        Volume.open(path, "raw")
    assert "'zstd-java' compression" in one_sentence(err.value)


def test_missing_root_attributes_tolerated(small_n5):
    path, data = small_n5
    (path / "attributes.json").unlink()  # as tensorstore writes containers
    vol = Volume.open(path, "raw")
    np.testing.assert_array_equal(vol.data.compute(), data)
    assert not (path / "attributes.json").exists()  # reading never writes


def test_zarr_container_refused_clearly(tmp_path):
    import z5py

    f = z5py.File(str(tmp_path / "x.zarr"), "a")
    f.create_dataset("raw", shape=(4, 4, 4), chunks=(2, 2, 2), dtype="uint8")
    with pytest.raises(VolumeError) as err:
        Volume.open(tmp_path / "x.zarr", "raw")
    assert "zarr container" in one_sentence(err.value)
    from napari_emparsl.core.volume import container_tree

    with pytest.raises(VolumeError) as err:  # `emparsl info`, the volume panel: no empty tree
        container_tree(tmp_path / "x.zarr")
    assert "is a zarr container, which this version does not open yet" in one_sentence(err.value)


def test_zarr_output_refused_before_anything_is_made(capsys, tmp_path, small_n5):
    """An output named like a zarr container was made as a folder, then failed inside z5py
    ("Zarr file cannot be opened in N5 format"), leaving that folder behind."""
    import tifffile
    import z5py

    from napari_emparsl.cli import main

    z5py.File(str(tmp_path / "old.zarr"), "a").create_group("g")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 8, 8), np.uint8))
    src = f"{small_n5[0]}:raw"
    for output, import_to in (
        (tmp_path / "new.zarr", tmp_path / "t.zarr"),
        (tmp_path / "old.zarr", None),
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        code = main(["run", "--input", src, "--model", "unet3d-em", "--site", "threads",
                     "--output", f"{output}:pred"])  # fmt: skip
        stem = output.name.split(".")[0]
        assert code == 2 and capsys.readouterr().err == (
            f"emparsl: error: {output} names a zarr container; emparsl writes N5: give the "
            f"output a container name ending in .n5 (e.g. {stem}.n5:pred).\n"
        )
        if import_to is not None:
            assert main(["import", str(tmp_path / "stack.tif"), f"{import_to}:raw"]) == 2
            assert "t.zarr names a zarr container" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing made


@pytest.fixture
def pyramid_sample(tmp_path) -> Path:
    from napari_emparsl.cli import main

    path = tmp_path / "s.n5"  # raw/s0, s1, s2 and the groups labels/{cells, classes}
    assert main(["sample", str(path), "--shape", "16,64,64"]) == 0
    return path


@pytest.mark.parametrize(
    ("source", "output", "message"),
    [
        ("raw", "raw/s0", "lies inside the input's pyramid raw;"),
        ("raw/s0", "raw/s1", "lies inside the input's pyramid raw;"),
        ("raw/s0", "raw/s3", "lies inside the input's pyramid raw;"),
        ("raw/s1", "raw", "holds the input (raw/s1);"),
        ("raw", "labels", "is a group holding other datasets (labels/cells, labels/classes);"),
    ],
)
def test_run_never_overwrites_the_input_or_a_group(capsys, pyramid_sample, source, output, message):
    """Even with --overwrite: not the input's pyramid (one of its levels was the input's own
    data), not a group of other datasets (ground truth), also when the output is given as a
    folder inside the container."""
    from napari_emparsl.cli import main

    path = pyramid_sample
    before = digest(path)
    for out in (f"{path}:{output}", f"{path}/{posixpath.dirname(output)}:{output.split('/')[-1]}"):
        code = main(["run", "--input", f"{path}:{source}", "--output", out, "--model",
                     "unet3d-em", "--site", "threads", "--overwrite"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in one_sentence(err.strip().removeprefix("emparsl: error: "))
        assert digest(path) == before


def test_output_given_as_a_folder_inside_the_container(capsys, pyramid_sample):
    from napari_emparsl.cli import main

    path = pyramid_sample
    code = main(["run", "--input", f"{path}:raw", "--output", f"{path}/labels:pred", "--model",
                 "unet3d-em", "--site", "threads"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    out = Volume.open(path, "labels/pred")  # keyed from the container's root
    assert out.shape == (16, 64, 64) and out.root == str(path)
    assert Volume.open(path, "labels/cells").shape == (16, 64, 64)


def test_no_volume_given():
    with pytest.raises(VolumeError) as err:
        Volume.open("")
    assert one_sentence(err.value) == "No volume was given; give it as DATA.n5:DATASET."


@pytest.mark.parametrize("name", ["../pred", "a/../../pred", "a/./pred", "a//pred"])
def test_dataset_name_that_leaves_the_container(capsys, tmp_path, pyramid_sample, name):
    """`OUT.n5:../pred` wrote the output beside the container (next to it in the parent folder),
    where no N5 tool would look. Every command refuses such a name; nothing is written."""
    from napari_emparsl.cli import main

    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ["run", "--input", f"{pyramid_sample}:raw", "--output", f"{tmp_path}/o.n5:{name}",
         "--model", "unet3d-em", "--site", "threads"],
        ["import", str(pyramid_sample / "raw"), f"{tmp_path}/o.n5:{name}"],
        ["info", f"{pyramid_sample}:{name}"],
    ):  # fmt: skip
        assert main(args) == 2
        assert capsys.readouterr().err == (
            f"emparsl: error: The dataset name '{name}' in {tmp_path}/o.n5:{name} is not a path "
            "inside the container (no '..', '.' or '//' in it); give a name such as pred or "
            "labels/pred.\n"
        ).replace(
            f"{tmp_path}/o.n5", str(pyramid_sample) if args[0] == "info" else f"{tmp_path}/o.n5"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(VolumeError, match="is not a path inside the container"):
        save_array(tmp_path / "o.n5", name, np.zeros((2, 2, 2), np.uint8))


def test_a_2d_dataset_says_how_to_make_it_a_volume(capsys, tmp_path):
    from napari_emparsl.cli import main

    save_array(tmp_path / "i.n5", "img", np.zeros((32, 32), np.uint8))
    code = main(["run", "--input", f"{tmp_path}/i.n5:img", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/o.n5:p", "--site", "threads"])  # fmt: skip
    assert code == 2 and capsys.readouterr().err == (
        f"emparsl: error: The input {tmp_path}/i.n5:img has 2 spatial axes; emparsl runs on 3D "
        "volumes (z, y, x, and at most one channel axis) (a 2D image is a volume of one slice: "
        "save it as a TIFF and `emparsl import` it, which writes it as 1×Y×X).\n"
    )
    assert not (tmp_path / "o.n5").exists()
    # five axes with no names: not "5 spatial axes"
    save_array(tmp_path / "i.n5", "five", np.zeros((2, 2, 4, 8, 8), np.uint8))
    code = main(["run", "--input", f"{tmp_path}/i.n5:five", "--model", "unet3d-em", "--output",
                 f"{tmp_path}/o.n5:p", "--site", "threads"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "has 5 axes (" in err and "spatial" not in err
    with pytest.raises(SystemExit) as exit_:  # argparse's: before, an internal error
        main(["sample", f"{tmp_path}/a.n5", "--shape", "8,16,16", "--anisotropy", "1e308"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "must be above 0 and at most 100, not '1e308'" in err
    assert not (tmp_path / "o.n5").exists() and not (tmp_path / "a.n5").exists()


@pytest.fixture
def read_only_container(tmp_path, small_n5):
    """The small container, bind-mounted read-only (a shared data disk); needs root."""
    import os
    import subprocess

    ro = tmp_path / "ro.n5"
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    for cmd in (["mount", "--bind", str(small_n5[0]), str(ro)],
                ["mount", "-o", "remount,bind,ro", str(ro)]):  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", str(ro)], check=False, capture_output=True)
            pytest.skip(f"cannot bind-mount read-only here: {res.stderr.strip()}")
    yield ro
    subprocess.run(["umount", str(ro)], check=False)


def test_without_an_output_it_goes_beside_the_input_or_home_when_read_only(
    capsys, tmp_path, monkeypatch, small_n5, read_only_container
):
    """`emparsl run` without --output (and the run panel's suggestion): predictions/<name> in
    the input's container; for an input on a read-only disk, a container of its name in
    ~/emparsl-predictions (it was always the input's container, which then failed)."""
    from napari_emparsl.cli import main
    from napari_emparsl.core.volume import suggest_output

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / "emparsl-predictions"
    assert suggest_output(str(small_n5[0]), "raw") == f"{small_n5[0]}:predictions/raw"
    assert suggest_output(str(read_only_container), "raw") == f"{home}/ro.n5:predictions/raw"
    base = ["--model", "unet3d-em", "--site", "threads", "--roi", "0:8,0:8,0:8"]
    for src, written in ((small_n5[0], small_n5[0]), (read_only_container, home / "ro.n5")):
        assert main(["run", "--input", f"{src}:raw", *base]) == 0
        assert f"Planned 1 block into {written}:predictions/raw" in capsys.readouterr().out
        assert Volume.open(written, "predictions/raw").data[:8, :8, :8].compute().any()


def test_a_folder_made_read_only_gets_no_suggested_output_also_for_root(
    capsys, tmp_path, monkeypatch, small_n5
):
    """A data folder made read-only on purpose (`chmod -R a-w`, as a shared data folder is):
    root may write there all the same, and a run without --output wrote its predictions and a
    lock file into it; they go to ~/emparsl-predictions as for a read-only disk. A user's
    --output there is still written (root chose it)."""
    import os
    import shutil

    from napari_emparsl.cli import main
    from napari_emparsl.core.volume import suggest_output

    if os.geteuid() != 0:
        pytest.skip("for others the folder's mode already refuses writing")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / "emparsl-predictions"
    shared = tmp_path / "shared.n5"
    shutil.copytree(small_n5[0], shared)
    before = sorted(str(p) for p in shared.rglob("*"))
    shared.chmod(0o555)
    try:
        assert suggest_output(str(shared), "raw") == f"{home}/shared.n5:predictions/raw"
        base = ["--model", "unet3d-em", "--site", "threads", "--roi", "0:8,0:8,0:8"]
        assert main(["run", "--input", f"{shared}:raw", *base]) == 0
        assert f"Planned 1 block into {home}/shared.n5:predictions/raw" in capsys.readouterr().out
        assert sorted(str(p) for p in shared.rglob("*")) == before  # nothing written into it
        assert main(["run", "--input", f"{shared}:raw", *base, "--output", f"{shared}:p"]) == 0
    finally:
        shared.chmod(0o755)


def test_output_on_a_read_only_disk_is_one_sentence(capsys, tmp_path, read_only_container):
    """An input on a read-only disk runs (it is only read); an output there was z5py's
    "filesystem error: cannot create directories" as an internal error."""
    from napari_emparsl.cli import main

    ro = read_only_container
    base = ["--model", "unet3d-em", "--site", "threads", "--roi", "0:8,0:8,0:8"]
    assert main(["run", "--input", f"{ro}:raw", "--output", f"{tmp_path}/o.n5:p", *base]) == 0
    capsys.readouterr()
    for args in (
        ["run", "--input", f"{ro}:raw", "--output", f"{ro}:p", *base],
        ["run", "--input", f"{ro}:raw", "--output", f"{ro}/sub/o.n5:p", *base],
    ):
        assert main(args) == 2
        assert capsys.readouterr().err == (
            f"emparsl: error: Cannot write to {ro} (a read-only disk, or no permission); choose "
            "an output on a disk you can write to.\n"
        )
