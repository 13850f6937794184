"""napari sample data: the synthetic EM volume with its ground truth."""

from __future__ import annotations

from typing import Any

from napari_emparsl.core.sample import make_sample


def make_sample_data(seed: int = 0) -> list[tuple[Any, dict[str, Any], str]]:
    """Raw EM, class labels (background, membrane, mitochondria) and cell instances."""
    sample = make_sample(seed=seed)
    scale = tuple(sample.voxel_size)
    units = ("nm",) * 3
    return [
        (sample.raw, {"name": "sample raw", "scale": scale, "units": units}, "image"),
        (
            sample.classes,
            {
                "name": "sample classes",
                "scale": scale,
                "units": units,
                "opacity": 0.5,
                "features": {"class": list(sample.class_names)},
            },
            "labels",
        ),
        (
            sample.cells,
            {"name": "sample cells", "scale": scale, "units": units, "visible": False},
            "labels",
        ),
    ]
