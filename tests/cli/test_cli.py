"""The `emparsl` command line: info, import, sample; bad input gives one sentence and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_emparsl.cli import main
from napari_emparsl.core.ledger import Ledger
from napari_emparsl.core.volume import Volume, save_array


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text_and_json(capsys, small_n5):
    path, _ = small_n5
    code, out, _ = run(capsys, "info", f"{path}:raw")
    assert code == 0
    assert "20 × 40 × 50" in out and "uint8" in out and "8 × 16 × 16" in out
    assert "gzip" in out and "30 × 10 × 10 nm" in out
    code, out, _ = run(capsys, "info", str(path), "--json")
    info = json.loads(out)
    assert code == 0 and info["tree"][1]["key"] == "raw" and "dataset" not in info
    code, out, _ = run(capsys, "info", f"{path}:raw", "--json")
    ds = json.loads(out)["dataset"]
    assert ds["shape"] == [20, 40, 50] and ds["voxel_size"] == [30.0, 10.0, 10.0]


def test_info_shared_data_pyramid_free(capsys, shared_data):
    code, out, _ = run(capsys, "info", str(shared_data / "cremi_C_crop/cremi_C_crop.n5:raw"))
    assert code == 0 and "40 × 4 × 4 nm" in out and "25 × 625 × 625" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/definitely/not/here.n5"], "does not exist"),
        (["info", "{tmp}"], "not an N5 or zarr container"),
        (["info", "{n5}:nope"], "no dataset 'nope'"),
        (["import", "{tmp}/missing.tif", "{tmp}/o.n5:raw"], "does not exist"),
        (["import", "{tif}", "{n5}:raw"], "already exists; pass --overwrite"),
        (["import", "{tif}", "{tif}:raw"], "is the input"),
    ],
)
def test_bad_input_one_sentence(capsys, tmp_path, small_n5, args, message):
    path, data = small_n5
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    args = [a.format(tmp=tmp_path, n5=path, tif=tif) for a in args]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err and err.startswith("emparsl: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    np.testing.assert_array_equal(Volume.open(path, "raw").data.compute(), data)


def test_import_prints_estimate_and_progress(capsys, shared_data, tmp_path):
    src = shared_data / "gala_fibsem_tiny/original/tests/example-data/train-image-png"
    code, out, err = run(
        capsys, "import", str(src), f"{tmp_path}/o.n5:em/raw", "--chunks", "16,64,64",
        "--voxel-size", "10,10,10",
    )  # fmt: skip
    assert code == 0
    assert "Estimate: 32 chunk files" in out and "on disk" in out
    assert "import" in err and "4/4" in err  # tqdm progress on stderr
    vol = Volume.open(tmp_path / "o.n5", "em/raw")
    assert vol.voxel_size == (10.0, 10.0, 10.0) and vol.chunks == (16, 64, 64)


def test_import_dry_run_and_tiny_chunk_warning(capsys, tmp_path):
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((16, 32, 32), np.uint8), photometric="minisblack")
    code, out, err = run(
        capsys, "import", str(tif), f"{tmp_path}/o.n5:raw", "--chunks", "2,2,2", "--dry-run"
    )
    assert code == 0 and "Dry run: nothing written." in out
    assert "tiny chunks" in err
    assert not (tmp_path / "o.n5").exists()
    # over an existing dataset: the estimate still (before: refused), and what importing needs
    save_array(tmp_path / "o.n5", "raw", np.zeros((2, 4, 4), np.uint8))
    code, out, err = run(capsys, "import", str(tif), f"{tmp_path}/o.n5:raw", "--dry-run")
    assert code == 0 and out.startswith("Estimate: ") and "Dry run: nothing written." in out
    assert f"{tmp_path}/o.n5:raw already exists: importing needs --overwrite" in err
    assert Volume.open(tmp_path / "o.n5", "raw").shape == (2, 4, 4)
    code, _, err = run(capsys, "import", str(tif), f"{tmp_path}/o.n5:raw")  # for real: refused
    assert code == 2 and err.startswith("emparsl: error: ") and "already exists" in err


def test_an_output_under_a_file_is_said_to_be(capsys, tmp_path, small_n5):
    """An output path through a file (x.txt/o.n5): the run said the folder x.txt "does not
    exist … create the folder first" (it exists, as a file); the import said "Not a directory
    …; check the path and free space". A one-chunk estimate said "1 chunk files"."""
    (tmp_path / "x.txt").write_text("notes")
    code, _, err = run(capsys, "run", "--input", f"{small_n5[0]}:raw", "--model", "unet3d-em",
                       "--output", f"{tmp_path}/x.txt/o.n5:p", "--site", "threads")  # fmt: skip
    assert code == 2 and err.strip() == (
        f"emparsl: error: {tmp_path}/x.txt is a file, not a folder, so the output "
        f"{tmp_path}/x.txt/o.n5:p cannot be made there; choose an output path in a folder."
    )
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.ones((4, 8, 8), np.uint8), photometric="minisblack")
    code, out, err = run(capsys, "import", str(tif), f"{tmp_path}/x.txt/o.n5:raw")
    assert out.startswith("Estimate: 1 chunk file, about ")
    assert code == 2 and err.strip().endswith(
        f"Not a directory ({tmp_path}/x.txt/o.n5); a part of the path is a file, not a folder: "
        "check the path."
    )
    assert (tmp_path / "x.txt").read_text() == "notes"


def test_a_container_of_several_datasets_names_an_image_as_the_example(capsys, tmp_path):
    """`--input s.n5` with several datasets: the example was the first by name, a label
    volume (labels/cells), which a run then warned looked like labels."""
    assert run(capsys, "sample", f"{tmp_path}/s.n5", "--shape", "8,32,32")[0] == 0
    code, _, err = run(capsys, "run", "--input", f"{tmp_path}/s.n5", "--model", "unet3d-em",
                       "--site", "threads")  # fmt: skip
    assert code == 2 and err.strip() == (
        f"emparsl: error: {tmp_path}/s.n5 holds several datasets (labels/cells, labels/classes, "
        f"raw); name one, e.g. {tmp_path}/s.n5:raw."
    )


def test_console_script_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "napari_emparsl.cli"]
    ok = subprocess.run([*exe, "--version"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "emparsl" in ok.stdout
    bad = subprocess.run(
        [*exe, "info", str(tmp_path / "x.n5")], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip() == f"emparsl: error: {tmp_path / 'x.n5'} does not exist; check the path."
    )


def test_output_read_by_a_reader_that_stops_is_no_error(small_n5):
    # `emparsl info … | head -1`: the reader closes the pipe before emparsl writes to it
    path, _ = small_n5
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "info", f"{path}:raw"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 1 and err == ""  # no "error: Broken pipe; check the path…"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "a.tif", "o.n5:raw", "--chunks", "a,b,c"], "expected integers"),
        # a negative value is the option's bad value, not another option ("expected one argument")
        (["run", "--input", "i.n5:r", "--model", "m", "--output", "o.n5:p", "--block",
          "-32,32,32"], "argument --block: sizes must be positive, not '-32,32,32'"),
        (["run", "--input", "i.n5:r", "--model", "m", "--output", "o.n5:p", "--halo",
          "-1,0,0"], "argument --halo: a halo cannot be negative"),
        (["run", "--input", "i.n5:r", "--model", "m", "--output", "o.n5:p", "--retries",
          "-1"], "argument --retries: cannot be negative, not '-1'"),
        (["sample", "s.n5", "--seed", "-3"], "argument --seed: cannot be negative"),
        # two values where three axes are meant: an internal error (--block), a sample generator
        # error in the log (--shape), a voxel size written that no reader could use (import)
        (["run", "--input", "i.n5:r", "--model", "m", "--output", "o.n5:p", "--block",
          "64,64"], "argument --block: expected three values z,y,x like 64,64,64 (or one for all "
                    "axes), not '64,64'"),
        (["sample", "s.n5", "--shape", "8,8"], "argument --shape: expected three values z,y,x"),
        (["import", "a.tif", "o.n5:raw", "--voxel-size", "4,4"],
         "argument --voxel-size: expected three values z,y,x like 40,4,4"),
        (["import", "a.tif", "o.n5:raw", "--voxel-size", "nan,4,4"],
         "argument --voxel-size: voxel sizes must be positive, not 'nan,4,4'"),
        (["sample", "s.n5", "--anisotropy", "0"],
         "argument --anisotropy: must be above 0 and at most 100, not '0'"),
    ],
)  # fmt: skip
def test_bad_option_value(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["run", "--inputs", "a.n5:raw", "--model", "m"],
         "emparsl run: error: unrecognized arguments: --inputs; see 'emparsl run --help'."),
        (["run", "--input", "a.n5:raw"],
         "emparsl run: error: the following arguments are required: --model; "
         "see 'emparsl run --help'."),
        (["frob"], "emparsl: error: argument COMMAND: invalid choice: 'frob' (choose from "),
    ],
)  # fmt: skip
def test_a_command_line_argparse_refuses_is_one_line(capsys, args, line):
    """What argparse refuses is said in one line with where to read the options — not under
    its usage block — and an unknown option is named, not hidden behind the options the
    command line lacks because of it."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith(line), err
    assert "usage:" not in err


def test_values_that_start_with_dashes_stay_values(capsys, tmp_path, monkeypatch):
    """The unknown-option check took a value beginning with -- for an option: --name "--my
    model" was "unrecognized arguments" (argparse itself takes it, as it has a space)."""
    from napari_emparsl.core.models import export

    seen = {}
    real = export.export_package

    def recorded(model, output, options, **kwargs):
        seen.update(kwargs)
        return real(model, output, options, **kwargs)

    monkeypatch.setattr(export, "export_package", recorded)
    code, _, err = run(capsys, "export-model", "unet3d-em", str(tmp_path / "x.zip"),
                       "--name", "--my model")  # fmt: skip
    assert code == 0 and seen["name"] == "--my model", err


def test_an_abbreviated_option_is_still_taken(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path / "s.n5"), "--sha", "16")
    assert code == 0 and Volume.open(tmp_path / "s.n5", "raw").shape == (16, 16, 16), err


def test_one_value_for_all_axes_and_a_sample_too_big_for_memory(capsys, tmp_path):
    code, _, _ = run(capsys, "sample", str(tmp_path / "s.n5"), "--shape", "16")
    assert code == 0 and Volume.open(tmp_path / "s.n5", "raw").shape == (16, 16, 16)
    code, _, err = run(capsys, "sample", str(tmp_path / "big.n5"), "--shape", "100000")
    assert code == 2 and err.startswith(
        "emparsl: error: A sample of 100000×100000×100000 voxels needs about "
    )
    assert err.endswith("free; choose a smaller --shape.\n") and not (tmp_path / "big.n5").exists()


def test_sizes_as_people_write_them(capsys, tmp_path, small_n5):
    """64,64,64 — and 64 64 64, 64x64x64, 64×64×64 (as emparsl prints sizes) — in every size
    option and in the run panel's fields."""
    from napari_emparsl._napari.run_widget import _triple
    from napari_emparsl.core.geometry import size_values

    assert size_values(" 8 16,16 ") == [8, 16, 16] and size_values("40×4x4", float) == [40.0, 4, 4]
    assert _triple("16×16×16", "block", 1) == (16, 16, 16) == _triple("16 16 16", "block", 1)
    code, _, err = run(capsys, "sample", str(tmp_path / "s.n5"), "--shape", "16 32×32")
    assert code == 0 and Volume.open(tmp_path / "s.n5", "raw").shape == (16, 32, 32), err
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((16, 32, 32), np.uint8))
    code, _, err = run(capsys, "import", str(tmp_path / "t.tif"), f"{tmp_path}/i.n5:raw",
                       "--chunks", "8x16x16", "--voxel-size", "40 4 4")  # fmt: skip
    vol = Volume.open(tmp_path / "i.n5", "raw")
    assert code == 0 and (vol.chunks, vol.voxel_size) == ((8, 16, 16), (40, 4, 4)), err
    code, _, err = run(capsys, "run", "--input", f"{small_n5[0]}:raw", "--model", "unet3d-em",
                       "--output", f"{tmp_path}/o.n5:p", "--site", "threads", "--block", "24×24×24",
                       "--halo", "4 4 4", "--roi", "0:8,0:8,0:8")  # fmt: skip
    assert code == 0, err
    assert json.loads(
        (tmp_path / "o.n5" / "p" / "emparsl-ledger.jsonl").read_text().splitlines()[0]
    )["halo"] == [4, 4, 4]
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "t.n5"), "--shape", "16 a"])
    assert "expected integers like 64,64,64, not '16 a'" in capsys.readouterr().err


def test_python_api_refuses_a_block_or_halo_of_two_axes(small_n5, tmp_path):
    import napari_emparsl
    from napari_emparsl.execution.runner import RunError

    for kwargs, message in (
        (
            {"block": (64, 64)},
            "The block is three whole numbers z,y,x of at least 1, not (64, 64).",
        ),
        (
            {"halo": (1, -1, 1)},
            "The halo is three whole numbers z,y,x of at least 0, not (1, -1, 1).",
        ),
    ):
        with pytest.raises(RunError) as err:
            napari_emparsl.run(f"{small_n5[0]}:raw", "unet3d-em", f"{tmp_path}/o.n5:p", **kwargs)
        assert str(err.value) == message
    assert not (tmp_path / "o.n5").exists()
    # one number for every axis, as the command line's --block 8 (it was a TypeError)
    with pytest.warns(UserWarning):  # the voxel size, the halo under the model's context
        done = napari_emparsl.run(f"{small_n5[0]}:raw", "unet3d-em", f"{tmp_path}/o.n5:p",
                                  site="threads", block=8, halo=0, roi="0:8,0:8,0:16")  # fmt: skip
    assert (done.done, done.total) == (2, 2)
    assert Ledger(str(tmp_path / "o.n5"), "p").summary().last_run["block"] == [8, 8, 8]


def test_python_api_advice_names_its_own_parameters(capsys, small_n5, tmp_path):
    """The engine's advice speaks to the command line (pass --overwrite, e.g. --block 8,8,8);
    from a notebook it names the API's parameters, and quoted commands stay as typed."""
    import napari_emparsl
    from napari_emparsl.core.errors import python_words
    from napari_emparsl.execution.runner import RunError

    src = f"{small_n5[0]}:raw"
    save_array(tmp_path / "o.n5", "p", np.zeros((4, 4, 4), np.uint8))  # not emparsl's
    with pytest.raises(RunError) as err:
        napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/o.n5:p", site="threads")
    assert str(err.value) == (
        f"The output {tmp_path}/o.n5:p exists and was not written by emparsl; pass "
        "overwrite=True to replace it, or choose another name."
    )
    with pytest.raises(RunError) as err:  # a block not a multiple of the model's (4,4,4)
        napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/b.n5:p", site="threads", block=6)
    assert str(err.value).endswith("e.g. block=(4, 4, 4) or (8, 8, 8).") and "--" not in str(
        err.value
    )
    # the CLI's words where the CLI is used
    assert main(["run", "--input", src, "--model", "unet3d-em", "--output", f"{tmp_path}/o.n5:p"])
    assert "; pass --overwrite to replace it" in capsys.readouterr().err
    assert python_words("e.g. with `emparsl import … --overwrite`; --halo 8,8,8") == (
        "e.g. with `emparsl import … --overwrite`; halo=(8, 8, 8)"
    )
    assert python_words("(e.g. --model-option out_range=0,2.5) or with --model-option.") == (
        "(e.g. model_options=['out_range=0,2.5']) or with model_options."
    )


def test_python_api_takes_a_region_as_text_slices_or_pairs(small_n5, tmp_path):
    """In a notebook a region comes as numpy slices: it was an AttributeError ('tuple' object
    has no attribute 'ndim') deep in the planner."""
    import napari_emparsl
    from napari_emparsl.execution.runner import Run, RunError

    src = f"{small_n5[0]}:raw"  # 20×40×50
    plans = []
    for roi in (
        "0:8,0:16,0:16",
        (slice(0, 8), slice(0, 16), slice(0, 16)),
        [(0, 8), (0, 16), (0, 16)],
    ):
        plan = Run(src, "unet3d-em", f"{tmp_path}/o{len(plans)}.n5:p", site="threads", roi=roi,
                   block=(32, 32, 32)).prepare()  # fmt: skip
        plans.append([b.id for b in plan.blocks])
    assert plans[0] == plans[1] == plans[2] == [0]
    # open ends, as in numpy: to the volume's end (and a lone ":" the whole axis)
    for roi in ("0:8,:,32:", " [0:8, 0:, 32:50] ", (slice(0, 8), slice(None), slice(32, None))):
        run = Run(src, "unet3d-em", f"{tmp_path}/open.n5:p", site="threads", roi=roi,
                  block=(32, 32, 32))  # fmt: skip
        plan = run.prepare()
        run.release()
        assert [b.id for b in plan.blocks] == [1, 3] and str(run.roi) == "0:8,0:40,32:50"
        assert not [w for w in run.warnings if "reaches beyond" in w]
    # partly beyond the volume: cut to it, and said so (a typo would otherwise pass unnoticed)
    run = Run(src, "unet3d-em", f"{tmp_path}/open.n5:p", site="threads", roi="0:8,0:99,32:50",
              block=(32, 32, 32))  # fmt: skip
    plan = run.prepare()
    run.release()
    assert [b.id for b in plan.blocks] == [1, 3] and str(run.roi) == "0:8,0:40,32:50"
    assert run.warnings[-1] == (
        "The region 0:8,0:99,32:50 reaches beyond the volume (20×40×50); it was cut to "
        "0:8,0:40,32:50."
    )
    with pytest.raises(
        RunError, match=r"The region 30:,0:40,0:50 is outside the volume 0:20,0:40,0:50"
    ):
        Run(src, "unet3d-em", f"{tmp_path}/x.n5:p", site="threads", roi="30:,:,:").prepare()
    for roi in (5, (slice(0, 8, 2), slice(0, 8), slice(0, 8))):
        with pytest.raises(RunError, match=r"A region is z0:z1,y0:y1,x0:x1 \(or numpy slices"):
            napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/x.n5:p", roi=roi)
    # a negative bound: numpy counts it from the end; it was taken as 0 (-8: ran the whole
    # column) or said "empty" (0:-1)
    for roi in ("-8:,0:8,0:8", "0:-1,:,:", (slice(-8, None), slice(0, 8), slice(0, 8))):
        with pytest.raises(RunError, match=r"has a negative bound; give positions counted from"):
            napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/x.n5:p", roi=roi)
    assert not (tmp_path / "x.n5").exists()
    # block and halo as the command line takes them (before: "not ('1', '6', ',', …)")
    with pytest.warns(UserWarning) as said:  # the API says so
        done = napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/t.n5:p", site="threads",
                                  roi="0:8,0:8,0:8", block="32,32,32", halo="8")  # fmt: skip
    said = [str(w.message) for w in said]
    assert any("was trained on 8×8×8 nm voxels" in w for w in said), said
    assert any(w.startswith("The halo 8,8,8 is smaller than the context") for w in said), said
    assert done.ok
    prov = json.loads(
        (tmp_path / "t.n5" / "p" / "emparsl-ledger.jsonl").read_text().splitlines()[0]
    )
    assert prov["block"][1:] == [32, 32] and prov["halo"] == [8, 8, 8]  # z: the volume's 20
    with pytest.raises(RunError, match=r"The block is three whole numbers z,y,x of at least 1, "
                       r"not '32,a'\."):  # fmt: skip
        napari_emparsl.run(src, "unet3d-em", f"{tmp_path}/u.n5:p", site="threads", block="32,a")


def test_sample_writes_pyramids_with_ground_truth(capsys, tmp_path):
    out_path = tmp_path / "s.n5"
    code, out, _ = run(capsys, "sample", str(out_path), "--shape", "32,64,64", "--seed", "3")
    assert code == 0 and "Wrote the synthetic EM sample" in out
    raw = Volume.open(out_path, "raw")
    classes = Volume.open(out_path, "labels/classes")
    cells = Volume.open(out_path, "labels/cells")
    assert raw.is_multiscale and len(raw.levels) == 3 and not raw.is_labels
    assert classes.is_labels and cells.is_labels and len(classes.levels) == 3
    assert set(np.unique(classes.data.compute())) == {0, 1, 2}
    assert classes.attrs["class_names"] == ["background", "membrane", "mitochondria"]
    code, _, err = run(capsys, "sample", str(out_path), "--shape", "32,64,64")
    assert code == 2 and "already exists" in err
    code, _, _ = run(capsys, "sample", str(out_path), "--shape", "16,32,32", "--overwrite")
    assert code == 0 and Volume.open(out_path, "raw").shape == (16, 32, 32)


def test_evaluate_dice_and_what_is_not_labels(capsys, tmp_path):
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:, :4] = 1  # 128 voxels of class 1, 128 of class 0
    pred = truth.copy()
    pred[0, 0, :] = 0  # 8 voxels of class 1 predicted as 0
    save_array(tmp_path / "e.n5", "truth", truth, attrs={"class_names": ["bg", "fg"]})
    save_array(tmp_path / "e.n5", "pred", pred)
    save_array(tmp_path / "e.n5", "raw", (np.arange(256) % 200).astype(np.uint8).reshape(4, 8, 8))
    save_array(tmp_path / "e.n5", "prob", pred.astype(np.float32))
    save_array(tmp_path / "e.n5", "small", truth[:2])
    e = f"{tmp_path}/e.n5"
    code, out, err = run(capsys, "evaluate", f"{e}:pred", f"{e}:truth", "--json")
    # bg: 2·128 / (136 + 128); fg: 2·120 / (120 + 128)
    assert code == 0 and err == ""
    assert json.loads(out) == {"dice": {"bg": round(256 / 264, 4), "fg": round(240 / 248, 4)}}
    code, out, _ = run(capsys, "evaluate", f"{e}:truth", f"{e}:truth")
    assert out.strip() == "Dice against the ground truth: bg 1.000, fg 1.000"
    # an image given as the prediction: the Dice, and a note that it is hardly labels
    code, out, err = run(capsys, "evaluate", f"{e}:raw", f"{e}:truth")
    assert code == 0 and "holds values up to 199 but there are 2 classes (0–1)" in err
    for args, message in (
        ([f"{e}:prob", f"{e}:truth"], "holds float32 values, not class labels;"),
        (
            [f"{e}:small", f"{e}:truth"],
            "The prediction (2×8×8) and the ground truth (4×8×8) differ in shape",
        ),
    ):
        code, _, err = run(capsys, "evaluate", *args)
        assert code == 2 and message in err and err.count("\n") == 1
    # an image model's uint8 output (a run's: its kind is known) is no labels: refused (its
    # "Dice" was 0.000 for every class, exit 0)
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "same.pt"))
    (tmp_path / "same.pt.yaml").write_text(
        "kind: image\nout_channels: 1\nhalo: [0, 0, 0]\nout_dtype: uint8\nout_range: [0, 255]\n"
    )
    code, _, err = run(capsys, "run", "--input", f"{e}:raw", "--model", str(tmp_path / "same.pt"),
                       "--output", f"{e}:restored", "--site", "threads")  # fmt: skip
    assert code == 0 and Volume.open(e, "restored").dtype == np.uint8 and "Warning" not in err
    # without its out_range (the default [0, 1]) nearly every value is clipped: said at the end
    code, _, err = run(capsys, "run", "--input", f"{e}:raw", "--model", str(tmp_path / "same.pt"),
                       "--output", f"{e}:clipped", "--site", "threads", "--model-option",
                       "out_range=0,1")  # fmt: skip
    assert code == 0 and "Warning: 98.4 % of the values written lay outside out_range [0, 1] (the " \
        "blocks that clipped gave 0 to 199) and were written as 0 or 255;" in err  # fmt: skip
    code, _, err = run(capsys, "evaluate", f"{e}:restored", f"{e}:truth")
    assert code == 2 and err == (
        f"emparsl: error: The prediction {e}:restored is the output of an image model "
        "(intensities), not class labels; evaluate a labels model's output against labels of the "
        "same classes.\n"
    )
    # same shape, other grid (µm at 100,20,30 against nm at 0): scored, and said (was silent)
    save_array(tmp_path / "e.n5", "um", pred, voxel_size=(0.5, 0.2, 0.2), unit="um",
               offset=(100, 20, 30))  # fmt: skip
    save_array(tmp_path / "e.n5", "nm", truth, voxel_size=(500, 200, 200), unit="nm",
               offset=(1e5, 2e4, 3e4))  # fmt: skip
    save_array(tmp_path / "e.n5", "nm0", truth, voxel_size=(40, 4, 4), unit="nm")
    code, out, err = run(capsys, "evaluate", f"{e}:um", f"{e}:nm0")
    assert code == 0 and "Dice" in out
    assert err.strip() == (
        "Warning: the prediction and the ground truth lie on different grids (0.5×0.2×0.2 um "
        "voxels at 100, 20, 30 against 40×4×4 nm voxels at 0, 0, 0); the Dice compares them "
        "voxel by voxel: check that they show the same region."
    )
    code, out, err = run(capsys, "evaluate", f"{e}:um", f"{e}:truth")  # no voxel size: no word
    assert code == 0 and err == ""
    # offsets within a share of a voxel: a 20-voxel shift far from 0 is one (was within 0.1 % of
    # the offset), float noise near 0 is not
    save_array(tmp_path / "e.n5", "far", truth, voxel_size=(4, 4, 4), offset=(1e5, 0, 0))
    save_array(tmp_path / "e.n5", "far20", truth, voxel_size=(4, 4, 4), offset=(1e5 + 80, 0, 0))
    save_array(tmp_path / "e.n5", "noise", truth, voxel_size=(4, 4, 4), offset=(1e-5, 0, 0))
    save_array(tmp_path / "e.n5", "zero", truth, voxel_size=(4, 4, 4))
    assert "different grids" in run(capsys, "evaluate", f"{e}:far", f"{e}:far20")[2]
    assert run(capsys, "evaluate", f"{e}:noise", f"{e}:zero")[2] == ""
    code, out, err = run(capsys, "evaluate", f"{e}:um", f"{e}:nm")  # the same grid in nm
    assert code == 0 and err == ""


def test_status_of_what_is_not_there(capsys, tmp_path, small_n5):
    path, _ = small_n5
    for spec, message in (
        (f"{tmp_path}/nothere.n5:x", f"{tmp_path}/nothere.n5 does not exist; check the path."),
        (f"{path}:nope", f"{path}:nope does not exist; check the path."),
        (
            f"{path}:raw",
            "has no emparsl ledger; it was not written by `emparsl run`: give a "
            f"run's output, OUT.n5:DATASET (`emparsl info {path}` lists the datasets "
            "there).",
        ),
        (
            str(path),
            f"{path} has no emparsl ledger; it was not written by `emparsl run`: give a "
            f"run's output, OUT.n5:DATASET (`emparsl info {path}` lists the datasets "
            "there).",
        ),
    ):
        code, _, err = run(capsys, "status", spec)
        assert code == 2 and err.strip().endswith(message)
    # a container holding run outputs: it names them (before: "has no emparsl ledger")
    _one_block_run(capsys, tmp_path, small_n5)
    code, _, err = run(capsys, "status", f"{tmp_path}/o.n5")
    assert code == 2 and err.strip() == (
        f"emparsl: error: {tmp_path}/o.n5 holds run outputs: {tmp_path}/o.n5:pred; give one, "
        f"e.g. `emparsl status {tmp_path}/o.n5:pred`."
    )


def test_a_complete_output_run_again_says_so(capsys, tmp_path, small_n5):
    """The same run again on a finished output: it is complete, nothing to compute (before:
    "Planned 1 blocks … (1 already done, resuming)" and "Finished … 0.00 Mvoxel/s"). Of a
    region (--roi), the region is done, not the output ("is complete already (1/1 blocks done)"
    of an output with 104 blocks to compute), and `status` says the region's counts and the
    whole volume's state (before: the region was nowhere, "pending" counted the whole)."""
    path, _ = small_n5
    out = f"{tmp_path}/o.n5:pred"
    cmd = ["run", "--input", f"{path}:raw", "--model", "unet3d-em", "--output", out,
           "--site", "threads"]  # fmt: skip
    assert run(capsys, *cmd, "--roi", "0:1,0:8,0:8", "--block", "8", "--halo", "0")[0] == 0
    code, text, _ = run(capsys, *cmd, "--roi", "0:1,0:8,0:8")
    assert code == 0
    assert text == (
        f"The region 0:1,0:8,0:8 of {out} is done already (1/1 of its blocks): nothing to "
        "compute (`emparsl status` counts the whole volume's; --overwrite replaces the whole "
        "output, then computes this region).\n"
    )
    code, text, _ = run(capsys, "status", out, "--json")
    status = json.loads(text)
    assert code == 0 and status["state"] == "incomplete" and status["pending"] == 104
    assert status["region"] == {
        "roi": "0:1,0:8,0:8", "blocks": 1, "done": 1, "failed": 0, "pending": 0
    }  # fmt: skip
    assert status["provenance"]["roi"] == "0:1,0:8,0:8"
    code, text, _ = run(capsys, "status", out)
    assert "the last run's region 0:1,0:8,0:8: 1/1 blocks done, 0 failed, 0 pending" in text
    # a region given beyond the volume, or open-ended, is said as cut to it, not as typed
    # (before: "The region 0:1,0:8,0:999 of … is done already")
    assert run(capsys, *cmd, "--roi", "0:1,0:8,0:999")[0] == 0
    for typed in ("0:1,0:8,0:999", "0:1,0:8,:"):
        code, text, _ = run(capsys, *cmd, "--roi", typed)
        assert code == 0 and text.startswith(f"The region 0:1,0:8,0:50 of {out} is done already")
    # the whole volume: complete, no region
    assert run(capsys, *cmd)[0] == 0
    code, text, _ = run(capsys, *cmd)
    assert text == f"{out} is complete already (105/105 blocks done): nothing to compute " \
        "(--overwrite computes it again).\n"  # fmt: skip
    status = json.loads(run(capsys, "status", out, "--json")[1])
    assert (status["state"], status["pending"], status["region"]) == ("complete", 0, None)


def test_status_of_an_output_a_run_is_starting_on(capsys, tmp_path, small_n5):
    """In a run's first second (the model loads, the volume is planned) it holds the output
    but has not made it: `status` said it did not exist (exit 2), a script polling it gave up."""
    from napari_emparsl.core.ledger import OutputLock

    lock = OutputLock(f"{tmp_path}/n.n5", "pred", "run")
    lock.acquire()
    try:
        code, text, _ = run(capsys, "status", f"{tmp_path}/n.n5:pred")
        assert code == 0
        assert text.startswith(
            f"{tmp_path}/n.n5:pred: a run is starting on it (process {os.getpid()} on "
        )
        assert text.strip().endswith("no block written yet.")
        code, text, _ = run(capsys, "status", f"{tmp_path}/n.n5:pred", "--json")
        status = json.loads(text)
        assert code == 0 and status["state"] == "starting" and status["done"] == 0
        _one_block_run(capsys, tmp_path, small_n5)  # the keys of a run's answer: all there
        keys = set(json.loads(run(capsys, "status", f"{tmp_path}/o.n5:pred", "--json")[1]))
        assert set(status) == keys
        assert status["running"]["pid"] == os.getpid()
        # the output made, its ledger not yet: starting too (it said "has no emparsl ledger;
        # it was not written by `emparsl run`", exit 2)
        save_array(tmp_path / "n.n5", "pred", np.zeros((4, 4, 4), np.uint8), chunks=(4, 4, 4))
        code, text, _ = run(capsys, "status", f"{tmp_path}/n.n5:pred")
        assert code == 0 and "a run is starting on it" in text
        # a level of it, as a script may poll (it said "does not exist")
        code, text, _ = run(capsys, "status", f"{tmp_path}/n.n5:pred/s0")
        assert code == 0 and text.startswith(f"{tmp_path}/n.n5:pred: a run is starting on it")
    finally:
        lock.release()
    imported = OutputLock(f"{tmp_path}/n.n5", "raw", "import")  # an import's, as it writes
    imported.acquire()
    try:
        code, text, _ = run(capsys, "status", f"{tmp_path}/n.n5:raw")
        assert code == 0 and text.startswith(f"{tmp_path}/n.n5:raw: an import is writing it now")
        assert "it keeps no run ledger" in text
        polled = json.loads(run(capsys, "status", f"{tmp_path}/n.n5:raw", "--json")[1])
        assert polled["state"] == "running" and polled["running"]["what"] == "import"
    finally:
        imported.release()
    code, _, err = run(capsys, "status", f"{tmp_path}/n.n5:raw")
    assert code == 2 and "does not exist" in err  # a refused or ended writer: nothing there


def _one_block_run(capsys, tmp_path, small_n5):
    """A run of one block into o.n5:pred; the output and its ledger file."""
    path, _ = small_n5
    out = f"{tmp_path}/o.n5:pred"
    code, _, _ = run(capsys, "run", "--input", f"{path}:raw", "--model", "unet3d-em",
                     "--output", out, "--site", "threads", "--roi", "0:1,0:8,0:8")  # fmt: skip
    assert code == 0
    ledger = tmp_path / "o.n5" / "pred" / "emparsl-ledger.jsonl"
    return out, ledger


def test_status_of_a_ledger_with_a_damaged_record(capsys, tmp_path, small_n5):
    """A done record without its timings (edited by hand, or damaged): status still answers,
    leaving it out of the mean time (before: an internal error, KeyError 't_read')."""
    out, ledger = _one_block_run(capsys, tmp_path, small_n5)
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    block = next(r for r in records if r.get("type") == "block")
    ledger.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "t_read"}) + "\n" for r in records)
    )
    code, text, err = run(capsys, "status", out, "--json")
    assert code == 0 and err == ""
    status = json.loads(text)
    assert status["done"] == 1 and status["mean_block_seconds"] is None and block["id"] == 0


def test_a_damaged_or_unreadable_ledger_is_never_read_as_an_empty_one(capsys, tmp_path, small_n5):
    """A ledger that could not be read was read as empty: status said "complete", and the run
    advised --overwrite ("nothing is lost"), losing the blocks done. A torn last run record
    hid the earlier ones (a resume took the model's defaults and was refused); records of
    other types, ids outside the plan, were counted or crashed status."""
    path, _ = small_n5
    out, ledger = _one_block_run(capsys, tmp_path, small_n5)
    args = ["run", "--input", f"{path}:raw", "--model", "unet3d-em", "--output", out,
            "--site", "threads", "--roi", "0:1,0:8,0:8"]  # fmt: skip
    # a crash tore a second run record: the first one, whole, is the run resumed (its block
    # 8×8×8 and halo 4, not the model's defaults, which the resume took and was refused)
    other = [*args[:6], f"{tmp_path}/b.n5:pred", *args[7:]]
    assert run(capsys, *other, "--block", "8", "--halo", "4")[0] == 0
    torn = tmp_path / "b.n5" / "pred" / "emparsl-ledger.jsonl"
    torn.write_text(torn.read_text() + torn.read_text().splitlines()[0][:150])
    code, _, err = run(capsys, *other)
    assert code == 0, err
    # odd values in records: status answers, counting the plan's blocks only
    with open(ledger, "a") as f:
        f.write("\n" + json.dumps({"type": "block", "id": 1e999, "status": "done"}) + "\n")
        f.write(json.dumps({"type": "block", "id": 7, "status": "done", "device": ["cpu"],
                            "t_read": 1e999, "t_compute": 1, "t_write": 1}) + "\n")  # fmt: skip
        f.write(json.dumps({"type": "block", "id": 0, "status": "failed",
                            "error": {"what": "odd"}}) + "\n")  # fmt: skip
    for extra in ((), ("--json",)):
        code, said, err = run(capsys, "status", out, *extra)
        assert code == 0 and "Infinity" not in said, err
    assert json.loads(said)["done"] == 1 and json.loads(said)["blocks"] == 1
    # no run record readable at all: not "complete"
    ledger.write_text("\n".join(line for line in ledger.read_text().splitlines()
                                if '"type":"run"' not in line.replace(" ", "")) + "\n")  # fmt: skip
    code, said, _ = run(capsys, "status", out, "--json")
    assert code == 0 and json.loads(said)["state"] == "incomplete"
    assert json.loads(said)["blocks"] is None
    code, said, _ = run(capsys, "status", out)  # no last run to compare its blocks' model with
    assert code == 0 and "how many blocks it has is not known" in said
    assert "another model file" not in said, said
    # unreadable (here a folder of its name): one sentence, and no advice to start again
    ledger.unlink()
    ledger.mkdir()
    for command in (["status", out], args):
        code, said, err = run(capsys, *command)
        assert code == 2 and err.startswith(f"emparsl: error: The ledger of {out} ("), err
        assert "cannot be read (" in err and "--overwrite" not in err and err.count("\n") == 1
    code, said, err = run(capsys, "info", out)  # the dataset is shown, with a note
    assert code == 0 and "dataset      pred" in said and err.startswith("emparsl: note: The ledger")


def test_status_of_many_different_failures_is_a_few_lines(capsys, tmp_path, small_n5):
    """Errors that differ in their numbers (a region, a memory size) were printed one line per
    failed block: 100,004 lines for a ledger of 100,000 failures."""
    out, ledger = _one_block_run(capsys, tmp_path, small_n5)
    with open(ledger) as f:
        record = json.loads(f.readline())
    with open(ledger, "a") as f:
        # a run of 700 blocks of 1×8×8 (ids outside an output's plan are not its blocks)
        f.write(json.dumps(record | {"block": [1, 8, 8]}) + "\n")
        for i in range(1, 40):  # blocks 1…39 failed, each with its own numbers
            f.write(json.dumps({"type": "block", "id": i, "status": "failed", "attempt": 1,
                                "error": f"out of memory: tried to allocate {i} MiB"}) + "\n")  # fmt: skip
    code, text, _ = run(capsys, "status", out)
    lines = [ln for ln in text.splitlines() if "failed" in ln and ln.startswith("  ")]
    assert code == 0 and len(lines) == 11, text
    assert lines[-1] == (
        "  and 29 more blocks failed with 29 other errors; `emparsl status --json` lists every one"
    )
    code, text, _ = run(capsys, "status", out, "--json")
    assert len(json.loads(text)["failed_blocks"]) == 39


def test_info_of_a_group_lists_what_it_holds(capsys, tmp_path):
    for name in ("a", "b"):
        save_array(tmp_path / "g.n5", f"labels/{name}", np.zeros((4, 8, 8), np.uint8))
    save_array(tmp_path / "g.n5", "raw", np.zeros((4, 8, 8), np.uint8))
    code, out, err = run(capsys, "info", f"{tmp_path}/g.n5:labels")
    assert code == 0 and err == ""
    assert out.splitlines()[1:] == [
        "  labels/",
        "    a  4×8×8 uint8  chunks 4×8×8  gzip",
        "    b  4×8×8 uint8  chunks 4×8×8  gzip",
    ]  # the group's datasets, not the container's raw
    code, out, _ = run(capsys, "info", f"{tmp_path}/g.n5:labels", "--json")
    assert [n["key"] for n in json.loads(out)["tree"]] == ["labels", "labels/a", "labels/b"]


@pytest.mark.parametrize(
    ("signum", "code", "how"),
    [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_stopped_import_keeps_nothing(tmp_path, signum, code, how):
    """SIGTERM (a batch job's time limit) or Ctrl-C during `emparsl import` into a new
    container: exit 143 / 130, one sentence, and nothing left — not the partly written dataset
    (before, the process died and left a dataset that looked complete, its missing chunks read
    as zeros), nor the container it made (before: `o.n5/` with its attributes.json)."""
    import os
    import time

    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(2000):  # one slab per slice: an import of ~2000 steps
        tifffile.imwrite(folder / f"z{i:04d}.tif", np.full((32, 32), i % 251, np.uint8))
    out = tmp_path / "o.n5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_emparsl.cli", "import", str(folder), f"{out}:raw",
         "--chunks", "1,32,32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal (a suite run in the background has SIGINT ignored, inherited)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    attrs = out / "raw" / "attributes.json"
    deadline = time.time() + 60
    while not (attrs.exists() and (out / "raw" / "0").exists()) and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)  # held mid-import while we look
    assert "emparsl_unfinished" in json.loads(attrs.read_text())
    os.kill(proc.pid, signum)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.replace("\r", "\n").strip().splitlines()[-1] == (
        f"emparsl: import {how}; nothing of it was kept."
    )
    assert not out.exists() and "Traceback" not in err


def test_progress_in_a_log_file_is_a_few_lines(small_n5, tmp_path):
    """Where stderr is not a terminal (a batch job's log) the bar is drawn every 10 s, not twice
    per block: 105 blocks wrote 200+ bar states into the log. Each state is its own line: tqdm's
    carriage returns made one physical line of them all, of which `tail` showed the last."""
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{small_n5[0]}:raw",
           "--model", "unet3d-em", "--output", f"{tmp_path}/o.n5:p", "--site", "threads",
           "--block", "8", "--halo", "0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "Finished: 105/105 blocks done" in res.stdout
    assert "\r" not in res.stderr
    states = [s for s in res.stderr.splitlines() if s.startswith("run:")]
    assert 2 <= len(states) < 105 // 4, states  # not one per block or two
    assert "starting the site" in states[0] and "105/105" in states[-1]
    assert all(s == s.rstrip() for s in states)  # no redraw's padding


def test_sites_list_shows_a_broken_profile_among_the_others(capsys, tmp_path, monkeypatch):
    """One profile that is not valid YAML stopped `sites list` there: the profiles after it
    were not listed."""
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path))
    (tmp_path / "broken.yaml").write_text("kind: local\nworkers: [\n")
    (tmp_path / "good.yaml").write_text("kind: local\nworkers: 1\n")
    (tmp_path / "short.yml").write_text("kind: threads\nworkers: 1\n")  # .yml: listed too
    # one saved in Latin-1 (before: an internal error, no profile listed at all)
    (tmp_path / "latin.yaml").write_bytes("kind: local\n# café\n".encode("latin-1"))
    code, out, _ = run(capsys, "sites", "list")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 2 and set(lines) == {"local", "threads", "broken", "good", "latin", "short"}
    assert lines["broken"].startswith(
        f"broken       invalid: The site profile {tmp_path}/broken.yaml"
    )
    assert lines["latin"].endswith("latin.yaml is not UTF-8 text; save it as UTF-8.")
    # a folder that is not there (a typo): said, not silently nothing of yours
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "nope"))
    code, out, err = run(capsys, "sites", "list")
    assert code == 0 and {line.split()[0] for line in out.splitlines()} == {"local", "threads"}
    assert err == (
        f"emparsl: note: EMPARSL_SITES is {tmp_path}/nope, which is no folder: no profiles of "
        "yours are listed from it.\n"
    )
    assert lines["good"].startswith("good         local    1 worker  (")


def test_paths_as_typed_home_and_quotes(capsys, monkeypatch, tmp_path, small_n5):
    """``~`` (not expanded by the shell in ``--output=~/…`` or in a panel's text field) and
    quotes around a pasted path name the path they mean, not a folder called "~"."""
    import torch

    from napari_emparsl.core.paths import user_path

    conv = torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1).eval())
    torch.jit.save(conv, str(tmp_path / "conv.pt"))
    (tmp_path / "conv.pt.yaml").write_text("kind: image\nhalo: [1, 1, 1]\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "small.n5")  # a literal "~" folder would appear here
    assert user_path(" '~/a b.n5' ") == str(tmp_path / "a b.n5")
    assert user_path('"/x/y.n5"') == "/x/y.n5" and user_path("~") == str(tmp_path)
    assert main(["info", "~/small.n5"]) == 0
    assert "raw  20×40×50 uint8" in capsys.readouterr().out
    args = ["run", "--input=~/small.n5:raw", "--model", '"~/conv.pt"',
            "--output= ~/out.n5:pred", "--site", "threads", "--block", "16,16,16"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert Volume.open(tmp_path / "out.n5", "pred").shape == small_n5[1].shape
    assert Volume.open("'~/out.n5:pred'").key == "pred"
    assert not (tmp_path / "small.n5" / "~").exists()
    from napari_emparsl.execution.sites import load_site

    (tmp_path / "mine.yaml").write_text("name: mine\nkind: threads\nworkers: 1\n")
    assert load_site("'~/mine.yaml'").name == "mine"


def test_workers_auto_uses_the_cores_this_process_may_use(capsys, tmp_path, monkeypatch):
    """The built-in sites take one worker per core this process may use (a batch job's
    allocation, ``taskset``), at most one per 3 GB of memory: a 64-core node no longer ran 2."""
    from napari_emparsl.execution.sites import auto_workers, load_site, machine_capacity

    cores, memory = machine_capacity()
    assert cores == len(os.sched_getaffinity(0)) and memory > 2**30
    expected = max(1, min(cores, memory // (3 * 2**30)))
    assert load_site("local").workers == "auto" and load_site("local").worker_count == expected
    assert auto_workers(threads_per_worker=cores) == 1
    # threads per worker: auto shares the cores among a given number of workers
    from napari_emparsl.execution.sites import SiteProfile

    assert load_site("local").worker_threads == 1
    two = SiteProfile(name="two", kind="local", workers=2)
    assert two.worker_threads == max(1, cores // 2)
    assert SiteProfile(name="one", kind="local", workers=1).worker_threads == cores
    assert (
        SiteProfile(name="t", kind="local", workers=2, threads_per_worker="3").worker_threads == 3
    )
    fixed = SiteProfile(name="f", kind="local", threads_per_worker=cores)
    assert fixed.worker_count == 1 and fixed.worker_threads == cores
    code, out, _ = run(capsys, "sites", "list")
    assert f"local        local    {expected} worker" in out and "(auto)" in out
    # pinned to one core (as a job allocated one core is): one worker
    script = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from napari_emparsl.cli import main; raise SystemExit(main(['sites', 'show', 'local']))"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert shown.returncode == 0 and json.loads(shown.stdout)["workers"] == "auto"
    assert shown.stderr == "(workers auto: 1; threads_per_worker auto: 1 on this machine)\n"
    # a number stays a number; anything else is one sentence naming the field
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path))
    (tmp_path / "three.yaml").write_text("kind: local\nworkers: 3\n")
    assert load_site("three").worker_count == 3
    (tmp_path / "zero.yaml").write_text("kind: local\nworkers: 0\n")
    code, _, err = run(capsys, "sites", "show", "zero")
    assert code == 2 and err == (
        f"emparsl: error: The site profile {tmp_path}/zero.yaml is invalid: field 'workers': "
        "workers is a whole number of at least 1, or auto, not 0.\n"
    )
    # a threads site has no worker processes: settings for them are refused, not ignored
    (tmp_path / "t1.yaml").write_text('kind: threads\nworker_init: "module load x"\n')
    (tmp_path / "t2.yaml").write_text("kind: threads\nnice: 10\n")
    code, _, err = run(capsys, "sites", "show", "t1")
    assert code == 2 and err == (
        f"emparsl: error: The site profile {tmp_path}/t1.yaml is invalid: worker_init runs "
        "before worker processes start, and a threads site has none (its blocks run in this "
        "process): leave it empty, or use kind local.\n"
    )
    code, _, err = run(capsys, "sites", "show", "t2")
    assert code == 2 and "invalid: nice sets the priority of worker processes" in err
    (tmp_path / "t3.yaml").write_text('kind: threads\nnice: 0\nworker_init: " "\n')
    assert load_site("t3").kind == "threads"  # the defaults (as the site panel saves them)


def test_a_path_from_the_home_folder_is_not_a_folder_named_tilde(tmp_path, monkeypatch, capsys):
    """`emparsl sample '~/s.n5'` (quoted, so no shell expanded it) and save_array('~/…'):
    written in the home folder (before: a half-written folder named ~ in the current one)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, out, _ = run(capsys, "sample", "~/s.n5", "--shape", "8,32,32")
    assert code == 0 and f"to {tmp_path}/home/s.n5:" in out
    save_array("~/t.n5", "raw", np.zeros((4, 8, 8), np.uint8))
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["s.n5", "t.n5"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_site_profiles_that_would_not_do_what_they_say_are_refused(capsys, tmp_path, monkeypatch):
    """A profile named otherwise than its file could not be chosen by its name (and the site
    panel saved a second file); `nice: true` was read as 1; a strategy_period of .inf or 1e300
    killed Parsl's poller thread, and workers that failed to start were never noticed."""
    from napari_emparsl.execution.sites import load_site

    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path))
    (tmp_path / "gpu.yaml").write_text("name: mygpu\nkind: local\n")
    code, _, err = run(capsys, "sites", "show", "gpu")
    assert code == 2 and err == (
        f"emparsl: error: The site profile {tmp_path}/gpu.yaml names itself 'mygpu', but a "
        "site's name is its file's name: rename the file to mygpu.yaml, or set name: gpu.\n"
    )
    (tmp_path / "2024.yaml").write_text("name: 2024\nkind: local\n")  # YAML's int, not text
    code, _, err = run(capsys, "sites", "show", "2024")
    assert code == 2 and "is invalid: field 'name': name should be a valid string, not 2024" in err
    (tmp_path / "2024.yaml").unlink()
    (tmp_path / "my gpu.yaml").write_text("kind: local\n")
    code, _, err = run(capsys, "sites", "show", str(tmp_path / "my gpu.yaml"))
    assert code == 2 and err.startswith(
        f"emparsl: error: The site profile {tmp_path}/my gpu.yaml is invalid: its file name "
        "'my gpu' is no site name: a site's name is the name of its file: letters, digits"
    )
    for text, field in (
        ("nice: true", "nice"),
        ("keep_freed_memory: 1", "keep_freed_memory"),
        ("strategy_period: .inf", "strategy_period"),
        ("strategy_period: 1e300", "strategy_period"),
        ("strategy_period: true", "strategy_period"),
    ):
        (tmp_path / "odd.yaml").write_text(f"kind: local\n{text}\n")
        code, _, err = run(capsys, "sites", "show", "odd")
        assert code == 2 and f"is invalid: field '{field}': " in err, (text, err)
    # pydantic's own words ("Extra inputs are not permitted", "Field required") said neither
    # the settings there are nor what to add
    for text, said in (
        ("kind: local\nworkres: 2", "'workres' is not a setting of a site profile (check its "
                                     "spelling; the settings are name, kind, workers, "),
        ("workers: 2", "field 'kind' is missing: add kind: local or kind: threads."),
        ("kind: [local", "is not valid YAML (while parsing a flow sequence, line 2, column 1)."),
    ):  # fmt: skip
        (tmp_path / "odd.yaml").write_text(f"{text}\n")
        code, _, err = run(capsys, "sites", "show", "odd")
        assert code == 2 and said in err, (text, err)
    (tmp_path / "odd.yaml").write_text("kind: local\nstrategy_period: 2\nnice: 19\n")
    assert load_site("odd").strategy_period == 2.0


def test_sample_says_how_many_levels_it_wrote(capsys, tmp_path):
    """It always said "3 pyramid levels each"; a small sample has fewer."""
    for shape, said in (("1", "no pyramid (too small)."), ("64,64,64", "3 pyramid levels each.")):
        code, out, _ = run(capsys, "sample", f"{tmp_path}/s{len(shape)}.n5", "--shape", shape)
        assert code == 0 and out.strip().endswith(f"labels/cells, {said}"), out


def test_a_negative_bound_after_a_space_gets_its_sentence(capsys, tmp_path, small_n5):
    """`--roi -8:,:,:` (a space, not `=`): argparse took the value for an option and said
    "expected one argument"; now it reaches the sentence the docs promise, as `--roi=-8:`."""
    src = f"{small_n5[0]}:raw"
    for roi in (["--roi", "-8:,:,:"], ["--roi=-8:,:,:"]):
        code = main(["run", "--input", src, "--model", "unet3d-em", "--site", "threads",
                     "--output", f"{tmp_path}/o.n5:p", *roi])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "has a negative bound; give positions counted from" in err, err
    assert not (tmp_path / "o.n5").exists()
    with pytest.raises(SystemExit):  # a value that is an option stays one: argparse says so
        main(["run", "--input", src, "--model", "unet3d-em", "--roi", "--halo", "8"])
    assert "argument --roi: expected one argument" in capsys.readouterr().err


def test_sites_folder_as_typed_hidden_files_and_shown_profiles(capsys, tmp_path, monkeypatch):
    """EMPARSL_SITES='~/sites' hid every profile without a word; an editor's lock file
    (.#mine.yaml) or macOS's ._mine.yaml were broken profiles (exit code 2); `sites show`
    wrote characters beyond the BMP as surrogate halves, which did not read back; a name of
    230 characters was valid, and its site never started."""
    import yaml

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EMPARSL_SITES", "~/sites")
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "mine.yaml").write_text(
        'kind: local\nworkers: 1\nworker_init: "echo café 😀"\n', encoding="utf-8"
    )
    (tmp_path / "sites" / ".#mine.yaml").write_text("user@host.1234")
    (tmp_path / "sites" / "._mine.yaml").write_bytes(b"\x00\x05\x16\x07")
    code, out, err = run(capsys, "sites", "list")
    assert code == 0 and {line.split()[0] for line in out.splitlines()} == {
        "local",
        "threads",
        "mine",
    }, out + err
    code, out, _ = run(capsys, "sites", "show", "mine")
    assert code == 0 and yaml.safe_load(out)["worker_init"] == "echo café 😀"
    (tmp_path / "sites" / "long.yaml").write_text(f"name: {'a' * 230}\nkind: local\n")
    code, _, err = run(capsys, "sites", "show", str(tmp_path / "sites" / "long.yaml"))
    assert code == 2 and "a site's name is at most 64 characters long, not 230" in err, err


def test_sites_list_with_a_name_says_show(capsys):
    """`emparsl sites list local` listed every site, the name ignored (a typo for show)."""
    code, out, err = run(capsys, "sites", "list", "local")
    assert (
        code == 2
        and out == ""
        and err
        == (
            "emparsl: error: `emparsl sites list` takes no name; `emparsl sites show local` shows "
            "that profile.\n"
        )
    )


def test_model_options_before_a_command_s_paths_leave_the_paths_alone(capsys, tmp_path):
    """`--model-option` takes one or more values, and before a command's paths it took those
    too: "the following arguments are required: model"."""
    assert main(["describe-model", "--model-option", "halo=1", "classes=a,b,c", "unet3d-em"]) == 0
    out = capsys.readouterr().out
    assert "halo: [1, 1, 1]" in out and "classes: [a, b, c]" in out
    # a word without "=" ends its values: the option's own sentence, not argparse's
    assert main(["describe-model", "unet3d-em", "--model-option", "halo"]) == 2
    assert capsys.readouterr().err.startswith(
        "emparsl: error: Model options are key=value, not 'halo'"
    )


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_batch_job_with_a_standard_stream_closed(tmp_path, closed):
    """A job started with stdin, stdout or stderr closed (`0<&-`): with stdin or stdout closed
    every block failed on the local site (the fork server's socket took descriptor 0 or 1, and
    its child had it replaced: "the site's workers could not start"); with stderr closed the
    run crashed on the progress bar and said so on stdout."""
    assert main(["sample", str(tmp_path / "s.n5"), "--shape", "32,64,64", "--seed", "3"]) == 0
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/s.n5:raw",
           "--model", "unet3d-em", "--output", f"{tmp_path}/s.n5:p", "--block", "32",
           "--site", "local"]  # fmt: skip
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e, check=False,
                             preexec_fn=lambda: os.close(closed))  # fmt: skip
    said = out.read_text() + err.read_text()
    assert res.returncode == 0, said
    assert "internal error" not in said and "Traceback" not in said
    if closed != 1:
        assert "Finished: 4/4 blocks done, 0 failed" in out.read_text()
    assert Volume.open(tmp_path / "s.n5", "p").data.compute().any()


def test_an_output_encoding_without_the_messages_characters(tmp_path):
    """PYTHONIOENCODING=ascii (a batch system's locale): ×, — and … are replaced, not a crash
    (`sample` exited 1 after writing the sample; `info` and `status` exited 1)."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    cli = [sys.executable, "-m", "napari_emparsl.cli"]
    for args in (["sample", str(tmp_path / "s.n5"), "--shape", "16,32,32", "--seed", "3"],
                 ["info", f"{tmp_path}/s.n5:raw"],
                 ["run", "--input", f"{tmp_path}/s.n5:raw", "--model", "unet3d-em", "--output",
                  f"{tmp_path}/s.n5:p", "--site", "threads"],
                 ["status", f"{tmp_path}/s.n5:p"]):  # fmt: skip
        res = subprocess.run([*cli, *args], capture_output=True, env=env, check=False)
        assert res.returncode == 0, (args, res.stderr.decode(errors="replace"))
        assert b"internal error" not in res.stderr and b"Traceback" not in res.stderr
    assert b"?" in subprocess.run([*cli, "info", f"{tmp_path}/s.n5:raw"], capture_output=True,
                                  env=env, check=True).stdout  # (16×32×32 as 16?32?32)  # fmt: skip


def test_exit_codes_a_script_tells_apart(capsys, tmp_path, small_n5, monkeypatch):
    """Bad input 2, an output another writer holds 75 (try later), a fault of emparsl's own 70
    with its traceback in the log (both were 2 and 1: a script could not tell "try again
    later" from "fix the command", nor a bug from failed blocks)."""
    from napari_emparsl.core import volume
    from napari_emparsl.core.ledger import OutputLock

    path, _ = small_n5
    cmd = ["run", "--input", f"{path}:raw", "--model", "unet3d-em", "--site", "threads"]
    assert run(capsys, *cmd, "--output", f"{path}:raw")[0] == 2  # output = input
    lock = OutputLock(f"{tmp_path}/o.n5", "pred", "import")
    lock.acquire()
    try:
        code, _, err = run(capsys, *cmd, "--output", f"{tmp_path}/o.n5:pred")
    finally:
        lock.release()
    assert code == 75 and "is being written by an import" in err

    def broken(*args, **kwargs):
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(volume, "container_tree", broken)  # a bug, injected
    code, _, err = run(capsys, "info", str(path))
    assert code == 70 and err.startswith("emparsl: internal error (RuntimeError: a fault of ours)")
    assert "please report them" in err and "Traceback" not in err
    log = err.split("the details are in ", 1)[1].split("; please report")[0]
    assert "Traceback" in open(log, encoding="utf-8").read()
