"""Load models safely: TorchScript (``torch.jit.load``) or a state dict
(``torch.load(weights_only=True)``) plus a named built-in architecture. Pickles that need code
are refused. Loaded models are cached per process, keyed by file hash and options, so a worker
loads each model once.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from napari_emparsl.core.models.bioimageio import (
    PER_CHANNEL,
    describe_package,
    find_package,
    one_line,
    read_weights,
    zip_members,
)
from napari_emparsl.core.models.spec import ModelError, ModelSpec, read_sidecar
from napari_emparsl.core.paths import user_path

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "describe_model",
    "file_hash",
    "load_model",
    "misnamed_description",
    "missing_description",
    "resolve_model",
    "stated_keys",
]

#: built-in model name -> weights file inside napari_emparsl/models/ (sidecar beside it)
BUILTIN_MODELS = {"unet3d-em": "unet3d_em.pt"}

#: models loaded in this process, the most recently used last; at most _CACHED of them (a
#: napari session kept a copy per model file, retrained file and options tried, for good)
_CACHE: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()
_CACHED = 3
_LOADING: dict[tuple[str, str, str], threading.Lock] = {}  # a lock per model being loaded
_LOCK = threading.Lock()
_LOADS = 0  # cache misses in this process: a worker loads each model once
_HASHES: dict[tuple[Any, ...], str] = {}  # file_hash by the file's stat


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module or torch.jit.ScriptModule, in eval mode
    spec: ModelSpec
    sha256: str
    path: str


def _first_mismatch(err: RuntimeError) -> str:
    """torch's load_state_dict error, shortened: a size mismatch, else the missing or
    unexpected parameters, counted."""
    lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()]
    for line in lines:
        m = re.match(
            r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
            r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
            line,
        )
        if m:
            return (
                f"{m.group(1)} is {m.group(2)} in the weights but {m.group(3)} in the architecture"
            )
    for line in lines:
        keys = re.findall(r'"([^"]+)"', line)
        if line.startswith("Missing key(s)") and keys:
            return f"{len(keys)} parameter(s) of the architecture are not in the weights, e.g. {keys[0]}"
        if line.startswith("Unexpected key(s)") and keys:
            return f"{len(keys)} parameter(s) of the weights are not in the architecture, e.g. {keys[0]}"
    return one_line(lines[0] if lines else str(err), 150)


def resolve_model(model: str) -> str:
    """A built-in name or a file path -> the model file's path (a bioimage.io package: its
    folder or ``.zip``)."""
    if model in BUILTIN_MODELS:
        return str(resources.files("napari_emparsl") / "models" / BUILTIN_MODELS[model])
    model = user_path(model)
    if not os.path.exists(model):
        names = ", ".join(BUILTIN_MODELS)
        what = f"The model {model} does not exist" if model.strip() else "No model was given"
        raise ModelError(f"{what}; give a model file or a built-in name ({names}).")
    package = find_package(model)
    if package is not None and not package.is_zip and os.path.isfile(model):
        # a description file named: the package is its folder, whose description is the one
        # its folder is read by (rdf.yaml first) — another one there would run instead
        chosen = find_package(package.path)
        if chosen is not None and chosen.rdf != package.rdf:
            raise ModelError(
                f"The folder {package.path} holds several bioimage.io descriptions "
                f"({chosen.rdf} and {package.rdf}), and a package is read by its folder, from "
                f"{chosen.rdf}; move {package.rdf} (with the files it names) into a folder of "
                "its own and give that folder."
            )
    if package is not None:
        return package.path if not package.is_zip else model
    if os.path.isdir(model):
        raise ModelError(
            f"The model {model} is a folder; give the model file (.pt/.pth) inside it, or a "
            "bioimage.io package (a folder or .zip with rdf.yaml)."
        )
    return model


def _stamp(path: str) -> tuple[Any, ...]:
    """What changes when a file (or a package folder's files) is written again."""
    paths = [path]
    if os.path.isdir(path):  # every file, also in subfolders (weights/weights.pt): a file
        # written again inside one changes no stamp of the folder above it
        paths = sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
        )
    stamps = []
    for p in paths:
        st = os.stat(p)
        stamps.append((p, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


def file_hash(path: str) -> str:
    """SHA-256 of a model file (a bioimage.io package folder: of its description and weights).

    Remembered per process while the file's size, inode and times stay the same: a worker
    asks for it before every block, and reading a 100 MB model each time cost ~80 ms a block
    (more than a block's compute on a GPU).
    """
    stamp = _stamp(path)
    with _LOCK:
        known = _HASHES.get(stamp)
    if known is None:
        known = _file_hash(path)
        with _LOCK:
            _HASHES[stamp] = known
    return known


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    if os.path.isdir(path):
        package = find_package(path)
        if package is None:
            raise ModelError(f"The model {path} is a folder, not a bioimage.io package.")
        h.update(package.read(package.rdf))
        h.update(read_weights(package)[1])
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _description(path: str) -> tuple[dict[str, Any], str]:
    """The keys describing the model file at ``path`` (its sidecar; a bioimage.io package's
    description, overridden by a sidecar beside the package), and where they come from."""
    package = find_package(path)
    if package is None:
        return read_sidecar(path), f"{path}.yaml"
    keys, _ = describe_package(package)
    sidecar = read_sidecar(path.rstrip("/\\"))
    keys |= sidecar
    if "normalize" in sidecar:
        keys.pop(PER_CHANNEL, None)  # the sidecar says how to normalize it
    return keys, f"the bioimage.io description of {path}"


def stated_keys(model: str, options: Mapping[str, Any] | None = None) -> set[str]:
    """The description keys the user wrote (its sidecar, the options), not those a bioimage.io
    package's description fills in (a package's data range is its out_range, uint8 or not)."""
    path = resolve_model(model)
    if model in BUILTIN_MODELS:
        return set(options or {})
    return set(read_sidecar(path.rstrip("/\\"))) | set(options or {})


def describe_model(model: str, options: Mapping[str, Any] | None = None) -> ModelSpec:
    """The model's spec from its sidecar (or bioimage.io description) and options, without
    loading any weights."""
    path = resolve_model(model)
    keys, where = _description(path)
    refusal = keys.pop(PER_CHANNEL, None)
    if refusal and "normalize" not in (options or {}):
        raise ModelError(refusal)
    return ModelSpec.from_mapping(keys, where).with_options(options or {})


def misnamed_description(model: str) -> str | None:
    """The name of a description lying beside a model file under a name that is not read
    (``model.yaml`` or ``model.yml`` for ``model.pt``, whose is ``model.pt.yaml``), where the
    file has none of its own; else None."""
    if model in BUILTIN_MODELS:
        return None
    path = user_path(model)
    if not os.path.isfile(path) or any(os.path.isfile(path + e) for e in (".yaml", ".yml")):
        return None
    stem = os.path.splitext(path)[0]
    return next(
        (
            os.path.basename(p)
            for p in (stem + ".yaml", stem + ".yml")
            if p != path and os.path.isfile(p)
        ),
        None,
    )


def missing_description(
    model: str, options: Mapping[str, Any] | None = None, look_inside: bool = True
) -> list[str]:
    """Keys a model file needs but neither its sidecar nor ``options`` give (the GUI asks).

    A file that is no model emparsl can load (not a TorchScript or PyTorch file, a damaged
    zip, a pickle that needs code, a TorchScript model given an architecture) is refused as
    loading it would be: there is nothing to describe. ``architecture`` is asked for only of a
    state dict. ``look_inside=False``: what needs torch to tell (a state dict or a pickled
    module) is not looked at — the file's first bytes and zip listing only.
    """
    path = resolve_model(model)
    described = _description(path)[0] | dict(options or {})
    described.pop(PER_CHANNEL, None)
    given = set(described)
    if described.get("architecture") in ("unet3d", "unet2d"):
        given.add("halo")  # the network's whole context (ModelSpec fills it in)
    if described.get("classes"):
        given.add("kind")  # class names: a labels model
    missing = [k for k in ("kind", "halo") if k not in given]
    if "kind" not in given and "classes" not in given:
        missing.append("classes")  # labels: one name per output channel
    if model not in BUILTIN_MODELS and os.path.isfile(path) and find_package(path) is None:
        # what it is, as loading it finds (a state dict: mapped, not read, from its file); a
        # built-in model is ours and described: looking needs torch, whose import (~1.5 s) would
        # hold napari's Qt thread as the run panel opens
        architecture = bool(described.get("architecture"))
        if not look_inside:
            if _file_kind(path, architecture) == "torchscript" and architecture:
                raise ModelError(_torchscript_with_architecture(path))
            return missing
        what, _ = _contents(path, architecture, mmap=True)
        if what == "state dict" and "architecture" not in given:
            missing.append("architecture")  # which built-in network to fill
    return missing


def _torchscript_names(names: list[str]) -> bool:
    return any(n.endswith("/constants.pkl") or n.endswith("/code/") or "/code/" in n for n in names)


_EXPORT = (
    "export the model with torch.jit.script or torch.jit.trace and save it with torch.jit.save"
)


def _not_a_model(path: str, architecture: bool) -> str:
    """Why a file that is neither a zip nor a pickle is no model, in one sentence: by its name
    where that says what it is (a sidecar given instead of its model, Python source)."""
    name = path.lower()
    if name.endswith((".yaml", ".yml")):
        stem = path[: path.rfind(".")]
        which = f" ({stem})" if os.path.isfile(stem) else ""
        return (
            f"{path} is a model description (YAML), not a model; give the model file it "
            f"describes{which}."
        )
    if name.endswith(".py"):
        return (
            f"{path} is a Python source file, not a model; {_EXPORT} (or save its state_dict "
            "with torch.save for a built-in architecture)."
        )
    what = "is empty, not" if os.path.getsize(path) == 0 else "is not"
    advice = (
        "save the network's weights with torch.save(model.state_dict(), …)"
        if architecture
        else _EXPORT
    )
    return f"{path} {what} a TorchScript or PyTorch file; {advice}."


def _file_kind(path: str, architecture: bool) -> str:
    """What a model file (not a package) is, by its first bytes: ``torchscript`` (a zip with
    code), ``archive`` (a zip torch.save wrote: a state dict, or a pickled module) or
    ``pickle`` (torch.save's older format: pickle protocol 2 and later start with 0x80).
    Anything else is refused in one sentence, a zip that cannot be read as damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise ModelError(f"The model {path} cannot be read ({one_line(err)}).") from None
    names = zip_members(path, "save or download it again")
    if names is not None:
        if _torchscript_names(names):
            return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "archive"
        if any(os.path.basename(n) == "archive_format" for n in names):
            raise ModelError(
                f"{path} is a torch.export program, which emparsl does not run; {_EXPORT}."
            )
        raise ModelError(f"{path} is a zip file but not a TorchScript or PyTorch file; {_EXPORT}.")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    raise ModelError(_not_a_model(path, architecture))


def _torchscript_with_architecture(path: str) -> str:
    return (
        f"{path} is a TorchScript model, which carries its own architecture; remove "
        "`architecture` (and `arch_options`) from its sidecar and model options."
    )


def _weights_only(path: str, mmap: bool = False, architecture: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and numbers, never code."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 …": said below instead
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        # a global it refuses to load ("Unsupported global", or "unsupported GLOBAL
        # posix.system whose module posix is blocked"): code, not "cannot be read"
        if "safe_globals" in text or "Unsupported global" in text or "unsupported GLOBAL" in text:
            raise ModelError(_unsafe(path)) from None
        if "Unsupported operand" in text:  # a pickle Python's pickle.dump wrote, not torch.save
            raise ModelError(
                _not_a_model(path, architecture).replace(
                    " is not a ", " is a Python pickle, not a ", 1
                )
            ) from None
        # torch's own words lead with how to load it unsafely; the reason is on its last lines
        reason = text.rsplit("WeightsUnpickler error:", 1)[-1]
        raise ModelError(f"The weights {path} cannot be read ({one_line(reason)}).") from None
    except Exception as err:
        raise ModelError(f"The weights {path} cannot be read ({one_line(err)}).") from None


def _contents(path: str, architecture: bool, mmap: bool = False) -> tuple[str, Any]:
    """``("torchscript", None)`` or ``("state dict", the state dict)`` for a model file (not a
    package), or the one sentence that says why it cannot be loaded (``architecture``: whether
    its description names one)."""
    kind = _file_kind(path, architecture)
    if kind == "torchscript":
        if architecture:
            raise ModelError(_torchscript_with_architecture(path))
        return "torchscript", None
    state = _unwrapped_state(
        _weights_only(path, mmap=mmap and kind == "archive", architecture=architecture)
    )
    if isinstance(state, dict) and _holds_tensors(state):
        return "state dict", state
    if isinstance(state, dict):  # {"epoch": 3, "config": {…}}: asked for an architecture
        raise ModelError(
            f"{path} holds no weights (no tensors), so it is no model; "
            + (
                "save the network's weights with torch.save(model.state_dict(), …)."
                if architecture
                else f"{_EXPORT}."
            )
        )
    if architecture:
        raise ModelError(
            f"{path} does not hold a state dict; save model.state_dict() for an architecture."
        )
    raise ModelError(
        f"{path} is not a TorchScript model; export it with torch.jit.script or torch.jit.trace."
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _architecture(spec: ModelSpec) -> Any:
    from napari_emparsl.core.models.unet import UNet

    opts = dict(spec.arch_options)
    if spec.architecture in ("unet3d", "unet2d"):
        dims = 3 if spec.architecture == "unet3d" else 2
        unknown = sorted(set(opts) - {"base", "depth"})
        bad = [k for k in ("base", "depth") if k in opts and not _count(opts[k])]
        if unknown or bad:
            raise ModelError(
                f"The arch_options of {spec.architecture} are base and depth, whole numbers of "
                f"at least 1 (e.g. {{base: 8, depth: 2}}), not {opts}."
            )
        return UNet(spec.in_channels, spec.n_outputs, dims=dims, **opts)
    raise ModelError(
        f"Unknown architecture {spec.architecture!r}; the built-in ones are unet3d and unet2d."
    )


def _load_module(path: str, spec: ModelSpec) -> Any:
    import torch

    package = find_package(path)
    if package is not None:
        weights, data = read_weights(package)
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except Exception as err:
            raise ModelError(
                f"The TorchScript weights {weights} of {path} cannot be loaded ({one_line(err)})."
            ) from None
    what, state = _contents(path, bool(spec.architecture))
    if what == "torchscript":
        try:
            return torch.jit.load(path, map_location="cpu").eval()
        except Exception as err:
            raise ModelError(
                f"The TorchScript model {path} cannot be loaded ({one_line(err)})."
            ) from None
    if not spec.architecture:
        raise ModelError(
            f"{path} is a state dict without an architecture; add 'architecture: unet3d' (and its "
            "arch_options) to its sidecar, or export the model to TorchScript."
        )
    module = _architecture(spec)
    state = _without_prefix(state, module.state_dict())
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(
            f"The weights {path} do not fit the architecture {spec.architecture} with options "
            f"{spec.arch_options} and the description's channels ({_first_mismatch(err)}); "
            "check in_channels, classes / out_channels and arch_options."
        ) from None
    return module.eval()


def _holds_tensors(value: Any, depth: int = 0) -> bool:
    """Whether a loaded state dict holds a tensor (in nested dicts too, as some checkpoints)."""
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict) and depth < 4:
        return any(_holds_tensors(v, depth + 1) for v in value.values())
    return False


def _unwrapped_state(state: Any) -> Any:
    """The state dict inside the usual checkpoint wrappers: {"state_dict": …} (Lightning),
    {"model_state_dict": …}, {"model": …} — saved so, they were refused as not fitting."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _without_prefix(state: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """``state`` with a prefix every key shares dropped (``module.`` of DataParallel,
    ``model.`` of a Lightning module) where the architecture's keys have none."""
    keys = [k for k in state if isinstance(k, str)]
    if not keys or set(keys) & set(wanted):
        return state
    head = keys[0].split(".", 1)[0] + "."
    if all(k.startswith(head) for k in keys) and {k[len(head) :] for k in keys} & set(wanted):
        return {k[len(head) :]: v for k, v in state.items()}
    return state


def _channels_last(module: Any, spec: ModelSpec) -> Any:
    """Store the module's convolution weights channels-last, in place; returns the module.

    oneDNN runs convolutions with channels-last weights much faster on a CPU (the built-in 3D
    U-Net's blocks ~15–20 %, its whole-volume forward on two threads 2.4×, a 2D U-Net ~1.6×);
    the results differ by float rounding only (~1e-6). 5-D weights become ``channels_last_3d``,
    4-D ones ``channels_last``. 2D convolutions then also return channels-last activations, on
    which a model's own ``.view`` can fail: a model whose small trial forward fails so keeps the
    layout its file had.
    """
    import torch

    formats = {5: torch.channels_last_3d, 4: torch.channels_last}
    params = [p for p in module.parameters() if p.dim() in formats]
    if not params:
        return module
    before = [p.data for p in params]
    with torch.no_grad():
        for p in params:
            p.data = p.data.contiguous(memory_format=formats[p.dim()])
    size = spec.input_size([m * max(1, 16 // m) for m in spec.multiple])
    # a batch of two: with one, a view across the batch axis works in any layout
    shape = (2, spec.in_channels, *(size if spec.spatial_dims == 3 else size[1:]))
    try:
        with torch.inference_mode():
            module(torch.zeros(shape, dtype=params[0].dtype))  # a float16 model's own type
    except Exception:
        with torch.no_grad():
            for p, data in zip(params, before, strict=True):
                p.data = data
    return module


def _unsafe(path: str) -> str:
    return (
        f"{path} is a pickled Python object that needs code to load, which could run anything, so it "
        "is refused; export the model to TorchScript (torch.jit.save) or save its state_dict."
    )


def load_model(
    model: str, options: Mapping[str, Any] | None = None, device: str = "cpu"
) -> LoadedModel:
    """Load (once per process and device) and return the model with its spec and file hash.

    ``device`` is ``cpu`` or a torch CUDA device (``cuda:0``): on a CPU the convolution weights
    are stored channels-last (:func:`_channels_last`); on a GPU the module keeps its file's layout.
    """
    path = resolve_model(model)
    spec = describe_model(model, options)
    digest = file_hash(path)
    key = (digest, repr(sorted(spec.to_dict().items())), device)
    # the cache's lock is held for moments only; a load (seconds for a big model) holds its
    # own key's, so that a model loading (the run panel's trial of a file) does not stall the
    # blocks of another, nor the hashes asked on napari's thread
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _LOCK:
            cached = _CACHE.get(key)  # loaded by another thread meanwhile
            if cached is not None:
                _CACHE.move_to_end(key)
                return cached
        try:
            module = _load_module(path, spec)
            module = _channels_last(module, spec) if device == "cpu" else module.to(device)
            cached = LoadedModel(module, spec, digest, path)
            with _LOCK:
                for other in [k for k, v in _CACHE.items() if v.path == path and k[0] != digest]:
                    del _CACHE[other]  # the file's earlier weights: it was written anew
                _CACHE[key] = cached
                while len(_CACHE) > _CACHED:
                    _CACHE.popitem(last=False)
                global _LOADS
                _LOADS += 1
        finally:
            with _LOCK:
                _LOADING.pop(key, None)
    return cached


def models_loaded() -> int:
    """How many times this process has loaded a model from its file (cache misses)."""
    return _LOADS
