"""Training input: random (raw, labels) tiles read from N5 through a torch Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.models.training import (
    IGNORED,
    N5TileDataset,
    TrainingDataError,
    train,
)
from napari_emparsl.core.volume import Volume, save_array

SHAPE = (24, 40, 40)


@pytest.fixture
def pair(tmp_path):
    """Raw values that encode each voxel's position; labels = raw % 5, so a tile's labels can be
    checked against its raw voxel by voxel (after flips and rotations too)."""
    raw = np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE)
    save_array(tmp_path / "t.n5", "raw", raw, chunks=(8, 16, 16))
    save_array(tmp_path / "t.n5", "labels", (raw % 5).astype(np.uint8), chunks=(8, 16, 16))
    return Volume.open(f"{tmp_path}/t.n5:raw"), Volume.open(f"{tmp_path}/t.n5:labels"), raw


def _raw_values(ds: N5TileDataset, x: torch.Tensor) -> np.ndarray:
    mean, std = ds.stats[0]
    return np.rint(x.numpy().astype(np.float64) * std + mean).astype(np.int64)


def test_tiles_of_large_valued_raw_keep_their_detail(tmp_path):
    """uint32 raw of 3e9 + position: tiles normalized in float64 then cast, as blocks are (cast
    to float32 first, values 256 apart were one; a model trained on them was run on others)."""
    raw = (3_000_000_000 + np.arange(np.prod(SHAPE))).astype(np.uint32).reshape(SHAPE)
    save_array(tmp_path / "t.n5", "raw", raw, chunks=(8, 16, 16))
    save_array(tmp_path / "t.n5", "labels", (raw % 5).astype(np.uint8), chunks=(8, 16, 16))
    ds = N5TileDataset([(Volume.open(f"{tmp_path}/t.n5:raw"), Volume.open(f"{tmp_path}/t.n5:labels"))],
                       (8, 16, 16), length=4, seed=3)  # fmt: skip
    for i in range(len(ds)):
        x, y = ds[i]
        values = _raw_values(ds, x[0])
        assert len(np.unique(values)) == 8 * 16 * 16  # every voxel its own value
        np.testing.assert_array_equal(values % 5, y.numpy())


def test_tiles_are_aligned_deterministic_and_inside(pair):
    raw_vol, labels_vol, raw = pair
    ds = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=40, seed=3)
    flat = set(raw.ravel().tolist())
    seen_flipped = False
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (1, 8, 16, 16) and x.dtype == torch.float32
        assert y.shape == (8, 16, 16) and y.dtype == torch.int64
        values = _raw_values(ds, x[0])
        np.testing.assert_array_equal(values % 5, y.numpy())  # labels follow their voxels
        assert set(values.ravel().tolist()) <= flat
        # the tile is a (possibly flipped / rotated) box of the volume: its voxels' positions
        z, yy, xx = np.unravel_index(values, SHAPE)
        assert [int(np.ptp(pos)) + 1 for pos in (z, yy, xx)] == [8, 16, 16]
        seen_flipped |= bool(np.diff(z, axis=0).min() < 0)
    assert seen_flipped  # augmentation happened
    x0, y0 = ds[7]
    x1, y1 = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=40, seed=3)[7]
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, _ = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=40, seed=4)[7]
    assert not torch.equal(x0, x2)
    plain = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), seed=3, augment=False)
    values = _raw_values(plain, plain[0][0][0])
    assert (np.diff(values, axis=2) == 1).all()  # unaugmented: x runs forward


def test_dataloader_with_worker_processes(pair):
    raw_vol, labels_vol, _ = pair
    ds = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=6, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3
    for (xb, yb), i in zip(batches, range(0, 6, 2), strict=True):
        assert xb.shape == (2, 1, 8, 16, 16) and yb.shape == (2, 8, 16, 16)
        assert torch.equal(xb[0], ds[i][0]) and torch.equal(yb[1], ds[i + 1][1])


def test_multichannel_raw(tmp_path, pair):
    _, labels_vol, raw = pair
    two = np.stack([raw, raw + 1]).astype(np.float32)
    rv = save_array(tmp_path / "m.n5", "raw", two, chunks=(1, 8, 16, 16))
    ds = N5TileDataset([(rv, labels_vol)], (8, 16, 16), length=4, seed=1)
    x, y = ds[2]
    assert x.shape == (2, 8, 16, 16) and y.shape == (8, 16, 16)
    mean, std = ds.stats[0]
    c0, c1 = (np.rint(x.numpy().astype(np.float64) * std + mean)).astype(np.int64)
    np.testing.assert_array_equal(c1, c0 + 1)  # both channels flipped alike
    np.testing.assert_array_equal(c0 % 5, y.numpy())


def test_train_a_few_steps(pair):
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, _ = pair
    torch.manual_seed(0)
    model = UNet(1, 5, dims=3, base=2, depth=1)
    before = [p.detach().clone() for p in model.parameters()]
    lines: list[str] = []
    ds = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=4, seed=0)
    train(model, ds, steps=5, batch=2, log=lines.append)
    assert not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert lines and lines[-1].startswith("step 5/5  loss ")
    # the first step said at once (the next at step 25: minutes on big tiles), then the last;
    # labels of 5 classes in every tile: nothing to say about them
    assert len(lines) == 2 and lines[0].startswith("step 1/5  loss "), lines


def test_bad_pairs_and_tiles_are_one_sentence(tmp_path, pair):
    raw_vol, labels_vol, raw = pair
    floats = save_array(tmp_path / "f.n5", "f", raw.astype(np.float32), chunks=(8, 16, 16))
    coarse = save_array(tmp_path / "c.n5", "c", (raw[::2, ::2, ::2] % 5).astype(np.uint8))
    save_array(tmp_path / "u.n5", "u", (raw % 5).astype(np.uint8))
    import z5py

    from napari_emparsl.core.volume import UNFINISHED

    z5py.File(str(tmp_path / "u.n5"), "a")["u"].attrs[UNFINISHED] = "an import that was stopped"
    unfinished = Volume.open(f"{tmp_path}/u.n5:u")
    cases = [
        ([(raw_vol, labels_vol)], (32, 16, 16), "A tile of 32×16×16 voxels does not fit in the raw"),
        ([(raw_vol, labels_vol)], (0, 16, 16), "A tile is 3 positive whole numbers of voxels (z, y, x), not (0, 16, 16)."),
        ([(raw_vol, labels_vol)], (16, 16), "A tile is 3 positive whole numbers of voxels"),
        ([], (8, 8, 8), "Give at least one (raw, labels) pair of volumes to train on."),
        ([(raw_vol, floats)], (8, 8, 8), "holds float32 values, not class ids"),
        ([(raw_vol, coarse)], (8, 8, 8), "is 24×40×40 voxels but the labels"),
        ([(raw_vol, unfinished)], (8, 8, 8), "is an import that was stopped, so parts of it"),
    ]  # fmt: skip
    for pairs, tile, sentence in cases:
        with pytest.raises(TrainingDataError) as err:
            N5TileDataset(pairs, tile)
        assert sentence in str(err.value), str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    np.testing.assert_array_equal(raw_vol.read(), raw)  # inputs untouched


def test_empty_dataset_and_no_steps_are_refused(pair):
    """An empty dataset made train() loop for ever; steps=0 gave torch's raw total_steps error."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, _ = pair
    for length in (0, -3):
        with pytest.raises(TrainingDataError) as err:
            N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=length)
        assert f"A dataset of {length} tiles has nothing to train on" in str(err.value)
    ds = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=4)
    model = UNet(1, 5, dims=3, base=2, depth=1)
    for kwargs, sentence in [
        ({"steps": 0}, "Training needs steps of 1 or more, not 0;"),
        ({"steps": -1}, "Training needs steps of 1 or more, not -1;"),
        ({"steps": 2, "batch": 0}, "Training needs batch of 1 or more, not 0;"),
    ]:
        with pytest.raises(TrainingDataError) as err:
            train(model, ds, log=lambda _: None, **kwargs)
        assert sentence in str(err.value) and "\n" not in str(err.value)


class _Recording(torch.nn.Module):
    """A model that keeps a copy of every batch it is given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


def test_each_step_draws_fresh_tiles_reproducibly(pair):
    """A DataLoader over range(length) came round to the same tiles (augmentation included)
    after length/batch steps: length=4, 6 steps of 2 gave only 2 distinct batches."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, _ = pair

    def run(seed: int) -> tuple[_Recording, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = _Recording(UNet(1, 5, dims=3, base=2, depth=1))
        ds = N5TileDataset([(raw_vol, labels_vol)], (4, 8, 8), length=4, seed=seed)
        train(model, ds, steps=6, batch=2, log=lambda _: None)
        return model, [p.detach().clone() for p in model.parameters()]

    model, weights = run(0)
    assert len(model.inputs) == 6
    tiles = [tuple(x.numpy().ravel().tolist()) for b in model.inputs for x in b]
    assert len(set(tiles)) == 12  # every tile of the run is new
    ds = N5TileDataset([(raw_vol, labels_vol)], (4, 8, 8), length=4, seed=0)
    assert torch.equal(model.inputs[0][1], ds[1][0])  # the first pass: the dataset's items
    again, weights_again = run(0)
    assert all(torch.equal(a, b) for a, b in zip(model.inputs, again.inputs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_again, strict=True))
    other, weights_other = run(1)
    assert not torch.equal(model.inputs[0], other.inputs[0])
    assert any(not torch.equal(a, b) for a, b in zip(weights, weights_other, strict=True))


def test_labels_beyond_the_classes_are_one_sentence(tmp_path, pair):
    """Instance-like ids (up to 43) for a 5-class model failed inside the loss with
    'IndexError: Target 43 is out of bounds'."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, raw = pair
    cells = save_array(tmp_path / "t.n5", "cells", (raw % 44).astype(np.uint16), chunks=(8, 16, 16))
    model = UNet(1, 5, dims=3, base=2, depth=1)
    ds = N5TileDataset([(raw_vol, labels_vol), (raw_vol, cells)], (8, 16, 16), length=4)
    before = [p.detach().clone() for p in model.parameters()]
    lines: list[str] = []
    with pytest.raises(TrainingDataError) as err:
        train(model, ds, steps=3, batch=2, log=lines.append)
    message = str(err.value)
    assert message.startswith(f"The labels {tmp_path}/t.n5:cells hold id 43 but"), message
    assert (
        "but there are 5 classes, ids 0–4; give labels of class ids" in message
        and "\n" not in message
    )
    assert isinstance(err.value, UserError)
    # refused before the first step (the ids read when the dataset was made): it was found
    # only when a tile held it, on real volumes perhaps hours in, with nothing saved
    assert not lines and all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    # the dataset checks the ids itself when told the classes; negative ids too
    with pytest.raises(TrainingDataError, match="hold id 43 but .* 5 classes"):
        N5TileDataset([(raw_vol, cells)], (8, 16, 16), length=4, classes=5)
    signed = save_array(tmp_path / "t.n5", "signed", (raw % 3).astype(np.int8) - 1)
    with pytest.raises(TrainingDataError, match="signed hold id -1 but there are 3 classes"):
        N5TileDataset([(raw_vol, signed)], (8, 16, 16), length=4, classes=3)
    # without classes, a tile of negative ids is refused as no class ids at all
    with pytest.raises(TrainingDataError, match="signed hold id -1, which is no class id; "):
        N5TileDataset([(raw_vol, signed)], (8, 16, 16), length=4)[0]
    with pytest.raises(TrainingDataError, match="The number of classes is 1 or more, not 0."):
        N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), classes=0)
    _, y = N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), length=4, classes=5)[3]  # fits
    assert int(y.min()) == 0 and int(y.max()) == 4


def test_non_finite_raw_enters_as_zero_like_inference(tmp_path, pair):
    """NaN in float raw went into the tiles and made the loss and the weights NaN; blockwise
    inference feeds non-finite voxels to the model as 0 once normalized, and so does training."""
    from napari_emparsl.core.models.unet import UNet

    _, labels_vol, raw = pair
    holes = raw.astype(np.float32)
    holes[:, :20] = np.nan
    holes[:, 20:, :3] = np.inf
    rv = save_array(tmp_path / "n.n5", "raw", holes, chunks=(8, 16, 16))
    ds = N5TileDataset([(rv, labels_vol)], SHAPE, length=4, augment=False)
    x, _ = ds[0]
    mean, std = ds.stats[0]
    assert np.isfinite(mean) and np.isfinite(std)
    bad = ~np.isfinite(holes)
    assert (x[0].numpy()[bad] == 0).all()
    np.testing.assert_allclose(x[0].numpy()[~bad], (holes[~bad] - mean) / std, rtol=1e-5)
    torch.manual_seed(0)
    model = UNet(1, 5, dims=3, base=2, depth=1)
    lines: list[str] = []
    train(
        model, N5TileDataset([(rv, labels_vol)], (8, 16, 16), length=4), steps=3, log=lines.append
    )
    assert "nan" not in lines[-1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_unet_script_writes_to_the_current_folder_by_default(tmp_path, monkeypatch):
    """Its default --out was the package's models folder, so a trial run replaced the built-in
    model; and its docstring said --steps 600 where the default (and docs/models.md) is 800."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("train_unet", repo / "scripts" / "train_unet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    args = script.parse_args([])
    assert Path(args.out).resolve() == tmp_path.resolve()
    shipped = repo / "src" / "napari_emparsl" / "models"
    assert Path(script.parse_args(["--out", str(shipped)]).out) == shipped  # only when asked
    assert f"--steps {args.steps}]" in script.__doc__ and args.steps == 800
    assert f"{args.steps} steps of two random" in (repo / "docs" / "models.md").read_text()


# --- a trained model saved for runs; sparse labels; what the model takes ------------------------


def _classes_pair(tmp_path, shape=(24, 40, 40), offset=1000.0):
    """Raw of membrane-like sheets on a large offset (the normalization matters), and labels
    of 2 classes: 1 on the sheets."""
    _, y, x = np.indices(shape)
    sheets = ((y % 10) < 2) | ((x % 12) < 2)
    rng = np.random.default_rng(0)
    raw = (offset + 50 * sheets + rng.normal(0, 5, shape)).astype(np.float32)
    save_array(tmp_path / "c.n5", "raw", raw, chunks=(8, 16, 16))
    save_array(tmp_path / "c.n5", "labels", sheets.astype(np.uint8), chunks=(8, 16, 16))
    return Volume.open(f"{tmp_path}/c.n5:raw"), Volume.open(f"{tmp_path}/c.n5:labels"), raw


@pytest.mark.parametrize("dims", [3, 2])
def test_save_model_writes_what_a_run_needs_to_reproduce_training(tmp_path, dims):
    """docs/models.md had the state dict saved with a sidecar of `architecture: unet3d` alone:
    UNet's default base (12) did not fit the weights (base 8), and once arch_options were
    added, the model ran without the z-score normalization training gave every tile
    (inference's default is none): boundary Dice 0.000 instead of 0.561 on real data."""
    import napari_emparsl
    from napari_emparsl.core.models.loaders import describe_model, load_model
    from napari_emparsl.core.models.training import save_model
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, raw = _classes_pair(tmp_path)
    torch.manual_seed(0)
    model = UNet(1, 2, dims=dims, base=2, depth=1)
    ds = N5TileDataset([(raw_vol, labels_vol)], (4, 8, 8), length=4, seed=0)
    train(model, ds, steps=3, batch=2, log=lambda _: None)
    path = tmp_path / "mine.pt"
    spec = save_model(model, path, classes=["interior", "boundary"], dataset=ds)
    described = describe_model(str(path))
    assert described == spec
    assert described.normalize == "zscore" and described.edge == "none"
    assert described.architecture == ("unet3d" if dims == 3 else "unet2d")
    assert described.arch_options == {"base": 2, "depth": 1}
    assert described.spatial_dims == dims and described.in_channels == 1
    assert described.classes == ("interior", "boundary") and described.kind == "labels"
    assert described.voxel_size is None  # the raw has no voxel size in a length unit
    loaded = load_model(str(path)).module
    state = {k: v.float() for k, v in loaded.state_dict().items()}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k].contiguous(), v)

    # a blockwise run equals the model's own forward over the z-scored volume
    event = napari_emparsl.run(
        f"{tmp_path}/c.n5:raw", str(path), f"{tmp_path}/out.n5:pred", site="threads",
        block=(12, 20, 20) if dims == 3 else (1, 20, 20),
    )  # fmt: skip
    assert event.ok, event
    pred = Volume.open(f"{tmp_path}/out.n5:pred").read()

    def forward(volume: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(volume.astype(np.float32))[None, None]
        if dims == 2:  # slice by slice
            x = x[0].transpose(0, 1)
        with torch.inference_mode():
            out = model(x)
        return out.numpy()[0] if dims == 3 else out.transpose(0, 1).numpy()

    mean, std = ds.stats[0]
    assert np.mean(pred == forward((raw - mean) / std).argmax(0)) > 0.999
    # the network's output itself, as an image model: the z-scored volume's, not the raw's
    event = napari_emparsl.run(
        f"{tmp_path}/c.n5:raw", str(path), f"{tmp_path}/out.n5:logits", site="threads",
        block=(12, 20, 20) if dims == 3 else (1, 20, 20), model_options={"kind": "image", "classes": [], "out_channels": 2},
    )  # fmt: skip
    assert event.ok, event
    logits = Volume.open(f"{tmp_path}/out.n5:logits").read()
    np.testing.assert_allclose(logits, forward((raw - mean) / std), atol=1e-4)
    assert np.abs(logits - forward(raw)).max() > 1  # what a run without normalization gives


def test_save_model_refusals_are_one_sentence(tmp_path, pair):
    from napari_emparsl.core.models.spec import ModelError
    from napari_emparsl.core.models.training import save_model
    from napari_emparsl.core.models.unet import UNet

    model = UNet(1, 3, base=2, depth=1)
    cases = [
        (dict(path=tmp_path / "m.pt", classes=["a", "b"]), "The model outputs 3 classes but 2 class names"),
        (dict(path=tmp_path / "no" / "m.pt", classes="a,b,c"), f"The folder {tmp_path}/no does not exist"),
        (dict(path=tmp_path, classes="a,b,c"), "is a folder; give the model's file name"),
        (dict(path=tmp_path / "m.pt", classes="a,b,c", options={"normalize": "none"}), "The option(s) normalize are fixed by the network"),
        (dict(path=tmp_path / "m.pt", classes="a,b,c", options={"halo": 2.5}), "'halo' in the options given to save_model must be three integers"),
        (dict(path=tmp_path / "m.pt", classes=["a", "a", "b"]), "names a more than once"),
        # a multiple the U-Net of depth 1 cannot take: saved, then every block of a run failed
        (dict(path=tmp_path / "m.pt", classes="a,b,c", options={"multiple": 3}), "The size multiple 3,3,3 does not suit the U-Net of depth 1, which takes sizes that are multiples of 2,2,2; leave multiple out"),
        (dict(path=tmp_path / "m.pt", classes="a,b,c", options={"scale": [1, 2, 2]}), "The option(s) scale are fixed by the network"),
    ]  # fmt: skip
    for kwargs, sentence in cases:
        with pytest.raises(ModelError) as err:
            save_model(model, **kwargs)
        assert sentence in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="not a Conv3d; save other networks with torch.jit"):
        save_model(torch.nn.Conv3d(1, 2, 1), tmp_path / "m.pt", classes="a,b")
    assert list(tmp_path.glob("m.pt*")) == []  # nothing written
    # the description's place a folder: refused before the weights were replaced (they were,
    # then a traceback, and a .part file left)
    (tmp_path / "d.pt").write_bytes(b"old weights")
    (tmp_path / "d.pt.yaml").mkdir()
    with pytest.raises(ModelError, match=r"d\.pt\.yaml, where the model's description goes, is a "):
        save_model(model, tmp_path / "d.pt", classes="a,b,c")
    assert (tmp_path / "d.pt").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.glob("d.pt*")) == ["d.pt", "d.pt.yaml"]
    assert save_model(model, tmp_path / "e.pt", classes="a,b,c", options={"multiple": 4})
    raw = np.zeros((8, 8, 8), np.uint8)
    raw[4:] = 1
    rv = save_array(tmp_path / "v.n5", "raw", raw, voxel_size=(40, 4, 4), unit="nm")
    ds = N5TileDataset([(rv, Volume.open(f"{tmp_path}/v.n5:raw"))], (4, 4, 4), length=1)
    spec = save_model(
        model, tmp_path / "m.pt", classes="a,b,c", dataset=ds, options={"block": 32}, comment="x\ny"
    )
    assert spec.voxel_size == (40.0, 4.0, 4.0) and spec.block == (32, 32, 32)
    assert (tmp_path / "m.pt.yaml").read_text().startswith("# x\n# y\nkind: labels\n")
    # numpy values (YAML cannot write them): written as plain numbers; before, the weights were
    # written and the description left empty, a traceback raised
    save_model(model, tmp_path / "n.pt", classes="a,b,c",
               options={"threshold": np.float32(0.25), "block": np.array([32, 32, 32])})  # fmt: skip
    written = yaml.safe_load((tmp_path / "n.pt.yaml").read_text())
    assert written["threshold"] == 0.25 and written["block"] == [32, 32, 32]
    assert sorted(p.name for p in tmp_path.glob("n.pt*")) == ["n.pt", "n.pt.yaml"]


def test_save_model_takes_a_path_of_the_home_folder(tmp_path, monkeypatch):
    """~/models/mine.pt, as --model and Volume.open take it: it was a folder named ~."""
    from napari_emparsl.core.models.loaders import describe_model
    from napari_emparsl.core.models.training import save_model
    from napari_emparsl.core.models.unet import UNet

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    save_model(UNet(1, 2, base=2, depth=1), "~/models/mine.pt", classes="a,b")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mine.pt", "mine.pt.yaml"]
    assert describe_model(str(tmp_path / "models" / "mine.pt")).classes == ("a", "b")


def test_uint64_labels_marking_unlabelled_voxels_with_their_largest_id(tmp_path, pair):
    """CREMI marks voxels without a cleft 2**64 - 1 in uint64 labels: cast to int64 it was -1,
    the advice 'pass ignore=-1' was then refused, and ignore=2**64-1 crashed in the loss."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, _, raw = pair
    big = np.iinfo(np.uint64).max
    labels = (raw % 2).astype(np.uint64)
    labels[:, :20] = big
    vol = save_array(tmp_path / "u.n5", "clefts", labels, chunks=(8, 16, 16))
    with pytest.raises(TrainingDataError) as err:
        train(UNet(1, 2, base=2, depth=1), N5TileDataset([(raw_vol, vol)], (8, 16, 16), length=4),
              steps=2, log=lambda _: None)  # fmt: skip
    assert str(err.value).endswith(f"if id {big} marks unlabelled voxels, pass ignore={big}.")
    ds = N5TileDataset([(raw_vol, vol)], (8, 16, 16), length=4, ignore=big, augment=False)
    x, y = ds[0]
    assert set(y.unique().tolist()) <= {IGNORED, 0, 1}
    region = (y != IGNORED).numpy()  # the labelled voxels of the tile, as the labels hold them
    np.testing.assert_array_equal(_raw_values(ds, x[0])[region] % 2, y.numpy()[region])
    model = UNet(1, 2, base=2, depth=1)
    assert train(model, ds, steps=2, log=lambda _: None) == 4  # the next item to read
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # ids beyond int64 that are not the ignore id: said as they are, not wrapped to negatives
    labels[0, 0, 0] = big - 1
    odd = save_array(tmp_path / "u.n5", "odd", labels, chunks=(8, 16, 16))
    with pytest.raises(TrainingDataError, match=f"hold id {big - 1} but there are 2 classes"):
        N5TileDataset([(raw_vol, odd)], (8, 16, 16), ignore=big, classes=2)
    with pytest.raises(TrainingDataError, match=f"hold id {big - 1}, which is no class id"):
        N5TileDataset([(raw_vol, odd)], SHAPE, ignore=big, length=1)[0]


def test_an_id_the_label_sample_missed_is_refused_when_a_tile_holds_it(tmp_path, pair, monkeypatch):
    """Labels too large to read whole are sampled when the dataset is made; an id outside
    the classes the sample missed is refused in one sentence when a tile holds it."""
    from napari_emparsl.core.models import training
    from napari_emparsl.core.models.unet import UNet

    monkeypatch.setattr(training, "LABEL_SAMPLE", 1)  # one chunk read: the first
    raw_vol, _, raw = pair
    labels = (raw % 3).astype(np.uint8)
    labels[-8:, -8:, -8:] = 9  # in the last chunk alone
    vol = save_array(tmp_path / "l.n5", "labels", labels, chunks=(8, 16, 16))
    ds = N5TileDataset([(raw_vol, vol)], SHAPE, length=1)  # each tile the whole volume
    assert ds.ids_found == {f"{tmp_path}/l.n5:labels": {0, 1, 2}}
    with pytest.raises(TrainingDataError, match="hold id 9, the largest in a training tile, but"):
        train(UNet(1, 3, base=2, depth=1), ds, steps=2, log=lambda _: None)


def test_a_second_call_continues_with_new_tiles(pair):
    """train() read items 0, 1, … on every call: a second call to continue training saw the
    first call's tiles again. It returns the next item, which a second call passes on."""
    raw_vol, labels_vol, _ = pair
    from napari_emparsl.core.models.unet import UNet

    read: list[int] = []

    class Logged(N5TileDataset):
        def __getitem__(self, index):
            read.append(index)
            return super().__getitem__(index)

    ds = Logged([(raw_vol, labels_vol)], (8, 16, 16), length=4, seed=0)
    model = UNet(1, 5, base=2, depth=1)
    nxt = train(model, ds, steps=3, batch=2, log=lambda _: None)
    assert nxt == 6 and read == [0, 1, 2, 3, 4, 5]
    read.clear()
    assert train(model, ds, steps=2, batch=2, first_tile=nxt, log=lambda _: None) == 10
    assert read == [6, 7, 8, 9]
    for bad in (-1, 2.5, "3"):
        with pytest.raises(TrainingDataError, match="first_tile is the whole number"):
            train(model, ds, steps=1, first_tile=bad)


def test_raw_and_labels_on_different_grids_are_noted(tmp_path, pair):
    """Labels 10 voxels off in z, or of another voxel size, were paired silently."""
    *_, raw = pair
    rv = save_array(tmp_path / "g.n5", "raw", raw, chunks=(8, 16, 16), voxel_size=(8, 8, 8))
    same = save_array(tmp_path / "g.n5", "same", (raw % 5).astype(np.uint8), voxel_size=(8, 8, 8))
    shifted = save_array(tmp_path / "g.n5", "shifted", (raw % 5).astype(np.uint8),
                         voxel_size=(8, 8, 8), offset=(80, 0, 0))  # fmt: skip
    bare = save_array(tmp_path / "g.n5", "bare", (raw % 5).astype(np.uint8))  # no voxel size
    assert N5TileDataset([(rv, same), (rv, bare)], (8, 16, 16)).notes == []
    lines: list[str] = []
    from napari_emparsl.core.models.unet import UNet

    train(UNet(1, 5, base=2, depth=1), N5TileDataset([(rv, shifted)], (8, 16, 16)), steps=1,
          log=lines.append)  # fmt: skip
    assert lines[0] == (
        f"The raw {tmp_path}/g.n5:raw and the labels {tmp_path}/g.n5:shifted lie on different "
        "grids (8×8×8 nm voxels at 0, 0, 0 against 8×8×8 nm voxels at 80, 0, 0); tiles pair "
        "their voxels by index all the same: check that the labels were drawn on this raw."
    )


def _sparse_labels(tmp_path, raw: np.ndarray, unlabelled: int) -> Volume:
    """Class ids 0/1 on z = 2 only; ``unlabelled`` elsewhere."""
    labels = np.full(raw.shape, unlabelled, np.uint8)
    labels[2] = raw[2] % 2
    return save_array(
        tmp_path / "s.n5", f"u{unlabelled}", labels, chunks=(8, 16, 16), overwrite=True
    )


def test_ignore_id_leaves_unlabelled_voxels_out_of_the_loss(tmp_path, pair):
    """Sparse labels (one labelled section, as CREMI's) had no way to mark the unlabelled
    voxels: they trained as background."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, _, raw = pair

    def weights(labels: Volume, ignore: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = UNet(1, 2, base=2, depth=1)
        ds = N5TileDataset([(raw_vol, labels)], (4, 8, 8), length=4, seed=0, ignore=ignore)
        train(model, ds, steps=4, batch=2, log=lambda _: None)
        params = [p.detach().clone() for p in model.parameters()]
        assert all(torch.isfinite(p).all() for p in params)
        return params

    marked = _sparse_labels(tmp_path, raw, 255)
    with pytest.raises(TrainingDataError, match="hold id 255 but there are 2 "
                       "classes, ids 0–1; .* if id 255 marks unlabelled voxels, pass ignore=255."):  # fmt: skip
        weights(marked, None)
    by_255 = weights(marked, 255)
    by_7 = weights(_sparse_labels(tmp_path, raw, 7), 7)  # the ignored voxels' id does not count
    assert all(torch.equal(a, b) for a, b in zip(by_255, by_7, strict=True))
    as_background = weights(_sparse_labels(tmp_path, raw, 0), None)
    assert any(not torch.equal(a, b) for a, b in zip(by_255, as_background, strict=True))
    # the ignore id passes the dataset's own class check; in the items it is IGNORED
    ds = N5TileDataset([(raw_vol, marked)], SHAPE, length=1, classes=2, ignore=255)
    assert set(ds[0][1].unique().tolist()) == {0, 1, IGNORED}
    for ignore, sentence in [
        (300, "The ignore id 300 cannot occur in the labels"),
        (-1, "holds uint8 ids 0–255; give the id its unlabelled voxels have."),
        (True, "The ignore id is the whole-number label id of unlabelled voxels"),
        (2.5, "(or None: every voxel is labelled), not 2.5."),
    ]:
        with pytest.raises(TrainingDataError) as err:
            N5TileDataset([(raw_vol, marked)], (4, 8, 8), ignore=ignore)
        assert sentence in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_tiles_of_one_class_are_counted_and_labels_of_one_id_refused(tmp_path, pair, monkeypatch):
    """83 of 100 tiles of sparse labels held background only, and labels all one id trained,
    both without a word."""
    from napari_emparsl.core.models import training
    from napari_emparsl.core.models.unet import UNet

    raw_vol, _, raw = pair
    sparse = _sparse_labels(tmp_path, raw, 0)
    lines: list[str] = []
    ds = N5TileDataset([(raw_vol, sparse)], (4, 8, 8), length=4, seed=0)
    expected = sum(len(ds[i][1].unique()) == 1 for i in range(10))
    assert expected >= 3
    train(UNet(1, 2, base=2, depth=1), ds, steps=5, batch=2, log=lines.append)
    assert lines[-2].endswith(f"  single-class tiles {expected}/10"), lines
    assert lines[-1].startswith(
        f"{expected} of 10 training tiles ({10 * expected} %) held a single class, which teaches"
    )
    assert "pass it to N5TileDataset as ignore." in lines[-1]
    ignored = _sparse_labels(tmp_path, raw, 255)
    lines.clear()
    ds = N5TileDataset([(raw_vol, ignored)], (4, 8, 8), length=4, seed=0, ignore=255)
    train(UNet(1, 2, base=2, depth=1), ds, steps=5, batch=2, log=lines.append)
    assert "held a single class or only the ignore id 255, which" in lines[-1]

    zeros = save_array(tmp_path / "s.n5", "zeros", np.zeros(SHAPE, np.uint8), chunks=(8, 16, 16))
    only = np.full(SHAPE, 255, np.uint8)
    only[2] = 0
    only = save_array(tmp_path / "s.n5", "only", only, chunks=(8, 16, 16))  # 0, the ignore id
    for labels, ignore, sentence in [
        (zeros, None, f"The labels {tmp_path}/s.n5:zeros hold only id 0 in every voxel, so"),
        (ignored, 255, None),  # 0 and 1 on z = 2: fine
        (only, 255, "hold only id 0 in every voxel"),
        (zeros, 0, "hold only the ignore id 0 in every voxel"),
    ]:
        if sentence is None:
            N5TileDataset([(raw_vol, labels)], (4, 8, 8), ignore=ignore)
            continue
        with pytest.raises(TrainingDataError) as err:
            N5TileDataset([(raw_vol, labels)], (4, 8, 8), ignore=ignore)
        assert sentence in str(err.value) and "\n" not in str(err.value), str(err.value)
    # another pair of other ids: one class in a pair is fine (a crop of background only)
    N5TileDataset([(raw_vol, zeros), (raw_vol, sparse)], (4, 8, 8))
    # a volume too big to read whole: a sample of its chunks, said in the log, not refused
    monkeypatch.setattr(training, "LABEL_SAMPLE", 2048)
    ds = N5TileDataset([(raw_vol, zeros)], (4, 8, 8), length=2)
    assert len(ds.notes) == 1 and ds.notes[0].startswith(
        f"The labels {tmp_path}/s.n5:zeros held only id 0 in the 2,048 voxels read across it"
    )
    lines.clear()
    train(UNet(1, 2, base=2, depth=1), ds, steps=1, batch=2, log=lines.append)
    assert lines[0] == ds.notes[0]


def test_tiles_the_unet_cannot_take_are_one_sentence(tmp_path, pair):
    """A tile that is not a multiple of 2**depth, or too small, failed inside torch ('Sizes of
    tensors must match…', 'Output size is too small'); 2 raw channels for a 1-channel U-Net
    too."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, raw = pair
    thin = save_array(tmp_path / "thin.n5", "raw", raw[:2])
    thin_labels = save_array(tmp_path / "thin.n5", "labels", (raw[:2] % 5).astype(np.uint8))
    two = save_array(tmp_path / "two.n5", "raw", np.stack([raw, raw]), chunks=(1, 8, 16, 16))
    cases = [
        ((raw_vol, labels_vol), (6, 17, 16), 2, 3,
         "A tile of 6×17×16 voxels does not suit the U-Net of depth 2, which takes sizes that "
         "are multiples of 4 along each axis; use a tile of 4×16×16."),
        ((raw_vol, labels_vol), (1, 16, 16), 2, 3, "; use a tile of 4×16×16."),
        ((raw_vol, labels_vol), (3, 18, 16), 2, 2,
         "multiples of 4 along y and x (it takes each z slice on its own); use a tile of 3×16×16."),
        ((thin, thin_labels), (2, 16, 16), 2, 3,
         f"and the raw {tmp_path}/thin.n5:raw has only 2 voxel(s) along z; train a U-Net of "
         "depth 1 or a 2D one (dims=2) on it."),
        ((two, labels_vol), (4, 8, 8), 1, 3,
         f"The U-Net takes 1 input channel(s) but the raw {tmp_path}/two.n5:raw has 2; build "
         "it as UNet(2, …) for these volumes."),
    ]  # fmt: skip
    for pair_, tile, depth, dims, sentence in cases:
        ds = N5TileDataset([pair_], tile, length=2)
        model = UNet(1, 5, base=2, depth=depth, dims=dims)
        with pytest.raises(TrainingDataError) as err:
            train(model, ds, steps=1, log=lambda _: None)
        assert sentence in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_2d_unet_learns_from_the_z_slices_of_its_tiles(pair):
    """A UNet(dims=2) could not be trained: tiles are 3D ('Expected 3D (unbatched) or 4D
    (batched) input to conv2d')."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, _ = pair
    torch.manual_seed(0)
    model = UNet(1, 5, base=2, depth=1, dims=2)
    inputs: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    before = [p.detach().clone() for p in model.parameters()]
    ds = N5TileDataset([(raw_vol, labels_vol)], (3, 8, 8), length=4, seed=0)
    train(model, ds, steps=2, batch=2, log=lambda _: None)
    assert [tuple(x.shape) for x in inputs] == [(6, 1, 8, 8)] * 2
    x, _ = ds[1]
    assert torch.equal(inputs[0][3:], x.transpose(0, 1))  # item 1's slices, in order
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_training_settings_are_checked_first(pair):
    """Class weights of another length failed in torch ('weight tensor should be defined
    either for all or no classes'), negative ones trained; a tile of 8.5 was 8; seed None
    failed at the first item ('object of type 'NoneType' has no len()'); lr 0 trained."""
    from napari_emparsl.core.models.unet import UNet

    raw_vol, labels_vol, _ = pair
    ds = N5TileDataset([(raw_vol, labels_vol)], (4, 8, 8), length=4)
    model = UNet(1, 5, base=2, depth=1)
    for kwargs, sentence in [
        ({"class_weights": [0.3, 1.0, 1.0]},
         "There are 3 class weights [0.3, 1.0, 1.0] but the model outputs 5 classes; give one "
         "weight per class."),
        ({"class_weights": [1, 1, -1, 1, 1]}, "The class weights are positive numbers, one per "
         "class (the model's output channels), not [1, 1, -1, 1, 1]."),
        ({"class_weights": [1, 1, 0, 1, 1]}, "not [1, 1, 0, 1, 1]."),
        ({"class_weights": [1, 1, float("nan"), 1, 1]}, "The class weights are positive"),
        ({"class_weights": 0.3}, "The class weights are positive numbers, one per class"),
        ({"lr": 0}, "The learning rate is a positive number, not 0."),
        ({"lr": float("inf")}, "The learning rate is a positive number, not inf."),
    ]:  # fmt: skip
        with pytest.raises(TrainingDataError) as err:
            train(model, ds, steps=1, log=lambda _: None, **kwargs)
        assert sentence in str(err.value) and "\n" not in str(err.value), str(err.value)
    train(model, ds, steps=1, class_weights=[0.3, 1, 1, 1, 1], log=lambda _: None)  # fits

    for kwargs, sentence in [
        ({"tile": (8.5, 16, 16)}, "A tile is 3 positive whole numbers of voxels (z, y, x), not (8.5, 16, 16)."),
        ({"tile": (8, 16, True)}, "not (8, 16, True)."),
        ({"seed": None}, "The seed is a whole number of 0 or more (it draws the tiles, reproducibly), not None."),
        ({"seed": -1}, "not -1."),
        ({"seed": 1.5}, "not 1.5."),
    ]:  # fmt: skip
        with pytest.raises(TrainingDataError) as err:
            N5TileDataset([(raw_vol, labels_vol)], **({"tile": (4, 8, 8)} | kwargs))
        assert sentence in str(err.value), str(err.value)
    whole = N5TileDataset([(raw_vol, labels_vol)], (8.0, np.int64(16), 16), seed=np.int64(3))
    assert whole.tile == (8, 16, 16)
    assert torch.equal(
        whole[2][0], N5TileDataset([(raw_vol, labels_vol)], (8, 16, 16), seed=3)[2][0]
    )


def _script():
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("train_unet", repo / "scripts" / "train_unet.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_train_unet_script_checks_its_arguments_before_training(tmp_path, capsys):
    """--out an existing file failed with a FileExistsError traceback after the whole training;
    --steps 0 with a traceback after writing the samples."""
    script = _script()
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, sentence in [
        (["--steps", "1", "--out", str(afile)],
         f"--out {afile} is a file; give the folder to write unet3d_em.pt and unet3d_em.pt.yaml into."),
        (["--steps", "1", "--out", f"{afile}/sub"], f"is inside {afile}, which is a file, not a folder."),
        (["--steps", "0", "--out", str(tmp_path)], "--steps is the number of training steps, 1 or more, not 0."),
        (["--steps", "1", "--seed", "-2", "--out", str(tmp_path)], "--seed is a whole number of 0 or more"),
    ]:  # fmt: skip
        assert script.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_unet.py: error: ") and sentence in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written
