"""The site panel: a form generated from the profile schema, validated like the engine does."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from napari_emparsl._napari.site_widget import SiteWidget
from napari_emparsl.execution.sites import SiteProfile, load_site


def _test_site(qtbot, widget, timeout: int) -> list:
    """Click Test site and wait for its answer; the notifications shown meanwhile."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.test_btn.clicked.emit()
        qtbot.waitUntil(lambda: widget.test_btn.enabled, timeout=timeout)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    return seen


def test_form_from_schema_validates_and_saves(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    viewer = make_napari_viewer()
    widget = SiteWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert set(widget.fields) == set(SiteProfile.model_fields)  # one widget per schema field
    # labelled in words (the profile's keys, as in YAML, stay the widgets' names)
    assert widget.fields["threads_per_worker"].label == "threads per worker"
    assert not [w.label for w in widget.fields.values() if "_" in w.label]
    widget.site.value = "local"
    assert widget.fields["kind"].value == "local" and widget.fields["strategy_period"].value == 0.2
    # workers: a number or auto
    workers = widget.fields["workers"]
    assert workers.value == "auto" and "auto" in workers.tooltip
    workers.value = "0"
    assert widget.save() is None
    assert widget.message.value == (
        "field 'workers': workers is a whole number of at least 1, or auto, not '0'"
    )
    widget.fields["name"].value = "mysite"
    workers.value = "3"
    keep = widget.fields["keep_freed_memory"]
    assert keep.widget_type == "CheckBox" and keep.value is True and "memory" in keep.tooltip
    keep.value = False
    from napari_emparsl._napari.run_widget import RunWidget

    run = RunWidget(viewer)  # a run panel open meanwhile
    assert "mysite" not in run.site.choices
    path = widget.save()
    assert path and path.endswith("mysite.yaml")
    saved = load_site("mysite")
    assert saved.workers == 3 and not saved.keep_freed_memory and "mysite" in widget.site.choices
    assert "mysite" in run.site.choices  # offered there at once (before: once a layer came)
    assert widget.site.value == "mysite"  # the chooser shows what was saved
    # a profile that cannot be read: the form still shows the last one, so neither Save nor
    # Test (before: Save wrote the last profile, e.g. a copy of local shadowing the built-in)
    (tmp_path / "sites" / "broken.yaml").write_text("kind: [local\n")
    widget.site.reset_choices()
    widget.site.value = "broken"
    assert "is not valid YAML" in widget.message.value
    assert not widget.save_btn.enabled and not widget.test_btn.enabled
    widget.site.value = "mysite"
    assert widget.save_btn.enabled and widget.test_btn.enabled
    (tmp_path / "sites" / "broken.yaml").unlink()
    widget.site.reset_choices()
    assert run._preloaded.wait(120)  # its background preload ends within this test
    workers.value = " auto"
    assert widget.save() and load_site("mysite").workers == "auto"
    assert "workers: auto" in (tmp_path / "sites" / "mysite.yaml").read_text()
    widget.site.value = "local"
    workers.value = "7"
    widget.site.value = "mysite"
    assert workers.value == "auto"
    widget.fields["threads_per_worker"].value = "0"  # what does not validate says so, once
    assert widget.save() is None
    assert widget.message.value == (
        "field 'threads_per_worker': threads_per_worker is a whole number of at least 1, or "
        "auto, not '0'"
    )
    widget.fields["threads_per_worker"].value = "auto"
    # a local profile made a threads one: its nice has no process to apply to (was ignored);
    # the form sets it back to 0 (and worker_init to none) as the kind changes
    widget.site.value = "local"
    widget.fields["worker_init"].value = "module load x"
    widget.fields["kind"].value = "threads"
    assert widget.fields["nice"].value == 0 and widget.fields["worker_init"].value == ""
    widget.fields["nice"].value = 5  # set again by hand: refused, saying why
    assert widget.save() is None
    assert widget.message.value.startswith("nice sets the priority of worker processes")
    widget.fields["nice"].value = 0
    widget.fields["name"].value = "mythreads"
    assert widget.save() and load_site("mythreads").kind == "threads"
    (tmp_path / "sites" / "mythreads.yaml").unlink()
    widget.site.value = "mysite"
    # a name that is no file name: it was written where it pointed (../x.yaml beside the
    # sites folder) or failed with a traceback
    # (a space: Parsl puts the name into its workers' command line unquoted, and none starts)
    for name in ("../x", "", ".hidden", "my site"):
        widget.fields["name"].value = name
        assert widget.save() is None
        assert widget.message.value == (
            "field 'name': a site's name is the name of its file: letters, digits, '.', '_' and "
            f"'-' only (no spaces), not starting with a dot, not {name!r}"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites"]
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["mysite.yaml"]
    # every field says what it is (before, some showed a type: "threads_per_worker
    # (typing.Annotated[int, Gt(gt=0)])")
    for name, field in widget.fields.items():
        assert field.tooltip == SiteProfile.model_fields[name].description, name
        assert "typing" not in field.tooltip and len(field.tooltip) > 20
    # a sites folder that cannot be written: one sentence, as a notification too
    from napari.utils.notifications import notification_manager

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "file"))
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        widget.fields["name"].value = "other"
        assert widget.save() is None
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert widget.message.value.startswith(f"Could not save the site profile to {tmp_path}/file/")
    assert widget.message.value.endswith(
        "set EMPARSL_SITES to a folder you can write, or free some space."
    )
    assert [str(n.message) for n in seen] == [widget.message.value]


def test_test_site_starts_the_site_as_the_form_says(make_napari_viewer, qtbot, tmp_path, htex,
                                                    monkeypatch):  # fmt: skip
    """Test site runs one no-op task on the site the form describes (saved or not) — a real
    local site, its processes gone afterwards."""
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    viewer = make_napari_viewer()
    widget = SiteWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.site.value = "local"
    widget.fields["workers"].value = 1
    widget.fields["name"].value = "unsaved"
    widget.test_btn.clicked.emit()
    assert widget.message.value == "testing site unsaved…" and not widget.test_btn.enabled
    qtbot.waitUntil(lambda: widget.test_btn.enabled, timeout=120_000)
    assert widget.message.value.startswith("site unsaved: first result after ")
    assert htex.gone()  # the site was shut down: no interchange, pool or worker left
    assert "unsaved" not in widget.site.choices  # testing saves nothing
    # a site whose workers cannot start: one sentence in the panel and as a notification
    widget.fields["worker_init"].value = "exit 3"
    seen = _test_site(qtbot, widget, 120_000)
    assert widget.message.value == (
        "The site 'unsaved' could not start its workers (their pool exited with code 3); check "
        "its worker_init and settings."
    )
    assert [str(n.message) for n in seen] == [widget.message.value]
    assert htex.gone()


def test_number_boxes_offer_only_what_the_schema_allows(make_napari_viewer, tmp_path, monkeypatch):
    """The strategy period box went down to 0.0, which Save then refused in pydantic's words
    ("field 'strategy_period': Input should be greater than 0"): every number box's range is
    the schema's, a valid profile whose value the box cannot show opens with the nearest one
    it can, and what the schema refuses is said in a sentence."""
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    viewer = make_napari_viewer()
    widget = SiteWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.site.value = "threads"
    period, nice = widget.fields["strategy_period"], widget.fields["nice"]
    assert (period.min, period.max) == (0.01, 60.0) and (nice.min, nice.max) == (0, 19)
    with pytest.raises(ValueError, match="outside of the allowed range"):
        period.value = 0.0  # the box refuses it (before: it showed 0.00, and Save refused it)
    period.value = period.min  # the smallest value the box takes is one Save takes
    widget.fields["name"].value = "fast"
    assert widget.save() and load_site("fast").strategy_period == 0.01
    # a valid profile with a period the box cannot show: opens (with 0.01), no traceback
    (tmp_path / "sites" / "tiny.yaml").write_text(
        "name: tiny\nkind: threads\nstrategy_period: 0.001\n"
    )
    widget.site.reset_choices()
    widget.site.value = "tiny"
    assert period.value == 0.01 and widget.message.value == "" and widget.save_btn.enabled
    # what the schema itself refuses (not a value the form can hold): a sentence, no "Input"
    from napari_emparsl._napari.site_widget import _plain_problem

    for settings, message in [
        ({"strategy_period": 0.0}, "field 'strategy_period': strategy_period should be greater "
                                   "than 0, not 0.0"),
        ({"strategy_period": 61.0}, "field 'strategy_period': strategy_period should be less "
                                    "than or equal to 60, not 61.0"),
        ({"nice": 20, "kind": "local"}, "field 'nice': nice should be less than or equal to 19, "
                                        "not 20"),
        ({"device": "gpu"}, "field 'device': device should be 'auto', 'cpu' or 'cuda', not 'gpu'"),
    ]:  # fmt: skip
        with pytest.raises(ValidationError) as err:
            SiteProfile.model_validate({"name": "x", "kind": "threads"} | settings)
        assert _plain_problem(err.value) == message
    # the profile's own sentences are kept as they are
    with pytest.raises(ValidationError) as err:
        SiteProfile.model_validate({"name": "x", "kind": "threads", "workers": "0"})
    assert _plain_problem(err.value) == (
        "field 'workers': workers is a whole number of at least 1, or auto, not '0'"
    )


def test_test_site_checks_the_device_as_a_block_does(make_napari_viewer, qtbot, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """A threads site with device: cuda where torch sees no GPU: Test site said "first result
    after 0.0 s" while every block of a run failed; the test's task checks the device as a
    block does, and fails with the blocks' sentence. With device: auto (the CPU here) it passes.
    A form that does not validate starts nothing and says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: device cuda works, the failure cannot be shown")
    widget = _site_panel(make_napari_viewer, tmp_path, monkeypatch)
    widget.site.value = "threads"
    widget.fields["workers"].value = "0"
    widget.test_btn.clicked.emit()
    assert widget.message.value.startswith("field 'workers': ") and widget.test_btn.enabled
    widget.fields["workers"].value = "1"
    widget.fields["device"].value = "cuda"
    seen = _test_site(qtbot, widget, 60_000)
    assert widget.message.value == (
        f"The site asks for a GPU (device: cuda), but torch on {socket.gethostname()} sees no "
        "CUDA device; set device: auto or cpu in the site profile, or run it where a GPU is."
    )
    assert [str(n.message) for n in seen] == [widget.message.value]
    widget.fields["device"].value = "auto"
    widget.test_btn.clicked.emit()
    qtbot.waitUntil(lambda: widget.test_btn.enabled, timeout=60_000)
    assert widget.message.value.startswith("site threads: first result after ")


def test_a_profile_under_a_built_in_name_keeps_its_kind(make_napari_viewer, tmp_path, monkeypatch):
    """`local` renamed `threads` and saved silently replaced the built-in threads site with
    worker processes for every choice of it (previews too); such a save is refused, and one of
    the same kind says it replaces the built-in."""
    widget = _site_panel(make_napari_viewer, tmp_path, monkeypatch)
    widget.site.value = "local"
    widget.fields["name"].value = "threads"
    assert widget.save() is None
    assert widget.message.value == (
        "A profile named threads replaces the built-in site threads everywhere (kind threads), "
        "so it must be of kind threads; choose another name for a local site (e.g. my-local)."
    )
    assert not (tmp_path / "sites" / "threads.yaml").exists()
    assert load_site("threads").kind == "threads"
    widget.fields["name"].value = "local"
    widget.fields["workers"].value = "1"
    path = widget.save()
    assert path and load_site("local").workers == 1
    assert widget.message.value == (
        f"saved {path} (it replaces the built-in local; delete the file to have that back)"
    )


def test_a_hand_written_profile_under_a_built_in_name_keeps_its_kind(tmp_path, monkeypatch):
    """The rule of the site panel's Save, where a profile is used: a threads.yaml of kind local
    written by hand replaced the built-in threads (previews too) without a word."""
    from napari_emparsl.execution.sites import SiteError

    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "threads.yaml").write_text("kind: local\nworkers: 1\n")
    with pytest.raises(SiteError) as err:
        load_site("threads")
    assert str(err.value) == (
        f"The site profile {tmp_path}/sites/threads.yaml replaces the built-in site threads (kind "
        "threads) but is of kind local; rename it (e.g. my-local.yaml), or make it kind threads."
    )
    (tmp_path / "sites" / "threads.yaml").write_text("kind: threads\nworkers: 3\n")
    assert load_site("threads").workers == 3  # of its kind: it replaces the built-in


def _site_panel(make_napari_viewer, tmp_path, monkeypatch) -> SiteWidget:
    """The site panel docked in a new viewer, saving into tmp_path/sites."""
    monkeypatch.setenv("EMPARSL_SITES", str(tmp_path / "sites"))
    viewer = make_napari_viewer()
    widget = SiteWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget
