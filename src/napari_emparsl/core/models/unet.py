"""A small 3D (or 2D) U-Net: the built-in architecture for voxel classification.

'same' convolutions, max-pooling by 2, nearest upsampling; ``depth`` poolings make the input
size multiple 2**depth. The receptive-field radius (context needed per side for seamless
tiling) is returned by :func:`receptive_radius`.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_emparsl.core.models.spec import receptive_radius

__all__ = ["UNet", "receptive_radius"]


class _Conv(nn.Sequential):
    def __init__(self, dims: int, c_in: int, c_out: int):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        # no normalization layers that look at the whole input: tiling must stay exact
        super().__init__(
            conv(c_in, c_out, 3, padding=1),
            nn.ReLU(inplace=True),
            conv(c_out, c_out, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with ``depth`` levels below the top and ``base`` channels at the top."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        *,
        base: int = 12,
        depth: int = 2,
        dims: int = 3,
    ):
        super().__init__()
        self.dims, self.depth = dims, depth
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for ch in chans[:-1]:
            self.down.append(_Conv(dims, c, ch))
            c = ch
        self.pool = pool(2)
        self.bottom = _Conv(dims, chans[-2], chans[-1])
        self.up = nn.ModuleList(
            _Conv(dims, chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))
        )
        self.head = conv(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for i, block in enumerate(self.up):  # TorchScript-friendly: no zip/reversed
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(torch.cat([x, skips[len(skips) - 1 - i]], dim=1))
        return self.head(x)
