"""Architecture boundaries and packaging: core imports no GUI/parsl, the manifest is valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_no_gui_or_parsl():
    code = (
        "import sys, napari_emparsl, napari_emparsl.core.volume, napari_emparsl.core.importer, "
        "napari_emparsl.core.sample, napari_emparsl.core.n5attrs, napari_emparsl.cli, "
        "napari_emparsl.core.geometry, napari_emparsl.core.blockwise, napari_emparsl.core.ledger, "
        "napari_emparsl.core.events, napari_emparsl.core.models.loaders, "
        "napari_emparsl.core.models.unet, napari_emparsl.core.models.training\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'napari', 'magicgui', 'parsl', 'vispy')]\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout}"


def test_parsl_only_in_sites_and_qt_only_in_napari_package():
    # DESIGN.md: sites.py is the one interface to Parsl; nothing below _napari imports Qt/napari
    import ast

    src = REPO / "src" / "napari_emparsl"
    parsl_users, gui_users = [], []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                roots = [node.module.split(".")[0]]
            else:
                continue
            if "parsl" in roots:
                parsl_users.append(rel)
            if not rel.startswith("_napari/") and {"qtpy", "PyQt6", "napari", "magicgui"} & set(
                roots
            ):
                gui_users.append(rel)
    assert sorted(set(parsl_users)) == ["execution/sites.py"]
    assert gui_users == []


def test_every_manifest_python_name_imports():
    import importlib

    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    names = [c["python_name"] for c in manifest["contributions"]["commands"]]
    assert names
    for name in names:
        module, attr = name.split(":")
        assert module.startswith("napari_emparsl._napari."), name
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_manifest_validates_and_is_the_installed_one():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-emparsl")
    assert {c.id for c in manifest.contributions.commands} >= {
        "napari-emparsl.get_reader",
        "napari-emparsl.write_labels",
        "napari-emparsl.sample_em",
    }
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-emparsl"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_wheel_ships_the_manifest(tmp_path):
    # built from a copy: a build in the checkout leaves build/ there, whose stale build/lib can
    # carry deleted modules into later wheels
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", project / "src", symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "napari.yaml", "README.md"):
        shutil.copy(REPO / name, project / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(project)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    [wheel] = tmp_path.glob("napari_emparsl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("napari_emparsl/napari.yaml").decode()
        entry_points = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        assert "napari_emparsl:napari.yaml" in zf.read(entry_points).decode()
    assert shipped == (REPO / "napari.yaml").read_text()
