"""Write a model as a bioimage.io package (format 0.5), to share it through the BioImage Model
Zoo or run it in other tools (ilastik, deepImageJ, bioimageio.core): TorchScript weights, the
description, a test input and the output the model gives for it.

What bioimage.io cannot say is kept for emparsl under ``config: emparsl:`` (the description's
free field): labels with their class names (a labels model's package outputs class
probabilities, by softmax, or 0/1 masks, by binarize), its block, edge and output data type. So
``emparsl`` runs an exported package exactly as the model it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from napari_emparsl.core.blockwise import normalized
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.models.bioimageio import one_line
from napari_emparsl.core.models.loaders import describe_model, load_model
from napari_emparsl.core.models.spec import ModelError, ModelSpec
from napari_emparsl.core.volume import Volume

__all__ = ["Exported", "export_package"]

#: ModelSpec keys kept under config.emparsl (bioimage.io has no word for them)
_CONFIG_KEYS = (
    "kind", "classes", "colors", "threshold", "block", "edge", "out_dtype", "out_range", "min_size",
    "multiple", "fixed", "voxel_size",
)  # fmt: skip


@dataclass(frozen=True)
class Exported:
    path: str
    bytes: int
    test_shape: tuple[int, ...]
    #: the test input given, where it was mirrored along an axis to the size the model takes
    #: (25 sections of anisotropic EM, the built-in U-Net taking 52): its shape; else ()
    mirrored_from: tuple[int, ...] = ()


def _test_input(spec: ModelSpec, volume: np.ndarray | Volume | None) -> np.ndarray:
    """(C, z, y, x) float32: ``volume`` (its start, at most 128 voxels an axis in 3D, 512 in
    2D, cut to a size the model takes), or a synthetic sample a little larger than the halo.
    A :class:`Volume` is read only as far as that start (it read whole: a TB volume)."""
    cap = (128, 128, 128) if spec.spatial_dims == 3 else (1, 512, 512)
    if isinstance(volume, Volume):
        start = tuple(slice(0, max(cap[i], _least_input(spec, i))) for i in range(3))
        volume = volume.read(((slice(None),) if "c" in volume.axes else ()) + start)
    if volume is None:
        from napari_emparsl.core.sample import make_sample

        if spec.in_channels != 1:
            raise ModelError(
                f"The model takes {spec.in_channels} channels; give a test input with as many "
                "(--test-input)."
            )
        ctx = [max(32, 2 * h + 16) for h in spec.halo]
        size = spec.input_size([1, *ctx[1:]] if spec.spatial_dims == 2 else ctx)
        raw = make_sample(tuple(max(s, 16) for s in size), seed=7).raw  # type: ignore[arg-type]
        volume = raw[tuple(slice(0, s) for s in size)]
    volume = np.asarray(volume)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.shape[0] != spec.in_channels:
        raise ModelError(
            f"The test input has {volume.shape[0]} channel(s) but the model takes "
            f"{spec.in_channels}."
        )
    # along an axis shorter than the model takes (at least the input size the description
    # declares: its output must outgrow the halo), mirrored to that size: a test tensor, as a
    # run mirrors the volume at its edges (anisotropic EM has few sections)
    short = [max(0, _least_input(spec, i) - n) for i, n in enumerate(volume.shape[1:])]
    if any(short):
        volume = np.pad(volume, [(0, 0), *((0, s) for s in short)], mode="symmetric")
    fit = []
    for i, n in enumerate(volume.shape[1:]):
        low = _least_input(spec, i)
        m = min(n, max(cap[i], low))
        size = spec.input_size_axis(i, m)
        size = size if size <= m else size - spec.multiple[i]
        fit.append(max(size, low))
    return volume[(slice(None), *(slice(0, s) for s in fit))].astype(np.float32)


def _least_input(spec: ModelSpec, axis: int) -> int:
    """The smallest input the package declares along ``axis`` (bioimage.io: an output must be
    larger than its halo on both sides); its test input is at least that."""
    return spec.input_size_axis(axis, 2 * spec.halo[axis] + 1)


def _normalized(x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """As the engine normalizes a volume — here the test input is the whole volume."""
    return normalized(x, *norm_values(x, spec))


def norm_values(x: np.ndarray, spec: ModelSpec) -> tuple[float, float]:
    """What a package normalizes the whole array ``x`` by (subtract, divide), as bioimage.io
    computes it over a sample: all its values, not the engine's sample of a volume's chunks."""
    if spec.normalize == "zscore":
        sub, div = float(x.mean()), float(x.std() or 1.0) + spec.norm_eps
    elif spec.normalize == "percentile":
        lo, hi = np.percentile(x, list(spec.percentiles))
        span = float(hi - lo)
        sub, div = float(lo), span + spec.norm_eps if spec.norm_eps else max(span, 1e-6)
    elif spec.normalize == "fixed":
        sub, div = spec.norm_values
    else:
        sub, div = 0.0, 1.0
    return float(sub), float(div)


def _preprocessing(spec: ModelSpec, names: list[str]) -> list[dict[str, Any]]:
    # bioimage.io's `axes` are those reduced over: the channel axis with the space axes is one
    # mean and std (or pair of percentiles) over all channels of the sample, as emparsl
    # normalizes a volume (without it, each channel would be normalized on its own)
    axes = ["channel", *names]
    eps = {"eps": spec.norm_eps} if spec.norm_eps else {}  # (else the spec's own, 1e-6)
    if spec.normalize == "zscore":
        return [{"id": "zero_mean_unit_variance", "kwargs": {"axes": axes, **eps}}]
    if spec.normalize == "percentile":
        lo, hi = spec.percentiles
        return [
            {
                "id": "scale_range",
                "kwargs": {"axes": axes, "min_percentile": lo, "max_percentile": hi, **eps},
            }
        ]
    if spec.normalize == "fixed":
        mean, std = spec.norm_values
        if std < 1e-6:  # inverted contrast (a negative divisor): the spec's std is ≥ 1e-6
            gain = 1.0 / std
            return [{"id": "scale_linear", "kwargs": {"gain": gain, "offset": -mean * gain}}]
        return [{"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": mean, "std": std}}]
    return []


def _identifiers(names: Sequence[str]) -> list[str]:
    """Class names as bioimage.io's channel names must be (Python identifiers, no keywords:
    "cell wall" -> cell_wall, "None" -> None_, "2nd" -> _2nd), each once; the names as given
    stay in the package's config (emparsl reads them from there)."""
    import keyword

    out: list[str] = []
    for name in names:
        ident = re.sub(r"\W", "_", str(name)) or "_"
        if ident[0].isdigit():
            ident = f"_{ident}"
        if keyword.iskeyword(ident) or ident in ("None", "True", "False"):
            ident += "_"
        while ident in out:
            ident += "_"
        out.append(ident)
    return out


def _postprocessing(spec: ModelSpec) -> tuple[str, list[dict[str, Any]]]:
    """The activation the package's output applies, and its post-processing steps."""
    if spec.kind == "labels" and spec.n_outputs > 1:
        return "softmax", [{"id": "softmax", "kwargs": {"axis": "channel"}}]
    steps = [{"id": spec.activation}] if spec.activation != "none" else []
    if spec.kind == "labels":  # one channel, thresholded
        steps.append({"id": "binarize", "kwargs": {"threshold": spec.threshold}})
    return spec.activation, steps


def export_package(
    model: str,
    output: str,
    options: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    authors: Sequence[str] = ("emparsl user",),
    description: str = "",
    test_input: np.ndarray | Volume | None = None,
    overwrite: bool = False,
) -> Exported:
    """Write ``model`` (a built-in name, a model file or a package, with ``options``) as the
    bioimage.io package ``output`` (a ``.zip``)."""
    import torch

    from napari_emparsl import __version__
    from napari_emparsl.core.blockwise import run_model_on_array

    if not output.lower().endswith(".zip"):
        raise UserError(f"A bioimage.io package is a .zip file; name it {output}.zip.")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"{output} exists; choose another name or pass --overwrite.")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):  # said before the model is run (it named the .part file)
        raise UserError(f"The folder {os.path.dirname(output)} does not exist; create it first.")
    spec = describe_model(model, options)
    if spec.norm_eps > 0.1 and spec.normalize in ("zscore", "percentile"):
        raise ModelError(  # (bioimage.io: 0 < eps <= 0.1)
            f"A bioimage.io package's eps is at most 0.1, and the model's norm_eps is "
            f"{spec.norm_eps:g}; export it with a norm_eps of at most 0.1 (--model-option "
            "norm_eps=0.1)."
        )
    loaded = load_model(model, options)
    module = loaded.module
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            module = torch.jit.script(module)
        except Exception as err:
            raise ModelError(
                f"The model cannot be written as TorchScript ({one_line(err)})."
            ) from None
    x = _test_input(spec, test_input)
    activation, post = _postprocessing(spec)
    try:
        y = run_model_on_array(
            module, dataclasses.replace(spec, activation=activation), _normalized(x, spec)
        )
    except UserError:
        raise
    except Exception as err:  # the model's own failure (its description does not fit it): said
        # as check-model says it, not as an internal error
        raise ModelError(f"The model failed on its test input ({one_line(err, 300)}).") from None
    if spec.kind == "labels" and spec.n_outputs == 1:
        y = (y > spec.threshold).astype(np.float32)
    dims = spec.spatial_dims
    names = ["z", "y", "x"][3 - dims :]
    lead = 3 - dims  # 2D: the z axis of the engine's arrays is not the model's
    x_t, y_t = x[None], y[None]
    if dims == 2:
        x_t, y_t = x_t[:, :, 0], y_t[:, :, 0]
    unit: dict[str, Any] = {}
    in_axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {"type": "channel", "channel_names": [f"raw{i}" for i in range(spec.in_channels)]},
    ]
    out_axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {
            "type": "channel",
            "channel_names": _identifiers(spec.classes)
            or [f"out{i}" for i in range(spec.n_outputs)],
        },
    ]
    for i, axis in enumerate(names, start=lead):
        if spec.voxel_size is not None:
            unit = {"unit": "nanometer", "scale": float(spec.voxel_size[i])}
        low = _least_input(spec, i)
        size = spec.fixed[i] or {"min": low, "step": spec.multiple[i]}  # one size, or min + k·step
        in_axes.append({"type": "space", "id": axis, "size": size, **unit})
        out_unit = dict(unit)
        if spec.scale[i] != 1:
            out_unit = {**unit, "scale": float(unit.get("scale", 1.0)) / spec.scale[i]}
        out_axes.append(
            {
                "type": "space",
                "id": axis,
                "size": {"tensor_id": "raw", "axis_id": axis},
                "halo": spec.halo[i] * spec.scale[i],
                **out_unit,
            }
        )
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    weights = buffer.getvalue()
    config = {k: v for k, v in spec.to_dict().items() if k in _CONFIG_KEYS}
    # bioimage.io names: 5–128 characters, letters, digits, spaces and - _ . ( )
    title = " ".join(
        re.sub(r"[^A-Za-z0-9 _.()-]+", " ", name or os.path.basename(output)[:-4]).split()
    )
    title = (title if len(title) >= 5 else f"emparsl {title}".strip())[:128]
    rdf: dict[str, Any] = {
        "format_version": "0.5.4",
        "type": "model",
        "name": title,
        "description": description or f"{title}, exported by emparsl {__version__}.",
        "authors": [{"name": a} for a in authors],
        # the model zoo asks for a citation: name the model's paper or data before sharing it
        "cite": [
            {
                "text": "Exported by napari-emparsl; cite the model's own work here.",
                "url": "https://bioimage.io",
            }
        ],
        "license": "CC-BY-4.0",
        "documentation": "README.md",
        "tags": ["electron-microscopy", "3d" if dims == 3 else "2d", "emparsl"],
        "inputs": [
            {
                "id": "raw",
                "axes": in_axes,
                "test_tensor": {"source": "test_input.npy", "sha256": ""},
                "preprocessing": _preprocessing(spec, names),
            }
        ],
        "outputs": [
            {
                "id": "prediction",
                "axes": out_axes,
                "test_tensor": {"source": "test_output.npy", "sha256": ""},
                "postprocessing": post,
            }
        ],
        "weights": {
            "torchscript": {
                "source": "weights.pt",
                "sha256": hashlib.sha256(weights).hexdigest(),
                "pytorch_version": torch.__version__.split("+")[0],
            }
        },
        "config": {"emparsl": config},
    }
    files = {"weights.pt": weights}
    for key, side, array in (
        ("inputs", "test_input.npy", x_t),
        ("outputs", "test_output.npy", y_t),
    ):
        data = io.BytesIO()
        np.save(data, np.ascontiguousarray(array, dtype=np.float32))
        files[side] = data.getvalue()
        rdf[key][0]["test_tensor"]["sha256"] = hashlib.sha256(files[side]).hexdigest()
    files["README.md"] = (
        f"# {title}\n\n{rdf['description']}\n\n"
        + ("Classes: " + ", ".join(spec.classes) + ".\n\n" if spec.classes else "")
        + f"Halo {list(spec.halo)} voxels (z, y, x); normalization: {spec.normalize}.\n\n"
        + "# Validation\n\n`emparsl check-model` runs the test input through emparsl's blockwise "
        "engine and compares the result with the test output.\n"
    ).encode()
    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()
    tmp = f"{output}.part"  # a package appears whole, or not at all
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for file, data in files.items():
                zf.writestr(file, data)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    shape = test_input.shape if isinstance(test_input, Volume) else np.shape(test_input)
    given = tuple(shape[-3:]) if test_input is not None else ()
    mirrored = any(n < _least_input(spec, i) for i, n in enumerate(given))
    return Exported(output, os.path.getsize(output), tuple(x_t.shape), given if mirrored else ())
