"""Lengths as image files and N5 attributes spell their units."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["grid_difference", "nm_per_unit"]

# nanometres per unit; other units ("pixel", "inch" from a scanner's dpi) are not lengths of EM
_NM_PER_UNIT = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "millimetre": 1e6,
    "å": 0.1,
    "angstrom": 0.1,
}


def nm_per_unit(unit: object) -> float | None:
    """Nanometres in one ``unit`` (``nm``, ``µm``, ImageJ's ``micron`` or ``\\u00B5m``, …), or
    None for what is not a length."""
    text = str(unit).strip().lower()
    text = text.replace("\\u00b5", "µ").replace("\\u03bc", "μ")  # ImageJ escapes µ so
    return _NM_PER_UNIT.get(text)


def grid_difference(a: Any, b: Any) -> str:
    """How two volumes of one shape lie differently in the world (voxel size, offset), in
    words; '' where they agree, or where either records no voxel size (unit ``pixel``)."""
    na, nb = nm_per_unit(a.unit), nm_per_unit(b.unit)
    if "pixel" in (a.unit, b.unit) or (na is None) != (nb is None):
        return ""
    fa, fb = (na, nb) if na is not None and nb is not None else (1.0, 1.0)
    if na is None and a.unit != b.unit:
        return ""
    same = all(  # sizes within 0.1 %, offsets within 0.1 % of a voxel (a 20-voxel shift at
        # 100 µm was within 0.1 % of the offset)
        math.isclose(x * fa, y * fb, rel_tol=1e-3)
        for x, y in zip(a.voxel_size, b.voxel_size, strict=True)
    ) and all(
        abs(x * fa - y * fb) <= 1e-3 * v * fa
        for x, y, v in zip(a.offset, b.offset, a.voxel_size, strict=True)
    )
    if same:
        return ""

    def where(v: Any) -> str:
        size = "×".join(f"{x:g}" for x in v.voxel_size)
        return f"{size} {v.unit} voxels at {', '.join(f'{x:g}' for x in v.offset)}"

    return f"{where(a)} against {where(b)}"
