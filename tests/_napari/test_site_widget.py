"""The site panel: a form generated from the profile schema, validated like the engine does."""

from __future__ import annotations

from napari_emparsl._napari.site_widget import SiteWidget
from napari_emparsl.execution.sites import SiteProfile, load_site


def test_form_from_schema_validates_and_saves(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    viewer = make_napari_viewer()
    widget = SiteWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert set(widget.fields) == set(SiteProfile.model_fields)  # one widget per schema field
    widget.site.value = "local"
    assert widget.fields["kind"].value == "local" and widget.fields["strategy_period"].value == 0.2
    widget.fields["workers"].value = 0
    assert widget.save() is None
    assert "'workers'" in widget.message.value and "greater than 0" in widget.message.value
    widget.fields["name"].value = "mysite"
    widget.fields["workers"].value = 3
    keep = widget.fields["keep_freed_memory"]
    assert keep.widget_type == "CheckBox" and keep.value is True and "memory" in keep.tooltip
    keep.value = False
    path = widget.save()
    assert path and path.endswith("mysite.yaml")
    saved = load_site("mysite")
    assert saved.workers == 3 and not saved.keep_freed_memory and "mysite" in widget.site.choices
