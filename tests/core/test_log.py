"""The log file that keeps the tracebacks messages leave out."""

from __future__ import annotations

from napari_emparsl.core import paths


def test_log_details_appends_and_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(paths, "_LOG_MOST_BYTES", 10_000)
    path = paths.log_details("first", "Traceback: one\n")
    assert path == str(tmp_path / "napari-emparsl" / "emparsl.log")
    text = open(path).read()
    assert text.startswith("--- ") and text.endswith(" first\nTraceback: one\n")
    for i in range(100):  # 100 records of ~200 bytes: cut to its last half, whole records
        paths.log_details(f"record {i}", "x" * 160)
    text = open(path).read()
    assert len(text) <= 10_000 + 300 and text.startswith("--- ")
    assert "first" not in text and text.rstrip().endswith("x" * 160)
    assert " record 99\n" in text
    # a folder that cannot be made: the temporary folder's log instead
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert paths.log_path().endswith("emparsl.log") and "file" not in paths.log_path()
