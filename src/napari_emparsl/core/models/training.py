"""Training on N5: a torch Dataset of random tiles read lazily from N5, and a small trainer.

Used to make the built-in model (``scripts/train_unet.py``); works for any raw/labels pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.volume import UNFINISHED, Volume, volume_stats

__all__ = ["N5TileDataset", "TrainingDataError", "dice_scores", "volume_stats"]


class TrainingDataError(UserError, ValueError):
    """Volumes or tiles that cannot be trained on, said in one sentence."""


def _spatial_shape(volume: Volume) -> tuple[int, ...]:
    return tuple(volume.shape[1:]) if "c" in volume.axes else tuple(volume.shape)


def _size(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


def _check_pair(raw: Volume, labels: Volume, tile: tuple[int, ...]) -> None:
    names = {id(raw): f"raw {raw.root}:{raw.key}", id(labels): f"labels {labels.root}:{labels.key}"}
    for vol in (raw, labels):
        if vol.attrs.get(UNFINISHED):
            raise TrainingDataError(
                f"The {names[id(vol)]} is {vol.attrs[UNFINISHED]}, so parts of it are missing; "
                "write it again before training on it."
            )
    if "c" in labels.axes or len(labels.shape) != 3:
        raise TrainingDataError(
            f"The {names[id(labels)]} has shape {_size(labels.shape)}; labels are one 3D volume "
            "of class ids (z, y, x)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TrainingDataError(
            f"The {names[id(labels)]} holds {labels.dtype} values, not class ids; give an integer "
            "labels volume (0 = background, 1, 2, … one id per class)."
        )
    spatial = _spatial_shape(raw)
    if len(spatial) != 3:
        raise TrainingDataError(
            f"The {names[id(raw)]} has shape {_size(raw.shape)}; training reads 3D volumes "
            "(z, y, x, with an optional channel axis first)."
        )
    if spatial != tuple(labels.shape):
        raise TrainingDataError(
            f"The {names[id(raw)]} is {_size(spatial)} voxels but the {names[id(labels)]} is "
            f"{_size(labels.shape)}; give labels on the raw's grid (the same pyramid level)."
        )
    if any(t > n for t, n in zip(tile, spatial, strict=True)):
        raise TrainingDataError(
            f"A tile of {_size(tile)} voxels does not fit in the {names[id(raw)]} "
            f"({_size(spatial)}); choose a tile no bigger than the volume in each axis."
        )


class N5TileDataset(Dataset):
    """Random (raw, labels) tiles from one or more N5 volume pairs; reads only the tiles.

    Each item is ``(x, y)``: float32 ``(channels, *tile)`` normalized by the volume's global
    mean/std (NaN and infinite voxels: 0, as in blockwise inference), int64 ``tile`` class ids.
    Random flips and axis-aligned rotations in y/x augment.
    Raw volumes may have a channel axis (first); labels are 3D integer class ids on the raw's grid.
    Bad pairs or tiles raise :class:`TrainingDataError` with one sentence; given ``classes``, so
    does a tile whose labels hold an id outside 0…classes-1 (:func:`train` checks every tile
    against the model's classes in any case).

    Item ``i`` is drawn from a random stream seeded by ``(seed, i)``, so it is the same tile on
    every read, for any ``i >= 0``: ``length`` is one pass of a plain DataLoader, and
    :func:`train` reads items 0, 1, 2, … on past it, so no step sees an earlier step's tiles.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Volume, Volume]],
        tile: Sequence[int],
        *,
        length: int = 1000,
        seed: int = 0,
        augment: bool = True,
        classes: int | None = None,
    ):
        self.pairs = list(pairs)
        try:
            self.tile = tuple(int(t) for t in tile)
        except (TypeError, ValueError):
            self.tile = ()
        if len(self.tile) != 3 or min(self.tile) < 1:
            raise TrainingDataError(f"A tile is 3 positive sizes (z, y, x), not {tile!r}.")
        if not self.pairs:
            raise TrainingDataError("Give at least one (raw, labels) pair of volumes to train on.")
        for raw, labels in self.pairs:
            _check_pair(raw, labels, self.tile)
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
            raise TrainingDataError(
                f"A dataset of {length!r} tiles has nothing to train on; give a length of 1 or "
                "more tiles."
            )
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 1
        ):
            raise TrainingDataError(f"The number of classes is 1 or more, not {classes!r}.")
        self.length = int(length)
        self.classes = None if classes is None else int(classes)
        self.seed = seed
        self.augment = augment
        self.stats = [volume_stats(raw) for raw, _ in self.pairs]

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> tuple[np.random.Generator, int]:
        """Item ``index``'s random stream, and the pair it reads, drawn first from it."""
        rng = np.random.default_rng((self.seed, index))
        return rng, int(rng.integers(len(self.pairs)))

    def check_classes(self, index: int, y: torch.Tensor | np.ndarray, classes: int) -> None:
        """Raise :class:`TrainingDataError` naming the labels volume if item ``index``'s labels
        ``y`` hold an id outside 0…classes-1 (instance ids, say), which the loss cannot take."""
        low, high = int(y.min()), int(y.max())
        if low >= 0 and high < classes:
            return
        labels = self.pairs[self._draw(index)[1]][1]
        found = f"id {high}, the largest in a training tile," if high >= classes else f"id {low}"
        raise TrainingDataError(
            f"The labels {labels.root}:{labels.key} hold {found} but there are {classes} "
            f"classes, ids 0–{classes - 1}; give labels of class ids (0 = background, 1, 2, …), "
            "not instance ids, or train that many classes."
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng, k = self._draw(index)
        raw, labels = self.pairs[k]
        spatial = _spatial_shape(raw)
        begin = [int(rng.integers(0, n - t + 1)) for n, t in zip(spatial, self.tile, strict=True)]
        region = tuple(slice(b, b + t) for b, t in zip(begin, self.tile, strict=True))
        mean, std = self.stats[k]
        has_c = "c" in raw.axes
        x = (raw.read(((slice(None),) if has_c else ()) + region).astype(np.float32) - mean) / std
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(x).all():
            # NaN / infinite voxels (masked or padded float data) are 0 once normalized, as
            # blockwise inference feeds them to the model; else they make the loss and weights NaN
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if not has_c:
            x = x[None]
        y = labels.read(region).astype(np.int64)
        if self.classes is not None:
            self.check_classes(index, y, self.classes)
        if self.augment:
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis + 1), np.flip(y, axis)
            if rng.random() < 0.5 and y.shape[1] == y.shape[2]:
                x, y = np.swapaxes(x, 2, 3), np.swapaxes(y, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def dice_scores(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> list[float]:
    """Per-class Dice of two label arrays."""
    out = []
    for c in range(n_classes):
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / denom) if denom else 1.0)
    return out


def train(
    model: torch.nn.Module,
    dataset: N5TileDataset,
    *,
    steps: int,
    batch: int = 2,
    lr: float = 2e-3,
    class_weights: Sequence[float] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Adam + weighted cross-entropy on random tiles; logs the loss now and then."""
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise TrainingDataError(
                f"Training needs {name} of 1 or more, not {value!r}; ask for at least one step "
                "of at least one tile."
            )
    # item k of the run is the dataset's item k, on past len(dataset): fresh tiles at every step
    # (a DataLoader over range(len(dataset)) came round to the same tiles again after each pass),
    # reproducible from the dataset's seed; the first pass is the tiles read before
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=range(steps * batch), num_workers=0
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    model.train()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader, 1):
        opt.zero_grad()
        out = model(x)
        if y.min() < 0 or y.max() >= out.shape[1]:  # the loss's own error is an IndexError
            for j, tile in enumerate(y):
                dataset.check_classes((step - 1) * batch + j, tile, out.shape[1])
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    model.eval()
