"""Training on N5: a torch Dataset of random tiles read lazily from N5, and a small trainer.

Used to make the built-in model (``scripts/train_unet.py``); works for any raw/labels pair.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_emparsl.core.volume import Volume, volume_stats

__all__ = ["N5TileDataset", "dice_scores", "volume_stats"]


class N5TileDataset(Dataset):
    """Random (raw, labels) tiles from one or more N5 volume pairs; reads only the tiles.

    Each item is ``(x, y)``: float32 ``(1, *tile)`` normalized by the volume's global mean/std,
    int64 ``tile`` class ids. Random flips and axis-aligned rotations in y/x augment.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Volume, Volume]],
        tile: Sequence[int],
        *,
        length: int = 1000,
        seed: int = 0,
        augment: bool = True,
    ):
        self.pairs = list(pairs)
        self.tile = tuple(int(t) for t in tile)
        self.length = length
        self.seed = seed
        self.augment = augment
        self.stats = [volume_stats(raw) for raw, _ in self.pairs]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        k = int(rng.integers(len(self.pairs)))
        raw, labels = self.pairs[k]
        begin = [int(rng.integers(0, n - t + 1)) for n, t in zip(raw.shape, self.tile, strict=True)]
        region = tuple(slice(b, b + t) for b, t in zip(begin, self.tile, strict=True))
        mean, std = self.stats[k]
        x = (raw.read(region).astype(np.float32) - mean) / std
        y = labels.read(region).astype(np.int64)
        if self.augment:
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            if rng.random() < 0.5 and x.shape[1] == x.shape[2]:
                x, y = np.swapaxes(x, 1, 2), np.swapaxes(y, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(x)[None]), torch.from_numpy(
            np.ascontiguousarray(y)
        )


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
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    model.train()
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0 or step == steps:
                log(
                    f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s"
                )
            if step >= steps:
                break
    model.eval()
