"""Models: what a model declares (ModelSpec), how it is loaded, and the built-in ones."""

from napari_emparsl.core.models.spec import ModelError, ModelSpec

__all__ = ["ModelError", "ModelSpec"]
