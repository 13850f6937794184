"""Lengths as image files and N5 attributes spell their units."""

from __future__ import annotations

__all__ = ["nm_per_unit"]

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
