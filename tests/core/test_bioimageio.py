"""bioimage.io model packages (format 0.4 and 0.5): described without loading, run like any
model, reproducing the package's own test output; what emparsl cannot run the same way is
refused in one sentence."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
import z5py

import napari_emparsl
from napari_emparsl.core.models.loaders import (
    describe_model,
    file_hash,
    load_model,
    missing_description,
)
from napari_emparsl.core.models.spec import ModelError


def _space(axis: str, size, **more) -> dict:
    return {"type": "space", "id": axis, "size": size, **more}


def _rdf_05(**change) -> dict:
    nm = {"unit": "nanometer", "scale": 8.0}
    rdf = {
        "format_version": "0.5.3",
        "type": "model",
        "name": "toy sigmoid",
        "inputs": [
            {
                "id": "raw",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["raw"]},
                    *(_space(a, {"min": 16, "step": 8}, **nm) for a in "zyx"),
                ],
                "test_tensor": {"source": "test_input.npy"},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["z", "y", "x"]}},
                ],
            }
        ],
        "outputs": [
            {
                "id": "probability",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["p"]},
                    *(_space(a, {"tensor_id": "raw", "axis_id": a}, halo=4, **nm) for a in "zyx"),
                ],
                "test_tensor": {"source": "test_output.npy"},
                "data": {"range": [0.0, 1.0]},
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": {"torchscript": {"source": "weights.pt", "pytorch_version": "2.13"}},
    }
    return rdf | change


def _rdf_04() -> dict:
    return {
        "format_version": "0.4.10",
        "type": "model",
        "name": "toy sigmoid",
        "inputs": [
            {
                "name": "raw",
                "axes": "bczyx",
                "data_type": "float32",
                "shape": {"min": [1, 1, 16, 16, 16], "step": [0, 0, 8, 8, 8]},
                "preprocessing": [
                    {
                        "name": "zero_mean_unit_variance",
                        "kwargs": {"mode": "per_sample", "axes": "zyx"},
                    }
                ],
            }
        ],
        "outputs": [
            {
                "name": "probability",
                "axes": "bczyx",
                "data_type": "float32",
                "data_range": [0.0, 1.0],
                "halo": [0, 0, 4, 4, 4],
                "shape": {
                    "reference_tensor": "raw",
                    "scale": [1, 0, 1, 1, 1],
                    "offset": [0, 0.5, 0, 0, 0],
                },
                "postprocessing": [{"name": "sigmoid"}],
            }
        ],
        "test_inputs": ["test_input.npy"],
        "test_outputs": ["test_output.npy"],
        "weights": {"torchscript": {"source": "weights.pt"}},
    }


@pytest.fixture(scope="module")
def package(tmp_path_factory, write_package):
    """A package folder and its .zip (format 0.5): TorchScript weights, test input (32×48×48)
    and its output as the package's authors computed it (per-sample z-score, net, sigmoid)."""
    root = tmp_path_factory.mktemp("bioimageio")
    folder = root / "toy"
    x = np.random.default_rng(0).normal(100, 20, (1, 1, 32, 48, 48)).astype(np.float32)
    y = write_package(folder, x, _rdf_05())
    with zipfile.ZipFile(root / "toy.zip", "w") as zf:
        for name in os.listdir(folder):
            zf.write(folder / name, name)
    n5 = root / "in.n5"
    ds = z5py.File(str(n5), "a").create_dataset("raw", data=x[0, 0], chunks=(16, 16, 16))
    ds.attrs["resolution"], ds.attrs["unit"] = [8, 8, 8], "nm"
    return {"folder": folder, "zip": root / "toy.zip", "n5": n5, "expected": y[0, 0]}


def _package(tmp_path, rdf: dict, files=("weights.pt",), src=None) -> str:
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    for name in files:
        (folder / name).write_bytes((src / name).read_bytes())
    return str(folder)


def test_package_described_without_torch_and_alike_in_both_formats(package, tmp_path):
    spec = describe_model(str(package["zip"]))
    assert spec.kind == "image" and spec.in_channels == 1 and spec.out_channels == 1
    assert spec.spatial_dims == 3 and spec.halo == (4, 4, 4)
    assert spec.min_size == (16, 16, 16) and spec.multiple == (8, 8, 8)
    assert spec.normalize == "zscore" and spec.activation == "sigmoid" and spec.edge == "none"
    assert spec.voxel_size == (8.0, 8.0, 8.0) and spec.out_range == (0.0, 1.0)
    assert spec.block == (64, 64, 64)  # read 72 = 16 + 7 × 8: a size the model takes
    # the folder, its description file and the zip are the same model
    assert describe_model(str(package["folder"])) == spec
    assert describe_model(str(package["folder"] / "rdf.yaml")) == spec
    assert missing_description(str(package["zip"])) == []  # the panel asks for nothing
    # the coordinator and the panel describe it without importing torch
    code = (
        "import sys; from napari_emparsl.core.models.loaders import describe_model; "
        f"describe_model({str(package['zip'])!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # format 0.4 of the same model says the same (0.4 has no voxel size)
    old = _package(tmp_path, _rdf_04(), src=package["folder"])
    assert describe_model(old) == spec.with_options({"voxel_size": None})


@pytest.mark.parametrize(
    ("form", "site"),
    [("zip", "threads"), ("folder", "threads"), ("rdf", "threads"), ("zip", "local")],
)
def test_package_run_reproduces_its_test_output(package, tmp_path, form, site, htex):
    model = {
        "zip": package["zip"],
        "folder": package["folder"],
        "rdf": package["folder"] / "rdf.yaml",
    }[form]
    out = tmp_path / "out.n5"
    # blocks of 24 do not divide 48 (nor 16 the 32 of z): inner and edge blocks both; on
    # `local`, worker processes read the weights from the zip themselves
    workers = set()
    done = napari_emparsl.run(
        f"{package['n5']}:raw", str(model), f"{out}:p", site=site, block=(16, 24, 24),
        callback=lambda e: workers.add(e.result.worker) if hasattr(e, "result") else None,
    )  # fmt: skip
    here = any(w.endswith(f":{os.getpid()}") for w in workers)
    assert workers and here == (site == "threads")
    assert done.ok
    y = z5py.File(str(out), "r")["p"][:]
    assert y.dtype == np.float32 and y.shape == package["expected"].shape
    # everywhere, edges included: the model meets the volume edge as in its own test
    assert np.abs(y - package["expected"]).max() < 1e-5
    # the ledger's hash covers the weights (a folder: its description and weights)
    assert len(file_hash(str(model if form != "rdf" else package["folder"]))) == 64
    assert htex.gone()


def test_sidecar_beside_package_and_options_override(package, tmp_path):
    zipped = tmp_path / "toy.zip"
    zipped.write_bytes(package["zip"].read_bytes())
    (tmp_path / "toy.zip.yaml").write_text("edge: reflect\nblock: [32, 32, 32]\n")
    spec = describe_model(str(zipped), {"activation": "none"})
    assert spec.edge == "reflect" and spec.block == (32, 32, 32) and spec.activation == "none"
    loaded = load_model(str(zipped))
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    # what the user wrote, not what the package's own description fills in (its data range is
    # its out_range: a float32 output of another range was said to leave it unused)
    from napari_emparsl.core.models.loaders import stated_keys

    assert stated_keys(str(zipped), {"activation": "none"}) == {"edge", "block", "activation"}
    ranged = describe_model(str(zipped), {"out_range": "-1,1"})
    assert ranged.unused(stated_keys(str(zipped))) == []
    assert len(ranged.unused(stated_keys(str(zipped), {"out_range": "-1,1"}))) == 1


def test_input_smaller_than_min_size_is_padded(package, tmp_path):
    x = np.random.default_rng(1).normal(0, 1, (5, 9, 11)).astype(np.float32)
    z5py.File(str(tmp_path / "s.n5"), "a").create_dataset("raw", data=x, chunks=(8, 8, 8))
    done = napari_emparsl.run(
        f"{tmp_path / 's.n5'}:raw", str(package["zip"]), f"{tmp_path / 'o.n5'}:p", site="threads"
    )
    assert done.ok
    y = z5py.File(str(tmp_path / "o.n5"), "r")["p"][:]
    assert y.shape == x.shape and np.isfinite(y).all() and 0 < y.min() <= y.max() < 1


def _2d_04(**output) -> dict:
    rdf = {
        "format_version": "0.4.9",
        "type": "model",
        "name": "membranes 2d",
        "inputs": [
            {
                "name": "raw",
                "axes": "bcyx",
                "shape": [1, 1, 256, 256],
                "preprocessing": [
                    {
                        "name": "scale_range",
                        "kwargs": {
                            "mode": "per_sample",
                            "axes": "yx",
                            "min_percentile": 2,
                            "max_percentile": 99.5,
                        },
                    }
                ],
            }
        ],
        "outputs": [
            {
                "name": "mask",
                "axes": "bcyx",
                "halo": [0, 0, 32, 32],
                "shape": {
                    "reference_tensor": "raw",
                    "scale": [1, 0, 1, 1],
                    "offset": [0, 0.5, 0, 0],
                },
                "postprocessing": [
                    {"name": "sigmoid"},
                    {"name": "binarize", "kwargs": {"threshold": 0.6}},
                ],
            }
        ],
        "weights": {"torchscript": {"source": "weights.pt"}},
    }
    rdf["outputs"][0] |= output
    return rdf


def test_2d_fixed_shape_binarized_model(package, tmp_path):
    spec = describe_model(_package(tmp_path, _2d_04(), src=package["folder"]))
    assert spec.spatial_dims == 2 and spec.halo == (0, 32, 32)
    # a fixed 256×256 input: blocks of 192 fill it with their halo; smaller ones are padded
    assert spec.fixed == (0, 256, 256) and spec.multiple == (1, 1, 1)
    assert spec.input_size((1, 100, 256)) == (1, 256, 256) and spec.block == (1, 192, 192)
    assert spec.normalize == "percentile" and spec.percentiles == (2.0, 99.5)
    assert spec.kind == "labels" and spec.classes == () and spec.threshold == 0.6
    assert spec.activation == "sigmoid" and spec.label_dtype == "uint8"
    # any size of 64 + k × 16: 256² blocks, read as 320² (not 1×64×64 blocks read as 128²)
    rdf = _2d_04()
    rdf["inputs"][0]["shape"] = {"min": [1, 1, 64, 64], "step": [0, 0, 16, 16]}
    spec = describe_model(_package(tmp_path, rdf, src=package["folder"]))
    assert spec.min_size == (1, 64, 64) and spec.multiple == (1, 16, 16)
    assert spec.block == (1, 256, 256)
    # sizes 20 + k × 8 (20 is not a multiple of 8): inputs padded to 20, 28, 36, …
    rdf = _rdf_05()
    for ax in rdf["inputs"][0]["axes"][2:]:
        ax["size"] = {"min": 20, "step": 8}
    spec = describe_model(_package(tmp_path, rdf, src=package["folder"]))
    assert spec.input_size((5, 21, 36)) == (20, 28, 36)
    assert spec.block == (68, 68, 68)  # read 76 = 20 + 7 × 8


def test_super_resolution_and_fixed_normalizations(package, tmp_path):
    rdf = _rdf_05()
    out_axes = rdf["outputs"][0]["axes"]
    for ax in out_axes[3:]:  # y, x: voxels half as large -> twice as many, halo in output voxels
        ax.update(scale=4.0, halo=8)
    out_axes[2]["halo"] = 2
    rdf["outputs"][0]["postprocessing"] = []
    rdf["inputs"][0]["preprocessing"] = [
        {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 110.0, "std": 15.0}}
    ]
    spec = describe_model(_package(tmp_path, rdf, src=package["folder"]))
    assert spec.scale == (1, 2, 2) and spec.halo == (2, 4, 4)
    assert spec.normalize == "fixed" and spec.norm_values == (110.0, 15.0)
    assert spec.activation == "none"
    rdf["inputs"][0]["preprocessing"] = [
        {"id": "scale_linear", "kwargs": {"gain": 0.5, "offset": -3.0}}
    ]
    spec = describe_model(_package(tmp_path, rdf, src=package["folder"]))
    assert spec.norm_values == (6.0, 2.0)  # (x - 6) / 2 = 0.5 x - 3


def _two_inputs(rdf):
    rdf["inputs"] = rdf["inputs"] * 2
    return rdf


def _state_dict_only(rdf):
    rdf["weights"] = {"pytorch_state_dict": {"source": "w.pt", "architecture": "unet.py:UNet"}}
    return rdf


def _channels_last(rdf):
    ax = rdf["inputs"][0]["axes"]
    rdf["inputs"][0]["axes"] = [ax[0], *ax[2:], ax[1]]
    return rdf


def _other_postprocessing(rdf):
    rdf["outputs"][0]["postprocessing"] = [{"id": "scale_linear", "kwargs": {"gain": 2.0}}]
    return rdf


def _remote_weights(rdf):
    rdf["weights"]["torchscript"]["source"] = "https://zenodo.org/record/1/files/weights.pt"
    return rdf


def _per_channel(rdf):
    rdf["inputs"][0]["preprocessing"] = [
        {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": [1.0, 2.0], "std": [1.0, 1.0]}}
    ]
    return rdf


def _damaged_weights(rdf):
    rdf["weights"]["torchscript"]["sha256"] = "0" * 64
    return rdf


def _old_format(rdf):
    rdf["format_version"] = "0.3.6"
    return rdf


@pytest.mark.parametrize(
    ("change", "files", "words"),
    [
        (
            _two_inputs,
            ("weights.pt",),
            "has 2 input(s) and 1 output(s); emparsl runs models of one",
        ),
        (
            _state_dict_only,
            (),
            "has no TorchScript weights (only pytorch_state_dict): a state dict needs",
        ),
        (_channels_last, ("weights.pt",), "input takes axes bzyxc; emparsl runs models on batch"),
        (_other_postprocessing, ("weights.pt",), "post-processes its output with 'scale_linear'"),
        (_remote_weights, (), "to download, which emparsl does not do"),
        (_per_channel, ("weights.pt",), "normalizes each channel with its own mean"),
        (_old_format, ("weights.pt",), "is in bioimage.io format 0.3.6; emparsl reads formats"),
        (lambda rdf: rdf, (), "lacks weights.pt, which its description names"),
        (_damaged_weights, ("weights.pt",), "do not match the SHA-256 its description records"),
    ],
)
def test_what_cannot_run_the_same_way_is_refused_in_one_sentence(
    package, tmp_path, change, files, words
):
    path = _package(tmp_path, change(_rdf_05()), files=files, src=package["folder"])
    with pytest.raises(ModelError) as err:
        describe_model(path)
        load_model(path)
    message = str(err.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_cli_refuses_a_package_it_cannot_run_and_writes_nothing(package, tmp_path):
    path = _package(tmp_path, _state_dict_only(_rdf_05()), files=(), src=package["folder"])
    out = tmp_path / "out.n5"
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{package['n5']}:raw",
           "--model", path, "--output", f"{out}:p", "--site", "threads"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "has no TorchScript weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_check_model_runs_the_test_input_through_the_engine(package, capsys):
    from napari_emparsl.cli import main

    assert main(["check-model", str(package["zip"])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{package['zip']}: Reproduces the package's test output: largest")
    assert "over 73,728 values" in out
    # mirrored context at the edges is not what the authors computed: the check says so
    assert main(["check-model", str(package["folder"]), "--model-option", "edge=reflect"]) == 1
    assert "Does not reproduce the package's test output" in capsys.readouterr().out
    # a model file without a package: nothing to check it with, in one sentence
    assert main(["check-model", "unet3d-em"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emparsl: error: ") and "is not a bioimage.io package" in err
    assert err.count("\n") == 1
    assert err.rstrip().endswith(
        "(`emparsl export-model unet3d-em unet3d-em.zip` makes one of it)."
    )
    # a missing file: no advice to give a built-in name, which it would then refuse
    assert main(["check-model", str(package["zip"]) + ".nope"]) == 2
    assert capsys.readouterr().err == (
        f"emparsl: error: The model '{package['zip']}.nope' does not exist; give a bioimage.io "
        "package (a folder or .zip holding rdf.yaml).\n"
    )


def test_2d_fixed_shape_labels_package_reproduces_its_test_output(tmp_path, write_package):
    """A 2D model of one fixed input size (64×64, halo 8: blocks of 48 padded to it), percentile
    normalization, sigmoid then binarize: a uint8 labels output equal to the authors' masks."""
    from napari_emparsl.execution.check import check_model

    x = np.random.default_rng(2).gamma(2.0, 30.0, (1, 1, 64, 64)).astype(np.float32)
    lo, hi = np.percentile(x, [2, 99.5])
    rdf = _2d_04()
    rdf["inputs"][0]["shape"] = [1, 1, 64, 64]
    rdf["outputs"][0]["halo"] = [0, 0, 8, 8]
    rdf |= {"test_inputs": ["test_input.npy"], "test_outputs": ["test_output.npy"]}

    def masks(net):
        with torch.no_grad():
            p = torch.sigmoid(net(torch.from_numpy(((x - lo) / (hi - lo)).astype(np.float32))))
        # a threshold halfway between two neighbouring values (a random net's outputs all lie
        # near 0.5): half of the voxels on each side, none within float rounding of it
        ordered = np.sort(p.numpy().ravel())
        threshold = float(ordered[2047] + ordered[2048]) / 2
        rdf["outputs"][0]["postprocessing"][1]["kwargs"]["threshold"] = threshold
        return (p.numpy() > threshold).astype(np.uint8)

    folder = tmp_path / "pkg"
    write_package(folder, x, rdf, dims=2, seed=1, expected=masks)
    result = check_model(str(folder))
    assert result.ok and result.kind == "labels" and result.max_difference == 0
    assert result.voxels == 64 * 64
    assert result.sentence().startswith(
        "Reproduces the package's test output: 0 of 4,096 voxels differ (allowed: a fraction of "
        "0.0001)"
    )


def test_describe_model_prints_what_emparsl_will_run(package, capsys):
    from napari_emparsl.cli import main

    assert main(["describe-model", str(package["zip"]), "--model-option", "block=32"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    described = describe_model(str(package["zip"]), {"block": 32}).to_dict()
    assert described["architecture"] is None and not described["arch_options"]
    # no "architecture: null" to copy into a sidecar, which would not take it
    assert "architecture" not in printed and "arch_options" not in printed
    del described["architecture"], described["arch_options"]
    assert printed == described
    assert printed["normalize"] == "zscore" and printed["block"] == [32, 32, 32] and err == ""
    # a TorchScript file without a sidecar: what is missing, on stderr (stdout stays YAML)
    assert main(["describe-model", str(package["folder"] / "weights.pt")]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["kind"] == "labels"
    assert err.startswith("Not described: kind, halo, classes (set them in its sidecar")


def test_export_builtin_model_round_trip(tmp_path):
    """The built-in U-Net written as a package: what emparsl reads back is the same model (its
    labels under config.emparsl), and the engine reproduces the package's test output."""
    from napari_emparsl.core.models.export import export_package
    from napari_emparsl.execution.check import check_model

    out = tmp_path / "membranes.zip"
    done = export_package("unet3d-em", str(out), name="EM membranes & mitochondria")
    assert done.test_shape == (1, 1, 64, 64, 64) and done.bytes == out.stat().st_size
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == [
            "README.md", "rdf.yaml", "test_input.npy", "test_output.npy", "weights.pt"
        ]  # fmt: skip
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        probabilities = np.load(io.BytesIO(zf.read("test_output.npy")))
        for tensor in rdf["inputs"] + rdf["outputs"]:
            source = tensor["test_tensor"]
            assert hashlib.sha256(zf.read(source["source"])).hexdigest() == source["sha256"]
    assert rdf["name"] == "EM membranes mitochondria" and rdf["format_version"] == "0.5.4"
    assert [a["channel_names"] for a in rdf["outputs"][0]["axes"][1:2]] == [
        ["background", "membrane", "mitochondria"]
    ]
    assert rdf["outputs"][0]["axes"][2]["halo"] == 24 and rdf["inputs"][0]["axes"][2]["size"] == {
        "min": 52, "step": 4}  # fmt: skip
    assert probabilities.shape == (1, 3, 64, 64, 64)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)  # softmax over the classes
    back, original = describe_model(str(out)), describe_model("unet3d-em")
    same = ("kind", "classes", "halo", "multiple", "min_size", "normalize", "block", "edge",
            "voxel_size", "spatial_dims", "in_channels", "scale")  # fmt: skip
    assert {k: getattr(back, k) for k in same} == {k: getattr(original, k) for k in same}
    result = check_model(str(out))
    assert result.ok and result.kind == "labels" and result.max_difference == 0


def test_export_of_a_model_with_mirrored_edges_checks_out(tmp_path):
    """A model run with `edge: reflect` (the default) written as a package: its test output is
    the model's own forward, and check-model compares with that (before: 'Does not reproduce',
    thousands of voxels at the edges differing)."""
    import torch

    from napari_emparsl.core.models.export import export_package
    from napari_emparsl.core.models.unet import UNet
    from napari_emparsl.execution.check import check_model

    torch.manual_seed(1)
    path = tmp_path / "u.pt"
    torch.jit.save(torch.jit.script(UNet(1, 3, base=4, depth=2).eval()), str(path))
    (tmp_path / "u.pt.yaml").write_text(
        "kind: labels\nclasses: [a, b, c]\nhalo: [24, 24, 24]\nmultiple: [4, 4, 4]\n"
        "block: [32, 32, 32]\n"
    )
    assert describe_model(str(path)).edge == "reflect"
    export_package(str(path), str(tmp_path / "u.zip"))
    assert describe_model(str(tmp_path / "u.zip")).edge == "reflect"  # emparsl's runs keep it
    result = check_model(str(tmp_path / "u.zip"))
    assert result.ok and result.max_difference == 0


def test_export_a_package_again_as_uint8_and_from_the_command_line(package, tmp_path, capsys):
    from napari_emparsl.cli import main
    from napari_emparsl.execution.check import check_model

    out = tmp_path / "again.zip"
    test = f"{package['n5']}:raw"
    assert main(["export-model", str(package["zip"]), str(out), "--test-input", test,
                 "--model-option", "out_dtype=uint8", "--author", "A. Microscopist"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert said.startswith(f"Wrote {out} (") and "a 32×48×48 test input with its output" in said
    spec = describe_model(str(out))
    assert spec.out_dtype == "uint8" and spec.activation == "sigmoid" and spec.edge == "none"
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    assert rdf["authors"] == [{"name": "A. Microscopist"}]
    assert np.array_equal(x[0, 0], z5py.File(str(package["n5"]), "r")["raw"][:])
    result = check_model(str(out))  # written as 0..255: within 1 of the mapped test output
    assert result.ok and result.max_difference <= 1
    # an existing package is kept unless asked; a name that is not a .zip is refused
    assert main(["export-model", str(package["zip"]), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"emparsl: error: {out} exists; choose another name or pass --overwrite.\n"
    )
    assert main(["export-model", "unet3d-em", str(tmp_path / "m.tar")]) == 2
    assert "is a .zip file; name it" in capsys.readouterr().err
    # a folder that is not there: said before the model runs (it named the package's .part)
    assert main(["export-model", "unet3d-em", str(tmp_path / "nowhere" / "m.zip")]) == 2
    assert capsys.readouterr().err == (
        f"emparsl: error: The folder {tmp_path / 'nowhere'} does not exist; create it first.\n"
    )


def _places(tree, at=()):
    """Every key and list index of a description, as paths."""
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list)
        else ()
    )
    for key, value in items:
        yield (*at, key)
        yield from _places(value, (*at, key))


@pytest.mark.parametrize("rdf", [_rdf_05, _rdf_04])
def test_any_malformed_description_is_one_sentence(package, tmp_path, rdf):
    """Each field of a description replaced by a value of another type (None, text, numbers,
    lists, mappings): described, or refused as a ModelError of one line — never another error
    (which the command line would report as an internal error)."""
    import copy

    good = rdf()
    folder = _package(tmp_path, good, src=package["folder"])
    described, refused = 0, 0
    for place in list(_places(good)):
        for odd in (None, "x", 3, -1, 0, 2.5, [], {}, [1, 2], {"a": 1}, True):
            bad = copy.deepcopy(good)
            parent = bad
            for key in place[:-1]:
                parent = parent[key]
            parent[place[-1]] = odd
            (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(bad))
            try:
                describe_model(folder)
                described += 1
            except ModelError as err:
                assert "\n" not in str(err) and str(err).endswith("."), (place, odd, err)
                refused += 1
    assert described > 50 and refused > 200  # both happen: the mutations reach the reader


def test_damaged_zip_is_one_sentence(package, tmp_path):
    broken = tmp_path / "broken.zip"
    data = package["zip"].read_bytes()
    broken.write_bytes(data[: len(data) // 2] + data[-22:])  # the end record, half the files
    with pytest.raises(ModelError) as err:
        describe_model(str(broken))
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_export_test_input_is_at_least_the_declared_minimum(tmp_path):
    """A halo over 56: the package declares inputs of at least 2 × halo + 1, and its test input
    is that large (before: cut to 128, smaller than its own description allows)."""
    import torch

    from napari_emparsl.core.models.export import export_package

    path = tmp_path / "c.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1).eval()), str(path))
    (tmp_path / "c.pt.yaml").write_text("kind: image\nhalo: [64, 64, 64]\nedge: none\n")
    export_package(str(path), str(tmp_path / "c.zip"))
    with zipfile.ZipFile(tmp_path / "c.zip") as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    least = [a["size"]["min"] for a in rdf["inputs"][0]["axes"][2:]]
    assert least == [129, 129, 129] and all(n >= m for n, m in zip(x.shape[2:], least, strict=True))


class _FixedConv(torch.nn.Module):
    """One 3×3×3 convolution (radius 1) that refuses any input but 8×16×16, as models exported
    for one tile size do."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x):
        if x.shape[2] != 8 or x.shape[3] != 16 or x.shape[4] != 16:
            raise ValueError("fixed-size model got " + str(x.shape))
        return self.conv(x)


def test_fixed_size_package_runs_on_a_volume_larger_than_its_tile(tmp_path, capsys):
    """A package of one input size (8×16×16, output halo 1,2,2): every block is read at exactly
    that size, and the output is the convolution tile by tile. Before, the size became
    min_size = multiple = 8×16×16 and the halo was rounded up to it: blocks read 24×48×48 and all
    failed ("fixed-size model got [1, 1, 24, 48, 48]")."""
    from napari_emparsl.cli import main

    torch.manual_seed(3)
    net = torch.jit.script(_FixedConv().eval())
    rdf = _rdf_05()
    rdf["name"] = "fixed tile"
    for ax, n in zip(rdf["inputs"][0]["axes"][2:], (8, 16, 16), strict=True):
        ax["size"] = n
    rdf["inputs"][0]["preprocessing"] = []
    for ax, h in zip(rdf["outputs"][0]["axes"][2:], (1, 2, 2), strict=True):
        ax["halo"] = h
    rdf["outputs"][0]["postprocessing"] = []
    folder = tmp_path / "pkg"
    folder.mkdir()
    torch.jit.save(net, str(folder / "weights.pt"))
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    spec = describe_model(str(folder))
    assert spec.fixed == (8, 16, 16) and spec.multiple == (1, 1, 1) and spec.halo == (1, 2, 2)
    assert spec.block == (6, 12, 12)  # the tile less twice the halo
    x = np.random.default_rng(4).normal(0, 1, (20, 40, 44)).astype(np.float32)
    z5py.File(str(tmp_path / "in.n5"), "a").create_dataset("raw", data=x, chunks=(8, 16, 16))
    with torch.no_grad():  # the same convolution over the whole volume: what tiles give
        want = net.conv(torch.from_numpy(x)[None, None])[0, 0].numpy()
    for name, halo in (("p", None), ("q", (2, 3, 3))):  # a halo given: blocks of 4×10×10
        done = napari_emparsl.run(
            f"{tmp_path / 'in.n5'}:raw", str(folder), f"{tmp_path / 'o.n5'}:{name}",
            site="threads", halo=halo,
        )  # fmt: skip
        assert done.ok and done.failed == 0
        y = z5py.File(str(tmp_path / "o.n5"), "r")[name][:]
        assert y.shape == x.shape and np.abs(y - want).max() < 1e-5
    # a halo of more than a quarter of the tile: blocks smaller than the halo, the only ones
    # such a model takes (before: refused, advising blocks at least as large as the halo)
    done = napari_emparsl.run(f"{tmp_path / 'in.n5'}:raw", str(folder),
                              f"{tmp_path / 'o.n5'}:wide", site="threads", halo=(1, 6, 6))  # fmt: skip
    assert done.ok and done.failed == 0
    y = z5py.File(str(tmp_path / "o.n5"), "r")["wide"][:]
    assert np.abs(y - want).max() < 1e-5
    # a block (or halo) whose reads are not the fixed size: one sentence, what works
    code = main(["run", "--input", f"{tmp_path / 'in.n5'}:raw", "--model", str(folder),
                 "--output", f"{tmp_path / 'o.n5'}:r", "--site", "threads",
                 "--block", "8,16,16"])  # fmt: skip
    assert code == 2 and capsys.readouterr().err == (
        "emparsl: error: The model takes inputs of exactly 8×16×16 voxels (z×y×x), but blocks "
        "of 8,16,16 with a halo of 1,2,2 read 10×20×20; give blocks of that size less twice the "
        "halo, e.g. --block 6,12,12 (or no block: that is the default).\n"
    )
    code = main(["run", "--input", f"{tmp_path / 'in.n5'}:raw", "--model", str(folder),
                 "--output", f"{tmp_path / 'o.n5'}:r", "--site", "threads", "--halo", "4,4,4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "which leave no voxels to write with a halo of 4,4,4" in err and "--halo 1,2,2." in err
    assert not (tmp_path / "o.n5" / "r").exists()


@pytest.mark.parametrize("normalize", ["zscore", "percentile"])
def test_export_of_a_multichannel_model_normalizes_channels_together(tmp_path, normalize):
    """emparsl normalizes all channels of a volume together: the package's pre-processing says
    so (its axes, those reduced over, hold the channel axis), and the statistics bioimage.io
    computes from them give the package's test output. Before, the axes were z, y, x: each
    channel was normalized on its own by other tools (differences of ~0.7 on outputs < 0.6)."""
    from napari_emparsl.core.models.export import export_package

    torch.manual_seed(0)
    path = tmp_path / "mc.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(2, 1, 1).eval()), str(path))
    (tmp_path / "mc.pt.yaml").write_text(f"kind: image\nin_channels: 2\nnormalize: {normalize}\n")
    rng = np.random.default_rng(0)
    x = np.stack([rng.random((16, 16, 16)) * 10, rng.random((16, 16, 16)) * 1000 + 500])
    export_package(str(path), str(tmp_path / "mc.zip"), test_input=x.astype(np.float32))
    with zipfile.ZipFile(tmp_path / "mc.zip") as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        ti = np.load(io.BytesIO(zf.read("test_input.npy")))
        to = np.load(io.BytesIO(zf.read("test_output.npy")))
        net = torch.jit.load(io.BytesIO(zf.read("weights.pt")))
    (step,) = rdf["inputs"][0]["preprocessing"]
    ids = [a.get("id", a["type"]) for a in rdf["inputs"][0]["axes"]]
    reduce = tuple(ids.index(a) for a in step["kwargs"]["axes"])
    assert reduce == (1, 2, 3, 4)  # per sample, over channels and space
    if step["id"] == "zero_mean_unit_variance":  # as bioimage.io computes it
        xn = (ti - ti.mean(axis=reduce, keepdims=True)) / (
            ti.std(axis=reduce, keepdims=True) + 1e-6
        )
    else:
        kw = step["kwargs"]
        lo = np.percentile(ti, kw["min_percentile"], axis=reduce, keepdims=True)
        hi = np.percentile(ti, kw["max_percentile"], axis=reduce, keepdims=True)
        xn = (ti - lo) / (hi - lo + 1e-6)
    with torch.no_grad():
        y = net(torch.from_numpy(xn.astype(np.float32))).numpy()
    assert np.abs(y - to).max() < 1e-3 * max(1.0, np.abs(to).max())
    assert describe_model(str(tmp_path / "mc.zip")).normalize == normalize  # read back alike


@pytest.mark.parametrize("v05", [True, False])
def test_per_channel_statistics_of_several_channels_are_refused(tmp_path, v05):
    """A package that normalizes each of its input channels on its own (axes without the
    channel axis) would be run with statistics over all channels together: refused in one
    sentence (before, it ran silently with other values)."""
    if v05:
        rdf = _rdf_05()
        rdf["inputs"][0]["axes"][1]["channel_names"] = ["a", "b"]
        step = rdf["inputs"][0]["preprocessing"][1]
        per_channel, joint = ["z", "y", "x"], ["channel", "z", "y", "x"]
    else:
        rdf = _rdf_04()
        rdf["inputs"][0]["shape"]["min"][1] = 2
        step = rdf["inputs"][0]["preprocessing"][0]
        per_channel, joint = "zyx", "czyx"
    path = _package(tmp_path, rdf, files=())
    step["kwargs"]["axes"] = per_channel
    (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelError) as err:
        describe_model(path)
    message = str(err.value)
    assert "normalizes each of its 2 input channels on its own (zero_mean_unit_variance" in message
    assert "\n" not in message and message.endswith(".")
    # as the sentence says: normalize given in the options, or a sidecar, runs it anyway (the
    # refusal came before either was read); so does a package emparsl exported itself (its
    # statistics are emparsl's: exports before the axes said so wrote z, y, x)
    assert describe_model(path, {"normalize": "percentile"}).normalize == "percentile"
    (tmp_path / "pkg.yaml").write_text("normalize: zscore\n")
    assert describe_model(path).normalize == "zscore"
    (tmp_path / "pkg.yaml").unlink()
    rdf["config"] = {"emparsl": {"kind": "image"}}
    (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    assert describe_model(path).normalize == "zscore"
    del rdf["config"]
    for axes in (joint, None):  # over the channels too, or over all axes (the default)
        step["kwargs"]["axes"] = axes
        (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
        spec = describe_model(path)
        assert spec.in_channels == 2 and spec.normalize == "zscore"
    # one channel: its statistics are those of all channels
    step["kwargs"]["axes"] = per_channel
    if v05:
        rdf["inputs"][0]["axes"][1]["channel_names"] = ["a"]
    else:
        rdf["inputs"][0]["shape"]["min"][1] = 1
    (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    assert describe_model(path).normalize == "zscore"


def test_04_output_shaped_by_its_input_keeps_its_channels(tmp_path):
    """A 0.4 output whose shape refers to its input has input × scale + 2 × offset channels
    (offset per side). Before, channels were counted only for a channel scale of 0: binarize of
    one channel (scale 1) was refused as of several channels, and an image model of 3 input
    channels (scale 1) was taken for one of 1 output channel."""
    rdf = _rdf_04()
    out = rdf["outputs"][0]
    out["shape"] = {"reference_tensor": "raw", "scale": [1, 1, 1, 1, 1], "offset": [0] * 5}
    out["postprocessing"] = [
        {"name": "sigmoid"},
        {"name": "binarize", "kwargs": {"threshold": 0.4}},
    ]
    path = _package(tmp_path, rdf, files=())
    spec = describe_model(path)
    assert spec.kind == "labels" and spec.out_channels == 1 and spec.threshold == 0.4
    out["postprocessing"] = []
    rdf["inputs"][0]["preprocessing"][0]["kwargs"]["axes"] = "czyx"  # all channels together
    for n_in, scale, offset, n_out in (
        (3, 1, 0, 3),
        (3, 0, 1.5, 3),
        (2, None, 1, 2),
        (2, 2, 0.5, 5),
    ):
        rdf["inputs"][0]["shape"]["min"][1] = n_in
        out["shape"]["scale"][1], out["shape"]["offset"][1] = scale, offset
        (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
        spec = describe_model(path)
        assert (spec.kind, spec.in_channels, spec.out_channels) == ("image", n_in, n_out)
    rdf["inputs"][0]["shape"]["min"][1] = 3
    out["shape"]["scale"][1], out["shape"]["offset"][1] = 0.5, 0
    (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelError) as err:
        describe_model(path)
    assert str(err.value) == (
        "The bioimage.io model 'toy sigmoid''s output has 3 × 0.5 + 2 × 0 = 1.5 channels, not a "
        "whole number of at least 1; check its shape's scale and offset."
    )


def test_export_with_a_test_input_of_few_sections(tmp_path, capsys):
    """Anisotropic EM (25 sections) as the test input of the built-in U-Net, which takes at
    least 52 along z: refused before ("smaller than the model takes along z … give a larger
    one", and no real dataset had more); now mirrored to that size, said so, and the package
    reproduces its test output."""
    from napari_emparsl.cli import main
    from napari_emparsl.core.sample import make_sample
    from napari_emparsl.core.volume import save_array
    from napari_emparsl.execution.check import check_model

    raw = make_sample((25, 64, 64), seed=3).raw
    save_array(tmp_path / "few.n5", "raw", raw, voxel_size=(8, 8, 8))
    out = tmp_path / "u.zip"
    assert main(["export-model", "unet3d-em", str(out), "--test-input",
                 f"{tmp_path}/few.n5:raw"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "a 52×64×64 (the 25×64×64 test input given, mirrored to the size the model takes) " \
        "test input with its output" in said, said  # fmt: skip
    with zipfile.ZipFile(out) as zf:
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    assert x.shape == (1, 1, 52, 64, 64)
    np.testing.assert_array_equal(x[0, 0, :25], raw)  # the data as given, then its mirror
    np.testing.assert_array_equal(x[0, 0, 25:50], raw[::-1])
    assert check_model(str(out)).ok


def test_a_zip_cut_short_is_said_to_be_damaged(package, tmp_path, capsys):
    """A download cut short: zipfile.is_zipfile() is False for it (its end is missing), so it
    was "not a TorchScript or PyTorch file" (run) or "not a bioimage.io package" (check-model),
    and describe-model described it, asking for an architecture."""
    from napari_emparsl.cli import main

    cut = tmp_path / "cut.zip"
    cut.write_bytes(package["zip"].read_bytes()[:20000])
    said = (
        f"{cut} is a damaged zip file (its end, which lists its files, is missing: it was cut "
        "short); download or export it again."
    )
    for ask in (describe_model, missing_description, load_model):
        with pytest.raises(ModelError) as err:
            ask(str(cut))
        assert str(err.value) == said
    for command in ("check-model", "describe-model"):
        assert main([command, str(cut)]) == 2
        assert capsys.readouterr().err == f"emparsl: error: {said}\n"


def test_a_zip_whose_list_of_files_is_damaged_is_one_sentence(tmp_path):
    """A file name flagged UTF-8 that is not escaped as a traceback (UnicodeDecodeError)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    data = bytearray(buf.getvalue())
    entry = data.rfind(b"PK\x01\x02")  # the list's entry: the UTF-8 flag, a byte that is not
    data[entry + 8 : entry + 10] = (0x800).to_bytes(2, "little")
    data[entry + 46] = 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    for ask in (missing_description, load_model):
        with pytest.raises(ModelError, match=r"bad.pt is a damaged zip file \("):
            ask(str(bad))


def test_a_zip_of_the_package_folder_runs_as_the_package(package, tmp_path):
    """A package zipped as its folder (toy/rdf.yaml, as a file manager zips a folder) was "not a
    TorchScript or PyTorch file"; a zip of two such folders is refused, naming them."""
    from napari_emparsl.execution.check import check_model

    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as zf:
        for name in os.listdir(package["folder"]):
            zf.write(package["folder"] / name, f"toy/{name}")
        zf.writestr("__MACOSX/toy/._rdf.yaml", b"\x00\x05\x16\x07")  # a Mac's resource fork
    assert describe_model(str(nested)) == describe_model(str(package["zip"]))
    assert missing_description(str(nested)) == []
    result = check_model(str(nested))
    assert result.ok and result.max_difference < 1e-4
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for folder in ("a", "b"):
            zf.write(package["folder"] / "rdf.yaml", f"{folder}/rdf.yaml")
    with pytest.raises(ModelError, match=r"holds several bioimage.io packages \(a/, b/\); unzip"):
        describe_model(str(two))


def test_export_of_a_model_that_fails_its_test_input_is_one_sentence(tmp_path, capsys):
    """A model of 2 output channels described as 3: "emparsl: internal error (ValueError: The
    model's output has 2 channel(s) …)", exit code 1."""
    from napari_emparsl.cli import main

    path = tmp_path / "two.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 2, 3, padding=1).eval()), str(path))
    (tmp_path / "two.pt.yaml").write_text("kind: image\nout_channels: 3\nhalo: 1\n")
    out = tmp_path / "two.zip"
    assert main(["export-model", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emparsl: error: The model failed on its test input (")
    assert "2 channel(s)" in err and err.endswith(").\n") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "two.zip.part").exists()


@pytest.mark.parametrize("v05", [True, False])
def test_statistics_of_each_slice_are_refused_and_eps_applied(tmp_path, v05):
    """A 3D package normalizing each z slice by its own statistics (axes y, x) ran with the
    volume's as a whole (check-model said it did not reproduce, a run said nothing); an eps
    (x - mean) / (std + eps) was left out (0.1 on data of std 0.2: values 3.8 off)."""
    if v05:
        rdf, slices, whole = _rdf_05(), ["y", "x"], ["z", "y", "x"]
        step = rdf["inputs"][0]["preprocessing"][1]
    else:
        rdf, slices, whole = _rdf_04(), "yx", "zyx"
        step = rdf["inputs"][0]["preprocessing"][0]
    path = _package(tmp_path, rdf, files=())

    def described(**kwargs):
        step["kwargs"].update(kwargs)
        (tmp_path / "pkg" / "rdf.yaml").write_text(yaml.safe_dump(rdf))
        return describe_model(path)

    with pytest.raises(ModelError) as err:
        described(axes=slices)
    assert "normalizes its input by the statistics of each z slice on its own" in str(err.value)
    assert str(err.value).endswith(
        "set normalize in a sidecar or the model options to run it anyway."
    )
    assert described(axes=whole).norm_eps == 0.0  # the spec's default eps, 1e-6: left out
    spec = described(eps=0.1)
    assert (spec.normalize, spec.norm_eps) == ("zscore", 0.1)
    if not v05:
        return
    step.update(id="scale_range")
    step["kwargs"] = {"axes": whole, "min_percentile": 1, "max_percentile": 99, "eps": 0.01}
    spec = described()
    assert (spec.normalize, spec.percentiles, spec.norm_eps) == ("percentile", (1, 99), 0.01)
    step.update(id="fixed_zero_mean_unit_variance")
    step["kwargs"] = {"mean": 5.0, "std": 0.2, "eps": 0.1}
    assert described().norm_values == pytest.approx((5.0, 0.3))


def test_check_model_normalizes_by_the_whole_test_input(tmp_path, write_package):
    """A test input mostly of zeros (its all-zero chunks unwritten, so left out of a run's
    sample) was normalized by other statistics than the package's: a package that reproduces
    its output failed the check (values 13 off)."""
    from napari_emparsl.execution.check import check_model

    x = np.zeros((1, 1, 32, 128, 128), np.float32)
    x[..., :16, :32, :32] = np.random.default_rng(7).gamma(2.0, size=(16, 32, 32)) * 100
    write_package(tmp_path / "sparse", x, _rdf_05())
    result = check_model(str(tmp_path / "sparse"))
    assert result.ok and result.max_difference < 1e-4, result.sentence()


def test_export_reads_only_the_start_of_a_test_volume(tmp_path, monkeypatch):
    """export-model --test-input read the whole volume (a TB volume: all of it into memory)
    to keep its first 128 voxels an axis."""
    from napari_emparsl.cli import main
    from napari_emparsl.core.volume import Volume, save_array

    raw = np.random.default_rng(0).integers(0, 255, (60, 300, 200), dtype=np.uint8)
    save_array(tmp_path / "big.n5", "raw", raw, voxel_size=(8, 8, 8))
    regions = []
    read = Volume.read

    def recorded(self, region=None):
        regions.append(region)
        return read(self, region)

    monkeypatch.setattr(Volume, "read", recorded)
    out = tmp_path / "u.zip"
    assert main(["export-model", "unet3d-em", str(out), "--test-input",
                 f"{tmp_path}/big.n5:raw"]) == 0  # fmt: skip
    assert regions and all(r is not None for r in regions)
    assert [(s.start, s.stop) for s in regions[0]] == [(0, 128), (0, 128), (0, 128)]
    with zipfile.ZipFile(out) as zf:
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    np.testing.assert_array_equal(x[0, 0], raw[: x.shape[2], : x.shape[3], : x.shape[4]])


def test_export_writes_what_the_spec_allows(tmp_path):
    """Class names went out as channel names as given ("cell wall", "None": no identifiers,
    which bioimage.io requires), and a negative std (inverted contrast) as
    fixed_zero_mean_unit_variance, whose std must be ≥ 1e-6."""
    from napari_emparsl.core.models.export import export_package

    out = tmp_path / "inv.zip"
    options = {"classes": ["cell wall", "None", "2nd"], "normalize": "fixed",
               "norm_values": [100, -50]}  # fmt: skip
    export_package("unet3d-em", str(out), options)
    with zipfile.ZipFile(out) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    names = rdf["outputs"][0]["axes"][1]["channel_names"]
    assert names == ["cell_wall", "None_", "_2nd"]
    assert all(n.isidentifier() for n in names)
    assert rdf["inputs"][0]["preprocessing"] == [
        {"id": "scale_linear", "kwargs": {"gain": -0.02, "offset": 2.0}}
    ]
    spec = describe_model(str(out))  # read back as it was
    assert spec.classes == ("cell wall", "None", "2nd")
    assert spec.normalize == "fixed" and spec.norm_values == pytest.approx((100, -50))


def test_a_second_description_in_a_package_folder_is_not_run_in_its_place(package, tmp_path):
    """Naming other.bioimageio.yaml in a folder that also holds rdf.yaml described (and ran)
    rdf.yaml's model: refused in one sentence; the description alone in its folder is read."""
    folder = tmp_path / "two"
    shutil.copytree(package["folder"], folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    rdf["inputs"][0]["preprocessing"] = [
        {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 1.0, "std": 2.0}}
    ]
    (folder / "other.bioimageio.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelError) as err:
        describe_model(str(folder / "other.bioimageio.yaml"))
    assert str(err.value) == (
        f"The folder {folder} holds several bioimage.io descriptions (rdf.yaml and "
        "other.bioimageio.yaml), and a package is read by its folder, from rdf.yaml; move "
        "other.bioimageio.yaml (with the files it names) into a folder of its own and give "
        "that folder."
    )
    assert describe_model(str(folder / "rdf.yaml")).normalize == "zscore"
    (folder / "rdf.yaml").unlink()
    assert describe_model(str(folder / "other.bioimageio.yaml")).norm_values == (1.0, 2.0)


def test_test_tensors_are_checked_against_their_sha256(package, tmp_path):
    """A test tensor that does not match its recorded SHA-256 (a damaged download) was used
    all the same: check-model compared against it."""
    from napari_emparsl.execution.check import check_model

    folder = tmp_path / "sha"
    shutil.copytree(package["folder"], folder)
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    rdf["outputs"][0]["test_tensor"]["sha256"] = "0" * 64
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelError) as err:
        check_model(str(folder))
    assert str(err.value) == (
        f"The test tensor test_output.npy of {folder} does not match the SHA-256 its description "
        "records, so the package is damaged or was changed; download it again."
    )
    import hashlib

    digest = hashlib.sha256((folder / "test_output.npy").read_bytes()).hexdigest()
    rdf["outputs"][0]["test_tensor"]["sha256"] = digest.upper()
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    assert check_model(str(folder)).ok


def test_an_eps_the_format_cannot_hold_is_refused_at_export(tmp_path):
    """norm_eps 0.5 was written as a package's eps, which bioimage.io allows up to 0.1."""
    from napari_emparsl.core.models.export import export_package

    with pytest.raises(ModelError, match=r"A bioimage.io package's eps is at most 0.1, and the "
                       r"model's norm_eps is 0.5; export it with a norm_eps of at most 0.1"):  # fmt: skip
        export_package("unet3d-em", str(tmp_path / "e.zip"), {"norm_eps": 0.5})
    assert not list(tmp_path.iterdir())
