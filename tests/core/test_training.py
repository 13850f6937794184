"""Training input: random (raw, labels) tiles read from N5 through a torch Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.models.training import N5TileDataset, TrainingDataError, train
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
        ([(raw_vol, labels_vol)], (0, 16, 16), "A tile is 3 positive sizes (z, y, x), not (0, 16, 16)."),
        ([(raw_vol, labels_vol)], (16, 16), "A tile is 3 positive sizes"),
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
    with pytest.raises(TrainingDataError) as err:
        train(model, ds, steps=3, batch=2, log=lambda _: None)
    message = str(err.value)
    assert (
        f"The labels {tmp_path}/t.n5:cells hold id 43, the largest in a training tile, but"
        in message
    ), message
    assert (
        "but there are 5 classes, ids 0–4; give labels of class ids" in message
        and "\n" not in message
    )
    assert isinstance(err.value, UserError)
    # the dataset checks each tile itself when told the classes; negative ids too
    with pytest.raises(TrainingDataError, match="hold id 43, .* 5 classes"):
        N5TileDataset([(raw_vol, cells)], (8, 16, 16), length=4, classes=5)[0]
    signed = save_array(tmp_path / "t.n5", "signed", (raw % 3).astype(np.int8) - 1)
    with pytest.raises(TrainingDataError, match="signed hold id -1 but there are 3 classes"):
        N5TileDataset([(raw_vol, signed)], (8, 16, 16), length=4, classes=3)[0]
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
