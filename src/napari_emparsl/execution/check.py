"""Check a bioimage.io model here: its test input through the same engine as any run (an N5
volume, blocks, the threads site), against the output its authors published."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.events import BlockFailed
from napari_emparsl.core.models.bioimageio import find_package, test_tensors
from napari_emparsl.core.models.loaders import describe_model, resolve_model
from napari_emparsl.core.models.spec import ModelError

__all__ = ["ModelCheck", "check_model"]

ATOL, RTOL = 1e-4, 1e-3  # images: |a - b| <= ATOL + RTOL * |b| (bioimage.io's own test)
LABELS_MISMATCH = 1e-4  # labels: float ties at a threshold may flip this fraction


@dataclass(frozen=True)
class ModelCheck:
    ok: bool
    voxels: int
    max_difference: float  # images; labels: the fraction of voxels that differ
    kind: str
    seconds: float

    def sentence(self) -> str:
        if self.kind == "labels":
            return (
                f"{'Reproduces' if self.ok else 'Does not reproduce'} the package's test output: "
                f"{round(self.max_difference * self.voxels):,} of {self.voxels:,} voxels differ "
                f"(allowed: a fraction of {LABELS_MISMATCH:g}), in {self.seconds:.1f} s."
            )
        return (
            f"{'Reproduces' if self.ok else 'Does not reproduce'} the package's test output: "
            f"largest difference {self.max_difference:.2g} over {self.voxels:,} values (allowed "
            f"{ATOL:g} + {RTOL:g}×|value|), in {self.seconds:.1f} s."
        )


def _as_volume(x: np.ndarray, dims: int) -> np.ndarray:
    """(1, C, [z,] y, x) -> (C, z, y, x), or (z, y, x) for one channel."""
    if x.ndim != dims + 2 or x.shape[0] != 1:
        raise ModelError(
            f"The package's test tensor is {x.shape}, not one batch item of {dims} spatial axes "
            "with channels."
        )
    v = x[0] if dims == 3 else x[0][:, None]
    return v[0] if v.shape[0] == 1 else v


def check_model(model: str, options: Mapping[str, Any] | None = None) -> ModelCheck:
    """Run a bioimage.io package on its test input, block by block, and compare."""
    import time

    import napari_emparsl
    from napari_emparsl.core.models.loaders import BUILTIN_MODELS
    from napari_emparsl.core.paths import user_path
    from napari_emparsl.core.volume import Volume, save_array

    if model not in BUILTIN_MODELS and not os.path.exists(user_path(model)):
        raise ModelError(  # (not "give a built-in name": a built-in model is no package)
            f"The model {user_path(model) or model!r} does not exist; give a bioimage.io package "
            "(a folder or .zip holding rdf.yaml)."
        )
    path = resolve_model(model)
    package = find_package(path)
    if package is None:
        made = (
            f" (`emparsl export-model {model} {model}.zip` makes one of it)"
            if model in BUILTIN_MODELS
            else ""
        )
        raise ModelError(
            f"{model} is not a bioimage.io package; only packages carry a test input and output "
            f"to check a model with{made}."
        )
    spec = describe_model(model, options)
    x, expected = test_tensors(package)
    volume = _as_volume(np.asarray(x, np.float32), spec.spatial_dims)
    given = dict(options or {})
    if spec.normalize in ("zscore", "percentile") and "normalize" not in given:
        # the statistics of the whole test input, as the package computes them: a run's come
        # from a sample of the volume's chunks (at most 2 million voxels, unwritten all-zero
        # chunks left out), which on a test input of 4 million voxels, or of mostly zeros,
        # made a package that reproduces its output fail the check
        from napari_emparsl.core.models.export import norm_values

        sub, div = norm_values(volume, spec)
        given |= {"normalize": "fixed", "norm_values": [sub, div]}
    want = np.asarray(expected)
    with tempfile.TemporaryDirectory(prefix="emparsl-check-") as tmp:
        src = os.path.join(tmp, "test.n5")
        save_array(src, "input", volume, chunks=(64,) * volume.ndim)
        errors: list[str] = []

        def note(event: Any) -> None:
            if isinstance(event, BlockFailed) and event.final:
                errors.append(event.error)

        t0 = time.perf_counter()
        done = napari_emparsl.run(
            f"{src}:input",
            model,
            f"{src}:output",
            site="threads",
            # a package's test output is the model's own forward over the whole test input:
            # at its edges the model pads as it does, not with mirrored context (the `reflect`
            # an exported package keeps for emparsl's runs of big volumes) — unless asked
            model_options={"edge": "none", **given},
            callback=note,
        )
        seconds = time.perf_counter() - t0
        if not getattr(done, "ok", False):
            why = errors[0].rstrip(".") if errors else "it was stopped"
            raise UserError(f"The model failed on its test input ({why}).")
        got = Volume.open(src, "output").read()
    if want.ndim == spec.spatial_dims + 2 and want.shape[0] == 1:
        want = want[0]  # (C, [z,] y, x)
        want = want[:, None] if spec.spatial_dims == 2 else want
        want = want[0] if want.shape[0] == 1 else want
    if want.shape != got.shape and not (
        spec.kind == "labels" and want.ndim == got.ndim + 1 and want.shape[1:] == got.shape
    ):
        raise ModelError(
            f"The model's output on its test input is {got.shape} voxels but the package's test "
            f"output is {want.shape}; check the description's scale and halo."
        )
    if spec.kind == "labels":
        if want.ndim == got.ndim + 1:  # class probabilities (an exported labels model)
            want = np.argmax(want, axis=0)
        differ = float(np.mean(got != np.rint(want).astype(got.dtype)))
        return ModelCheck(differ <= LABELS_MISMATCH, got.size, differ, "labels", seconds)
    if spec.out_dtype == "uint8":  # written as 0..255: the test output mapped alike, ±1
        lo, hi = spec.out_range
        want = np.clip(np.rint((want - lo) * (255 / (hi - lo))), 0, 255)
        diff = np.abs(got.astype(np.float64) - want)
        return ModelCheck(bool(np.all(diff <= 1)), got.size, float(diff.max()), "image", seconds)
    diff = np.abs(got.astype(np.float64) - want)
    ok = bool(np.all(diff <= ATOL + RTOL * np.abs(want)))
    return ModelCheck(ok, got.size, float(diff.max()), "image", seconds)
