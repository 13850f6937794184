"""Training on N5: a torch Dataset of random tiles read lazily from N5, a small trainer, and
:func:`save_model`, which writes a trained U-Net with the description a run needs.

Used to make the built-in model (``scripts/train_unet.py``); works for any raw/labels pair.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from napari_emparsl.core.blockwise import normalized
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.models.spec import ModelError, ModelSpec
from napari_emparsl.core.models.unet import UNet
from napari_emparsl.core.paths import user_path
from napari_emparsl.core.units import grid_difference, nm_per_unit
from napari_emparsl.core.volume import UNFINISHED, Volume, volume_stats

__all__ = [
    "N5TileDataset",
    "TrainingDataError",
    "dice_scores",
    "save_model",
    "train",
    "volume_stats",
]

#: labels voxels read (whole chunks spread over each labels volume) to tell, when the dataset is
#: made, whether its labels hold more than one class
LABEL_SAMPLE = 2_000_000
#: train() says so when at least this share of its tiles held a single class
ONE_CLASS_WARN = 0.25
#: the class id of unlabelled voxels in the dataset's items (the ``ignore`` id of the labels
#: volume, whatever its dtype: 2**64 - 1 of a uint64 volume has no int64 of its own), which the
#: loss leaves out
IGNORED = -100


class TrainingDataError(UserError, ValueError):
    """Volumes, tiles or training settings that cannot be trained on, said in one sentence."""


def _spatial_shape(volume: Volume) -> tuple[int, ...]:
    return tuple(volume.shape[1:]) if "c" in volume.axes else tuple(volume.shape)


def _channels(volume: Volume) -> int:
    return int(volume.shape[0]) if "c" in volume.axes else 1


def _size(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


def _name(volume: Volume) -> str:
    return f"{volume.root}:{volume.key}"


def _whole(value: Any) -> int | None:
    """``value`` as an int where it is a whole number (``8``, ``np.int64(8)``, ``8.0``); None
    for anything else (``8.5``, ``True``, ``None``, text) — int() alone made a tile of 8.5
    voxels 8, silently."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    return None


def _check_pair(raw: Volume, labels: Volume, tile: tuple[int, ...]) -> None:
    names = {id(raw): f"raw {_name(raw)}", id(labels): f"labels {_name(labels)}"}
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
    if "c" in raw.axes and raw.axes[0] != "c":
        raise TrainingDataError(
            f"The {names[id(raw)]} has its channel axis between its others (axes "
            f"{', '.join(raw.axes)}); training reads channels first (c, z, y, x): save it so "
            "and train on that."
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
    Raw volumes may have a channel axis (first), the same number of channels in every pair;
    labels are 3D integer class ids on the raw's grid. ``tile`` is three whole numbers of
    voxels (z, y, x); ``seed`` a whole number of 0 or more (``None`` is refused: the tiles
    would not be reproducible).

    ``ignore``: the label id of unlabelled voxels (sparse labels: CREMI's one labelled section
    in a stack), which :func:`train` leaves out of the loss; it may lie outside the classes
    (255, -1, a uint64 volume's 18446744073709551615), but must be an id the labels volume can
    hold. In the items, unlabelled voxels are :data:`IGNORED` (-100).

    Bad pairs or tiles raise :class:`TrainingDataError` with one sentence; given ``classes``, so
    does a tile whose labels hold an id outside 0…classes-1 other than ``ignore``
    (:func:`train` checks every tile against the model's classes in any case). Labels that
    hold a single class (the ignore id aside) all through, in every pair, are refused where
    that is certain: where each labels volume is small enough to be read whole
    (:data:`LABEL_SAMPLE` voxels); for larger ones, what a sample of whole chunks spread over
    each found is kept in :attr:`notes`, which :func:`train` logs.

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
        ignore: int | None = None,
    ):
        self.pairs = list(pairs)
        try:
            whole = tuple(_whole(t) for t in tile)
        except TypeError:
            whole = ()
        if len(whole) != 3 or None in whole or min(whole) < 1:  # type: ignore[type-var]
            raise TrainingDataError(
                f"A tile is 3 positive whole numbers of voxels (z, y, x), not {tile!r}."
            )
        self.tile: tuple[int, ...] = whole  # type: ignore[assignment]
        if not self.pairs:
            raise TrainingDataError("Give at least one (raw, labels) pair of volumes to train on.")
        for raw, labels in self.pairs:
            _check_pair(raw, labels, self.tile)
        first = self.pairs[0][0]
        for raw, _ in self.pairs[1:]:
            if _channels(raw) != _channels(first):
                raise TrainingDataError(
                    f"The raw {_name(raw)} has {_channels(raw)} channel(s) but the raw "
                    f"{_name(first)} has {_channels(first)}; give raw volumes of the same "
                    "channels (the model's inputs)."
                )
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
            raise TrainingDataError(
                f"A dataset of {length!r} tiles has nothing to train on; give a length of 1 or "
                "more tiles."
            )
        if classes is not None and (
            isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < 1
        ):
            raise TrainingDataError(f"The number of classes is 1 or more, not {classes!r}.")
        seed_value = _whole(seed)
        if seed_value is None or seed_value < 0:
            raise TrainingDataError(
                f"The seed is a whole number of 0 or more (it draws the tiles, reproducibly), "
                f"not {seed!r}."
            )
        if ignore is not None:
            ignore_value = _whole(ignore)
            if ignore_value is None:
                raise TrainingDataError(
                    "The ignore id is the whole-number label id of unlabelled voxels (or None: "
                    f"every voxel is labelled), not {ignore!r}."
                )
            for _, labels in self.pairs:
                info = np.iinfo(labels.dtype)
                if not info.min <= ignore_value <= info.max:
                    raise TrainingDataError(
                        f"The ignore id {ignore_value} cannot occur in the labels "
                        f"{_name(labels)}, which holds {labels.dtype} ids {info.min}–{info.max}; "
                        "give the id its unlabelled voxels have."
                    )
            ignore = ignore_value
        self.length = int(length)
        self.classes = None if classes is None else int(classes)
        self.seed = seed_value
        self.augment = augment
        self.ignore: int | None = ignore
        self.stats = [volume_stats(raw) for raw, _ in self.pairs]
        #: labels volume -> the ids (ignore id aside) found in it when the dataset was made:
        #: all of them where it was read whole, those of a sample of its chunks otherwise
        self.ids_found: dict[str, set[int]] = {}
        self.notes: list[str] = self._check_labels_vary() + self._grid_notes()
        if self.classes is not None:
            self.check_found_ids(self.classes)

    def _grid_notes(self) -> list[str]:
        """Pairs whose raw and labels lie differently in the world (another voxel size or
        offset): their voxels are paired by index all the same — say so, for the log."""
        notes = []
        for raw, labels in self.pairs:
            differ = grid_difference(raw, labels)
            if differ:
                notes.append(
                    f"The raw {_name(raw)} and the labels {_name(labels)} lie on different grids "
                    f"({differ}); tiles pair their voxels by index all the same: check that the "
                    "labels were drawn on this raw."
                )
        return notes

    def check_found_ids(self, classes: int) -> None:
        """Raise :class:`TrainingDataError` where a labels volume holds an id outside
        0…classes-1 (the ignore id aside) among those found when the dataset was made —
        before the first step, not when a tile happens to hold it."""
        for name, ids in self.ids_found.items():
            odd = sorted(i for i in ids if not 0 <= i < classes)
            if odd:
                labels = next(lab for _, lab in self.pairs if _name(lab) == name)
                raise TrainingDataError(self._odd_id(labels, odd[-1], classes, "id {odd}"))

    def _odd_id(self, labels: Volume, odd: int, classes: int | None, found: str) -> str:
        """The sentence for labels holding ``odd``, which is no class id."""
        found = found.format(odd=odd)
        if classes is None:
            said = f"The labels {labels.root}:{labels.key} hold {found}, which is no class id"
        else:
            said = (
                f"The labels {labels.root}:{labels.key} hold {found} but there are {classes} "
                f"classes, ids 0–{classes - 1}"
            )
        # the dtype's largest id, or -1: the usual marks of unlabelled voxels
        marks = self.ignore is None and odd in (-1, int(np.iinfo(labels.dtype).max))
        return (
            f"{said}; give labels of class ids (0 = background, 1, 2, …), not instance ids, "
            "or train that many classes"
            + (f"; if id {odd} marks unlabelled voxels, pass ignore={odd}." if marks else ".")
        )

    def _check_labels_vary(self) -> list[str]:
        """Refuse labels that certainly hold one class only (read whole: small volumes); say
        which larger ones held one class in a sample of their chunks (notes for the log)."""
        # labels -> ids found (the ignore id left out), whether read whole, voxels read
        found: dict[str, tuple[set[int], bool, int]] = {}
        for _, labels in self.pairs:
            name = _name(labels)
            if name in found:
                continue
            sample = labels.sample(LABEL_SAMPLE)
            ids = {int(v) for v in np.unique(sample)} - {self.ignore}
            found[name] = ids, sample.size >= int(np.prod(labels.shape)), sample.size
            self.ids_found[name] = ids
        every = set().union(*(ids for ids, _, _ in found.values()))
        if len(every) <= 1 and all(whole for _, whole, _ in found.values()):
            which = " and ".join(found)
            held = f"only id {every.pop()}" if every else f"only the ignore id {self.ignore}"
            raise TrainingDataError(
                f"The labels {which} hold {held} in every voxel, so there is nothing to learn "
                "from; give labels of at least two classes (0 = background, 1, 2, …)."
            )
        notes = []
        for name, (ids, whole, read) in found.items():
            if len(ids) <= 1 and not whole:
                held = f"only id {min(ids)}" if ids else f"only the ignore id {self.ignore}"
                notes.append(
                    f"The labels {name} held {held} in the {read:,} voxels read across "
                    "it (whole chunks spread over the volume): most of its tiles may teach "
                    "nothing; check it is the labels volume meant, or mark its unlabelled "
                    "voxels with an id of their own and pass it as ignore."
                )
        return notes

    def __len__(self) -> int:
        return self.length

    @property
    def channels(self) -> int:
        """Channels of the tiles' raw (the model's input channels)."""
        return _channels(self.pairs[0][0])

    def _draw(self, index: int) -> tuple[np.random.Generator, int]:
        """Item ``index``'s random stream, and the pair it reads, drawn first from it."""
        rng = np.random.default_rng((self.seed, index))
        return rng, int(rng.integers(len(self.pairs)))

    def check_classes(self, index: int, y: torch.Tensor | np.ndarray, classes: int) -> None:
        """Raise :class:`TrainingDataError` naming the labels volume if item ``index``'s labels
        ``y`` hold an id outside 0…classes-1 other than the ignore id (instance ids, say),
        which the loss cannot take. ``y``: an item's labels (unlabelled voxels
        :data:`IGNORED`) or the labels volume's own ids."""
        if self.ignore is not None:
            y = y[(y != self.ignore) & (y != IGNORED)]
            if not len(y):
                return
        low, high = int(y.min()), int(y.max())
        if low >= 0 and high < classes:
            return
        labels = self.pairs[self._draw(index)[1]][1]
        found = "id {odd}, the largest in a training tile," if high >= classes else "id {odd}"
        odd = high if high >= classes else low
        raise TrainingDataError(self._odd_id(labels, odd, classes, found))

    def _class_ids(self, index: int, y: np.ndarray) -> np.ndarray:
        """A tile's labels as the loss takes them: int64 class ids, unlabelled voxels
        :data:`IGNORED`; ids no class can have (negative, or beyond int64: a uint64 volume's
        largest ids) refused in the labels' own dtype, where they are exact."""
        keep = None if self.ignore is None else y != self.ignore
        kept = y if keep is None else y[keep]
        if kept.size:
            low, high = kept.min(), kept.max()
            if low < 0 or high > np.iinfo(np.int64).max:
                labels = self.pairs[self._draw(index)[1]][1]
                odd = int(low) if low < 0 else int(high)
                raise TrainingDataError(self._odd_id(labels, odd, self.classes, "id {odd}"))
        out = y.astype(np.int64)
        if keep is not None:
            out[~keep] = IGNORED
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng, k = self._draw(index)
        raw, labels = self.pairs[k]
        spatial = _spatial_shape(raw)
        begin = [int(rng.integers(0, n - t + 1)) for n, t in zip(spatial, self.tile, strict=True)]
        region = tuple(slice(b, b + t) for b, t in zip(begin, self.tile, strict=True))
        mean, std = self.stats[k]
        has_c = "c" in raw.axes
        x = normalized(raw.read(((slice(None),) if has_c else ()) + region), mean, std)
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(x).all():
            # NaN / infinite voxels (masked or padded float data) are 0 once normalized, as
            # blockwise inference feeds them to the model; else they make the loss and weights NaN
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if not has_c:
            x = x[None]
        y = self._class_ids(index, labels.read(region))
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


def _unet_in_channels(model: UNet) -> int:
    return int(model.down[0][0].in_channels)


def _check_unet(model: UNet, dataset: N5TileDataset) -> None:
    """The package's U-Net takes sizes that are multiples of 2**depth (each pooling halves
    them), along y and x only for a 2D one, which takes each z slice of a tile on its own; and
    the raw's channels."""
    takes, has = _unet_in_channels(model), dataset.channels
    if takes != has:
        raise TrainingDataError(
            f"The U-Net takes {takes} input channel(s) but the raw {_name(dataset.pairs[0][0])} "
            f"has {has}; build it as UNet({has}, …) for these volumes."
        )
    m, tile = 2**model.depth, dataset.tile
    axes = range(3) if model.dims == 3 else (1, 2)
    if all(tile[i] % m == 0 for i in axes):
        return
    along = "each axis" if model.dims == 3 else "y and x (it takes each z slice on its own)"
    said = (
        f"A tile of {_size(tile)} voxels does not suit the U-Net of depth {model.depth}, which "
        f"takes sizes that are multiples of {m} along {along}"
    )
    fit = list(tile)
    for i in axes:
        fit[i] = max(m, tile[i] // m * m)
    for i in axes:
        raw = min((raw for raw, _ in dataset.pairs), key=lambda r: _spatial_shape(r)[i])
        n = _spatial_shape(raw)[i]
        if fit[i] > n:  # even one multiple does not fit: a shallower U-Net, or a 2D one
            depth = int(math.log2(n)) if n >= 2 else 0
            advice = [f"a U-Net of depth {depth}"] if depth >= 1 else []
            if i == 0 and model.dims == 3:
                advice.append("a 2D one (dims=2)")
            raise TrainingDataError(
                f"{said}, and the raw {_name(raw)} has only {n} voxel(s) along {'zyx'[i]}; "
                f"train {' or '.join(advice)} on it."
            )
    raise TrainingDataError(f"{said}; use a tile of {_size(fit)}.")


def _class_weights(class_weights: Sequence[float], classes: int | None) -> torch.Tensor:
    try:
        weights = [float(w) for w in class_weights]
    except (TypeError, ValueError):
        weights = []
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise TrainingDataError(
            "The class weights are positive numbers, one per class (the model's output "
            f"channels), not {class_weights!r}."
        )
    if classes is not None and len(weights) != classes:
        raise TrainingDataError(
            f"There are {len(weights)} class weights {list(class_weights)!r} but the model "
            f"outputs {classes} classes; give one weight per class."
        )
    return torch.tensor(weights, dtype=torch.float32)


def train(
    model: torch.nn.Module,
    dataset: N5TileDataset,
    *,
    steps: int,
    batch: int = 2,
    lr: float = 2e-3,
    class_weights: Sequence[float] | None = None,
    first_tile: int = 0,
    log: Callable[[str], None] = print,
) -> int:
    """Adam + weighted cross-entropy on random tiles; logs the loss now and then.

    Voxels labelled with the dataset's ``ignore`` id are left out of the loss. The package's
    :class:`~napari_emparsl.core.models.unet.UNet` is checked against the tiles before the
    first step (a 3D one takes multiples of 2**depth along each axis; a 2D one, ``dims=2``,
    along y and x, and learns from each z slice of a tile as an image of its own), and
    ``class_weights`` (positive, one per output channel) against the model. The log says how
    many tiles held a single class (or only the ignore id), which teach little, and what the
    dataset's :attr:`~N5TileDataset.notes` found. Label ids outside the model's classes
    found when the dataset was made are refused before the first step.

    Steps read the dataset's items ``first_tile``, ``first_tile + 1``, … (``batch`` a step);
    returns the item after the last one read: a second call that continues the training
    passes it as ``first_tile`` to draw new tiles (with 0 again it sees the first call's
    tiles, in the same order, flips and rotations). Each call has a learning-rate schedule of
    its own (one cycle over its ``steps``). Training runs on the model's device (``model.cuda()``
    first to train on a GPU).
    """
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise TrainingDataError(
                f"Training needs {name} of 1 or more, not {value!r}; ask for at least one step "
                "of at least one tile."
            )
    first = _whole(first_tile)
    if first is None or first < 0:
        raise TrainingDataError(
            f"first_tile is the whole number (0 or more) of the dataset's first item to read, "
            f"not {first_tile!r}."
        )
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float | np.integer | np.floating)
        or not math.isfinite(lr)
        or lr <= 0
    ):
        raise TrainingDataError(f"The learning rate is a positive number, not {lr!r}.")
    flat = isinstance(model, UNet) and model.dims == 2  # 2D: each z slice an image of its own
    if isinstance(model, UNet):
        _check_unet(model, dataset)
    outputs = int(model.head.out_channels) if isinstance(model, UNet) else None
    weight = None if class_weights is None else _class_weights(class_weights, outputs)
    if outputs is not None:
        dataset.check_found_ids(outputs)
    ignore = dataset.ignore
    for note in dataset.notes:
        log(note)
    # item k of the run is the dataset's item k, on past len(dataset): fresh tiles at every step
    # (a DataLoader over range(len(dataset)) came round to the same tiles again after each pass),
    # reproducible from the dataset's seed; the first pass is the tiles read before
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=range(first, first + steps * batch), num_workers=0
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    # the model's device (a U-Net moved to a GPU with .cuda()): tiles and weights go there
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if weight is not None:
        weight = weight.to(device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORED)
    one_class = 0  # tiles whose labels held a single class (or only the ignore id)
    model.train()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        for tile in y:
            ids = torch.unique(tile)
            one_class += len(ids[ids != IGNORED]) <= 1
        labelled = y if ignore is None else y[y != IGNORED]
        if flat:  # (batch, c, z, y, x) -> (batch × z, c, y, x): z slices as images
            x = x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])
        opt.zero_grad()
        out = model(x)
        if weight is not None and out.shape[1] != len(weight):  # not the package's U-Net
            _class_weights(class_weights, out.shape[1])  # type: ignore[arg-type]
        if outputs is None:  # another network: its classes known from its first output
            outputs = int(out.shape[1])
            dataset.check_found_ids(outputs)
        if len(labelled) and (labelled.min() < 0 or labelled.max() >= out.shape[1]):
            for j, tile in enumerate(y):  # the loss's own error is an IndexError
                dataset.check_classes(first + (step - 1) * batch + j, tile, out.shape[1])
        if flat:
            y = y.reshape(-1, *y.shape[2:])
        if tuple(out.shape[2:]) != tuple(y.shape[1:]):
            raise TrainingDataError(
                f"The model's output is {_size(out.shape[2:])} voxels for a tile of "
                f"{_size(y.shape[1:])}; the loss needs one output voxel per label voxel (a "
                "model with 'same' padding, given tiles it takes)."
            )
        # a batch of unlabelled voxels only: no loss (the mean over none is NaN, which would
        # make every weight NaN), and no gradient
        loss = loss_fn(out, y) if len(labelled) else out.sum() * 0.0
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps or step == 1:
            seen = step * batch
            tail = f"  single-class tiles {one_class}/{seen}" if one_class else ""
            log(
                f"step {step}/{steps}  loss {loss.item():.4f}  "
                f"{time.perf_counter() - t0:.0f} s{tail}"
            )
    model.eval()
    total = steps * batch
    _say_one_class(log, one_class, total, ignore)
    return first + total


def _say_one_class(log: Callable[[str], None], one_class: int, total: int, ignore) -> None:
    if one_class and one_class >= ONE_CLASS_WARN * total:
        said = f"{one_class} of {total} training tiles ({100 * one_class / total:.0f} %) held"
        if ignore is None:
            log(
                f"{said} a single class, which teaches the model little: use larger tiles, "
                "labels that cover more of the volume, or mark unlabelled voxels with an id of "
                "their own and pass it to N5TileDataset as ignore."
            )
        else:
            log(
                f"{said} a single class or only the ignore id {ignore}, which teaches the model "
                "little or nothing: use tiles that reach more of the labelled voxels (larger "
                "ones, or volumes cropped around the labels)."
            )


def _voxel_size_nm(dataset: N5TileDataset) -> list[float] | None:
    """The raw volumes' voxel size in nm where they all have the same one in a length unit."""
    sizes = set()
    for raw, _ in dataset.pairs:
        per_nm = nm_per_unit(raw.unit)
        if per_nm is None or len(raw.voxel_size) < 3:
            return None
        sizes.add(tuple(round(float(v) * per_nm, 6) for v in raw.voxel_size[-3:]))
    return list(sizes.pop()) if len(sizes) == 1 else None


#: sidecar keys that save_model writes from the network and from how train() trained it
_FIXED_KEYS = (
    "kind",
    "in_channels",
    "classes",
    "out_channels",
    "spatial_dims",
    "scale",
    "architecture",
    "arch_options",
    "normalize",
    "percentiles",
    "norm_values",
)


def save_model(
    model: UNet,
    path: str | os.PathLike,
    *,
    classes: Sequence[str],
    dataset: N5TileDataset | None = None,
    voxel_size: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    comment: str = "",
) -> ModelSpec:
    """Write a U-Net trained by :func:`train` as ``path`` (its state dict) and ``path.yaml``
    (its complete sidecar), so that ``emparsl run --model path`` runs it as it was trained.

    The sidecar says ``architecture`` (``unet3d`` or ``unet2d``, from the U-Net's ``dims``),
    ``arch_options`` (its ``base`` and ``depth``), ``in_channels``, ``classes`` (one name per
    output channel, background first as in the labels), ``normalize: zscore`` (train's tiles
    are normalized by the raw volume's mean and standard deviation, as a run's ``zscore``
    normalizes each volume) and ``edge: none`` (the tiles met their edges with the
    convolutions' zero padding); the halo and size multiple follow from the architecture.
    ``voxel_size`` (nm, z y x) is that of the training data — by default the ``dataset``'s raw
    volumes' where they share one in a length unit — so that runs on other voxels warn.
    ``options`` adds or overrides other sidecar keys (``block``, ``edge``, ``voxel_size``);
    ``comment`` is written as ``#`` lines at the top. Returns the description as a run reads
    it. An existing model at ``path`` is replaced; a description that would not load is
    refused (:class:`~napari_emparsl.core.models.spec.ModelError`) before anything is written.
    """
    if not isinstance(model, UNet):
        raise ModelError(
            f"save_model writes the package's UNet (a state dict and its architecture), not a "
            f"{type(model).__name__}; save other networks with torch.jit.save(torch.jit.script("
            "model), path) and describe them in a sidecar path.yaml."
        )
    path = user_path(path)  # ~/models/mine.pt, as --model and Volume.open take it
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ModelError(f"{path} is a folder; give the model's file name, e.g. {path}/mine.pt.")
    if os.path.isdir(path + ".yaml"):  # found only after the weights were replaced
        raise ModelError(
            f"{path}.yaml, where the model's description goes, is a folder; remove it or save "
            "the model under another name."
        )
    if not os.path.isdir(folder):
        raise ModelError(
            f"The folder {folder} does not exist; create it, or save the model elsewhere."
        )
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    outputs = int(model.head.out_channels)
    if len(classes) != outputs:
        raise ModelError(
            f"The model outputs {outputs} classes but {len(classes)} class names were given "
            f"({', '.join(map(str, classes))}); give one name per class, background first."
        )
    fixed = sorted(set(options or {}) & set(_FIXED_KEYS))
    if fixed:
        raise ModelError(
            f"The option(s) {', '.join(fixed)} are fixed by the network and by how train() "
            "trained it; save_model writes them itself."
        )
    if voxel_size is None and dataset is not None:
        voxel_size = _voxel_size_nm(dataset)
    sidecar: dict[str, Any] = {
        "kind": "labels",
        "in_channels": _unet_in_channels(model),
        "classes": [str(c) for c in classes],
        "normalize": "zscore",
        "edge": "none",
        "architecture": "unet3d" if model.dims == 3 else "unet2d",
        "arch_options": {"base": int(model.head.in_channels), "depth": int(model.depth)},
    }
    if voxel_size is not None:
        sidecar["voxel_size"] = [float(v) for v in voxel_size]
    options_keys = set(options or {})
    sidecar |= dict(options or {})
    spec = ModelSpec.from_mapping(sidecar, "the options given to save_model")
    pooled = 2 ** int(model.depth)  # each pooling halves the sizes: z too for a 3D U-Net
    needs = (pooled if model.dims == 3 else 1, pooled, pooled)
    if any(m % n for m, n in zip(spec.multiple, needs, strict=True)):
        raise ModelError(
            f"The size multiple {','.join(map(str, spec.multiple))} does not suit the U-Net of "
            f"depth {model.depth}, which takes sizes that are multiples of "
            f"{','.join(map(str, needs))}; leave multiple out (save_model writes that one) or "
            "give a multiple of it."
        )
    given = spec.to_dict()  # the options as the description reads them: plain numbers, lists
    sidecar = {k: given.get(k, v) if k in options_keys else v for k, v in sidecar.items()}
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += yaml.safe_dump(sidecar, sort_keys=False, allow_unicode=True)  # before any file:
    # a value YAML cannot write (a numpy number) wiped the description, the weights written
    parts = [path + ".part", path + ".yaml.part"]
    try:
        for name, write in ((parts[0], lambda f: torch.save(model.state_dict(), f)),
                            (parts[1], lambda f: f.write(text.encode("utf-8")))):  # fmt: skip
            with open(name, "wb") as f:
                write(f)
        os.replace(parts[0], path)  # each whole, or the one before kept
        os.replace(parts[1], path + ".yaml")
    except OSError as err:
        for part in parts:  # nothing half-written left beside the model
            if os.path.exists(part):
                os.remove(part)
        raise ModelError(
            f"The model could not be written to {path} ({err.strerror or err}); check the "
            "folder's free space and permissions, or save it elsewhere."
        ) from None
    return spec
