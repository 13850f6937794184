"""Convert image stacks (TIFF stack, folder of 2D TIFF/PNG slices, HDF5 dataset) to chunked N5.

The conversion streams slabs of whole chunk rows along z, so memory is bounded by one slab and no
two writes ever touch the same chunk. Before writing, :func:`estimate` compresses a sample of real
chunks to predict the number of chunk files (inodes) and the size on disk, which matters on the
shared filesystems of compute clusters.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from napari_emparsl.core.ledger import OutputLock
from napari_emparsl.core.n5attrs import N5_DTYPES, VolumeError
from napari_emparsl.core.paths import user_path
from napari_emparsl.core.units import nm_per_unit
from napari_emparsl.core.volume import (
    UNFINISHED,
    Volume,
    check_output_free,
    hidden_output,
    next_level_problem,
    parse_spec,
    stale_levels,
)

__all__ = ["Estimate", "ImportSource", "estimate", "import_volume", "open_source"]

SLICE_EXTENSIONS = (".tif", ".tiff", ".png")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".he5")
TIFF_EXTENSIONS = (".tif", ".tiff")

#: below this many bytes per chunk, per-file overhead dominates on shared filesystems
TINY_CHUNK_BYTES = 32 * 1024
#: more chunk files than this strains inode quotas
MANY_FILES = 1_000_000
#: above this many voxels a chunk no longer fits a typical GPU tile (256^3)
HUGE_CHUNK_VOXELS = 256**3


@dataclass
class ImportSource:
    """A 3D (z, y, x) source read slab by slab."""

    description: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    read_slab: Callable[[int, int], np.ndarray]
    close: Callable[[], None] = lambda: None
    paths: tuple[str, ...] = ()  # files that must never be written to
    voxel_size: tuple[float, float, float] | None = None  # z, y, x nm, as the files record it
    voxel_from: str = ""  # where from ("the TIFF's ImageJ metadata"), or why none
    offset: tuple[float, float, float] | None = None  # z, y, x nm of voxel 0, as recorded


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _as_gray(arr: np.ndarray, name: str) -> np.ndarray:
    """EM slices are grey; PNG writers sometimes store grey as identical RGB(A) channels."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        raise VolumeError(f"{name} is a colour image; convert the slices to greyscale first.")
    if arr.ndim != 2:
        raise VolumeError(
            f"{name} is not a 2D image (shape {'×'.join(map(str, arr.shape))}); give 2D slices."
        )
    return arr


def _unreadable(what: str, err: BaseException, fix: str) -> VolumeError:
    """One sentence for data that cannot be read: what, why, and what to do — installing
    imagecodecs where tifffile says a codec needs it (LZW, zstd, JPEG …), else ``fix``."""
    if "imagecodecs" in str(err):
        fix = "install imagecodecs (pip install imagecodecs) and import again"
    elif isinstance(err, OSError) and re.search(
        r"not registered|plugin|dlopen", str(err), re.IGNORECASE
    ):
        # HDF5's words for a compression filter it has not (blosc, zstd, lz4, bitshuffle …):
        # "required filter … is not registered", "can't open directory (…/plugin)"
        fix = (
            "it is compressed with a filter this HDF5 library lacks: install hdf5plugin "
            "(pip install hdf5plugin) and import again"
        )
    return VolumeError(f"{what} cannot be read ({str(err)[:100] or type(err).__name__}); {fix}.")


def _no_slices(folder: str) -> str:
    """A folder that holds no slices: what it holds instead, and what to do with that (an N5
    container, HDF5 files, folders)."""
    none = f"{folder} holds no .tif, .tiff or .png slices"
    if os.path.exists(os.path.join(folder, "attributes.json")):
        return f"{none}: it is an N5 container or group; open it directly, no import needed."
    try:
        names = [n for n in os.listdir(folder) if not n.startswith(".")]
    except OSError:
        names = []
    h5 = sorted(n for n in names if n.lower().endswith(HDF5_EXTENSIONS))
    if h5:
        more = f" and {len(h5) - 1} more" if len(h5) > 1 else ""
        return (
            f"{none}, but HDF5 files ({h5[0]}{more}); import one of them as "
            f"{os.path.join(folder, h5[0])}:DATASET."
        )
    folders = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    kinds = sorted(
        {os.path.splitext(n)[1].lower() or "extensionless" for n in names if n not in folders}
    )
    held = [f"{len(folders)} folder{'s' if len(folders) != 1 else ''}"] if folders else []
    held += [f"{', '.join(kinds[:6])} files"] if kinds else []
    instead = f" (it holds {' and '.join(held)})" if held else " (it is empty)"
    return f"{none}{instead}; point to the folder of 2D slices."


def _slices(z0: int, z1: int, depth: int) -> str:
    """Sections z0..z1-1 as Fiji numbers them (from 1)."""
    return f"slice {z0 + 1}" if z1 - z0 == 1 else f"slices {z0 + 1}–{z1} of {depth}"


def _palette(path: str) -> bool:
    """Whether an image (not a TIFF: tifffile gives a palette TIFF's indices itself) holds
    palette indices (PNG's indexed colour, as label slices are often saved), from its header."""
    if path.lower().endswith(TIFF_EXTENSIONS):
        return False
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.mode == "P"
    except Exception:  # not an image Pillow reads: the reader says what is wrong with it
        return False


def _read_slice(path: str) -> np.ndarray:
    try:
        if path.lower().endswith(TIFF_EXTENSIONS):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                arr = tif.asarray()
                if _fiji_signed(tif, arr.dtype):  # as the stacks: what Fiji shows
                    arr = (arr ^ np.uint16(0x8000)).view(np.int16)
        elif _palette(path):  # its indices, as Fiji reads it (a palette's colours merged labels)
            from PIL import Image

            with Image.open(path) as img:
                arr = np.asarray(img)
        else:
            import imageio.v3 as iio

            arr = iio.imread(path)
    except Exception as err:  # image libraries raise many types for broken files
        raise _unreadable(
            f"The slice {path}", err, "replace or remove it and import again"
        ) from None
    return _as_gray(np.asarray(arr), os.path.basename(path))


def _slice_shape(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape and dtype of the first image, and how many images the file holds (a TIFF stack,
    an animated PNG: more than one), from the file header only."""
    if path.lower().endswith(TIFF_EXTENSIONS):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page, series = tif.pages[0], tif.series[0]
                # images along any axis but y, x and colour (pages; a volume in one page); a
                # thumbnail page beside the image is a series of its own, no second image
                axes = str(getattr(series, "axes", "")).upper()
                along = [n for a, n in zip(axes, series.shape, strict=False) if a not in "YXS"]
                images = max(math.prod(along), _imagej_images(tif))
                dtype = np.dtype(page.dtype)
                return (
                    tuple(page.shape),
                    np.dtype(np.int16) if _fiji_signed(tif, dtype) else dtype,
                    images,
                )
        except Exception as err:  # tifffile raises many types for broken files
            raise VolumeError(
                f"The slice {path} cannot be read ({str(err)[:100] or type(err).__name__}); "
                "replace or remove it and import again."
            ) from None
    if _palette(path):
        from PIL import Image

        with Image.open(path) as img:
            return (img.height, img.width), np.dtype(np.uint8), getattr(img, "n_frames", 1)
    import imageio.v3 as iio

    try:
        props = iio.improps(path)
    except Exception as err:
        raise VolumeError(
            f"The slice {path} cannot be read ({str(err)[:100] or type(err).__name__}); "
            "replace or remove it and import again."
        ) from None
    images = int(props.n_images or 1) if props.is_batch else 1
    return (
        tuple(props.shape)[1:] if images > 1 else tuple(props.shape),
        np.dtype(props.dtype),
        images,
    )


# ----------------------------------------------------------------------------------------------
# voxel size recorded by the files (Fiji / ImageJ, OME-TIFF, HDF5 conventions), in nm


def _nm(value: object, unit: object) -> float | None:
    per_nm = nm_per_unit(unit)
    try:
        size = float(value) * per_nm if per_nm is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return size if size is not None and math.isfinite(size) and size > 0 else None


def _ome_sizes(xml: str) -> tuple[float | None, float | None, float | None]:
    """z, y, x nm from OME-XML's first ``Pixels`` (its ``PhysicalSize*``, µm unless said)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, None
    return tuple(  # type: ignore[return-value]
        _nm(pixels.get(f"PhysicalSize{a}"), pixels.get(f"PhysicalSize{a}Unit", "µm"))
        if pixels.get(f"PhysicalSize{a}") is not None
        else None
        for a in "ZYX"
    )


def _tiff_sizes(tif: Any) -> tuple[tuple[float | None, float | None, float | None], str]:
    """z, y, x nm of a TIFF (None where not recorded) and where they come from."""
    if tif.is_ome and tif.ome_metadata:
        sizes = _ome_sizes(tif.ome_metadata)
        if any(sizes):
            return sizes, "the OME-TIFF metadata"
    meta = tif.imagej_metadata if tif.is_imagej else None
    if meta and nm_per_unit(meta.get("unit", "")) is not None:
        unit = meta["unit"]
        tags = tif.pages[0].tags

        def size(tag: str) -> float | None:  # pixels per unit, as a fraction
            value = tags[tag].value if tag in tags else None
            if not value or not value[0]:
                return None
            return _nm(value[1] / value[0], unit)

        # ImageJ leaves out a stack's section thickness (spacing) of 1 unit: Fiji reads none
        # as 1; a single image (a slice of a folder) says nothing of its thickness
        stack = _imagej_images(tif) > 1
        z = _nm(meta["spacing"], unit) if "spacing" in meta else _nm(1.0, unit) if stack else None
        return (z, size("YResolution"), size("XResolution")), "the TIFF's ImageJ metadata"
    return (None, None, None), ""


def _voxel_size(
    sizes: tuple[float | None, float | None, float | None], where: str, depth: int
) -> tuple[tuple[float, float, float] | None, str]:
    """A voxel size from what a source records (a single section needs no z), or None and
    what was missing."""
    z, y, x = sizes
    if y is not None and x is not None and z is None and depth == 1:
        z = x  # one section: its thickness changes nothing
    if None not in (z, y, x):
        return (z, y, x), where  # type: ignore[return-value]
    if y is not None and x is not None:
        return None, f"{where} records {y:g}×{x:g} nm pixels but no section thickness"
    return None, ""


def _folder_source(folder: str) -> ImportSource:
    names = sorted(
        # hidden files are no slices: "._z1.tif" is macOS's note on z1.tif, not an image
        (
            n
            for n in os.listdir(folder)
            if n.lower().endswith(SLICE_EXTENSIONS) and not n.startswith(".")
        ),
        key=_natural_key,
    )
    if not names:
        raise VolumeError(_no_slices(folder))
    paths = [os.path.join(folder, n) for n in names]
    headers = [_slice_shape(p) for p in paths]
    stacks = [(p, images) for p, (_, _, images) in zip(paths, headers, strict=True) if images > 1]
    if stacks:  # a stack among the slices, or a folder of stacks (an image and its labels)
        (path, images), more = stacks[0], len(stacks) - 1
        if path.lower().endswith(TIFF_EXTENSIONS):
            fix = (
                f"import {'each' if more else 'the'} stack itself (emparsl import {path} "
                "OUT.n5:DATASET)"
            )
        else:  # an animated PNG: no source of its own
            fix = "save it as a TIFF stack and import that"
        if len(stacks) < len(paths):
            fix += f", or move {'them' if more else 'it'} out of the folder of slices"
        raise VolumeError(
            f"{os.path.basename(path)} in {folder} is a stack of {images} images, not a slice"
            + (f" (and so are {more} more files there)" if more > 1 else "")
            + (f" (and so is {os.path.basename(stacks[1][0])})" if more == 1 else "")
            + f"; {fix}."
        )
    first_shape, first_dtype, _ = headers[0]
    for p, (shape, dtype, _) in zip(paths[1:], headers[1:], strict=True):
        if shape != first_shape or dtype != first_dtype:
            raise VolumeError(
                f"Slice {os.path.basename(p)} is {'×'.join(map(str, shape))} {dtype.name} but "
                f"{names[0]} is {'×'.join(map(str, first_shape))} {first_dtype.name}; all slices "
                "must have the same size and type."
            )
    first = _read_slice(paths[0])

    def read_slab(z0: int, z1: int) -> np.ndarray:
        return np.stack([_read_slice(p) for p in paths[z0:z1]])

    sizes, where = (None, None, None), ""
    if paths[0].lower().endswith(TIFF_EXTENSIONS):
        import tifffile

        try:
            with tifffile.TiffFile(paths[0]) as tif:
                sizes, where = _tiff_sizes(tif)
        except Exception:  # read once already: metadata that does not parse is no metadata
            pass
        where = where and where.replace("the TIFF's ", "the ") + f" of {names[0]}"
    voxel, where = _voxel_size(sizes, where, len(paths))
    return ImportSource(
        f"{len(paths)} slices in {folder}",
        (len(paths), *first.shape),
        first.dtype,
        read_slab,
        paths=tuple(paths),
        voxel_size=voxel,
        voxel_from=where,
    )


def _imagej_images(tif: Any) -> int:
    """How many images an ImageJ TIFF's header says it holds (0: not said)."""
    try:
        images = (tif.imagej_metadata or {}).get("images", 0) if tif.is_imagej else 0
        return int(images)
    except (TypeError, ValueError):
        return 0


def _other_axis(axes: str, shape: tuple[int, ...]) -> str:
    """What a TIFF holds along an axis of length > 1 that is not z (Z; I, Q: tifffile's names
    for a plain page sequence) nor y, x: "holds 5 time points", or "" if none.

    A time series is no z-stack: imported as one, its time points became sections (and
    OME's PhysicalSizeZ their thickness)."""
    if len(axes) != len(shape):
        return ""
    for axis, n in zip(axes[:-2], shape[:-2], strict=True):
        if n > 1 and axis not in "ZIQ":
            if axis == "T":
                return f"holds {n} time points"
            from tifffile import TIFF

            name = getattr(TIFF, "AXES_NAMES", {}).get(axis, "")
            return f"holds {n} images along its {name + ' ' if name else ''}axis {axis}"
    return ""


class _TiffComplaints(logging.Handler):
    """tifffile's errors while it reads a file's pages: it logs a chain of pages that breaks
    off (a file cut short: "invalid page offset") and returns the pages before."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _open_tiff(path: str, **flags: Any) -> tuple[Any, list[str]]:
    """The TIFF file with all its pages and series read, and what tifffile complained of."""
    import tifffile

    complaints = _TiffComplaints()
    logger = logging.getLogger("tifffile")
    logger.addHandler(complaints)
    try:
        tif = tifffile.TiffFile(path, **flags)
        try:
            len(tif.pages)  # every page's header: where the chain breaks off, tifffile says
            tif.series[0]  # the series, read while listening
        except BaseException:
            tif.close()
            raise
    finally:
        logger.removeHandler(complaints)
    return tif, complaints.messages


def _one_stack(tif: Any) -> list[Any]:
    """The file's series that are images of the stack: a reduced-resolution page (a
    thumbnail, a preview) left out."""
    return [s for s in tif.series if not getattr(s.pages[0], "is_reduced", False)]


def _imagej_offset(tif: Any, voxel: Sequence[float] | None) -> tuple[float, float, float] | None:
    """Where an ImageJ stack's voxel 0 lies (z, y, x nm): its origin (``xorigin``, … in
    pixels, as Fiji's Image > Properties sets it) times its voxel size, negated; None where it
    records none."""
    if voxel is None or not tif.is_imagej:
        return None
    meta = tif.imagej_metadata or {}
    try:
        origin = [float(meta.get(f"{a}origin", 0) or 0) for a in "zyx"]
    except (TypeError, ValueError):
        return None
    if not any(origin) or not all(math.isfinite(o) for o in origin):
        return None
    return tuple(-o * v + 0.0 for o, v in zip(origin, voxel, strict=True))  # type: ignore[return-value]


def _fiji_signed(tif: Any, dtype: np.dtype) -> bool:
    """Whether a TIFF is Fiji's signed 16-bit image: Fiji stores it as unsigned values 32768
    above the signed ones, with the calibration ``cf=0 c0=-32768 c1=1`` that shows them as
    they were (imported as stored, -600 became 32168)."""
    if dtype != np.uint16 or not tif.is_imagej:
        return False
    meta = tif.imagej_metadata or {}
    try:
        return (
            int(meta.get("cf", -1)) == 0
            and float(meta.get("c0", 0)) == -32768
            and float(meta.get("c1", 0)) == 1
        )
    except (TypeError, ValueError):
        return False


def _tiff_source(path: str) -> ImportSource:
    try:
        tif, complaints = _open_tiff(path)
        stack = _one_stack(tif)
        if (
            len(stack) > 1
            and len({(tuple(s.shape), str(s.dtype)) for s in stack}) == 1
            and all(len(s.pages) == 1 and len(s.shape) == 2 for s in stack)
        ):
            # pages written one by one with tifffile (each with a "shaped" description of its
            # own): one series per page, of one size and type — read as one stack
            tif.close()
            tif, complaints = _open_tiff(path, is_shaped=False)
            stack = _one_stack(tif)
        series = stack[0] if stack else tif.series[0]
    except Exception as err:  # tifffile raises many types for broken files
        raise VolumeError(f"{path} is not a readable TIFF file ({err}).") from None
    shape = tuple(series.shape)
    axes = str(getattr(series, "axes", "")).upper()
    problem = None
    broken = [m for m in complaints if "invalid page offset" in m or "corrupted" in m]
    if (images := _imagej_images(tif)) > math.prod(shape[:-2]):
        # tifffile, finding fewer images than the header says, gives the first alone
        problem = (
            f"{path} is cut short: its ImageJ header says {images} images but the file holds "
            f"{math.prod(shape[:-2])}; replace it (copy it again) and import again"
        )
    elif broken:  # the chain of pages breaks off: tifffile gave the pages before
        problem = (
            f"{path} is cut short or damaged: it points to pages that are not there; replace "
            "it (copy it again) and import again"
        )
    elif len(stack) > 1:  # pages that are not one stack: another size or type among them
        shapes = ", ".join("×".join(map(str, s.shape)) for s in stack[:4])
        problem = (
            f"{path} holds {len(stack)} image series ({shapes}{', …' if len(stack) > 4 else ''}), "
            "not one stack (a page differs in size or type from the others); save the stack "
            "alone, or as a folder of slices"
        )
    elif "S" in axes:
        problem = f"{path} is a colour image (axes {axes}); convert it to greyscale first"
    elif "C" in axes:
        problem = (
            f"{path} holds {shape[axes.index('C')]} channels (axes {axes}); import needs one "
            "greyscale channel: save each channel as a stack of its own"
        )
    elif extra := _other_axis(axes, shape):
        problem = f"{path} {extra} (axes {axes}); import needs a z-stack: " + (
            "save one time point as a stack and import that (if these are z sections, set "
            "Slices to their number and Frames to 1 in Fiji's Image > Properties, and save "
            "again)"
            if extra.endswith("time points")
            else "save one z-stack of it and import that"
        )
    if problem is not None:
        tif.close()
        raise VolumeError(problem + ".")
    while len(shape) > 3 and shape[0] == 1:  # a single time point, a single position, …
        shape = shape[1:]
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        tif.close()
        raise VolumeError(
            f"{path} holds a {len(series.shape)}-D image of shape "
            f"{'×'.join(map(str, series.shape))}; import needs a "
            "3D (z, y, x) greyscale stack."
        )
    n_pages = len(series.pages)
    # one header for all sections (Fiji's stacks over 4 GB, tifffile's own): where the
    # sections lie uncompressed one after another, a slab is read alone, not the whole file
    offset = None
    if n_pages != shape[0]:
        try:
            offset = series.dataoffset
        except Exception:  # no contiguous data: read whole below
            offset = None
    stored = np.dtype(series.dtype).newbyteorder(tif.byteorder)

    def read_pages(z0: int, z1: int) -> np.ndarray:
        if n_pages == shape[0]:
            arr = series.asarray(key=range(z0, z1)) if z1 - z0 > 1 else series.asarray(key=z0)
            return np.asarray(arr).reshape((z1 - z0, *shape[1:]))
        if offset is not None:
            per = math.prod(shape[1:]) * stored.itemsize  # bytes of one section
            with open(path, "rb") as f:
                f.seek(offset + z0 * per)
                buf = f.read((z1 - z0) * per)
            if len(buf) < (z1 - z0) * per:
                raise ValueError(f"the file ends within slice {z0 + len(buf) // per + 1}")
            return np.frombuffer(buf, stored).reshape((z1 - z0, *shape[1:]))
        return np.asarray(series.asarray())[z0:z1]  # compressed in one page: no finer access

    signed = _fiji_signed(tif, np.dtype(series.dtype))

    def read_slab(z0: int, z1: int) -> np.ndarray:
        try:
            pages = read_pages(z0, z1)
            if signed:  # Fiji's signed 16-bit: stored + 32768, calibrated back by -32768
                return (np.asarray(pages, np.uint16) ^ np.uint16(0x8000)).view(np.int16)
            return pages
        except Exception as err:  # a damaged file, a codec missing: tifffile raises many types
            raise _unreadable(
                f"The TIFF stack {path} ({_slices(z0, z1, shape[0])})",
                err,
                "the file is damaged (cut short, or a page corrupt): replace it and import again",
            ) from None

    try:
        sizes, where = _tiff_sizes(tif)
    except Exception:  # metadata that does not parse is no metadata
        sizes, where = (None, None, None), ""
    voxel, where = _voxel_size(sizes, where, shape[0])
    return ImportSource(
        f"TIFF stack {path}",
        shape,
        np.dtype(np.int16) if signed else np.dtype(series.dtype),
        read_slab,
        tif.close,
        (path,),
        voxel,
        where,
        _imagej_offset(tif, voxel),
    )


def _hdf5_source(path: str, key: str) -> ImportSource:
    import h5py

    try:  # registers the common compression filters (blosc, zstd, lz4 …) with h5py
        import hdf5plugin  # noqa: F401
    except Exception:  # not installed (or broken): files without those filters still read
        pass

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise VolumeError(f"{path} is not a readable HDF5 file ({err}).") from None
    datasets: list[str] = []
    f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    if not key:
        if len(datasets) != 1:
            f.close()
            raise VolumeError(
                f"{path} holds {len(datasets)} datasets ({', '.join(datasets[:10]) or 'none'}); "
                f"name one as {path}:DATASET."
            )
        key = datasets[0]
    if key not in f or not isinstance(f[key], h5py.Dataset):
        f.close()
        raise VolumeError(
            f"There is no dataset '{key}' in {path}; available: {', '.join(datasets[:20])}."
        )
    ds = f[key]
    order = _axistags(ds)
    if order is not None:  # ilastik's axis order (xyz, zyxc, tzyxc, …)
        try:
            return _hdf5_axes_source(f, path, key, ds, order)
        except BaseException:
            f.close()
            raise
    if ds.ndim != 3:
        shape = ds.shape  # before closing: a closed file's dataset has no shape
        f.close()
        raise VolumeError(
            f"{path}:{key} has shape {'×'.join(map(str, shape))}; import needs a 3D (z, y, x) "
            "dataset."
        )
    return _hdf5_axes_source(f, path, key, ds, "zyx")


def _hdf5_voxel_size(ds: Any, order: str) -> tuple[tuple[float, float, float] | None, str]:
    """An HDF5 dataset's voxel size (z, y, x nm) from Fiji's and ilastik's element_size_um
    (µm) or CREMI's resolution (nm), one value per axis of the dataset in ``order`` (its z, y,
    x taken), or three for z, y, x; and where it comes from."""
    sizes, where = (None, None, None), ""
    for name, unit in (("element_size_um", "µm"), ("resolution", "nm")):
        values = list(np.ravel(np.asarray(ds.attrs.get(name, []), dtype=object)))
        if len(values) == len(order) and len(order) != 3:
            values = [values[order.index(a)] for a in "zyx"]
        elif len(values) == 3 and len(order) == 3:
            values = [values[order.index(a)] for a in "zyx"]
        if len(values) == 3:
            sizes, where = tuple(_nm(v, unit) for v in values), f"the dataset's {name} attribute"
            break
    return _voxel_size(sizes, where, ds.shape[order.index("z")])  # type: ignore[arg-type]


def _hdf5_unreadable(name: str, z0: int, z1: int, depth: int, err: BaseException) -> VolumeError:
    """A slab of an HDF5 dataset that cannot be read (a corrupt chunk, a filter h5py lacks)."""
    return _unreadable(
        f"The HDF5 dataset {name} ({_slices(z0, z1, depth)})",
        err,
        "the file is damaged or uses a compression h5py cannot read: replace it (or save the "
        "dataset again) and import again",
    )


def _axistags(ds: Any) -> str | None:
    """The axis order ilastik (vigra) records in a dataset's ``axistags`` ("zyxc", "xyz"), as
    one letter per axis, or None where none is recorded or it does not fit the dataset."""
    import json

    text = ds.attrs.get("axistags")
    if text is None:
        return None
    try:
        keys = "".join(str(a["key"]).lower() for a in json.loads(text)["axes"])
    except (TypeError, ValueError, KeyError):
        return None
    if len(keys) != ds.ndim or len(set(keys)) != len(keys) or not set("zyx") <= set(keys):
        return None
    return keys


def _hdf5_axes_source(f: Any, path: str, key: str, ds: Any, order: str) -> ImportSource:
    """An HDF5 dataset in the axis order its axistags give (``zyx`` without them), read as z,
    y, x: the axes in another order (ilastik's xyz), a channel or time axis of length 1
    dropped."""
    name = f"{path}:{key}"
    for axis, n in zip(order, ds.shape, strict=True):
        if axis not in "zyx" and n > 1:
            what = "channels" if axis == "c" else "time points" if axis == "t" else f"{axis} images"
            raise VolumeError(
                f"{name} holds {n} {what} (axes {order}); import needs one greyscale z-stack: "
                "export each as a dataset of its own and import that."
            )
    at = {a: order.index(a) for a in "zyx"}
    shape = tuple(int(ds.shape[at[a]]) for a in "zyx")
    kept = [a for a in order if a in "zyx"]  # the z, y, x axes in the dataset's order
    to_zyx = [kept.index(a) for a in "zyx"]

    def read_slab(z0: int, z1: int) -> np.ndarray:
        index = tuple(slice(z0, z1) if a == "z" else slice(None) if a in "yx" else 0 for a in order)
        try:
            return np.ascontiguousarray(np.transpose(ds[index], to_zyx))
        except Exception as err:  # a corrupt chunk, a compression filter h5py lacks
            raise _hdf5_unreadable(name, z0, z1, shape[0], err) from None

    voxel, where = _hdf5_voxel_size(ds, order)
    return ImportSource(
        f"HDF5 {name}" + (f" (axes {order})" if order != "zyx" else ""),
        shape,
        np.dtype(ds.dtype),
        read_slab,
        f.close,
        (path,),
        voxel,
        where,
    )


def open_source(spec: str) -> ImportSource:
    """Open a TIFF stack, a folder of slices, or ``file.h5[:dataset]`` for reading."""
    spec = user_path(spec)
    path, key = spec, ""
    if ":" in spec and not os.path.exists(spec):
        # the first colon after the file's name: one in the dataset name stays there (a.h5:raw:v2)
        at = next(
            (
                i
                for i, ch in enumerate(spec)
                if ch == ":" and spec[:i].lower().endswith(HDF5_EXTENSIONS)
            ),
            None,
        )
        if at is not None:
            path, key = spec[:at], spec[at + 1 :]
    if not os.path.exists(path):
        raise VolumeError(f"{path} does not exist; check the path.")
    low = path.lower()
    if os.path.isdir(path):
        source = _folder_source(path)
    elif low.endswith(HDF5_EXTENSIONS):
        source = _hdf5_source(path, key)
    elif low.endswith(TIFF_EXTENSIONS):
        source = _tiff_source(path)
    else:
        raise VolumeError(
            f"{path} is neither a TIFF stack, a folder of TIFF/PNG slices, nor an HDF5 file; "
            "convert it to one of these first."
        )
    if 0 in source.shape:
        source.close()
        raise VolumeError(
            f"{source.description} is empty (shape {'×'.join(map(str, source.shape))}); "
            "import needs a volume with at least one voxel along each axis."
        )
    return source


# ----------------------------------------------------------------------------------------------
# estimate


@dataclass(frozen=True)
class Estimate:
    n_files: int
    raw_bytes: int
    disk_bytes: int
    chunk_bytes: int
    ratio: float  # compressed / raw, measured on sample chunks
    warnings: tuple[str, ...]
    voxel_size: tuple[float, ...] | None = None  # what the output gets (None: not known)
    unit: str = "nm"
    voxel_from: str = ""  # "given", or the metadata it was read from

    def summary(self) -> str:
        return (
            f"{self.n_files:,} chunk file{'' if self.n_files == 1 else 's'}, about "
            f"{human_size(self.disk_bytes)} on disk "
            f"({human_size(self.raw_bytes)} uncompressed, measured ratio {self.ratio:.2f})"
        )


def human_size(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB / TiB, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _compress(buf: bytes, compression: str) -> int:
    if compression == "gzip":
        return len(zlib.compress(buf, 5))  # z5py's default gzip level
    if compression == "raw":
        return len(buf)
    if compression == "bzip2":
        import bz2

        return len(bz2.compress(buf))
    if compression == "xz":
        import lzma

        return len(lzma.compress(buf))
    raise VolumeError(f"Unknown compression '{compression}'; use gzip, raw, bzip2 or xz.")


def estimate(
    source: ImportSource, chunks: Sequence[int], compression: str = "gzip", samples: int = 12
) -> Estimate:
    """Predict chunk files and disk size by compressing real chunks sampled along z."""
    shape = source.shape
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))
    grid = [math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)]
    n_files = math.prod(grid)
    itemsize = source.dtype.itemsize
    raw_bytes = math.prod(shape) * itemsize
    chunk_bytes = math.prod(chunks) * itemsize
    # up to 3 slabs spread over z, up to samples/3 chunks from each
    rng = np.random.default_rng(0)
    zs = sorted({int(z) for z in np.linspace(0, grid[0] - 1, num=min(3, grid[0]))})
    raw_total = comp_total = 0
    for gz in zs:
        z0 = gz * chunks[0]
        slab = source.read_slab(z0, min(z0 + chunks[0], shape[0]))
        for _ in range(max(1, samples // len(zs))):
            gy, gx = int(rng.integers(grid[1])), int(rng.integers(grid[2]))
            block = np.ascontiguousarray(
                slab[
                    :,
                    gy * chunks[1] : (gy + 1) * chunks[1],
                    gx * chunks[2] : (gx + 1) * chunks[2],
                ]
            )
            # N5 stores big-endian; the byte order does not change the compressed size much
            raw_total += block.nbytes
            comp_total += _compress(block.tobytes(), compression)
    ratio = comp_total / raw_total if raw_total else 1.0
    warnings = []
    # (a few tiny chunks strain nothing: a 5×20×20 stack, one file of 2 KiB, was told to use
    # 64³; a 1×4096×4096 image in 1×64×64 chunks is 4,096 files of 4 KiB)
    could_grow = n_files > 64
    if (chunk_bytes < TINY_CHUNK_BYTES and could_grow) or n_files > MANY_FILES:
        better = [min(64, s) for s in shape]  # grown in y, x first where z is thin (one slice)
        while math.prod(better) * itemsize < TINY_CHUNK_BYTES and (
            better[1] < shape[1] or better[2] < shape[2]
        ):
            better[1:] = [min(2 * b, s) for b, s in zip(better[1:], shape[1:], strict=True)]
        warnings.append(
            f"Chunks of {'×'.join(map(str, chunks))} ({human_size(chunk_bytes)}) give {n_files:,} "
            f"file{'s' if n_files != 1 else ''}: tiny chunks strain shared filesystems; consider "
            f"{'×'.join(map(str, better))} or larger."
        )
    if math.prod(chunks) > HUGE_CHUNK_VOXELS:
        warnings.append(
            f"Chunks of {'×'.join(map(str, chunks))} are bigger than a GPU tile (256³ voxels); "
            "every block read will load more than it needs: consider 64×64×64 to 128×128×128."
        )
    return Estimate(n_files, raw_bytes, int(raw_bytes * ratio), chunk_bytes, ratio, tuple(warnings))


# ----------------------------------------------------------------------------------------------
# import


def _storable(source: ImportSource) -> ImportSource:
    """The source as N5 stores it: float16 read as float32 and bool as uint8 (both lossless);
    a type N5 cannot store (complex, strings, …) refused in one sentence."""
    dtype = source.dtype
    to = {"float16": np.float32, "bool": np.uint8}.get(dtype.name)
    if to is not None:
        read = source.read_slab
        return replace(
            source,
            dtype=np.dtype(to),
            read_slab=lambda z0, z1: np.asarray(read(z0, z1)).astype(to),
        )
    if dtype.name not in N5_DTYPES:
        raise VolumeError(
            f"{source.description} holds {dtype.name} data, which N5 cannot store; convert it "
            f"to one of {', '.join(N5_DTYPES)} and import again."
        )
    return source


def _same_path(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def iter_import(
    src: str,
    dest: str,
    *,
    chunks: Sequence[int] = (64, 64, 64),
    compression: str = "gzip",
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> Iterator[Estimate | tuple[int, int]]:
    """Import ``src`` into ``dest`` (``OUT.n5:DATASET``) as a generator.

    Yields the :class:`Estimate` first (before anything is written), then ``(slabs_done,
    slabs_total)`` after each slab. On any error (or when closed before the last slab) the
    partly written dataset is removed, with the container and groups the import made, so a
    failed import never leaves an output that looks complete, nor an empty container. ``dry_run``: only the estimate is
    wanted; an existing output is said in it, not refused. ``voxel_size`` (z, y, x) is in
    ``unit`` (a length: nm when not given) and recorded in nm, as one read from the files is.
    """
    out_root, out_key = parse_spec(dest)
    out_key = out_key or "raw"
    voxel_size, given = _in_nm(voxel_size, unit)
    source = open_source(src)
    lock = OutputLock(out_root, out_key, "import")
    made: list[str] = []  # the folders this import made (the container, its groups), outer first
    finished = False
    try:
        source = _storable(source)  # before the estimate: --dry-run refuses it too
        if any(_same_path(p, out_root) for p in (*source.paths, src.split(":")[0])):
            raise VolumeError(
                f"The output {out_root} is the input (or inside it); choose another output path."
            )
        # a dry run over an existing output still gives its estimate (and says so)
        taken = dry_run and not overwrite and os.path.exists(os.path.join(out_root, out_key))
        check_output_free(out_root, out_key, overwrite or taken)
        hidden = hidden_output(out_root, out_key)
        if hidden:  # written, then neither listed nor opened
            raise VolumeError(
                f"The output {out_root}:{out_key} would lie inside {hidden}; choose a name "
                "outside it."
            )
        stale = stale_levels(out_root, out_key)
        if stale:  # its pyramid's other levels would show the old data
            pyramid = out_key.rsplit("/", 1)[0] if "/" in out_key else ""
            raise VolumeError(
                f"The output {stale}; "
                + (
                    f"import into the pyramid itself ({out_root}:{pyramid} with --overwrite, "
                    "which replaces all its levels), or choose another name."
                    if pyramid
                    else "import into another container (this one is the pyramid)."
                )
            )
        unlisted = next_level_problem(out_root, out_key, source.shape, source.dtype)
        if unlisted:  # a new level the pyramid would leave out
            raise VolumeError(f"The output {out_root}:{out_key} {unlisted}; choose another name.")
        chunks = tuple(int(c) for c in chunks)
        if len(chunks) != 3 or min(chunks) < 1:
            raise VolumeError(f"Chunks must be three positive sizes z,y,x, not {chunks}.")
        est = estimate(source, chunks, compression)
        offset = None
        if voxel_size is not None:
            voxel_from = given
        elif source.voxel_size is not None:
            voxel_size, voxel_from = source.voxel_size, f"from {source.voxel_from}"
            offset = source.offset  # in the files' own voxels: with their voxel size only
        else:
            voxel_from = ""
            missing = (
                f"{source.voxel_from[0].upper()}{source.voxel_from[1:]}"
                if source.voxel_from
                else "The source records no voxel size"
            )
            est = replace(
                est,
                warnings=(
                    *est.warnings,
                    f"{missing}: the volume is written without one (1 pixel per voxel); give "
                    "--voxel-size z,y,x in nm to record it.",
                ),
            )
        est = replace(
            est, voxel_size=voxel_size and tuple(voxel_size), unit="nm", voxel_from=voxel_from
        )
        if taken:
            est = replace(
                est,
                warnings=(
                    *est.warnings,
                    f"The output {out_root}:{out_key} already exists: importing needs "
                    "--overwrite to replace it.",
                ),
            )
        yield est
        # from here until the import ends, no run (nor another import) writes this output; a
        # run writing it now refuses the import (OutputBusy), before anything is written
        missing = _missing_folders(out_root, out_key)  # before the lock, which makes the container
        lock.acquire()
        made = missing  # (a lock held by another writer: what it made is its own)
        if lock.held:  # (a file system without locks: another import may be writing one)
            _clear_leftovers(out_root, out_key)  # of imports killed outright (kill -9) before
        # looked at again under the lock: a run may have made the output since
        check_output_free(out_root, out_key, overwrite)  # refused now, in one sentence
        # replacing a dataset: written beside it and swapped in when whole, so that a failed
        # import keeps the one it was to replace
        replacing = overwrite and os.path.exists(os.path.join(out_root, out_key))
        write_key = out_key
        if replacing:
            head, _, name = out_key.rpartition("/")
            hidden = f".{name}.importing-{uuid.uuid4().hex[:8]}"
            write_key = f"{head}/{hidden}" if head else hidden
        try:  # a dataset made and not finished is removed, however it ends
            vol = Volume.create(
                out_root,
                write_key,
                source.shape,
                source.dtype,
                chunks,
                compression=compression,
                voxel_size=voxel_size,
                unit="nm",
                offset=offset,
                attrs={
                    "source": source.description,
                    UNFINISHED: f"an import of {src} that has not finished",
                },
                overwrite=overwrite and not replacing,
            )
            slab = vol.chunks[0]  # whole chunk rows: no two writes share a chunk
            total = math.ceil(source.shape[0] / slab)
            for i in range(total):
                z0 = i * slab
                data = np.asarray(source.read_slab(z0, min(z0 + slab, source.shape[0])))
                try:
                    vol.write(data, (z0, 0, 0))
                except (OSError, RuntimeError) as err:  # z5 says "failed to write chunk file"
                    where = _slices(z0, z0 + len(data), source.shape[0])
                    raise _write_failed(out_root, data.nbytes, where, err) from None
                if i + 1 == total:
                    vol.mark_finished()
                    if replacing:
                        _swap_in(out_root, write_key, out_key)
                    finished = True
                yield (i + 1, total)
        except BaseException:
            if not finished:
                shutil.rmtree(os.path.join(out_root, write_key), ignore_errors=True)
            raise
    finally:
        source.close()
        if not finished:  # a container (or group) made for nothing is no output either
            _remove_made(made, lock.path, lock_held=lock.held)
        lock.release(remove=True)  # an import leaves no lock file


def _write_failed(root: str, nbytes: int, where: str, err: BaseException) -> VolumeError:
    """A slab's write that failed, in one sentence: a full disk, a folder it may not write to,
    or what the writer said."""
    try:
        free: int | None = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and free < nbytes:
        why = f"the disk holding {root} is full ({human_size(free)} free)"
        fix = "free space there, or import elsewhere"
    elif not os.access(root, os.W_OK):
        why = f"{root} may not be written to (its permissions)"
        fix = "make it writable, or import elsewhere"
    else:
        why = str(getattr(err, "strerror", None) or err)
        fix = "check the disk and its free space, and import again"
    return VolumeError(f"The import could not write {where}: {why}; nothing of it was kept; {fix}.")


def _in_nm(
    voxel_size: Sequence[float] | None, unit: str | None
) -> tuple[tuple[float, ...] | None, str]:
    """A voxel size given in ``unit`` (None: nm) in nm, and how the estimate says it was given
    ("given", "given as 0.01×0.01×0.01 um"); a unit that is no length, or one without a voxel
    size (it would change nothing), refused in one sentence."""
    if voxel_size is None:
        if unit is not None:
            raise VolumeError(
                f"--unit {unit} is the unit of --voxel-size, which is not given (a voxel size "
                "the files record is read in their own unit and recorded in nm); give "
                "--voxel-size Z,Y,X with it, or leave --unit out."
            )
        return None, ""
    per_nm = nm_per_unit(unit if unit is not None else "nm")
    if per_nm is None:
        raise VolumeError(
            f"--unit {unit} is no unit of length the import knows; give the voxel size in nm, "
            "µm (um, micron), mm or Å (angstrom)."
        )
    try:
        values = [float(v) for v in voxel_size]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        # (the command line checks its own; the Python API took (40, 4), 0 and NaN, and NaN
        # broke the attributes' JSON after the dataset was made)
        raise VolumeError(f"The voxel size is three positive numbers z,y,x, not {voxel_size!r}.")
    nm = tuple(float(f"{float(v) * per_nm:.12g}") for v in voxel_size)  # 0.004 µm: 4, not 4.0…01
    if per_nm == 1:
        return nm, "given"
    return nm, f"given as {'×'.join(f'{float(v):g}' for v in voxel_size)} {unit}"


def _missing_folders(root: str, key: str) -> list[str]:
    """The folders an import of ``root:key`` would make, outer first: the container (with the
    folders above it that are missing too) and the groups on the way to the dataset."""
    root = os.path.normpath(root)  # new.n5/ and new.n5 are one folder
    groups = key.strip("/").split("/")[:-1]
    inner = [os.path.join(root, *groups[:i]) for i in range(1, len(groups) + 1)]
    outer: list[str] = []
    d = os.path.abspath(root)
    while not os.path.exists(d) and os.path.dirname(d) != d:
        outer.insert(0, d)
        d = os.path.dirname(d)
    if outer:  # the container made: every group in it is new too
        return [*outer[:-1], root, *inner]
    return [g for g in inner if not os.path.exists(g)]


def _remove_made(made: list[str], lock_path: str, lock_held: bool) -> None:
    """Remove the folders a failed or stopped import made (:func:`_missing_folders`), inner
    first, each only while it holds nothing but what the import put there: a group's or the
    container's ``attributes.json``, and the import's lock file. A folder something else came
    into meanwhile stays, with all above it. Where the lock is held, its file and the folder
    holding it (with those above, that the lock made) are left to its release."""
    lock_dir, lock_name = os.path.normpath(os.path.dirname(lock_path)), os.path.basename(lock_path)
    for d in reversed(made):
        try:
            names = set(os.listdir(d)) - {lock_name if d == lock_dir else ""}
        except OSError:
            return
        if not names <= {"attributes.json"}:
            return
        try:
            for n in names:
                os.remove(os.path.join(d, n))
            if d == lock_dir and lock_held:
                return  # the lock's release removes its file, this folder, and those above
            if d == lock_dir and os.path.exists(lock_path):
                os.remove(lock_path)  # a file system without locks: the lock left its file
            os.rmdir(d)
        except OSError:
            return


def _clear_leftovers(root: str, key: str) -> None:
    """Remove the hidden ``.NAME.importing-…`` folders that imports over ``key`` killed
    outright (``kill -9``, a node failure) left beside it; under the output's lock, no other
    import is writing one. One killed between the two renames of :func:`_swap_in` left the
    dataset itself aside (``….replaced``) and none in its place: that one is put back."""
    head, _, name = key.strip("/").rpartition("/")
    group = os.path.join(root, head)
    try:
        left = [n for n in os.listdir(group) if n.startswith(f".{name}.importing-")]
    except OSError:  # no container or group yet: nothing left there
        return
    final = os.path.join(root, key)
    aside = [n for n in left if n.endswith(".replaced")]
    if len(aside) == 1 and not os.path.exists(final):
        os.rename(os.path.join(group, aside[0]), final)
        left.remove(aside[0])
    for n in left:
        shutil.rmtree(os.path.join(group, n), ignore_errors=True)


def _swap_in(root: str, fresh_key: str, key: str) -> None:
    """Put the dataset at ``fresh_key`` in place of the one at ``key`` (same group)."""
    final, fresh = os.path.join(root, key), os.path.join(root, fresh_key)
    aside = f"{fresh}.replaced"
    os.rename(final, aside)
    try:
        os.rename(fresh, final)
    except BaseException:
        os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def import_volume(src: str, dest: str, **kwargs) -> Volume:
    """Import without progress reporting; returns the opened output volume."""
    for _ in iter_import(src, dest, **kwargs):
        pass
    root, key = parse_spec(dest)
    return Volume.open(root, key or "raw")
