"""ModelSpec: what a model declares so the tiler can run it (see the sidecar format below).

```yaml
# unet.pt.yaml, beside unet.pt
kind: labels                  # labels | image
in_channels: 1
classes: [background, membrane, mitochondria]   # labels: one logit channel per class -> argmax
colors: [transparent, cyan, magenta]  # optional, labels: a colour per class for napari
                              # (#rrggbb, #rrggbbaa, [r, g, b] from 0 to 1, or a name)
# out_channels: 1             # image models
spatial_dims: 3               # 2 = applied slice by slice on 3D volumes
halo: [16, 16, 16]            # z, y, x voxels of context per side
multiple: [4, 4, 4]           # the model's input size must be a multiple of this
normalize: none               # none | zscore | percentile | fixed
percentiles: [1, 99.8]        # percentile: the volume's values mapped to 0 and 1
norm_values: [0, 1]           # fixed: subtract, then divide by (e.g. a training set's mean, std)
norm_eps: 0                   # zscore / percentile: added to the divisor (std + eps, or
                              # high - low + eps), as a bioimage.io package's eps
activation: none              # applied to the model's output: none | sigmoid | softmax
min_size: [1, 1, 1]           # the smallest input the model takes (z, y, x); inputs are
                              # multiples of `multiple` of at least this (or min_size + k ×
                              # multiple where it is larger and not a multiple of it)
fixed: [0, 0, 0]              # the one input size the model takes per axis (0: any, as above);
                              # blocks there are this size less twice the halo
scale: [1, 1, 1]              # output voxels per input voxel, per axis
out_dtype: float32            # image models: float32 | uint8 (out_range mapped to 0..255)
out_range: [0, 1]             # uint8 images: the output values written as 0 and as 255
block: [64, 128, 128]         # preferred block (write ROI) size
edge: reflect                 # context beyond the volume edge: reflect (mirror the data) | none
                              # (the model's own padding, as in a whole-volume forward; cheaper)
voxel_size: [8, 8, 8]         # z, y, x nm of the data it was trained on (optional: runs on
                              # volumes whose voxels differ by over 1.5× warn)
architecture: unet3d          # only for state-dict files: a built-in architecture
arch_options: {}              # its constructor arguments
```

With a built-in ``architecture`` (unet3d / unet2d), what the network itself fixes need not be
written: ``multiple`` defaults to 2**depth, ``halo`` to the network's whole context (exact
tiling), ``spatial_dims`` to the architecture's.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import size_text, size_values
from napari_emparsl.core.units import nm_per_unit

__all__ = ["ModelError", "ModelSpec", "parse_options", "read_sidecar", "resolution_mismatch"]

KINDS = ("labels", "image")
NORMALIZATIONS = ("none", "zscore", "percentile", "fixed")
ACTIVATIONS = ("none", "sigmoid", "softmax")
EDGES = ("reflect", "none")
OUT_DTYPES = ("float32", "uint8")  # of image models (labels: by class count)
# a volume's voxels may differ from the model's training data by this factor per axis unwarned
RESOLUTION_TOLERANCE = 1.5


class ModelError(UserError, ValueError):
    """A problem with a model file or its description, in one sentence."""


def receptive_radius(depth: int) -> int:
    """Context (voxels per side) a U-Net of two 3×3 convs per level needs for exact tiling.

    Each level l adds 2 convs of radius 2**l on the way down and up; the bottom adds 2 at 2**depth;
    pooling/upsampling add up to 2**l - 1 of grid offset, covered by aligning blocks to 2**depth.
    """
    down_up = sum(2 * 2 * 2**lvl for lvl in range(depth))
    return down_up + 2 * 2**depth + 2**depth


UNET_DEFAULT_DEPTH = 2  # core.models.unet.UNet's


#: the default block of a 2D model (one slice), where its description gives none
BLOCK_2D = (1, 512, 512)


def _architecture_defaults(kwargs: dict[str, Any], given: set[str]) -> tuple[str, ...]:
    """Fill what a built-in U-Net fixes (spatial dims, size multiple, exact halo) into
    ``kwargs`` where the description does not say it; the keys filled in."""
    arch = kwargs.get("architecture")
    if arch not in ("unet3d", "unet2d"):
        return ()
    depth = (kwargs.get("arch_options") or {}).get("depth", UNET_DEFAULT_DEPTH)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 10:
        return ()  # refused, with a sentence, when the network is built
    dims = 3 if arch == "unet3d" else 2
    m = 2**depth
    halo = -(-receptive_radius(depth) // m) * m  # on the pooling grid: tiles stay aligned
    derived = {
        "spatial_dims": dims,
        "multiple": (m, m, m) if dims == 3 else (1, m, m),
        "halo": (halo, halo, halo) if dims == 3 else (0, halo, halo),
    }
    filled = tuple(k for k in derived if k not in given)
    for k in filled:
        kwargs[k] = derived[k]
    return filled


def _triple(value: Any, name: str, minimum: int) -> tuple[int, int, int]:
    given = value  # as the user wrote it, for the message
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3

    def whole(v: Any) -> int:  # int() alone made a halo of 20.9 a halo of 20, silently
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(v)
        return int(v)

    try:
        out = tuple(whole(v) for v in (size_values(value) if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ModelError(
            f"The model option '{name}' must be three integers z,y,x, not {given!r}."
        ) from None
    if len(out) != 3 or any(v < minimum for v in out):
        raise ModelError(
            f"The model option '{name}' must be three integers z,y,x of at least {minimum}, not {given!r}."
        )
    return out  # type: ignore[return-value]


def _voxel_size(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        out = tuple(
            float(v) for v in (size_values(value, float) if isinstance(value, str) else value)
        )
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise ModelError(
            "The model option 'voxel_size' must be three positive numbers z,y,x in nm (the "
            f"voxel size of the data the model was trained on), not {value!r}."
        )
    return out  # type: ignore[return-value]


#: colour names a description may use (besides #rrggbb, #rrggbbaa and [r, g, b(, a)])
COLOR_NAMES = {
    "transparent": "#00000000", "none": "#00000000", "black": "#000000ff",
    "white": "#ffffffff", "gray": "#808080ff", "grey": "#808080ff", "red": "#ff0000ff",
    "green": "#00ff00ff", "blue": "#0000ffff", "yellow": "#ffff00ff", "cyan": "#00ffffff",
    "magenta": "#ff00ffff", "orange": "#ffa500ff", "purple": "#800080ff", "pink": "#ffc0cbff",
    "brown": "#a52a2aff", "gold": "#ffd700ff", "lime": "#32cd32ff", "teal": "#008080ff",
    "navy": "#000080ff", "olive": "#808000ff", "maroon": "#800000ff", "violet": "#ee82eeff",
}  # fmt: skip


def _color(value: Any) -> str:
    """One class colour as ``#rrggbbaa`` (lower case), from a name, ``#rgb``, ``#rrggbb``,
    ``#rrggbbaa`` or 3 or 4 numbers from 0 to 1; None where it is none of these."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in COLOR_NAMES:
            return COLOR_NAMES[text]
        if re.fullmatch(r"#[0-9a-f]{3}", text):
            return "#" + "".join(c * 2 for c in text[1:]) + "ff"
        if re.fullmatch(r"#[0-9a-f]{6}", text):
            return text + "ff"
        if re.fullmatch(r"#[0-9a-f]{8}", text):
            return text
        return None
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        try:
            rgba = [float(v) for v in value] + [1.0] * (4 - len(value))
        except (TypeError, ValueError):
            return None
        if all(0 <= v <= 1 for v in rgba):
            return "#" + "".join(f"{round(v * 255):02x}" for v in rgba)
    return None


def _rgb_text(text: str) -> Any:
    """``"[1, 0.5, 0]"`` as three numbers (a colour typed in model options); else the text."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return [float(v) for v in text[1:-1].split(",")]
        except ValueError:
            pass
    return text


def _colors(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # as typed: "transparent,#00e5ff,[1, 0.5, 0]", or in brackets
        text = value.strip()
        if text.startswith("[") and text.endswith("]") and _rgb_text(text) == text:
            text = text[1:-1]  # "[transparent, #00e5ff, magenta]": the list, not one colour
        value = [_rgb_text(v) for v in re.split(r",(?![^\[]*\])", text) if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        color = _color(v)
        if color is None:
            raise ModelError(
                f"The model option 'colors' gives {v!r}, which is no colour; give one per class "
                "as #rrggbb (e.g. #00e5ff), #rrggbbaa, [r, g, b] from 0 to 1, or a name ("
                + ", ".join(COLOR_NAMES)
                + ")."
            )
        out.append(color)
    return tuple(out)


_PAIRS = {
    "out_range": "two numbers low,high (the model's output values written as 0 and 255)",
    "percentiles": "two percentiles low,high (the volume's values mapped to 0 and 1)",
    "norm_values": "two numbers subtract,divide (e.g. a training set's mean and standard deviation)",
}


def _pair(value: Any, name: str = "out_range") -> tuple[float, float]:
    try:
        lo, hi = (
            float(v) for v in (size_values(value, float) if isinstance(value, str) else value)
        )
    except (TypeError, ValueError):
        raise ModelError(
            f"The model option '{name}' must be {_PAIRS[name]}, not {value!r}."
        ) from None
    return lo, hi


def fit_size(n: int, low: int, step: int) -> int:
    """The smallest input size of at least ``n`` that a model takes: a multiple of ``step`` of
    at least ``low`` — or, where ``low`` is larger than ``step`` and not a multiple of it (a
    bioimage.io size ``min + k·step``), ``low + k × step``."""
    if low <= step or low % step == 0:
        return -(-max(n, low) // step) * step
    return low + -(-max(0, n - low) // step) * step


@dataclass(frozen=True)
class ModelSpec:
    """What the tiler needs to know about a model."""

    kind: str = "labels"
    in_channels: int = 1
    classes: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()  # labels: a colour per class (#rrggbbaa), for napari
    out_channels: int = 1
    spatial_dims: int = 3
    halo: tuple[int, int, int] = (0, 0, 0)
    multiple: tuple[int, int, int] = (1, 1, 1)
    normalize: str = "none"
    percentiles: tuple[float, float] = (1.0, 99.8)  # normalize: percentile
    norm_values: tuple[float, float] = (0.0, 1.0)  # normalize: fixed (subtract, divide)
    norm_eps: float = 0.0  # zscore / percentile: added to the divisor (a package's eps)
    activation: str = "none"  # applied to the network's output (bioimage.io postprocessing)
    min_size: tuple[int, int, int] = (1, 1, 1)  # smallest input size per axis
    # the one input size the model takes per axis (a bioimage.io fixed size); 0: any size
    fixed: tuple[int, int, int] = (0, 0, 0)
    scale: tuple[int, int, int] = (1, 1, 1)
    block: tuple[int, int, int] = (64, 64, 64)
    threshold: float = 0.5
    edge: str = "reflect"
    voxel_size: tuple[float, float, float] | None = None  # nm, z y x, of its training data
    out_dtype: str = "float32"  # image models: float32, or uint8 (out_range mapped to 0..255)
    out_range: tuple[float, float] = (0.0, 1.0)
    architecture: str | None = None
    arch_options: dict[str, Any] = field(default_factory=dict)
    # keys filled in from the architecture (not part of the description: options may change
    # what they derive from)
    derived: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(
                f"The model kind must be one of {', '.join(KINDS)}, not {self.kind!r}."
            )
        if self.normalize not in NORMALIZATIONS:
            raise ModelError(
                f"The model option 'normalize' must be one of {', '.join(NORMALIZATIONS)}, not {self.normalize!r}."
            )
        if self.activation not in ACTIVATIONS:
            raise ModelError(
                f"The model option 'activation' must be one of {', '.join(ACTIVATIONS)}, not "
                f"{self.activation!r}."
            )
        plo, phi = self.percentiles
        if not 0 <= plo < phi <= 100:
            raise ModelError(
                "The model option 'percentiles' must be two percentiles low,high with "
                f"0 <= low < high <= 100, not {list(self.percentiles)}."
            )
        if not (math.isfinite(self.norm_values[0]) and math.isfinite(self.norm_values[1])) or (
            self.norm_values[1] == 0
        ):
            raise ModelError(
                "The model option 'norm_values' must be two finite numbers subtract,divide with "
                f"divide not 0, not {list(self.norm_values)}."
            )
        if self.edge not in EDGES:
            raise ModelError(
                f"The model option 'edge' must be one of {', '.join(EDGES)}, not {self.edge!r}."
            )
        if self.out_dtype not in OUT_DTYPES:
            raise ModelError(
                f"The model option 'out_dtype' must be one of {', '.join(OUT_DTYPES)}, not "
                f"{self.out_dtype!r}."
            )
        if self.kind == "labels" and self.out_dtype != "float32":
            raise ModelError(
                "The model option 'out_dtype' is for image models; a labels model writes "
                "uint8, uint16 or uint32 class ids by its number of classes."
            )
        lo, hi = self.out_range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ModelError(
                "The model option 'out_range' must be two numbers low,high with high > low (the "
                f"model's output values written as 0 and 255), not {list(self.out_range)}."
            )
        if self.spatial_dims not in (2, 3):
            raise ModelError(
                f"The model option 'spatial_dims' must be 2 or 3, not {self.spatial_dims!r}."
            )
        if self.in_channels < 1:
            raise ModelError("The model option 'in_channels' must be at least 1.")
        if self.kind == "labels" and len(self.classes) == 1:
            raise ModelError(
                "A labels model needs at least two classes (or none, for one thresholded channel)."
            )
        if self.kind == "image" and self.classes:
            raise ModelError(
                "The model option 'classes' is for labels models; an image model says how many "
                "channels it outputs with 'out_channels' (give classes= empty with kind=image)."
            )
        if self.colors and (self.kind != "labels" or len(self.colors) != len(self.classes)):
            raise ModelError(
                f"The model option 'colors' gives {len(self.colors)} colour(s) for "
                + (
                    f"{len(self.classes)} classes; give one per class, in the order of 'classes'."
                    if self.kind == "labels" and self.classes
                    else "a model without named classes; colours are for the classes of a "
                    "labels model (give classes too, or no colors)."
                )
            )
        if (
            self.kind == "labels"
            and self.classes
            and self.out_channels not in (1, len(self.classes))
        ):
            raise ModelError(
                f"The model option 'out_channels' ({self.out_channels}) differs from the "
                f"{len(self.classes)} classes; a labels model outputs one channel per class."
            )
        if self.activation == "softmax" and self.n_outputs == 1:
            raise ModelError(
                "The model option 'activation' is softmax over one output channel, which is 1 "
                "everywhere; use sigmoid (or none) for a one-channel model."
            )
        if self.spatial_dims == 2 and (
            self.halo[0] != 0
            or self.multiple[0] != 1
            or self.scale[0] != 1
            or self.min_size[0] != 1
            or self.fixed[0] > 1
        ):
            raise ModelError(
                "A 2D model runs slice by slice: its z halo must be 0 and its z multiple, z scale "
                f"and z min_size 1 (got halo {size_text(self.halo)}, multiple "
                f"{size_text(self.multiple)}, scale {size_text(self.scale)}, min_size "
                f"{size_text(self.min_size)}"
                + (f", fixed {size_text(self.fixed)}" if self.fixed[0] > 1 else "")
                + ")."
            )
        if any(f and m != 1 for f, m in zip(self.fixed, self.multiple, strict=True)):
            raise ModelError(
                f"The model option 'fixed' {list(self.fixed)} is the one input size the model "
                f"takes along an axis, so its multiple there must be 1 (got {list(self.multiple)})."
            )

    @property
    def n_outputs(self) -> int:
        """Channels the network produces."""
        return len(self.classes) if self.kind == "labels" and self.classes else self.out_channels

    def input_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The size the model is given for ``size`` voxels (z, y, x): see :func:`fit_size`."""
        return tuple(self.input_size_axis(i, n) for i, n in enumerate(size))

    def input_size_axis(self, axis: int, n: int) -> int:
        """:meth:`input_size` along one axis (0 = z); the ``fixed`` size where there is one."""
        if self.fixed[axis]:
            return self.fixed[axis]
        return fit_size(n, self.min_size[axis], self.multiple[axis])

    @property
    def label_dtype(self) -> str:
        n = max(len(self.classes), self.n_outputs, 2)  # unnamed classes count too
        return "uint8" if n <= 255 else "uint16" if n <= 65535 else "uint32"

    def unused(self, stated: set[str] | None = None) -> list[str]:
        """Sentences for values the description gives that this kind of model does not use
        (accepted without a word before: a threshold on an image model, an out_range on a
        float32 output); ``stated``: the keys the user wrote (a bioimage.io package's own
        description gives its data range as out_range, uint8 or not), None: any."""
        out = []
        said = (lambda key: True) if stated is None else stated.__contains__
        used_threshold = self.kind == "labels" and self.n_outputs == 1
        if said("threshold") and self.threshold != 0.5 and not used_threshold:
            out.append(
                f"threshold {self.threshold:g} is not used: it cuts the one output channel of "
                "a labels model into a mask; "
                + (
                    "this image model's values are written as they are."
                    if self.kind == "image"
                    else "this model's classes are told apart by their largest logit."
                )
            )
        uint8 = self.kind == "image" and self.out_dtype == "uint8"
        if said("out_range") and self.out_range != (0.0, 1.0) and not uint8:
            out.append(
                f"out_range [{self.out_range[0]:g}, {self.out_range[1]:g}] is not used: it maps "
                "an image model's values to 0..255 with out_dtype: uint8; "
                + (
                    "this output is float32, written as the model gives it."
                    if self.kind == "image"
                    else "this is a labels model."
                )
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["derived"]
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], where: str = "the model description"
    ) -> ModelSpec:
        known = {f.name for f in fields(cls)} - {"derived"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(
                f"Unknown key(s) {', '.join(unknown)} in {where}; known keys: {', '.join(sorted(known))}."
            )
        kwargs: dict[str, Any] = {}
        try:
            for key, value in data.items():
                if key in ("halo", "fixed"):
                    kwargs[key] = _triple(value, key, 0)
                elif key in ("multiple", "scale", "block", "min_size"):
                    kwargs[key] = _triple(value, key, 1)
                elif key == "classes":
                    if isinstance(value, str):
                        value = [v.strip() for v in value.split(",") if v.strip()]
                    if value is not None and not isinstance(value, (list, tuple)):
                        raise ModelError(
                            f"The model option 'classes' must be a list of class names, not {value!r}."
                        )
                    kwargs[key] = tuple(str(v) for v in value or ())
                    twice = sorted({c for c in kwargs[key] if kwargs[key].count(c) > 1})
                    if twice:  # the output's class names would not tell them apart
                        raise ModelError(
                            f"The model option 'classes' names {', '.join(twice)} more than "
                            "once; give each class (each output channel) a name of its own."
                        )
                elif key == "colors":
                    kwargs[key] = _colors(value)
                elif key in ("in_channels", "out_channels", "spatial_dims"):
                    kwargs[key] = _count(value, key)
                elif key in ("threshold", "norm_eps"):
                    try:
                        kwargs[key] = float(value)
                    except (TypeError, ValueError):
                        kwargs[key] = math.nan
                    if not math.isfinite(kwargs[key]) or (key == "norm_eps" and kwargs[key] < 0):
                        what = "a number" if key == "threshold" else "a number of 0 or more"
                        raise ModelError(
                            f"The model option '{key}' must be {what}, not {value!r}."
                        ) from None
                elif key in _PAIRS:
                    kwargs[key] = _pair(value, key)
                elif key == "voxel_size":
                    kwargs[key] = None if value is None else _voxel_size(value)
                elif key == "arch_options":
                    if value is not None and not isinstance(value, Mapping):
                        raise ModelError(
                            "The model option 'arch_options' must be a mapping such as "
                            f"{{base: 8, depth: 2}}, not {value!r}."
                        )
                    kwargs[key] = dict(value or {})
                else:
                    kwargs[key] = value if value is None else str(value)
            derived = _architecture_defaults(kwargs, set(data))
            if "block" not in data:  # the default: for what the description says (options
                derived = (*derived, "block")  # may make a model 2D, or 3D again)
                if kwargs.get("spatial_dims") == 2:
                    # one slice of 64×64 (the 3D default's) made thousands of 16 KiB chunk
                    # files and as many blocks of milliseconds; a 2D network takes more
                    kwargs["block"] = BLOCK_2D
            kwargs["derived"] = derived
            return cls(**kwargs)  # (its checks of single values speak as the loop's do)
        except ModelError as err:  # a value's sentence names where it was written
            m = re.match(r"The model option '([^']+)'", str(err))
            if where == "the model options" or m is None:
                raise
            raise ModelError(f"The value of '{m[1]}' in {where}" + str(err)[m.end() :]) from None

    def with_options(self, options: Mapping[str, Any]) -> ModelSpec:
        own = {k: v for k, v in self.to_dict().items() if k not in self.derived}
        options = dict(options)
        colors = own.pop("colors", None) if "colors" not in options else None
        spec = ModelSpec.from_mapping(own | options, "the model options")
        # the description's colours are of its classes: kept where the options leave them
        # (other classes, renamed or reordered, an image model: napari's own colours, not a
        # refusal)
        if colors and spec.kind == "labels" and spec.classes == self.classes:
            spec = replace(spec, colors=tuple(colors))
        return spec


def _in_nm(values: Sequence[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values) + " nm"


def resolution_mismatch(spec: ModelSpec, voxel_size: Sequence[float], unit: str) -> str | None:
    """Words for a volume (spatial ``voxel_size`` z,y,x in ``unit``) whose voxels differ from
    those the model was trained on by more than RESOLUTION_TOLERANCE on an axis the model sees
    ("trained on 8×8×8 nm voxels; the volume has 40×4×4 nm"); None when they fit, or when the
    model does not say or the volume's unit is not a length."""
    per_nm = nm_per_unit(unit)
    if spec.voxel_size is None or per_nm is None or len(voxel_size) != 3:
        return None
    have = [v * per_nm for v in voxel_size]
    axes = range(3) if spec.spatial_dims == 3 else (1, 2)  # 2D models see single sections
    if all(
        1 / RESOLUTION_TOLERANCE <= have[i] / spec.voxel_size[i] <= RESOLUTION_TOLERANCE
        for i in axes
    ):
        return None
    want = [spec.voxel_size[i] for i in axes]
    return (
        f"trained on {_in_nm(want)} {'voxels' if spec.spatial_dims == 3 else 'pixels'}; the "
        f"volume has {_in_nm([have[i] for i in axes])}"
    )


def _count(value: Any, key: str) -> int:
    """A whole number of at least 1 (``2``, ``"2"``, ``2.0``), or the one-sentence refusal —
    ``int()`` alone made 1.7 channels 1, and let 0 output channels through to fail in every
    block."""
    number = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or number < 1:
        raise ModelError(
            f"The model option '{key}' must be a whole number of at least 1, not {value!r}."
        )
    return number


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["halo=8,8,8", "kind=image"]`` -> dict (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ModelError(
                f"Model options are key=value, not {item!r} (e.g. --model-option halo=8,8,8 "
                "normalize=zscore, after the model and output paths)."
            )
        key, value = item.split("=", 1)
        if key.strip() == "colors":  # as typed: YAML reads "#00e5ff" as a comment (dropped)
            out["colors"] = value.strip()
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # "@x": the text typed, checked as such
            if value.strip()[:1] in "[{":
                raise ModelError(
                    f"The model option '{key.strip()}' is not a list emparsl can read: {value!r} "
                    f"(a bracket missing?); write it as {key.strip()}=a,b or {key.strip()}=[a, b]."
                ) from None
            parsed = value
        # "16,16,16" and YAML 1.1's base-60 numbers ("1:30" is 90) stay the text typed
        out[key.strip()] = (
            value if isinstance(parsed, (int, float)) and ("," in value or ":" in value) else parsed
        )
    return out


def read_sidecar(model_path: str) -> dict[str, Any]:
    """The ``<file>.yaml`` (or ``.yml``) beside a model file; ``{}`` when there is none."""
    for ext in (".yaml", ".yml"):
        path = model_path + ext
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                what = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ModelError(
                    f"The model description {path} is not valid YAML ({what}{at})."
                ) from None
            except UnicodeDecodeError:
                raise ModelError(
                    f"The model description {path} is not UTF-8 text; save it as UTF-8."
                ) from None
            if not isinstance(data, dict):
                raise ModelError(
                    f"The model description {path} must be a mapping of keys to values."
                )
            return data
    return {}
