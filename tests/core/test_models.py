"""Model specs, sidecars, safe loaders, the built-in U-Net (shipped weights, real Dice)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import yaml

from napari_emparsl.core.models.loaders import describe_model, load_model
from napari_emparsl.core.models.spec import ModelError, ModelSpec, parse_options
from napari_emparsl.core.models.unet import UNet, receptive_radius
from napari_emparsl.core.volume import Volume


def test_builtin_model_spec_and_weights():
    spec = describe_model("unet3d-em")
    assert spec.kind == "labels" and spec.classes == ("background", "membrane", "mitochondria")
    assert spec.halo == (24, 24, 24) and spec.multiple == (4, 4, 4) and spec.normalize == "zscore"
    loaded = load_model("unet3d-em")
    assert isinstance(loaded.module, UNet) and len(loaded.sha256) == 64
    assert load_model("unet3d-em") is loaded  # cached per process


@pytest.mark.parametrize("dims,script", [(3, False), (3, True), (2, True)])
def test_loaded_weights_are_channels_last_and_outputs_unchanged(tmp_path, dims, script):
    torch.manual_seed(0)
    net = UNet(1, 3, base=4, depth=1, dims=dims).eval()
    shape = (1, 1, 12, 16, 16) if dims == 3 else (3, 1, 16, 16)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = net(x)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    arch = "unet3d" if dims == 3 else "unet2d"
    if script:
        torch.jit.save(torch.jit.script(net), tmp_path / "m.pt")
        (tmp_path / "m.pt.yaml").write_text(f"classes: [a, b, c]\nspatial_dims: {dims}\n")
    else:
        torch.save(net.state_dict(), tmp_path / "m.pt")
        (tmp_path / "m.pt.yaml").write_text(
            f"architecture: {arch}\nclasses: [a, b, c]\narch_options: {{base: 4, depth: 1}}\n"
        )
    module = load_model(str(tmp_path / "m.pt")).module
    convs = [p for p in module.parameters() if p.dim() == dims + 2]
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really another layout, not a no-op
    with torch.inference_mode():
        got = module(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


class _Flattens(torch.nn.Module):
    """A 2D model that reshapes its activations with .view (needs them contiguous)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        n, c, h, w = y.shape
        y = y.view(n * c, h, w).view(n, c, h, w)
        return self.head(y)


def test_model_that_needs_its_layout_keeps_it(tmp_path):
    torch.manual_seed(0)
    net = _Flattens().eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.inference_mode():
        expected = net(x)
    torch.jit.save(torch.jit.script(net), tmp_path / "m.pt")
    (tmp_path / "m.pt.yaml").write_text("classes: [a, b]\nspatial_dims: 2\nhalo: [0, 2, 2]\n")
    module = load_model(str(tmp_path / "m.pt")).module
    assert all(p.is_contiguous() for p in module.parameters())  # channels-last would fail it
    with torch.inference_mode():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)


def test_options_override_sidecar_and_are_validated():
    spec = describe_model("unet3d-em", parse_options(["halo=8,8,8", "block=32,32,32"]))
    assert spec.halo == (8, 8, 8) and spec.block == (32, 32, 32)
    # sizes as emparsl prints them and people type them, as everywhere else
    spec = describe_model("unet3d-em", parse_options(["halo=16×16×16", "block=64 64 64"]))
    assert spec.halo == (16, 16, 16) and spec.block == (64, 64, 64)
    with pytest.raises(ModelError, match="Unknown key"):
        describe_model("unet3d-em", {"hallo": 3})
    with pytest.raises(ModelError, match="must be three integers"):
        describe_model("unet3d-em", {"halo": "a,b"})
    with pytest.raises(ModelError, match="kind must be one of"):
        ModelSpec(kind="points")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("threshold=x", "The model option 'threshold' must be a number, not 'x'."),
        ("threshold=.nan", "The model option 'threshold' must be a number, not nan."),
        ("classes=3", "The model option 'classes' must be a list of class names, not 3."),
        ("arch_options=x", "The model option 'arch_options' must be a mapping such as "
                           "{base: 8, depth: 2}, not 'x'."),
        ("arch_options={foo: 1}", "The arch_options of unet3d are base and depth, whole numbers "
                                  "of at least 1 (e.g. {base: 8, depth: 2}), not {'foo': 1}."),
        ("arch_options={depth: 0}", "The arch_options of unet3d are base and depth, whole numbers "
                                    "of at least 1 (e.g. {base: 8, depth: 2}), not {'depth': 0}."),
        ("out_dtype=uint8", "The model option 'out_dtype' is for image models; a labels model "
                            "writes uint8, uint16 or uint32 class ids by its number of classes."),
        ("out_dtype=int8", "The model option 'out_dtype' must be one of float32, uint8, not 'int8'."),
        ("out_range=1,0", "The model option 'out_range' must be two numbers low,high with high > "
                          "low (the model's output values written as 0 and 255), not [1.0, 0.0]."),
        ("out_range=0,a,1", "The model option 'out_range' must be two numbers low,high (the "
                            "model's output values written as 0 and 255), not '0,a,1'."),
        ("activation=relu", "The model option 'activation' must be one of none, sigmoid, "
                            "softmax, not 'relu'."),
        ("percentiles=99,1", "The model option 'percentiles' must be two percentiles low,high "
                             "with 0 <= low < high <= 100, not [99.0, 1.0]."),
        ("norm_values=5,0", "The model option 'norm_values' must be two finite numbers "
                            "subtract,divide with divide not 0, not [5.0, 0.0]."),
        ("norm_values=x", "The model option 'norm_values' must be two numbers subtract,divide "
                          "(e.g. a training set's mean and standard deviation), not 'x'."),
        ("min_size=0,8,8", "The model option 'min_size' must be three integers z,y,x of at "
                           "least 1, not '0,8,8'."),
        # YAML 1.1 read "1:30" as the base-60 number 90, and the run went on with halo 90
        ("halo=1:30", "The model option 'halo' must be three integers z,y,x, not '1:30'."),
        # int() made a halo of 20.9 a halo of 20, and a ×1.5 scale ×1, silently
        ("halo=20.9", "The model option 'halo' must be three integers z,y,x, not 20.9."),
        ("scale=1.5", "The model option 'scale' must be three integers z,y,x, not 1.5."),
        # options that are not YAML were an internal error (ParserError, ScannerError)
        ("classes=[a,b", "The model option 'classes' is not a list emparsl can read: '[a,b' (a "
                         "bracket missing?); write it as classes=a,b or classes=[a, b]."),
        ("normalize=@x", "The model option 'normalize' must be one of none, zscore, "
                         "percentile, fixed, not '@x'."),
        # accepted before, and an exported package of it failed its own check
        ("kind=image", "The model option 'classes' is for labels models; an image model says "
                       "how many channels it outputs with 'out_channels' (give classes= empty "
                       "with kind=image)."),
        ("out_channels=2", "The model option 'out_channels' (2) differs from the 3 classes; a "
                           "labels model outputs one channel per class."),
        # int() made 1.7 channels 1, and 0 output channels failed in every block instead
        ("in_channels=1.7", "The model option 'in_channels' must be a whole number of at least "
                            "1, not 1.7."),
        ("out_channels=0", "The model option 'out_channels' must be a whole number of at least "
                           "1, not 0."),
    ],
)  # fmt: skip
def test_bad_option_values_are_one_sentence(capsys, tmp_path, small_n5, option, message):
    """Each was an internal error (a traceback in the log) before: float('x'), dict('x'),
    UNet(foo=1)."""
    from napari_emparsl.cli import main

    code = main(["run", "--input", f"{small_n5[0]}:raw", "--model", "unet3d-em", "--site",
                 "threads", "--output", f"{tmp_path}/o.n5:p", "--model-option", option])  # fmt: skip
    assert code == 2 and capsys.readouterr().err == f"emparsl: error: {message}\n"


def test_state_dict_that_does_not_fit_architecture(tmp_path):
    torch.save(UNet(1, 3, base=4, depth=1).state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.pt.yaml").write_text(
        "architecture: unet3d\nclasses: [a, b, c]\narch_options: {base: 8, depth: 2}\n"
    )
    with pytest.raises(ModelError, match="do not fit the architecture unet3d") as err:
        load_model(str(tmp_path / "w.pt"))
    # the first mismatch, shortened from torch's message, and what to check
    assert re.search(r"\(\S+ is \[4, 1, 3, 3, 3\] in the weights but \[8, 1, 3, 3, 3\] in the "
                     r"architecture\); check in_channels, classes / out_channels and arch_options\.$",
                     str(err.value))  # fmt: skip
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    (tmp_path / "w.pt.yaml").write_text(
        "architecture: unet3d\nclasses: [a, b, c]\narch_options: {base: 4, depth: 1}\n"
    )
    assert isinstance(load_model(str(tmp_path / "w.pt")).module, UNet)


def test_architecture_fills_in_what_the_network_fixes(tmp_path, small_n5):
    """A state dict described only by its architecture gets the size multiple, the exact halo
    and the spatial dims of that network (its blocks used to fail on odd sizes, halo 0), and
    tiles it exactly like the built-in model with the same weights."""
    from napari_emparsl.core.models.loaders import missing_description, resolve_model
    from napari_emparsl.core.volume import Volume
    from napari_emparsl.execution.runner import Run

    spec = ModelSpec.from_mapping({"architecture": "unet3d", "arch_options": {"depth": 2}})
    assert (spec.multiple, spec.halo, spec.spatial_dims) == ((4, 4, 4), (24, 24, 24), 3)
    # (the block: the default, for what the description says)
    assert spec.derived == ("spatial_dims", "multiple", "halo", "block")
    assert "derived" not in spec.to_dict()
    deeper = spec.with_options({"arch_options": {"depth": 3}})  # derived again, from depth 3
    halo3 = -(-receptive_radius(3) // 8) * 8
    assert (deeper.multiple, deeper.halo) == ((8, 8, 8), (halo3,) * 3)
    flat = ModelSpec.from_mapping({"architecture": "unet2d", "halo": [0, 9, 9]})
    assert (flat.multiple, flat.halo, flat.spatial_dims) == ((1, 4, 4), (0, 9, 9), 2)
    assert flat.derived == ("spatial_dims", "multiple", "block")  # a given halo is kept
    # a 2D model's default block is one slice of 512×512: 1×64×64 made thousands of 16 KiB
    # chunk files and as many blocks of milliseconds
    assert flat.block == (1, 512, 512)
    assert ModelSpec.from_mapping({"kind": "image"}).with_options({"spatial_dims": 2}).block == (
        1, 512, 512,
    )  # fmt: skip
    given = ModelSpec.from_mapping({"kind": "image", "spatial_dims": 2, "block": [1, 64, 64]})
    assert given.block == (1, 64, 64) and given.with_options({"halo": [0, 2, 2]}).block == (
        1, 64, 64,
    )  # fmt: skip

    weights = tmp_path / "mine.pt"
    weights.write_bytes(open(resolve_model("unet3d-em"), "rb").read())
    (tmp_path / "mine.pt.yaml").write_text(
        "kind: labels\nclasses: [bg, membrane, mito]\narchitecture: unet3d\n"
        "arch_options: {base: 8, depth: 2}\nnormalize: zscore\nedge: none\n"
    )
    assert missing_description(str(weights)) == []  # the panel asks for no halo
    src = f"{small_n5[0]}:raw"
    for model, key in ((str(weights), "mine"), ("unet3d-em", "builtin")):
        ev = Run(src, model, f"{tmp_path}/o.n5:{key}", site="threads", block=(24, 24, 24)).execute()
        assert ev.ok and ev.done == ev.total == 1 * 2 * 3
    np.testing.assert_array_equal(
        Volume.open(tmp_path / "o.n5", "mine").data.compute(),
        Volume.open(tmp_path / "o.n5", "builtin").data.compute(),
    )


def test_state_dict_without_architecture_says_what_to_add(tmp_path):
    torch.save(UNet(1, 3, base=4, depth=1).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="add 'architecture: unet3d'"):
        load_model(str(tmp_path / "w.pt"))


@pytest.mark.parametrize("depth", [1, 2])
def test_unet_context_within_receptive_radius(depth):
    torch.manual_seed(0)
    m = UNet(1, 2, base=4, depth=depth).eval()
    x = torch.zeros(1, 1, 64, 64, 64)
    x2 = x.clone()
    x2[0, 0, 32, 32, 32] = 10.0
    with torch.no_grad():
        diff = (m(x2) - m(x)).abs().sum(dim=(0, 1))
    z = torch.nonzero(diff > 0)[:, 0]
    assert max(32 - int(z.min()), int(z.max()) - 32) <= receptive_radius(depth)


def test_builtin_segments_unseen_sample(tmp_path):
    from napari_emparsl.core.models.training import dice_scores
    from napari_emparsl.core.sample import make_sample
    from napari_emparsl.core.volume import Volume, save_array
    from napari_emparsl.execution.runner import Run

    s = make_sample((64, 128, 128), seed=7)  # never used in training (seeds 1-3)
    save_array(tmp_path / "s.n5", "raw", s.raw, chunks=(32, 64, 64), voxel_size=s.voxel_size)
    ev = Run(f"{tmp_path}/s.n5:raw", "unet3d-em", f"{tmp_path}/s.n5:pred", site="threads").execute()
    assert ev.ok
    pred = Volume.open(tmp_path / "s.n5", "pred").data.compute()
    dice = dice_scores(pred, s.classes, 3)
    assert dice[1] > 0.8 and dice[2] > 0.8, dice


def test_builtin_seamless_on_real_em(shared_data, tmp_path):
    """Tiled output of the built-in model on real FIB-SEM equals one whole-volume forward."""
    from napari_emparsl.core.models.training import volume_stats
    from napari_emparsl.core.volume import Volume
    from napari_emparsl.execution.runner import Run

    src = f"{shared_data}/gala_fibsem_tiny/gala_tiny.n5:train/raw"
    ev = Run(
        src, "unet3d-em", f"{tmp_path}/o.n5:pred", site="threads", block=(32, 32, 32)
    ).execute()
    assert ev.ok
    vol = Volume.open(f"{shared_data}/gala_fibsem_tiny/gala_tiny.n5", "train/raw")
    mean, std = volume_stats(vol)
    x = (vol.data.compute().astype(np.float32) - mean) / std
    x = np.pad(x, [(0, (-n) % 4) for n in x.shape])
    with torch.inference_mode():
        full = load_model("unet3d-em").module(torch.from_numpy(x)[None, None])[0].argmax(0).numpy()
    full = full[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    tiled = Volume.open(tmp_path / "o.n5", "pred").data.compute()
    b = 24
    mismatch = float((tiled[b:-b, b:-b, b:-b] != full[b:-b, b:-b, b:-b]).mean())
    assert mismatch < 1e-4, mismatch


@pytest.mark.parametrize("scripted", [False, True])
def test_size_the_unet_cannot_take_says_to_set_multiple(scripted):
    from napari_emparsl.core.blockwise import run_model_on_batch

    module = UNet(1, 3, base=2, depth=2).eval()
    if scripted:
        module = torch.jit.script(module)
    spec = ModelSpec(classes=("a", "b", "c"), multiple=(1, 1, 1))
    with pytest.raises(RuntimeError) as err:
        run_model_on_batch(module, spec, [np.zeros((1, 10, 10, 10), np.float32)])
    assert str(err.value) == (
        "Sizes of tensors must match except in dimension 1 — the model cannot take 10×10×10 "
        "voxels (multiple [1, 1, 1]): a U-Net needs sizes divisible by 2^depth; set multiple to "
        "that on each axis (multiple=4,4,4 for a U-Net of depth 2, 16,16,16 for depth 4)."
    )
    fits = ModelSpec(classes=("a", "b", "c"), multiple=(4, 4, 4))  # padded to 12³, cropped back
    [y] = run_model_on_batch(module, fits, [np.zeros((1, 10, 10, 10), np.float32)])
    assert y.shape == (3, 10, 10, 10)


def test_voxel_size_a_model_was_trained_on_is_checked_against_the_volume(
    capsys, tmp_path, small_n5
):
    """A model that declares the voxel size of its training data warns (not refuses) on volumes
    whose voxels differ by over 1.5× on an axis it sees: the CLI on stderr, the Python API as a
    UserWarning; an output made before the key existed still resumes."""
    import napari_emparsl
    from napari_emparsl.cli import main
    from napari_emparsl.core.models.spec import resolution_mismatch
    from napari_emparsl.execution.runner import _changes

    builtin = describe_model("unet3d-em")
    assert builtin.voxel_size == (8.0, 8.0, 8.0)  # the synthetic sample's, which it learnt
    assert ModelSpec.from_mapping({"voxel_size": "40x4x4"}).voxel_size == (40.0, 4.0, 4.0)
    assert builtin.with_options(parse_options(["voxel_size=6"])).voxel_size == (6.0, 6.0, 6.0)
    for bad in ("8,8", "0,8,8", "eight", [8, 8, -1]):
        with pytest.raises(
            ModelError, match="'voxel_size' in the model description must be three positive"
        ):
            ModelSpec.from_mapping({"voxel_size": bad})

    assert resolution_mismatch(builtin, (8, 8, 8), "nm") is None
    assert resolution_mismatch(builtin, (11.9, 5.4, 8), "nm") is None  # within 1.5× each way
    assert resolution_mismatch(builtin, (0.008, 0.008, 0.008), "µm") is None
    assert resolution_mismatch(builtin, (40, 4, 4), "nanometer") == (
        "trained on 8×8×8 nm voxels; the volume has 40×4×4 nm"
    )
    assert resolution_mismatch(builtin, (1, 1, 1), "pixel") is None  # no length: not compared
    assert (
        resolution_mismatch(describe_model("unet3d-em", {"voxel_size": None}), (40, 4, 4), "nm")
        is None
    )
    flat = ModelSpec.from_mapping({"spatial_dims": 2, "voxel_size": [50, 4, 4]})
    assert resolution_mismatch(flat, (40, 4.5, 4.5), "nm") is None  # a 2D model sees no z
    assert resolution_mismatch(flat, (40, 8, 8), "nm") == (
        "trained on 4×4 nm pixels; the volume has 8×8 nm"
    )

    # small_n5: voxels 30×10×10 nm — z 3.75× the model's
    src, out = f"{small_n5[0]}:raw", f"{tmp_path}/o.n5:p"
    args = ["run", "--input", src, "--model", "unet3d-em", "--site", "threads"]
    assert main([*args, "--output", out, "--roi", "0:8,0:16,0:16"]) == 0
    err = capsys.readouterr().err
    assert (
        "Warning: The model unet3d-em was trained on 8×8×8 nm voxels; the volume has 30×10×10 nm "
        f"({small_n5[0]}:raw): expect poorer results; resample the volume" in err
    )
    with pytest.warns(UserWarning, match="was trained on 8×8×8 nm voxels; the volume has 30×10×10"):
        assert napari_emparsl.run(src, "unet3d-em", out, site="threads").ok
    with warnings.catch_warnings(record=True) as caught:  # none where the sizes fit
        warnings.simplefilter("always")
        napari_emparsl.run(
            src,
            "unet3d-em",
            f"{tmp_path}/o.n5:q",
            site="threads",
            roi="0:8,0:16,0:16",
            model_options={"voxel_size": [30, 10, 10]},
        )
    assert not [w for w in caught if "trained on" in str(w.message)]

    # resuming an output whose ledger predates voxel_size (no such key recorded)
    from napari_emparsl.core.volume import Volume

    vol = Volume.open(src)
    last = {
        "input": f"{vol.root}:{vol.key}",
        "spec": builtin.to_dict(),
        "block": [8, 8, 8],
        "halo": [24, 24, 24],
    }
    del last["spec"]["voxel_size"]
    assert _changes(last, vol, builtin, (8, 8, 8), (24, 24, 24)) == []
    assert _changes(last, vol, builtin.with_options({"halo": 8}), (8, 8, 8), (8, 8, 8))


def test_normalizations_use_the_whole_volume(tmp_path):
    """zscore, percentile (its percentiles) and fixed values: one (subtract, divide) pair for
    every block, from the volume (or the description)."""
    from napari_emparsl.core.volume import Volume, save_array
    from napari_emparsl.execution.runner import _norm

    data = np.arange(40 * 50 * 50, dtype=np.float32).reshape(40, 50, 50)
    save_array(tmp_path / "v.n5", "raw", data, chunks=(16, 16, 16))
    vol = Volume.open(str(tmp_path / "v.n5"), "raw")
    spec = describe_model("unet3d-em")
    mean, std = _norm(vol, spec)
    assert mean == pytest.approx(data.mean(), rel=1e-6) and std == pytest.approx(
        data.std(), rel=1e-6
    )
    lo, span = _norm(vol, spec.with_options({"normalize": "percentile", "percentiles": [2, 98]}))
    assert lo == pytest.approx(np.percentile(data, 2), rel=1e-6)
    assert lo + span == pytest.approx(np.percentile(data, 98), rel=1e-6)
    fixed = spec.with_options({"normalize": "fixed", "norm_values": "110, 15"})
    assert _norm(vol, fixed) == (110.0, 15.0)
    with pytest.raises(
        ModelError, match="'normalize' must be one of none, zscore, percentile, fixed"
    ):
        spec.with_options({"normalize": "minmax"})


def test_model_hash_is_remembered_until_the_file_changes(tmp_path):
    """Workers ask for the model's hash before every block: it is computed once per file
    version, and a model written again (same size, other weights) gets its own."""
    import hashlib
    import time

    from napari_emparsl.core.models.loaders import file_hash

    path = tmp_path / "m.pt"
    path.write_bytes(b"a" * 1000)
    first = file_hash(str(path))
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() == file_hash(str(path))
    time.sleep(0.05)  # file times advance by the kernel's clock tick
    path.write_bytes(b"b" * 1000)
    assert file_hash(str(path)) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_process_keeps_a_few_models_loaded(tmp_path, monkeypatch):
    """napari previews load models in its own process: it kept a copy of every model file,
    retrained file and options tried for the whole session. The three used last are kept, and
    a file written anew lets go of its earlier weights."""
    import time

    import torch

    from napari_emparsl.core.models import loaders

    monkeypatch.setattr(loaders, "_CACHE", type(loaders._CACHE)())
    path = tmp_path / "conv.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(path))
    path.with_name("conv.pt.yaml").write_text("kind: image\nhalo: [1, 1, 1]\n")
    loaded = [loaders.load_model(str(path), {"halo": h}) for h in (1, 2, 3, 4)]
    assert len(loaders._CACHE) == 3  # (before: 4, and one more per options tried)
    assert loaders.load_model(str(path), {"halo": 4}) is loaded[3]  # used last: kept
    assert loaders.load_model(str(path), {"halo": 2}) is loaded[1]
    assert loaders.load_model(str(path), {"halo": 1}) is not loaded[0]  # the oldest went
    time.sleep(0.05)  # file times advance by the kernel's clock tick
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(path))
    new = loaders.load_model(str(path), {"halo": 1})
    assert new.sha256 != loaded[0].sha256
    assert [m.sha256 for m in loaders._CACHE.values()] == [new.sha256]  # the old weights went


def test_several_model_options_after_one_flag(capsys):
    from napari_emparsl.cli import main

    # `--model-option k=v …` as the command's help and docs write it, and the flag repeated
    for argv in (["--model-option", "halo=8,8,8", "edge=reflect"],
                 ["--model-option", "halo=8,8,8", "--model-option", "edge=reflect"]):  # fmt: skip
        assert main(["describe-model", "unet3d-em", *argv]) == 0
        described = yaml.safe_load(capsys.readouterr().out)
        assert described["halo"] == [8, 8, 8] and described["edge"] == "reflect"
    assert main(["describe-model", "unet3d-em", "--model-option", "halo=8,8,8", "reflect"]) == 2
    assert capsys.readouterr().err == (
        "emparsl: error: Model options are key=value, not 'reflect' (e.g. --model-option "
        "halo=8,8,8 normalize=zscore, after the model and output paths).\n"
    )


def test_a_sidecar_not_in_utf8_is_one_sentence(tmp_path):
    """A sidecar saved in Latin-1 (an accent in a comment): one sentence (before: an internal
    error, UnicodeDecodeError)."""
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(tmp_path / "m.pt"))
    (tmp_path / "m.pt.yaml").write_bytes("kind: image\n# modèle\n".encode("latin-1"))
    with pytest.raises(ModelError, match=r"m.pt.yaml is not UTF-8 text; save it as UTF-8.$"):
        describe_model(str(tmp_path / "m.pt"))


def test_softmax_over_one_channel_is_refused():
    """Softmax over one channel is 1 everywhere (every voxel above a labels threshold): said
    (before: accepted)."""
    with pytest.raises(ModelError, match="softmax over one output channel, which is 1"):
        describe_model("unet3d-em", {"activation": "softmax", "classes": ""})


@pytest.mark.parametrize(
    ("sidecar", "said"),
    [
        ("kind: labels\nclasses: [a, b, c]\nhalo: abc\n",
         "The value of 'halo' in {m}.yaml must be three integers z,y,x, not 'abc'."),
        ("kind: labels\nclasses: 3\n",
         "The value of 'classes' in {m}.yaml must be a list of class names, not 3."),
        ("kind: image\nscale: [2, 2]\n",
         "The value of 'scale' in {m}.yaml must be three integers z,y,x of at least 1, not [2, 2]."),
        # a value checked once the whole description is read (it said "The model option")
        ("kind: image\nactivation: relu\n",
         "The value of 'activation' in {m}.yaml must be one of none, sigmoid, softmax, not "
         "'relu'."),
        # the YAML's own words, with where it stopped reading (was: its first line only)
        ("kind: image\nhalo: [1, 2\nmultiple: 4\n",
         "The model description {m}.yaml is not valid YAML (expected ',' or ']', but got ':', "
         "line 3, column 9)."),
    ],
)  # fmt: skip
def test_a_sidecar_value_error_names_the_sidecar(tmp_path, sidecar, said):
    """A wrong value in a sidecar was blamed on "the model option", which the user never gave,
    and the sidecar was not named."""
    model = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(model))
    (tmp_path / "m.pt.yaml").write_text(sidecar)
    with pytest.raises(ModelError) as err:
        describe_model(str(model))
    assert str(err.value) == said.format(m=model)
    # the same value given as an option is still the option's
    with pytest.raises(ModelError, match="^The model option 'halo'"):
        describe_model("unet3d-em", {"halo": "abc"})


def test_a_class_named_twice_is_refused():
    """classes=a,a,b was accepted: two channels of the output under one name."""
    with pytest.raises(ModelError) as err:
        describe_model("unet3d-em", {"classes": "bg,mem,mem"})
    assert str(err.value) == (
        "The model option 'classes' names mem more than once; give each class (each output "
        "channel) a name of its own."
    )


def test_class_colours_a_model_declares(tmp_path, small_n5):
    """A labels model's description may give a colour per class (the built-in model does): they
    are checked, written with its output (napari draws the classes in them), and a model that
    changed only its colours resumes an output made before (they change nothing written)."""
    from napari_emparsl.execution.runner import Run

    assert describe_model("unet3d-em").colors == ("#00000000", "#00e5ffff", "#ff00ffff")
    spec = describe_model("unet3d-em", {"colors": "none,#abc,Gold"})
    assert spec.colors == ("#00000000", "#aabbccff", "#ffd700ff")
    # [r, g, b] typed in the options text, as the refusal offers (was refused as '[0')
    assert (
        describe_model("unet3d-em", {"colors": "none, red, [0, 0.5, 1]"}).colors[2] == "#0080ffff"
    )
    assert spec.with_options({}).colors == spec.colors  # as the description reads them
    # options giving other classes (or an image model) leave the description's colours out
    assert describe_model("unet3d-em", {"classes": "a,b"}).colors == ()
    assert describe_model("unet3d-em", {"kind": "image", "classes": ""}).colors == ()
    # the same number of classes, renamed or reordered: not the description's colours
    assert describe_model("unet3d-em", {"classes": "a,b,c"}).colors == ()
    assert describe_model("unet3d-em", {"classes": "background,mitochondria,membrane"}).colors == ()
    same = "background,membrane,mitochondria"
    assert len(describe_model("unet3d-em", {"classes": same}).colors) == 3
    # as typed on the command line and in the panel: "#…" is no YAML comment (the colours were
    # dropped, or refused as "1 colour(s) for 3 classes"), a list in brackets is the list
    for typed in ("colors=#00000000,#00e5ff,#ff00ff", "colors=transparent, #00e5ff, magenta",
                  "colors=[transparent, #00e5ff, magenta]"):  # fmt: skip
        assert describe_model("unet3d-em", parse_options([typed])).colors == (
            "#00000000", "#00e5ffff", "#ff00ffff"
        ), typed  # fmt: skip
    for option, said in (
        ({"colors": "red,blue"}, "The model option 'colors' gives 2 colour(s) for 3 classes; "
                                 "give one per class, in the order of 'classes'."),
        ({"colors": "red,blue,rouge"}, "The model option 'colors' gives 'rouge', which is no "
                                       "colour; give one per class as #rrggbb (e.g. #00e5ff)"),
        ({"colors": "red", "classes": "", "kind": "image"},
         "The model option 'colors' gives 1 colour(s) for a model without named classes"),
    ):  # fmt: skip
        with pytest.raises(ModelError) as err:
            describe_model("unet3d-em", option)
        assert str(err.value).startswith(said), str(err.value)
    # in a sidecar: [r, g, b] from 0 to 1 too
    assert ModelSpec.from_mapping(
        {"classes": ["a", "b"], "colors": ["transparent", [1, 0.5, 0]]}
    ).colors == ("#00000000", "#ff8000ff")  # fmt: skip
    path, _ = small_n5
    out = f"{tmp_path}/o.n5:p"
    red = {"colors": "transparent,red,blue"}
    Run(f"{path}:raw", "unet3d-em", out, site="threads", roi="0:1,0:8,0:8", block=(8, 8, 8),
        halo=(0, 0, 0), model_options=red).execute()  # fmt: skip
    written = Volume.open(tmp_path / "o.n5", "p")
    assert written.class_colors == {0: "#00000000", 1: "#ff0000ff", 2: "#0000ffff"}
    assert written.attrs["class_colors"] == ["#00000000", "#ff0000ff", "#0000ffff"]
    # the same model with its own colours: resumed, not refused as another description, and
    # the output takes them (it kept those it was made with)
    done = Run(f"{path}:raw", "unet3d-em", out, site="threads", roi="0:8,0:8,0:16").execute()
    assert (done.done, done.failed) == (2, 0)
    assert Volume.open(tmp_path / "o.n5", "p").class_colors[1] == "#00e5ffff"
