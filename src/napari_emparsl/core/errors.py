"""The base of every error about the user's input: shown as one sentence, never a traceback."""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input (data, model, site, parameters): the message says what is wrong and what to do."""


def python_words(message: str) -> str:
    """An engine sentence in the words of the Python API (``napari_emparsl.run``): the engine
    speaks to the command line (``pass --overwrite``, ``e.g. --block 64,64,64``), a notebook
    passes ``overwrite=True``, ``block=(64, 64, 64)``. Commands quoted in backticks (`emparsl
    import … --overwrite`) stay as they are typed."""
    parts = re.split(r"(`[^`]*`)", message)
    for i in range(0, len(parts), 2):  # outside the quoted commands
        parts[i] = _python_words(parts[i])
    return "".join(parts)


def _python_words(text: str) -> str:
    def triple(t: str) -> str:  # 8,8,8 -> (8, 8, 8)
        return f"({t.replace(',', ', ')})"

    text = re.sub(  # e.g. --block 4,4,4 or 8,8,8
        r"--(block|halo) (\d+,\d+,\d+)(?: or (\d+,\d+,\d+))?",
        lambda m: f"{m[1]}={triple(m[2])}" + (f" or {triple(m[3])}" if m[3] else ""),
        text,
    )
    text = re.sub(
        r"--model-option ([^()]*?), after the model and output paths",
        lambda m: f"model_options={m[1].split()!r}",
        text,
    )
    text = re.sub(r"--model-option (\S+=[^)\s]+)", lambda m: f"model_options=[{m[1]!r}]", text)
    text = text.replace("--model-option", "model_options")
    return text.replace("--overwrite", "overwrite=True")
