"""N5 containers as other tools lay them out (OME-NGFF metadata in N5, COSEM, Fiji's ImageJ
metadata, tensorstore's units, BigDataViewer, Paintera): what each says of voxel size, unit,
offset, axes, pyramid levels and labels is read, and what cannot be read is said."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from napari_emparsl.core.n5attrs import VolumeError, looks_like_labels
from napari_emparsl.core.volume import (
    Volume,
    container_tree,
    openable_keys,
    save_array,
    write_pyramid,
)

#: each voxel holds its own coordinate: one read shows the orientation
RAMP = (
    np.arange(8)[:, None, None] * 10000 + np.arange(16)[None, :, None] * 100 + np.arange(24)
).astype(np.uint16)


def _dataset(root: Path, key: str, data: np.ndarray, attrs: dict | None = None) -> None:
    """A dataset written by z5py, its attributes then replaced by ``attrs`` (as another tool
    writes them: no resolution of ours)."""
    import z5py

    f = z5py.File(str(root), "a")
    ds = f.create_dataset(key, data=data, chunks=(4,) * data.ndim, compression="gzip")
    meta = root / key / "attributes.json"
    stored = json.loads(meta.read_text())
    keep = {k: stored[k] for k in ("dimensions", "blockSize", "dataType", "compression")}
    meta.write_text(json.dumps(keep | (attrs or {})))
    del ds


def _group(root: Path, key: str, attrs: dict) -> None:
    path = root / key if key else root
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "attributes.json"
    old = json.loads(meta.read_text()) if meta.exists() else {}
    meta.write_text(json.dumps(old | attrs))


def _ngff(root: Path, group: str, paths: list[str], axes: str = "zyx") -> None:
    """An OME-NGFF multiscale in an N5 group, as Fiji's N5 export (n5-universe) writes it:
    the levels carry no voxel size; the group's ``multiscales`` list gives each one's scale
    and translation, and the axes' units."""
    factors = [(1, 1, 1), (1, 2, 2), (2, 4, 4)]
    datasets = []
    for path, f in zip(paths, factors, strict=False):
        _dataset(root, f"{group}/{path}" if group else path, RAMP[:: f[0], :: f[1], :: f[2]])
        scale = [0.5 * f[0], 0.1 * f[1], 0.1 * f[2]]
        translate = [100.0, 20.0, 30.0]
        if axes == "xyz":
            scale, translate = scale[::-1], translate[::-1]
        datasets.append({"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translate},
        ]})  # fmt: skip
    _group(root, "", {"n5": "4.0.0"})
    _group(root, group, {"multiscales": [{
        "version": "0.4", "name": group,
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in axes],
        "datasets": datasets,
    }]})  # fmt: skip


@pytest.mark.parametrize(("paths", "axes"), [(["0", "1", "2"], "zyx"), (["s0", "s1", "s2"], "xyz")])
def test_ome_ngff_multiscales_in_n5_is_one_pyramid_in_its_units(tmp_path, paths, axes):
    # before: levels named 0, 1, 2 were three datasets ("holds several datasets"; napari
    # opened three layers at scale 1, the coarse ones shrunk in a corner), and levels named s0,
    # s1, s2 a pyramid of 1-pixel voxels at offset 0
    root = tmp_path / "ngff.n5"
    _ngff(root, "img", paths, axes)
    assert openable_keys(root) == ["img"]
    vol = Volume.open(root)
    assert vol.key == "img" and vol.levels == tuple(f"img/{p}" for p in paths)
    assert vol.voxel_size == pytest.approx((0.5, 0.1, 0.1)) and vol.unit == "micrometer"
    assert vol.offset == pytest.approx((100.0, 20.0, 30.0))
    assert vol.level_voxel_sizes[2] == pytest.approx((1.0, 0.4, 0.4))
    assert vol.axes == ("z", "y", "x") and int(vol.read()[3, 5, 7]) == 30507
    level = Volume.open(root, f"img/{paths[1]}")  # one level opened on its own
    assert level.voxel_size == pytest.approx((0.5, 0.2, 0.2)) and level.unit == "micrometer"
    [entry] = [e for e in container_tree(root) if e["key"] == f"img/{paths[2]}"]
    assert entry["voxel_size"] == pytest.approx([1.0, 0.4, 0.4]) and entry["unit"] == "micrometer"


def test_a_cosem_pyramid_described_only_by_its_groups_multiscales(tmp_path):
    root = tmp_path / "cosem.n5"
    _group(root, "", {"n5": "2.0.0"})
    datasets = []
    for i in range(2):
        _dataset(root, f"em/fibsem/s{i}", RAMP[:, :: 2**i, :: 2**i])
        datasets.append({"path": f"s{i}", "transform": {
            "axes": ["z", "y", "x"], "scale": [5.24, 4.0 * 2**i, 4.0 * 2**i],
            "translate": [100.0, 200.0 + i, 300.0 + i], "units": ["nm"] * 3,
        }})  # fmt: skip
    _group(root, "em/fibsem", {"multiscales": [{"datasets": datasets, "name": "fibsem"}]})
    vol = Volume.open(root, "em/fibsem")  # before: 1-pixel voxels, unit "pixel", offset 0
    assert vol.voxel_size == pytest.approx((5.24, 4.0, 4.0)) and vol.unit == "nm"
    assert vol.offset == pytest.approx((100.0, 200.0, 300.0))
    assert vol.level_voxel_sizes[1] == pytest.approx((5.24, 8.0, 8.0))


def test_tensorstore_units_list_is_read_and_mixed_units_are_made_nm(tmp_path):
    root = tmp_path / "ts.n5"
    _group(root, "", {"n5": "2.0.0"})
    _dataset(root, "um", RAMP, {"resolution": [0.1, 0.1, 0.5], "units": ["um", "um", "um"]})
    _dataset(root, "mixed", RAMP, {"resolution": [4, 4, 0.05], "units": ["nm", "nm", "um"],
                                   "axes": ["x", "y", "z"]})  # fmt: skip
    um = Volume.open(root, "um")  # before: 0.5 × 0.1 × 0.1 "nm", 1000× too small
    assert um.voxel_size == pytest.approx((0.5, 0.1, 0.1)) and um.unit == "um"
    mixed = Volume.open(root, "mixed")
    assert mixed.voxel_size == pytest.approx((50.0, 4.0, 4.0)) and mixed.unit == "nm"


def test_fiji_imagej_metadata_gives_voxel_size_unit_origin_and_hyperstack_axes(tmp_path):
    root = tmp_path / "fiji.n5"
    _group(root, "", {"n5": "2.0.0"})
    ij = {"pixelWidth": 0.1, "pixelHeight": 0.2, "pixelDepth": 0.5, "pixelUnit": "micron"}
    _dataset(root, "stack", RAMP, ij | {"xOrigin": 10.0, "yOrigin": 0.0, "zOrigin": 2.0,
                                        "numChannels": 1, "numSlices": 8, "numFrames": 1})  # fmt: skip
    stack = Volume.open(root, "stack")  # before: 1-pixel voxels, unit "pixel"
    assert stack.voxel_size == pytest.approx((0.5, 0.2, 0.1)) and stack.unit == "micron"
    assert stack.offset == pytest.approx((-1.0, 0.0, -1.0))  # ImageJ's origin is in voxels
    # a 2-channel hyperstack: ImageJ's order X, Y, C, Z in N5, so z, c, y, x here (before:
    # c, z, y, x — napari showed 8 "channels" of 2 slices)
    zcyx = np.ascontiguousarray(np.stack([RAMP, RAMP + 1]).transpose(1, 0, 2, 3))
    _dataset(root, "hyper", zcyx, ij | {"numChannels": 2, "numSlices": 8, "numFrames": 1})
    hyper = Volume.open(root, "hyper")
    assert hyper.axes == ("z", "c", "y", "x") and hyper.voxel_size == pytest.approx((0.5, 0.2, 0.1))
    assert int(hyper.read()[3, 1, 5, 7]) == 30508
    from napari_emparsl._napari.reader import layer_data

    _, meta, _ = layer_data(hyper)
    assert meta["channel_axis"] == 1 and len(meta["name"]) == 2
    # runs and training take channels first: one sentence, nothing made
    import napari_emparsl
    from napari_emparsl.execution.runner import RunError

    with pytest.raises(RunError, match="has its channel axis between its others"):
        napari_emparsl.run(f"{root}:hyper", "unet3d-em", f"{tmp_path}/out.n5:p", site="threads")
    assert not (tmp_path / "out.n5").exists()
    from napari_emparsl.core.models.training import N5TileDataset, TrainingDataError

    _dataset(root, "labels", np.zeros((8, 16, 24), np.uint8))
    with pytest.raises(TrainingDataError, match="has its channel axis between its others"):
        N5TileDataset([(hyper, Volume.open(root, "labels"))], (4, 8, 8))


def test_bigdataviewer_factors_on_the_setup_group(tmp_path):
    # BigDataViewer keeps every level's factors as one list of lists on the setup group
    root = tmp_path / "bdv.n5"
    _group(root, "", {"n5": "2.0.0"})
    for i, step in enumerate([(1, 1, 1), (1, 2, 2), (2, 4, 4)]):
        _dataset(root, f"setup0/timepoint0/s{i}", RAMP[:: step[0], :: step[1], :: step[2]])
    _group(root, "setup0", {"downsamplingFactors": [[1, 1, 1], [2, 2, 1], [4, 4, 2]],
                            "dataType": "uint16"})  # fmt: skip
    _group(root, "setup0/timepoint0", {"resolution": [0.1, 0.1, 0.5], "unit": "µm"})
    vol = Volume.open(root, "setup0/timepoint0")  # before: every level at s0's voxel size
    expected = [(0.5, 0.1, 0.1), (0.5, 0.2, 0.2), (1.0, 0.4, 0.4)]
    for size, want in zip(vol.level_voxel_sizes, expected, strict=True):
        assert size == pytest.approx(want)


BDV_XML = """<?xml version="1.0" encoding="UTF-8"?>
<SpimData version="0.2">
  <BasePath type="relative">.</BasePath>
  <SequenceDescription>
    <ImageLoader format="bdv.n5" version="1.0">
      <n5 type="relative">{n5}</n5>
    </ImageLoader>
    <ViewSetups>
      <ViewSetup><id>0</id><name>0</name><size>24 16 8</size>
        <voxelSize><unit>µm</unit><size>0.1 0.1 0.5</size></voxelSize></ViewSetup>
      <ViewSetup><id>1</id><name>1</name><size>24 16 8</size>
        <voxelSize><unit>nm</unit><size>4 4 40</size></voxelSize></ViewSetup>
    </ViewSetups>
    <Timepoints type="range"><first>0</first><last>0</last></Timepoints>
  </SequenceDescription>
</SpimData>
"""


def test_bigdataviewer_export_unit_and_voxel_size_from_its_dataset_xml(tmp_path):
    # BigDataViewer's "Export to N5" (and BigStitcher) keep the unit in the project's
    # dataset.xml beside the container: the N5 has a unit-less resolution on each time point
    # (for Paintera) or none at all. µm data read as nm (1000x off) before.
    root = tmp_path / "export.n5"
    _group(root, "", {"n5": "2.0.0"})
    for setup in (0, 1):
        _group(root, f"setup{setup}", {"downsamplingFactors": [[1, 1, 1], [2, 2, 1]],
                                       "dataType": "uint16"})  # fmt: skip
        for i, step in enumerate([(1, 1, 1), (1, 2, 2)]):
            _dataset(
                root, f"setup{setup}/timepoint0/s{i}", RAMP[:: step[0], :: step[1], :: step[2]]
            )
    _group(root, "setup0/timepoint0", {"multiScale": True, "resolution": [0.1, 0.1, 0.5]})
    vol = Volume.open(root, "setup0/timepoint0")
    assert vol.unit == "nm"  # no project beside it: EM's default
    (tmp_path / "dataset.xml").write_text(BDV_XML.format(n5="export.n5"), encoding="utf-8")
    (tmp_path / "other.xml").write_text("<notes>not a project</notes>")
    vol = Volume.open(root, "setup0/timepoint0")
    assert vol.unit == "µm"
    assert vol.level_voxel_sizes[1] == pytest.approx((0.5, 0.2, 0.2))
    level = Volume.open(root, "setup0/timepoint0/s1")  # a level alone
    assert (level.unit, level.voxel_size) == ("µm", pytest.approx((0.5, 0.2, 0.2)))
    # setup 1's time point has no resolution of its own: the project's voxel size, N5 order
    vol = Volume.open(root, "setup1/timepoint0")
    assert (vol.unit, vol.voxel_size) == ("nm", pytest.approx((40.0, 4.0, 4.0)))
    tree = {n["key"]: n for n in container_tree(root)}
    assert tree["setup0/timepoint0/s1"]["unit"] == "µm"
    assert tree["setup0/timepoint0/s1"]["voxel_size"] == pytest.approx([0.5, 0.2, 0.2])
    assert tree["setup1/timepoint0/s0"]["voxel_size"] == pytest.approx([40.0, 4.0, 4.0])
    # a project of another container, or a damaged one, says nothing of this one
    (tmp_path / "dataset.xml").write_text(BDV_XML.format(n5="elsewhere.n5"), encoding="utf-8")
    assert Volume.open(root, "setup0/timepoint0").unit == "nm"
    (tmp_path / "dataset.xml").write_text(BDV_XML.format(n5="export.n5")[:-40])
    assert Volume.open(root, "setup0/timepoint0").unit == "nm"
    assert not any(p.name == "dataset.xml" for p in root.iterdir())  # nothing written


def _paintera(root: Path, multiset: bool = False) -> None:
    _group(root, "", {"n5": "2.0.0"})
    for source, kind, dtype in (("raw", "raw", np.uint8), ("neurons", "label", np.uint64)):
        _group(root, source, {"painteraData": {"type": kind}})
        _group(root, f"{source}/data", {"multiScale": True, "resolution": [4, 4, 40]})
        for i in range(2):
            _dataset(root, f"{source}/data/s{i}", RAMP[:, :: 2**i, :: 2**i].astype(dtype),
                     {"downsamplingFactors": [2**i, 2**i, 1]}
                     | ({"isLabelMultiset": True} if multiset and kind == "label" else {}))  # fmt: skip
    # Paintera's look-up tables beside the labels
    _dataset(root, "neurons/unique-labels/s0", RAMP.astype(np.uint64))
    _dataset(root, "neurons/fragment-segment-assignment", np.zeros((2, 4), np.uint64))


def test_a_paintera_container_opens_its_sources_data(tmp_path):
    # before: unique-labels and fragment-segment-assignment opened as label layers (napari
    # failed drawing the varlength chunks), and "neurons" held "several datasets"
    root = tmp_path / "paintera.n5"
    _paintera(root)
    assert openable_keys(root) == ["neurons/data", "raw/data"]
    neurons = Volume.open(root, "neurons")
    assert neurons.key == "neurons/data" and neurons.is_labels and neurons.is_multiscale
    assert not Volume.open(root, "raw").is_labels


def test_a_label_multiset_leaves_the_rest_of_its_container_open(tmp_path):
    from napari_emparsl._napari.reader import read_layers

    root = tmp_path / "paintera.n5"
    _paintera(root, multiset=True)
    with pytest.raises(VolumeError, match="is a Paintera label multiset"):
        read_layers(str(root))  # asked for strictly
    skipped: list[str] = []
    layers = read_layers(str(root), skipped)  # as napari opens it: before, nothing opened
    assert [meta["name"] for _, meta, _ in layers] == ["raw_data"]
    assert len(skipped) == 1 and "neurons/data is a Paintera label multiset" in skipped[0]


@pytest.mark.parametrize(
    ("key", "dtype", "labels"),
    [
        ("labels/mito_pred", "uint8", False),  # COSEM's predictions: images in a labels group
        ("HeLa_cells/raw", "uint16", False),
        ("volumes/raw", "uint32", False),
        ("volumes/raw/s0", "uint32", False),
        ("img/0", "uint32", False),
        ("labels/mito_seg", "uint64", True),
        ("neurons/data", "uint64", True),
        ("train/labels/neurons", "uint32", True),
        ("c0", "uint32", True),  # a wide integer with nothing else to go by
        ("mask_probability", "uint8", False),
        # both kinds of word: the last that tells decides
        ("pred_labels", "uint8", True),
        ("raw_mask", "uint16", True),
        ("affs_watershed", "uint16", True),
        ("cells_raw", "uint16", False),
    ],
)
def test_labels_or_image_by_the_datasets_own_name_first(key, dtype, labels):
    assert looks_like_labels(key, {}, dtype) is labels


def test_a_pyramid_with_a_missing_level_says_so_in_the_log(tmp_path, caplog):
    root = tmp_path / "gap.n5"
    _group(root, "", {"n5": "2.0.0"})
    _dataset(root, "img/s0", RAMP)
    _dataset(root, "img/s2", RAMP[::2, ::4, ::4])
    with caplog.at_level(logging.WARNING):
        vol = Volume.open(root, "img")
    assert vol.levels == ("img/s0",)
    assert "pyramid level(s) s2 left out (the level before them, s1, is missing)" in caplog.text


def test_info_names_a_pyramid_at_the_container_root_once(tmp_path, capsys):
    from napari_emparsl.cli import main

    root = tmp_path / "root.n5"
    _group(root, "", {"n5": "2.0.0"})
    _dataset(root, "s0", RAMP)
    _dataset(root, "s1", RAMP[:, ::2, ::2])
    assert main(["info", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "/  pyramid: s0, s1" in lines  # was "//  pyramid"


def test_a_level_beside_a_damaged_sibling_and_levels_with_their_own_size(tmp_path):
    # a review of the layouts above: every dataset opened read its group's levels, so a
    # damaged s0 beside a plain dataset refused that dataset too; and a group's multiscales
    # list without transforms (OME-NGFF 0.3) set levels with their own size to 1-pixel voxels
    root = tmp_path / "mixed.n5"
    _group(root, "", {"n5": "2.0.0"})
    _dataset(root, "grp/raw", RAMP, {"resolution": [4, 4, 40]})
    (root / "grp" / "s0").mkdir()
    (root / "grp" / "s0" / "attributes.json").write_text("{not json")
    assert Volume.open(root, "grp/raw").voxel_size == (40.0, 4.0, 4.0)
    for i in range(2):
        _dataset(root, f"old/s{i}", RAMP[:, :: 2**i, :: 2**i],
                 {"pixelResolution": {"dimensions": [4 * 2**i, 4 * 2**i, 40], "unit": "nm"}})  # fmt: skip
    _group(root, "old", {"multiscales": [{"version": "0.3", "axes": ["z", "y", "x"],
                                          "datasets": [{"path": "s0"}, {"path": "s1"}]}]})  # fmt: skip
    old = Volume.open(root, "old")
    assert old.level_voxel_sizes == ((40.0, 4.0, 4.0), (40.0, 8.0, 8.0)) and old.unit == "nm"


def test_units_lists_with_a_channel_axis_or_units_that_are_not_lengths(tmp_path):
    root = tmp_path / "units.n5"
    _group(root, "", {"n5": "2.0.0"})
    _dataset(root, "two", np.stack([RAMP, RAMP]), {
        "resolution": [0.1, 0.1, 0.5, 1], "units": ["um", "um", "um", ""],
        "axes": ["x", "y", "z", "c"]})  # fmt: skip
    two = Volume.open(root, "two")  # the channel's empty unit threw the list away: "nm"
    assert two.axes == ("c", "z", "y", "x") and two.unit == "um"
    _dataset(root, "time", RAMP, {"resolution": [4, 4, 1], "units": ["nm", "nm", "s"]})
    assert Volume.open(root, "time").unit != "s"  # not one unit for every axis


@pytest.mark.filterwarnings("ignore:The model unet3d-em was trained on")
def test_outputs_are_not_hidden_inside_pyramids_or_paintera_sources(tmp_path):
    # a run (or import) wrote them, and then nothing listed or opened them (a helper's
    # walkthrough): a pyramid shows its levels only, a Paintera source its data only
    import napari_emparsl
    from napari_emparsl.core.importer import import_volume
    from napari_emparsl.execution.runner import RunError

    root = tmp_path / "ngff_root.n5"
    _ngff(root, "", ["0", "1"])
    with pytest.raises(RunError) as err:
        napari_emparsl.run(str(root), "unet3d-em", f"{root}:pred", site="threads")
    assert str(err.value) == (
        f"The output {root}:pred would lie inside the pyramid at the root of {root}, where "
        "nothing but its levels is listed or opened; choose a name outside it, e.g. "
        f"{tmp_path}/ngff_root-predictions.n5:predictions."
    )
    # unless told, the output goes beside it (was root:predictions/data, hidden)
    result = napari_emparsl.run(str(root), "unet3d-em", site="threads")
    assert result.ok
    assert openable_keys(tmp_path / "ngff_root-predictions.n5") == ["predictions"]
    paintera = tmp_path / "paintera.n5"
    _paintera(paintera)
    with pytest.raises(RunError, match="inside the Paintera source raw, where nothing but its"):
        napari_emparsl.run(f"{paintera}:raw", "unet3d-em", f"{paintera}:raw/pred", site="threads")
    assert napari_emparsl.run(f"{paintera}:raw", "unet3d-em", site="threads").ok
    assert "predictions/raw" in openable_keys(paintera)  # was predictions/data
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", RAMP.astype(np.uint8), photometric="minisblack")
    with pytest.raises(VolumeError, match="would lie inside the pyramid at the root of"):
        import_volume(str(tmp_path / "s.tif"), f"{root}:new")
    assert not (root / "new").exists()


def test_info_says_offsets_multisets_and_a_paintera_sources_data(tmp_path, capsys):
    from napari_emparsl.cli import main

    root = tmp_path / "paintera.n5"
    _paintera(root, multiset=True)
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "s0  8×16×24 uint64  chunks 4×4×4  gzip  (a Paintera label multiset, which this " in out
    assert main(["info", f"{root}:raw"]) == 0  # the source group: its tree, then its data
    out = capsys.readouterr().out.splitlines()
    assert "dataset      raw/data  (image)" in out
    assert "offset       0 × 0 × 0 nm" not in out  # no offset: no line
    _group(root, "raw/data", {"offset": [40, 80, 400]})
    assert main(["info", f"{root}:raw"]) == 0
    assert "offset       400 × 80 × 40 nm" in capsys.readouterr().out.splitlines()


def test_what_is_listed_is_not_refused_and_suggestions_leave_pyramids(tmp_path, capsys):
    # a review of the refusals above: the levels of a pyramid and a Paintera source's data are
    # what those show, so writing them stays allowed; an input that is one level (raw/s0) got
    # the output predictions/s0, which made `predictions` a one-level pyramid hiding the rest
    from napari_emparsl.cli import main
    from napari_emparsl.core.volume import hidden_output, suggest_output

    root = tmp_path / "p.n5"
    _paintera(root, multiset=True)
    assert hidden_output(str(root), "raw/data") is None
    assert hidden_output(str(root), "raw/data/s2") is None  # a new level
    assert hidden_output(str(root), "raw/pred") is not None
    assert suggest_output(str(root), "raw/data/s0") == f"{root}:predictions/raw"
    assert main(["info", f"{root}:neurons"]) == 0  # its data cannot be read: the tree says so
    assert "cannot read" in capsys.readouterr().out
    rootpyr = tmp_path / "rootpyr.n5"
    _ngff(rootpyr, "", ["s0", "s1"])
    assert suggest_output(str(rootpyr), "s0") == f"{tmp_path}/rootpyr-predictions.n5:predictions"
    assert hidden_output(str(rootpyr), "s1") is None and hidden_output(str(rootpyr), "x")


def test_a_dataset_with_broken_metadata_hides_nothing_else(tmp_path, capsys):
    """One dataset whose attributes.json is corrupt, or lost beside its chunks: the whole
    container was refused with its sentence (`info c.n5:ok` too, the panel listed nothing, File >
    Open added nothing); a dataset without metadata was listed as a tree of chunk folders. Now
    it is listed as unreadable, saying why, and the others open."""
    from napari_emparsl._napari.reader import read_layers
    from napari_emparsl.cli import main

    c = tmp_path / "c.n5"
    for key in ("raw", "ok", "lost"):
        save_array(c, key, np.ones((4, 8, 8), np.uint8), chunks=(2, 4, 4))
    (c / "raw" / "attributes.json").write_text('{"dimensions": [8, 8')
    (c / "lost" / "attributes.json").unlink()
    # a group without attributes whose datasets are named 0, 1 (OME-NGFF levels): a group
    save_array(c, "ome/0", np.ones((4, 8, 8), np.uint8))
    (c / "ome" / "attributes.json").unlink(missing_ok=True)
    # groups of groups named by digits (time points), as z5py makes them (no attributes): a
    # group, its datasets listed (the review found them taken for a lost dataset)
    for t in ("0", "1"):
        save_array(c, f"tp/{t}/raw", np.ones((4, 8, 8), np.uint8), chunks=(2, 4, 4))
    for folder in (c / "tp", c / "tp" / "0", c / "tp" / "1"):
        (folder / "attributes.json").unlink(missing_ok=True)
    # a pyramid with one level's metadata corrupt: the pyramid unreadable, not the container
    write_pyramid(str(c), "pyr", np.ones((8, 16, 16), np.uint8), chunks=(8, 8, 8), levels=2)
    (c / "pyr" / "s1" / "attributes.json").write_text("{")
    tree = {n["key"]: n for n in container_tree(c)}
    assert tree["tp/0/raw"]["shape"] == [4, 8, 8] and tree["tp"]["kind"] == "group"
    assert "is corrupt or truncated" in tree["pyr"]["unreadable"]
    assert tree["raw"]["unreadable"].startswith(
        f"The metadata file {c}/raw/attributes.json is corrupt"
    )
    assert tree["lost"]["unreadable"] == (
        f"{c}/lost holds chunk folders but no attributes.json (the dataset's shape, type and "
        "chunking); restore it from a backup or re-export the dataset"
    )
    assert not [k for k in tree if k.startswith(("lost/", "raw/"))]  # no chunk folders listed
    assert tree["ok"]["shape"] == [4, 8, 8] and tree["ome/0"]["kind"] == "dataset"
    skipped: list[str] = []
    assert sorted(m["name"] for _, m, _ in read_layers(str(c), skipped)) == [
        "ok", "ome_0", "tp_0_raw", "tp_1_raw"
    ]  # fmt: skip
    assert len(skipped) == 3
    assert main(["info", f"{c}:ok"]) == 0 and "ok  (image)" in capsys.readouterr().out
    assert main(["info", f"{c}:lost"]) == 2
    assert "holds chunk folders but no attributes.json" in capsys.readouterr().err
    # a folder of chunks of a healthy dataset, chosen by mistake, is no lost dataset (it was
    # said to be one: "restore it from a backup"), from info, run and napari alike
    said = f" is a folder of chunks of the dataset {c}:ok, not a dataset; give that dataset " \
        f"({c}:ok) or the container ({c})."  # fmt: skip
    for args, folder in (
        (["info", f"{c}/ok/0"], f"{c}/ok/0"),
        (["info", f"{c}:ok/0/0"], f"{c}/ok/0/0"),
        (["run", "--input", f"{c}:ok/0", "--model", "unet3d-em", "--site", "threads"], f"{c}/ok/0"),
    ):
        assert main(args) == 2
        assert capsys.readouterr().err.strip().endswith(folder + said), args
    with pytest.raises(VolumeError, match="is a folder of chunks of the dataset"):
        read_layers(f"{c}/ok/0")


def test_a_broken_finest_level_is_not_blamed_on_the_coarser_ones(tmp_path, caplog):
    """A pyramid whose s0 has a data type no reader knows: the refusal names s0 (it was
    preceded by a warning that s1, s2 were left out, as if they were what was wrong); a
    dataset whose compression settings z5py cannot read says what to check."""

    write_pyramid(str(tmp_path / "c.n5"), "raw", np.ones((8, 32, 32), np.uint8), chunks=(8, 8, 8),
                  levels=3)  # fmt: skip
    level = tmp_path / "c.n5" / "raw" / "s0" / "attributes.json"
    level.write_text(json.dumps(json.loads(level.read_text()) | {"dataType": "uint99"}))
    caplog.set_level("INFO", logger="napari_emparsl")
    with pytest.raises(VolumeError, match="raw/s0 stores voxels of type 'uint99'"):
        Volume.open(tmp_path / "c.n5", "raw")
    assert "left out" not in caplog.text
    save_array(tmp_path / "d.n5", "raw", np.ones((8, 8, 8), np.uint8))
    attrs = tmp_path / "d.n5" / "raw" / "attributes.json"
    attrs.write_text(json.dumps(json.loads(attrs.read_text())
                                | {"compression": {"type": "gzip", "level": "x"}}))  # fmt: skip
    with pytest.raises(VolumeError) as err:
        Volume.open(tmp_path / "d.n5", "raw")
    assert str(err.value).endswith(
        "; check the settings in its attributes.json (compression, dataType, blockSize, "
        "dimensions), or write the dataset again."
    )


def test_a_level_of_a_pyramid_is_not_written_alone(tmp_path):
    """A run's output or a napari save at raw/s0 of a pyramid of three levels wrote the finest
    level alone: s1 and s2 showed the old data zoomed out. Refused, naming them; a pyramid of
    one level, and a level's next one, are written."""
    import napari_emparsl
    from napari_emparsl._napari.writer import write_image
    from napari_emparsl.core.volume import stale_levels, write_pyramid
    from napari_emparsl.execution.runner import RunError

    write_pyramid(tmp_path / "p.n5", "raw", np.zeros((8, 64, 64), np.uint8), chunks=(8, 32, 32))
    write_pyramid(tmp_path / "p.n5", "one", np.zeros((8, 8, 8), np.uint8), chunks=(8, 8, 8),
                  levels=1)  # fmt: skip
    assert stale_levels(str(tmp_path / "p.n5"), "one/s0") is None
    assert stale_levels(str(tmp_path / "p.n5"), "raw") is None
    said = (
        f"{tmp_path}/p.n5:raw/s1 is level s1 of the pyramid raw, whose other levels (s0, s2) "
        "would keep what they hold"
    )
    assert stale_levels(str(tmp_path / "p.n5"), "raw/s1") == said
    with pytest.raises(RunError) as err:
        napari_emparsl.run(f"{tmp_path}/p.n5:one", "unet3d-em", f"{tmp_path}/p.n5:raw/s1",
                           site="threads", overwrite=True)  # fmt: skip
    assert str(err.value).startswith(f"The output {said}; choose another output name, e.g. ")
    with pytest.raises(VolumeError) as err:
        write_image(str(tmp_path / "p.n5" / "raw" / "s1"), np.ones((4, 32, 32), np.uint8), {})
    assert str(err.value) == f"{said}; save it under a name outside the pyramid."
    assert Volume.open(tmp_path / "p.n5", "raw").read().max() == 0  # nothing written


def test_an_output_of_a_hidden_name_is_refused(tmp_path):
    """An output named .hidden (or under such a folder) was written, exit code 0, and never
    listed nor opened: the tree leaves hidden names out."""
    import tifffile

    from napari_emparsl.core.importer import import_volume
    from napari_emparsl.core.volume import hidden_output

    save_array(tmp_path / "s.n5", "raw", np.zeros((4, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((4, 8, 8), np.uint8), metadata={"axes": "ZYX"})
    for key in (".hidden", "a/.b/c"):
        assert hidden_output(str(tmp_path / "s.n5"), key).startswith("a hidden folder")
        with pytest.raises(VolumeError, match="would lie inside a hidden folder"):
            import_volume(f"{tmp_path}/s.tif", f"{tmp_path}/o.n5:{key}")
    assert not (tmp_path / "o.n5").exists()
    assert hidden_output(str(tmp_path / "s.n5"), "visible/name") is None
