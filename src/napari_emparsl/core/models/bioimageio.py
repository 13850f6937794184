"""bioimage.io model packages: a folder or ``.zip`` holding ``rdf.yaml`` (or ``*bioimageio.yaml``)
and TorchScript weights, as the BioImage Model Zoo distributes them (format 0.4 and 0.5).

The package's description is turned into the keys of a sidecar (see :mod:`.spec`): channels,
2D/3D, halo, size (``fixed`` from a fixed size, ``min_size`` and ``multiple`` from ``min +
k·step``), output scale (super-resolution), normalization (``zero_mean_unit_variance`` →
``zscore`` over the whole volume, ``scale_range`` → ``percentile``,
``fixed_zero_mean_unit_variance`` / ``scale_linear`` → ``fixed``), post-processing (``sigmoid`` /
``softmax`` → ``activation``, ``binarize`` → a thresholded labels output) and the voxel size of
the training data. What emparsl cannot do the same way — several inputs, a state dict that needs
the architecture's Python code, weights to download, per-channel normalization, other
post-processing — is refused in one sentence. A sidecar ``<package>.yaml`` beside the package,
or model options, override any key.

No torch here: the runner and the GUI describe models without loading them.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import yaml

from napari_emparsl.core.models.spec import ModelError, ModelSpec, fit_size
from napari_emparsl.core.units import nm_per_unit

__all__ = [
    "Package",
    "describe_package",
    "find_package",
    "one_line",
    "read_weights",
    "test_tensors",
    "zip_members",
]

_RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


def _is_rdf_name(name: str) -> bool:
    base = os.path.basename(name)
    return base in _RDF_NAMES or base.endswith(".bioimageio.yaml")


@dataclass(frozen=True)
class Package:
    """A bioimage.io package on disk: ``path`` is the folder or ``.zip``; ``rdf`` the name of its
    description inside it."""

    path: str
    rdf: str
    #: the folder inside a ``.zip`` that holds the description and its files (a zip of the
    #: package's folder rather than of its contents: ``seg3/rdf.yaml``), with its ``/``; else ""
    folder: str = ""

    @property
    def is_zip(self) -> bool:
        return os.path.isfile(self.path)

    def read(self, name: str) -> bytes:
        """A file of the package, by its name in the description."""
        if "://" in name:
            raise ModelError(
                f"The bioimage.io model {self.path} names {name} to download, which emparsl "
                "does not do; download the whole package (.zip) from the model zoo and give that."
            )
        name = name[2:] if name.startswith("./") else name
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as zf:
                    return zf.read(self.folder + name)
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except (KeyError, FileNotFoundError):
            raise ModelError(
                f"The bioimage.io model {self.path} lacks {name}, which its description names; "
                "the package is incomplete: download it again."
            ) from None
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise ModelError(
                f"The bioimage.io model {self.path} cannot be read ({one_line(err)}); check the "
                "file, or download it again."
            ) from None

    def description(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(io.BytesIO(self.read(self.rdf)))
        except yaml.YAMLError as err:
            raise ModelError(
                f"The description {self.rdf} of {self.path} is not valid YAML "
                f"({str(err).splitlines()[0]})."
            ) from None
        if not isinstance(data, dict):
            raise ModelError(f"The description {self.rdf} of {self.path} is not a mapping.")
        return data


def find_package(path: str) -> Package | None:
    """The bioimage.io package at ``path`` (its folder, its ``.zip`` or its description file), or
    None when ``path`` is not one. A ``.zip`` that cannot be read is refused as damaged."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if _is_rdf_name(n))
        names.sort(key=lambda n: n not in _RDF_NAMES)  # rdf.yaml first
        return Package(path, names[0]) if names else None
    if _is_rdf_name(path) and os.path.isfile(path):
        return Package(os.path.dirname(path) or ".", os.path.basename(path))
    if not path.lower().endswith(".zip") or not os.path.isfile(path):
        return None
    members = zip_members(path)
    if members is None:
        return None  # not a zip at all: said so where it is loaded as a model file
    top = sorted(n for n in members if "/" not in n and _is_rdf_name(n))
    if top:
        top.sort(key=lambda n: n not in _RDF_NAMES)
        return Package(path, top[0])
    # a zip of the package's folder (as a file manager zips it): its description one folder
    # down, the files it names beside it (__MACOSX/ holds a Mac's resource forks: no package)
    nested = sorted(
        n
        for n in members
        if n.count("/") == 1
        and _is_rdf_name(n)
        and not n.startswith("__MACOSX/")
        and not os.path.basename(n).startswith("._")
    )
    folders = sorted({n.split("/")[0] + "/" for n in nested})
    if len(folders) > 1:
        raise ModelError(
            f"The zip file {path} holds several bioimage.io packages ({', '.join(folders)}); "
            "unzip it and give one of them."
        )
    if not nested:
        return None
    nested.sort(key=lambda n: os.path.basename(n) not in _RDF_NAMES)
    return Package(path, os.path.basename(nested[0]), folders[0])


#: the local file header that starts a zip file (a bioimage.io .zip, a TorchScript file, a
#: state dict torch.save wrote)
_ZIP_MAGIC = b"PK\x03\x04"
_CUT_SHORT = "its end, which lists its files, is missing: it was cut short"


def zip_members(path: str, redo: str = "download or export it again") -> list[str] | None:
    """The names of the files in the zip file at ``path``; None when it is no zip file. One
    that starts as a zip file does (a local header) but cannot be read as one is refused as
    damaged, saying to ``redo`` it: also when the list of files found is not its own but that of
    a zip stored inside it (cut short, a package's end is missing and its TorchScript weights,
    themselves a zip file, end with a list of their own files)."""
    starts = False
    try:
        with open(path, "rb") as f:
            starts = f.read(4) == _ZIP_MAGIC
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    # a damaged list of files can fail otherwise: a name flagged UTF-8 that is not
    # (UnicodeDecodeError, a ValueError), a list cut short (EOFError), an unknown method
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        if not starts and not zipfile.is_zipfile(path):
            return None
        why = _CUT_SHORT if "not a zip file" in str(err).lower() else one_line(err)
        raise ModelError(f"{path} is a damaged zip file ({why}); {redo}.") from None
    if starts and infos and min(i.header_offset for i in infos) > 0:
        raise ModelError(f"{path} is a damaged zip file ({_CUT_SHORT}); {redo}.")
    return [i.filename for i in infos]


def one_line(err: BaseException | str, limit: int = 120) -> str:
    """An error's first line for a message's parentheses, without a closing period: at most
    ``limit`` characters (the whole sentences that fit, else cut at a word with "…", never
    mid-word); the error's type when it says nothing (``EOFError('')``)."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    text = text or ("" if isinstance(err, str) else type(err).__name__)
    if len(text) > limit:
        end = text[:limit].rfind(". ")  # its whole sentences that fit, else its words
        if end > 0:
            text = text[:end]
        else:
            cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
            text = cut.rstrip(" ,;:.(") + "…"
    return text.rstrip(".")


# -- axes --------------------------------------------------------------------------------------


@dataclass
class _Axis:
    name: str  # b, c, z, y, x (or another letter / id, refused)
    size: Any  # int | {min, step} | {reference…} | None
    halo: int = 0
    scale: float = 1.0  # 0.5: physical size of a voxel along the axis
    unit: str | None = None
    offset: float = 0.0  # 0.4 output: output = input × scale + 2 × offset
    channels: int | None = None


_AXIS_TYPES_05 = {"batch": "b", "channel": "c"}


def _axes_04(tensor: Mapping[str, Any], output: bool) -> list[_Axis]:
    letters = str(tensor.get("axes", ""))
    shape = tensor.get("shape")
    halo = tensor.get("halo") or [0] * len(letters)
    axes = [_Axis(a, None) for a in letters]
    if isinstance(shape, list):
        for ax, n in zip(axes, shape, strict=False):
            ax.size = int(n)
    elif isinstance(shape, Mapping) and "min" in shape:
        for ax, lo, st in zip(axes, shape["min"], shape.get("step", []), strict=False):
            ax.size = {"min": int(lo), "step": int(st)}
    elif isinstance(shape, Mapping) and output:
        for ax, sc, off in zip(axes, shape.get("scale", []), shape.get("offset", []), strict=False):
            ax.size = {"reference": True}
            # scale null: a new axis, of 2 × offset
            ax.scale, ax.offset = (0.0 if sc is None else float(sc)), float(off)
    for ax, h in zip(axes, halo, strict=False):
        ax.halo = int(h)
    for ax in axes:
        if ax.name == "c" and isinstance(ax.size, int):
            ax.channels = ax.size
        elif ax.name == "c" and isinstance(ax.size, Mapping) and not ax.size.get("step", 1):
            ax.channels = ax.size.get("min")
    return axes


def _reference_channels(ax: _Axis, in_channels: int, where: str) -> int:
    """The channels of a 0.4 output shaped by its input: input × scale + 2 × offset (the
    offset is per side)."""
    n = in_channels * ax.scale + 2 * ax.offset
    if not (math.isfinite(n) and abs(n - round(n)) < 1e-6 and round(n) >= 1):
        raise ModelError(
            f"{where}'s output has {in_channels} × {ax.scale:g} + 2 × {ax.offset:g} = {n:g} "
            "channels, not a whole number of at least 1; check its shape's scale and offset."
        )
    return round(n)


def _axes_05(tensor: Mapping[str, Any]) -> list[_Axis]:
    axes = []
    for a in tensor.get("axes") or []:
        kind = str(a.get("type", ""))
        name = _AXIS_TYPES_05.get(kind) or str(a.get("id") or ("x" if kind == "space" else kind))
        if kind not in ("batch", "channel", "space"):
            name = f"{kind}:{name}"  # time, index: refused below
        ax = _Axis(name, a.get("size"), int(a.get("halo") or 0))
        ax.scale = float(a.get("scale") or 1.0)
        ax.unit = a.get("unit")
        if kind == "channel":
            ax.channels = len(a.get("channel_names") or []) or None
        axes.append(ax)
    return axes


def _spatial(axes: list[_Axis], where: str) -> list[_Axis]:
    names = "".join(a.name if len(a.name) == 1 else "?" for a in axes)
    if names not in ("bczyx", "bcyx"):
        raise ModelError(
            f"{where} takes axes {names or '(none)'}; emparsl runs models on batch, channel, "
            "z, y, x (or batch, channel, y, x) in that order, as PyTorch models take them."
        )
    return axes[2:]


# -- description -> sidecar keys ------------------------------------------------------------------


def _steps(tensor: Mapping[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for step in tensor.get(key) or []:
        name = str(step.get("id") or step.get("name") or "")
        out.append((name, dict(step.get("kwargs") or {})))
    return [(n, k) for n, k in out if n != "ensure_dtype"]


def _scalar(value: Any, what: str, where: str) -> float:
    values = value if isinstance(value, (list, tuple)) else [value]
    flat = [float(v) for v in _flatten(values)]
    if not flat or any(v != flat[0] for v in flat):
        raise ModelError(
            f"{where} normalizes each channel with its own {what} ({values}); emparsl uses one "
            "value for all channels: set normalize and norm_values in a sidecar or the model "
            "options."
        )
    return flat[0]


def _flatten(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _reduced_over(kw: Mapping[str, Any], v05: bool) -> list[str] | None:
    """The axes statistics computed with these kwargs reduce over (None: all of them; 0.4:
    letters, 0.5: ids)."""
    axes = kw.get("axes")
    if axes is None:
        return None
    if isinstance(axes, str):
        axes = [axes] if v05 else list(axes)
    return [str(a) for a in axes]


def _joint_over_channels(kw: Mapping[str, Any], channel: str, v05: bool) -> bool:
    """Whether statistics computed with these kwargs are one value over all channels."""
    axes = _reduced_over(kw, v05)
    return axes is None or channel in axes


#: a key of a package's description: why it cannot run as described (per-channel statistics),
#: unless a sidecar or the model options set normalize (see loaders.describe_model)
PER_CHANNEL = "_per_channel_statistics"


def _normalization(
    steps: list[tuple[str, dict[str, Any]]],
    where: str,
    channels: int = 1,
    channel: str = "c",
    v05: bool = False,
    spatial: Sequence[str] = ("z", "y", "x"),
) -> dict[str, Any]:
    """``channels``: of the input; ``channel``: the id of its channel axis; ``spatial``: the
    ids of its spatial axes."""
    if not steps:
        return {"normalize": "none"}
    if len(steps) > 1:
        names = ", ".join(n for n, _ in steps)
        raise ModelError(
            f"{where} preprocesses its input in {len(steps)} steps ({names}); emparsl applies one "
            "normalization: set normalize in a sidecar or the model options."
        )
    name, kw = steps[0]
    mode = kw.get("mode", "per_sample")
    computed = name in ("zero_mean_unit_variance", "scale_range") and mode != "fixed"
    refusal = {}
    reduced = _reduced_over(kw, v05)
    apart = [a for a in spatial if reduced is not None and a not in reduced]
    if computed and apart:  # statistics of each slice (row, …) on its own
        refusal = {
            PER_CHANNEL: f"{where} normalizes its input by the statistics of each "
            f"{'z slice' if apart == ['z'] else 'position along ' + ', '.join(apart)} on its "
            f"own ({name} over axes {kw.get('axes')}, without {', '.join(apart)}); emparsl "
            "normalizes a volume by its statistics as a whole, which gives the model other "
            "values: set normalize in a sidecar or the model options to run it anyway."
        }
    elif computed and channels > 1 and not _joint_over_channels(kw, channel, v05):
        # said when the model is described, unless a sidecar or the options set normalize
        refusal = {
            PER_CHANNEL: f"{where} normalizes each of its {channels} input channels on its own "
            f"({name} over axes {kw.get('axes')}, without {channel}); emparsl normalizes all "
            "channels of a volume together, which gives the model other values: set normalize "
            "in a sidecar or the model options to run it anyway."
        }
    # (x - mean) / (std + eps), (x - low) / (high - low + eps): the spec's default eps, 1e-6,
    # changes nothing a model sees (and is left out, so that an exported package reads back as
    # it was); a larger one is applied
    eps = _scalar(kw.get("eps", 1e-6), "eps", where)
    eps = eps if eps > 1e-6 else 0.0
    extra = {"norm_eps": eps} if eps else {}
    if name == "zero_mean_unit_variance" and mode != "fixed":
        return {"normalize": "zscore", **extra} | refusal
    if name == "fixed_zero_mean_unit_variance" or (
        name == "zero_mean_unit_variance" and mode == "fixed"
    ):
        mean, std = (
            _scalar(kw.get("mean", 0), "mean", where),
            _scalar(kw.get("std", 1), "std", where),
        )
        return {"normalize": "fixed", "norm_values": [mean, std + eps]}
    if name == "scale_linear":
        gain = _scalar(kw.get("gain", 1), "gain", where)
        offset = _scalar(kw.get("offset", 0), "offset", where)
        if gain == 0:
            raise ModelError(f"{where} scales its input by a gain of 0.")
        return {"normalize": "fixed", "norm_values": [-offset / gain, 1 / gain]}
    if name == "scale_range" and mode != "fixed" and "reference_tensor" not in kw:
        lo, hi = float(kw.get("min_percentile", 0)), float(kw.get("max_percentile", 100))
        return {"normalize": "percentile", "percentiles": [lo, hi], **extra} | refusal
    raise ModelError(
        f"{where} preprocesses its input with {name!r}"
        + (f" ({mode})" if "mode" in kw else "")
        + ", which emparsl does not do; set normalize in a sidecar or the model options."
    )


def _postprocessing(
    steps: list[tuple[str, dict[str, Any]]], channels: int | None, where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kw in steps:
        if name in ("sigmoid", "softmax") and "activation" not in out and "threshold" not in out:
            out["activation"] = name
        elif name == "binarize" and "threshold" not in out and channels == 1:
            threshold = kw.get("threshold", 0.5)
            out |= {
                "kind": "labels",
                "classes": [],
                "threshold": _scalar(threshold, "threshold", where),
            }
        else:
            raise ModelError(
                f"{where} post-processes its output with {name!r}, which emparsl does not do "
                "(it applies sigmoid, softmax, and binarize of one channel); it cannot be run as "
                "published."
            )
    return out


def _in_sizes(axes: list[_Axis], where: str) -> dict[str, Any]:
    """min_size, multiple and fixed size (0: any) of the input's spatial axes."""
    mins, steps, fixed = [], [], []
    for ax in axes:
        size = ax.size
        if isinstance(size, int):
            lo, step = size, 0
        elif isinstance(size, Mapping) and "min" in size:
            lo, step = int(size["min"]), int(size.get("step") or 0)
        else:
            raise ModelError(
                f"{where} sizes its input axis {ax.name} by another tensor; emparsl needs a fixed "
                "or a min + k·step size."
            )
        # one size only: the model takes exactly it (smaller reads are padded up to it)
        mins.append(lo)
        steps.append(step or 1)
        fixed.append(0 if step else lo)
    return {"min_size": mins, "multiple": steps, "fixed": fixed}


def _default_block(
    axes: list[_Axis], sizes: dict[str, Any], halo: list[int], where: str
) -> list[int]:
    """Write blocks whose read size (block + 2 × halo) is one the model takes: the fixed size
    less twice the halo; else about 4 × the halo (at least 64 in 3D, 256 in 2D; at most 128 /
    512), so that the halo recomputed around each block stays a modest share of it."""
    out = []
    dims = len(axes)
    for ax, lo, step, n, h in zip(
        axes, sizes["min_size"], sizes["multiple"], sizes["fixed"], halo, strict=True
    ):
        if n:
            if n - 2 * h < 1:
                raise ModelError(
                    f"{where} takes {n} voxels along {ax.name} but asks for a halo of {h} on "
                    "each side, which leaves none to write; check the package's halo."
                )
            out.append(n - 2 * h)
            continue
        low, high = (64, 128) if dims == 3 else (256, 512)
        want = min(max(low, 4 * h), max(high, 2 * h))
        read = fit_size(want + 2 * h, lo, step)
        out.append(max(1, read - 2 * h))
    return out


def _out_scale(in_axes: list[_Axis], out_axes: list[_Axis], v05: bool, where: str) -> list[int]:
    scale = []
    for i, o in zip(in_axes, out_axes, strict=True):
        if isinstance(o.size, Mapping) and ("reference" in o.size or "axis_id" in o.size):
            if v05:
                if o.size.get("offset"):
                    raise ModelError(
                        f"{where} crops or grows its output along {o.name} (offset "
                        f"{o.size['offset']}); emparsl needs output = input × scale."
                    )
                s = i.scale / o.scale
            else:
                if o.offset:
                    raise ModelError(
                        f"{where} crops or grows its output along {o.name} (offset {o.offset}); "
                        "emparsl needs output = input × scale."
                    )
                s = o.scale
        elif isinstance(o.size, int) and isinstance(i.size, int):
            s = o.size / i.size
        else:
            s = 1.0  # a parameterized output follows its input
        if s < 1 or abs(s - round(s)) > 1e-6:
            raise ModelError(
                f"{where} maps its input to {s:g}× along {o.name}; emparsl needs a whole output "
                "scale of at least 1."
            )
        scale.append(round(s))
    return scale


def _voxel_size(axes: list[_Axis]) -> list[float] | None:
    per = [nm_per_unit(a.unit) if a.unit else None for a in axes]
    if any(p is None for p in per):
        return None
    size = [a.scale * p for a, p in zip(axes, per, strict=True)]  # type: ignore[operator]
    return (size if len(size) == 3 else [1.0, *size]) if all(v > 0 for v in size) else None


def _weights(desc: Mapping[str, Any], where: str) -> str:
    weights = desc.get("weights") or {}
    ts = weights.get("torchscript")
    if isinstance(ts, Mapping) and ts.get("source"):
        return str(ts["source"])
    have = ", ".join(sorted(weights)) or "none"
    why = (
        ": a state dict needs its architecture's Python code, which emparsl does not run"
        if "pytorch_state_dict" in weights
        else ""
    )
    raise ModelError(
        f"{where} has no TorchScript weights (only {have}){why}; use a package with torchscript "
        "weights, or export the network with torch.jit.save."
    )


def read_weights(package: Package) -> tuple[str, bytes]:
    """The name and bytes of the package's TorchScript weights, checked against the SHA-256 its
    description records."""
    import hashlib

    name = describe_package(package)[1]
    data = package.read(name)
    recorded = str((package.description()["weights"]["torchscript"]).get("sha256") or "")
    if recorded and hashlib.sha256(data).hexdigest() != recorded.lower():
        raise ModelError(
            f"The weights {name} of {package.path} do not match the SHA-256 its description "
            "records, so the package is damaged or was changed; download it again."
        )
    return name, data


def _malformed(package: Package, err: Exception) -> ModelError:
    return ModelError(
        f"The description {package.rdf} of {package.path} does not follow the bioimage.io "
        f"format ({type(err).__name__}: {one_line(err)}); validate it with bioimageio.spec, or "
        "download the package again."
    )


def _read(package: Package, reader: Any) -> Any:
    """``reader(package, description)``; a description whose fields are not of the format's
    types (which the readers meet as Python errors) is refused in one sentence."""
    desc = package.description()
    try:
        return reader(package, desc)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
        if isinstance(err, ModelError):
            raise
        raise _malformed(package, err) from None


def describe_package(package: Package) -> tuple[dict[str, Any], str]:
    """The package's description as sidecar keys, and the name of its TorchScript weights."""
    return _read(package, _describe)


def _describe(package: Package, desc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    name = desc.get("name") or os.path.basename(package.path.rstrip("/"))
    where = f"The bioimage.io model {name!r}"
    if desc.get("type", "model") != "model":
        raise ModelError(f"{package.path} describes a bioimage.io {desc.get('type')}, not a model.")
    version = str(desc.get("format_version", ""))
    major_minor = ".".join(version.split(".")[:2])
    if major_minor not in ("0.4", "0.5"):
        raise ModelError(
            f"{where} is in bioimage.io format {version or '(none)'}; emparsl reads formats 0.4 "
            "and 0.5: update the package with bioimageio.core."
        )
    v05 = major_minor == "0.5"
    inputs, outputs = desc.get("inputs") or [], desc.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{where} has {len(inputs)} input(s) and {len(outputs)} output(s); emparsl runs "
            "models of one input and one output."
        )
    (tin,), (tout,) = inputs, outputs
    ain = _axes_05(tin) if v05 else _axes_04(tin, False)
    aout = _axes_05(tout) if v05 else _axes_04(tout, True)
    sin = _spatial(ain, f"{where}'s input")
    sout = _spatial(aout, f"{where}'s output")
    if len(sin) != len(sout):
        raise ModelError(f"{where}'s input and output have different spatial axes.")
    dims = len(sin)
    in_channels = ain[1].channels
    out_channels = aout[1].channels
    if in_channels is None:
        raise ModelError(f"{where} does not say how many channels its input has.")
    if not v05 and isinstance(aout[1].size, Mapping) and aout[1].size.get("reference"):
        out_channels = _reference_channels(aout[1], in_channels, where)
    keys: dict[str, Any] = {"kind": "image", "in_channels": in_channels, "spatial_dims": dims}
    if out_channels:
        keys["out_channels"] = out_channels
    sizes = _in_sizes(sin, where)
    scale = _out_scale(sin, sout, v05, where)
    # bioimage.io gives the halo on the output: context in input voxels is halo / scale
    halo = [-(-o.halo // s) for o, s in zip(sout, scale, strict=True)]
    pad = [] if dims == 3 else [1]
    keys["min_size"] = pad + sizes["min_size"]
    keys["multiple"] = pad + sizes["multiple"]
    keys["halo"] = [0] * (3 - dims) + halo
    keys["fixed"] = [0] * (3 - dims) + sizes["fixed"]
    keys["scale"] = pad + scale
    keys["edge"] = "none"  # the model meets the volume edge as in its own test: reproducible
    # a fixed-size model takes blocks that fill its input with their halo
    keys["block"] = pad + _default_block(sin, sizes, halo, where)
    channel = str(tin["axes"][1].get("id") or "channel") if v05 else "c"
    keys |= _normalization(
        _steps(tin, "preprocessing"), where, in_channels, channel, v05, [a.name for a in sin]
    )
    keys |= _postprocessing(_steps(tout, "postprocessing"), out_channels, where)
    data = tout.get("data") if v05 else None
    span = data.get("range") if isinstance(data, Mapping) else tout.get("data_range")
    if keys["kind"] == "image" and isinstance(span, (list, tuple)) and len(span) == 2:
        lo, hi = (float(v) if v is not None else math.inf for v in span)
        if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
            keys["out_range"] = [lo, hi]
    voxel = _voxel_size(sin) if v05 else None
    if voxel:
        keys["voxel_size"] = voxel
    # what emparsl itself wrote there when it exported the model (kind, classes, block, …)
    ours = (
        (desc.get("config") or {}).get("emparsl")
        if isinstance(desc.get("config"), Mapping)
        else None
    )
    if isinstance(ours, Mapping):
        known = {f.name for f in fields(ModelSpec)}
        keys |= {k: v for k, v in ours.items() if k in known and k != "derived"}
        # emparsl exported it: its statistics are emparsl's, over all channels together
        # (packages exported before the axes said so wrote z, y, x)
        keys.pop(PER_CHANNEL, None)
    return keys, _weights(desc, where)


def test_tensors(package: Package) -> tuple[Any, Any]:
    """The package's test input and the output its authors got from it (numpy arrays, with
    their batch and channel axes)."""
    return _read(package, _test_tensors)


def _test_tensors(package: Package, desc: dict[str, Any]) -> tuple[Any, Any]:
    import hashlib

    import numpy as np

    digests: list[str] = ["", ""]  # 0.4 records none
    if str(desc.get("format_version", "")).startswith("0.4"):
        sources = [(desc.get("test_inputs") or [None])[0], (desc.get("test_outputs") or [None])[0]]
    else:
        tensors = [
            (desc.get(side) or [{}])[0].get("test_tensor") or {} for side in ("inputs", "outputs")
        ]
        sources = [t.get("source") for t in tensors]
        digests = [str(t.get("sha256") or "") for t in tensors]
    if not all(sources):
        raise ModelError(
            f"The bioimage.io model {package.path} has no test input and output to check it with."
        )
    arrays = []
    for name, digest in zip(sources, digests, strict=True):
        data = package.read(str(name))
        if digest and hashlib.sha256(data).hexdigest() != digest.lower():
            raise ModelError(
                f"The test tensor {name} of {package.path} does not match the SHA-256 its "
                "description records, so the package is damaged or was changed; download it "
                "again."
            )
        try:
            arrays.append(np.load(io.BytesIO(data), allow_pickle=False))
        except ValueError as err:
            raise ModelError(
                f"The test tensor {name} of {package.path} is not a numpy file ({err})."
            ) from None
    return arrays[0], arrays[1]
