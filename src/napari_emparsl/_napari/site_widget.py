"""Dock widget: view and edit a compute-site profile in a form generated from its schema.

The fields come from :class:`~napari_emparsl.execution.sites.SiteProfile` (pydantic), so a new
setting appears here without GUI code. Saving validates with the same model as the engine and
shows what is wrong next to the form; valid profiles are written to the user's site folder.
"""

from __future__ import annotations

import types
import typing
from typing import TYPE_CHECKING, Any

import yaml
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton, create_widget
from pydantic import ValidationError

from napari_emparsl._napari import napari_fixes
from napari_emparsl._napari.background import (
    Relay,
    error_sentence,
    guarded,
    import_engine,
    in_background,
)
from napari_emparsl._napari.widgets import (
    say_error,
    site_chooser,
    sites_changed,
    viewer_itself,
    wrapping,
)
from napari_emparsl.core.errors import UserError
from napari_emparsl.execution.sites import (
    SiteProfile,
    list_sites,
    load_site,
    profile_problem,
    user_site_dir,
)

if TYPE_CHECKING:
    import napari.viewer

__all__ = ["SiteWidget"]


def _number_or_auto(annotation: Any) -> bool:
    """A setting that is a number or ``auto`` (``PositiveInt | Literal["auto"]``)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    args = typing.get_args(annotation)
    return any(typing.get_args(a) == ("auto",) for a in args) and any(
        a is int or typing.get_origin(a) is typing.Annotated for a in args
    )


def _most(field: Any, default: float) -> float:
    """A number field's largest value as the schema says (``le``), else ``default``."""
    return next((m.le for m in field.metadata if getattr(m, "le", None) is not None), default)


#: the smallest step a float spin box shows (magicgui's: 2 decimals)
_FLOAT_STEP = 0.01


def _least(field: Any, step: float) -> float:
    """A number field's smallest value as the schema says: ``ge``, or the first value the box
    shows above ``gt`` (``step`` more); else 0 (the spin box offered 0.0 for a strategy period
    that must be greater than 0, and Save then refused it)."""
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            return m.ge
        if getattr(m, "gt", None) is not None:
            return m.gt + step
    return 0


def _plain_problem(err: ValidationError) -> str:
    """What is wrong with the form, in the words of the profile's own checks (a name, workers,
    a threads site's nice), or else as a sentence naming the field and the value it has,
    instead of pydantic's ("field 'strategy_period': Input should be greater than 0"): as a
    profile file's problems are said (:func:`profile_problem`)."""
    return profile_problem(err)


def _field_widget(name: str, field: Any) -> Any:
    annotation = field.annotation
    label = name.replace("_", " ")  # the profile's key (in YAML and in messages) as words
    options: dict[str, Any] = {}
    if _number_or_auto(annotation):  # typed: a number or "auto" (validated with the form)
        widget = LineEdit(name=name, label=label)
    elif typing.get_origin(annotation) is typing.Literal:
        options["choices"] = list(typing.get_args(annotation))
        widget = ComboBox(name=name, label=label, **options)
    elif annotation in (int,) or getattr(annotation, "__origin__", None) is typing.Annotated:
        widget = create_widget(
            annotation=int,
            name=name,
            label=label,
            options={"min": int(_least(field, 1)), "max": _most(field, 4096)},
        )
    elif annotation is bool:
        widget = create_widget(annotation=bool, name=name, label=label)
    elif annotation is float:
        widget = create_widget(
            annotation=float,
            name=name,
            label=label,
            options={
                "min": float(_least(field, _FLOAT_STEP)),
                "max": float(_most(field, 3600)),
                "step": 0.1,
            },
        )
    else:
        widget = LineEdit(name=name, label=label)
    widget.tooltip = field.description or f"{name} ({getattr(annotation, '__name__', annotation)})"
    return widget


class SiteWidget(Container):
    """Site chooser, one widget per profile field, Save (validated), messages."""

    def __init__(self, viewer: napari.viewer.Viewer = None):  # None: outside napari
        super().__init__(labels=True)
        self._viewer = viewer_itself(viewer)  # napari injects it by this annotation
        napari_fixes.apply()  # a napari crash on removing a layer (see the module)
        self.site = site_chooser(
            ComboBox(
                label="site",
                choices=lambda *_: list(list_sites()),
                tooltip="profile to view or edit",
            )
        )
        self.fields = {name: _field_widget(name, f) for name, f in SiteProfile.model_fields.items()}
        self._auto = {
            name for name, f in SiteProfile.model_fields.items() if _number_or_auto(f.annotation)
        }
        self.save_btn = PushButton(
            text="Save profile", tooltip="validate and save to your site folder"
        )
        self.test_btn = PushButton(
            text="Test site",
            tooltip="start the site as the form describes it (saved or not), run one no-op "
            "task, and report the time to its result or the error",
        )
        self.message = Label(label="", value="")
        wrapping(self.message)
        self.extend([self.site, *self.fields.values(), self.save_btn, self.test_btn, self.message])
        self._relay = Relay(self.native)  # a site test's answer, handed to the Qt thread
        self._relay.answer.connect(guarded(self, self._tested))
        self._testing = ""
        self.site.changed.connect(self.load)
        self.fields["kind"].changed.connect(self._kind_changed)
        self.save_btn.changed.connect(self.save)
        self.test_btn.changed.connect(self.test)
        self.load()

    def load(self, *_: Any) -> None:
        try:
            profile = load_site(self.site.value)
        except UserError as err:
            # the form still shows the last profile: saved or tested now, it would be that
            # one under its name (a broken "local" shadowed by a copy of the built-in one)
            self.message.value = str(err) + " Fix the file, or choose another profile."
            self.save_btn.enabled = self.test_btn.enabled = False
            return
        self.save_btn.enabled = True
        self.test_btn.enabled = not self._testing  # one test at a time
        for name, widget in self.fields.items():
            value = getattr(profile, name)
            if name in self._auto:
                value = str(value)
            elif hasattr(widget, "min") and not isinstance(value, bool):
                # a valid value the box cannot show (a strategy period of 0.001 s, below the
                # box's 0.01): its nearest (magicgui refused it with a traceback)
                value = min(max(value, widget.min), widget.max)
            widget.value = value
        self.message.value = ""

    def _kind_changed(self, kind: str) -> None:
        """Made a threads site: it has no worker processes, whose settings go back to their
        defaults (a threads profile refuses them; a copy of `local` kept its nice of 10)."""
        if kind == "threads":
            for name in ("worker_init", "nice"):
                self.fields[name].value = SiteProfile.model_fields[name].default

    def values(self) -> dict[str, Any]:
        return {
            name: widget.value.strip() if name in self._auto else widget.value
            for name, widget in self.fields.items()
        }

    def _validated(self) -> SiteProfile | None:
        """The form as a profile, or None with what is wrong in the message line."""
        try:
            return SiteProfile.model_validate(self.values())
        except ValidationError as err:
            self.message.value = _plain_problem(err)
            return None

    def test(self, *_: Any) -> None:
        """Start the site in the background and run one no-op task on it."""
        from napari_emparsl.execution.sites import check_site

        profile = self._validated()
        if profile is None:
            return
        self.message.value = f"testing site {profile.name}…"
        self.test_btn.enabled = False
        self._testing = profile.name
        in_background(
            self._relay,
            lambda: (import_engine(), check_site(profile))[1],
            name="emparsl-site-test",
        )

    def _tested(self, result: Any) -> None:
        name, self._testing = self._testing, ""
        self.test_btn.enabled = self.save_btn.enabled  # not while the form shows no profile
        if isinstance(result, BaseException):
            self._error(error_sentence(result, f"Testing site {name}"))
        else:
            self.message.value = f"site {name}: first result after {result:.1f} s"

    def _error(self, message: str) -> None:
        say_error(self.message, message)

    def save(self, *_: Any) -> str | None:
        """Validate; on success write ``<user sites>/<name>.yaml`` and return its path."""
        from napari_emparsl.execution.sites import builtin_kind

        profile = self._validated()
        if profile is None:
            return None
        builtin = builtin_kind(profile.name)
        if builtin is not None and builtin != profile.kind:
            # every choice of that name (previews run on threads) would start another kind
            self._error(
                f"A profile named {profile.name} replaces the built-in site {profile.name} "
                f"everywhere (kind {builtin}), so it must be of kind {builtin}; choose another "
                f"name for a {profile.kind} site (e.g. my-{profile.kind})."
            )
            return None
        folder = user_site_dir()
        path = folder / f"{profile.name}.yaml"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(profile.model_dump(), sort_keys=False))
        except OSError as err:  # a read-only home, a full disk
            self._error(
                f"Could not save the site profile to {path} ({err.strerror or err}); set "
                "EMPARSL_SITES to a folder you can write, or free some space."
            )
            return None
        sites_changed()  # this panel's list, and the run panels' (offered there at once)
        self.site.value = profile.name  # the chooser shows the profile saved
        self.message.value = f"saved {path}" + (
            f" (it replaces the built-in {profile.name}; delete the file to have that back)"
            if builtin is not None
            else ""
        )
        return str(path)
