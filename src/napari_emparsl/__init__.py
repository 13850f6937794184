"""napari-emparsl: AI on volume EM far larger than memory, from napari, on any compute site.

Importing the package is cheap: no Qt, napari, torch or parsl is loaded here.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Volume", "VolumeError", "__version__", "run"]


def run(input: str, model: str, output: str | None = None, **kwargs):
    """Run a model over an N5 volume block by block (same parameters as `emparsl run`).

    ``napari_emparsl.run("in.n5:raw", "unet3d-em", "out.n5:classes", site="local")`` returns the
    last event (``Finished`` with ``.ok``, or ``Cancelled``); without an output, it goes to
    ``predictions/<name>`` beside the input (as ``emparsl run``). Keyword arguments: ``site``, ``roi``,
    ``block``, ``halo``, ``model_options``, ``overwrite``, ``retries``, ``callback``.
    What the run notes before it starts (the volume's voxels are not those the model was
    trained on) and as it finishes (a uint8 output that clipped the model's values) comes as a
    ``UserWarning``. Bad input raises a ``UserError`` (``RunError``, ``ModelError``, …) whose
    one sentence says what is wrong and what to pass (``overwrite=True``, ``block=(…)``).
    """
    import warnings

    from napari_emparsl.core.errors import UserError, python_words
    from napari_emparsl.core.events import Finished, Planned
    from napari_emparsl.execution.runner import Run

    callback = kwargs.pop("callback", None)

    def report(event):
        if isinstance(event, Planned | Finished):
            for note in event.warnings:
                warnings.warn(python_words(note), UserWarning, stacklevel=2)
        if callback is not None:
            callback(event)

    try:
        return Run(input, model, output, **kwargs).execute(report)
    except UserError as err:  # the engine's advice names the command line's options
        if err.args and isinstance(err.args[0], str):
            err.args = (python_words(err.args[0]), *err.args[1:])
        raise


def __getattr__(name: str):
    # Lazy, so that `import napari_emparsl` stays light on headless workers.
    if name in ("Volume", "VolumeError"):
        from napari_emparsl.core import volume

        return getattr(volume, name)
    raise AttributeError(name)
