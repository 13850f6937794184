"""Seamless tiling: the blockwise output equals one whole-volume forward of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_emparsl.core.volume import Volume, save_array
from napari_emparsl.execution.runner import Run


def forward(path: str, x: np.ndarray) -> np.ndarray:
    m = torch.jit.load(path)
    with torch.inference_mode():
        return m(torch.from_numpy(x)[None, None])[0].numpy()


@pytest.mark.parametrize("site", ["threads", "local"])
def test_conv_seamless_blocks_not_dividing(tmp_path, conv_model, float_volume, site):
    src, data = float_volume
    ev = Run(src, conv_model, f"{tmp_path}/out.n5:pred", site=site).execute()
    assert ev.ok and ev.total == 3 * 4 * 4  # 40×50×60 in 16³ blocks
    out = Volume.open(tmp_path / "out.n5", "pred")
    assert out.voxel_size == (40.0, 8.0, 8.0) and out.dtype == np.float32
    full = forward(conv_model, data)[0]
    b = 2  # away from the border (reflect vs zero padding)
    np.testing.assert_allclose(
        out.data.compute()[b:-b, b:-b, b:-b], full[b:-b, b:-b, b:-b], atol=1e-4
    )


@pytest.mark.parametrize(  # blocks that divide the volume on every axis, on some, on none
    "shape, block", [((64, 96, 96), (32, 32, 32)), ((64, 96, 88), (32, 32, 32)),
                     ((64, 96, 88), (24, 40, 28))])  # fmt: skip
def test_unet_labels_seamless(tmp_path, unet_model, shape, block, classes_mixed):
    data = np.random.default_rng(5).random(shape).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(8, 8, 4))
    ev = Run(
        f"{tmp_path}/in.n5:raw", unet_model, f"{tmp_path}/out.n5:seg", site="threads", block=block
    ).execute()
    assert ev.ok
    out = Volume.open(tmp_path / "out.n5", "seg")
    assert out.dtype == np.uint8 and out.attrs["class_names"] == ["a", "b", "c"]
    full = forward(unet_model, data).argmax(0)
    b = 24
    classes_mixed(full[b:-b, b:-b, b:-b])  # (labels of one class everywhere could not differ)
    tiled = out.data.compute()[b:-b, b:-b, b:-b]
    mismatch = float((tiled != full[b:-b, b:-b, b:-b]).mean())
    assert mismatch < 1e-4, mismatch


@pytest.mark.parametrize("site", ["threads", "local"])
def test_unet_without_edge_padding_equals_whole_forward_everywhere(tmp_path, unet_model, site):
    # edge: none — no reflect padding at the volume edge: the tiles then reproduce one whole-volume
    # forward (its zero padding) up to the border too, with blocks that do not divide the volume.
    # The U-Net's three logit channels are written as a float image, to compare values.
    data = np.random.default_rng(6).random((56, 72, 100)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(8, 8, 8))
    as_image = {"kind": "image", "classes": [], "out_channels": 3}
    run = Run(f"{tmp_path}/in.n5:raw", unet_model, f"{tmp_path}/out.n5:logits", site=site,
              block=(32, 32, 48), model_options=as_image | {"edge": "none"})  # fmt: skip
    ev = run.execute()
    assert ev.ok and ev.total == 2 * 3 * 3
    tiled = Volume.open(tmp_path / "out.n5", "logits").data.compute()
    full = forward(unet_model, data)
    assert tiled.shape == full.shape == (3, 56, 72, 100)
    np.testing.assert_allclose(tiled, full, atol=1e-4)
    # reflect padding (the default) differs from it at the border only
    Run(f"{tmp_path}/in.n5:raw", unet_model, f"{tmp_path}/out.n5:refl", site="threads",
        block=(32, 32, 48), model_options=as_image).execute()  # fmt: skip
    refl = Volume.open(tmp_path / "out.n5", "refl").data.compute()
    assert np.abs(refl - full).max() > 1e-3
    b = 24
    inner = (slice(None), *(slice(b, -b),) * 3)
    np.testing.assert_allclose(refl[inner], full[inner], atol=1e-4)
    # the comparison can fail: a halo below the model's context (22) differs from the whole
    # forward by far more than its tolerance (before, with logits ~1e-3 apart, by 4e-5)
    Run(f"{tmp_path}/in.n5:raw", unet_model, f"{tmp_path}/out.n5:short", site="threads",
        block=(32, 32, 48), halo=(8, 8, 8), model_options=as_image | {"edge": "none"}).execute()  # fmt: skip
    short = Volume.open(tmp_path / "out.n5", "short").data.compute()
    assert np.abs(short - full).max() > 1e-2


def test_2d_model_on_3d_volume(tmp_path, conv2d_model, float_volume):
    src, data = float_volume
    run = Run(src, conv2d_model, f"{tmp_path}/out.n5:pred", site="threads")
    ev = run.execute()
    assert ev.ok and ev.total == 40 * 2 * 2  # one slice per block, 32×32 in y, x
    m = torch.jit.load(conv2d_model)
    with torch.inference_mode():
        full = m(torch.from_numpy(data)[:, None])[:, 0].numpy()
    out = Volume.open(tmp_path / "out.n5", "pred").data.compute()
    np.testing.assert_allclose(out[:, 2:-2, 2:-2], full[:, 2:-2, 2:-2], atol=1e-4)


def test_super_resolution_x2(tmp_path, superres_model, float_volume):
    src, data = float_volume
    ev = Run(src, superres_model, f"{tmp_path}/out.n5:sr", site="threads").execute()
    assert ev.ok
    out = Volume.open(tmp_path / "out.n5", "sr")
    assert out.shape == (40, 100, 120) and out.voxel_size == (40.0, 4.0, 4.0)
    # voxel centres: the two 4 nm voxels of an 8 nm voxel centred at 0 are centred at -2 and 2
    assert out.offset == (0.0, -2.0, -2.0)
    full = forward(superres_model, data)[0]
    np.testing.assert_allclose(
        out.data.compute()[2:-2, 4:-4, 4:-4], full[2:-2, 4:-4, 4:-4], atol=1e-4
    )


@pytest.mark.parametrize("kind", ["threads", "local"])  # 8 threads; 8 HTEX worker processes
def test_many_workers_write_disjoint_chunks(tmp_path, conv_model, float_volume, kind):
    src, data = float_volume
    from napari_emparsl.core.ledger import Ledger
    from napari_emparsl.execution.sites import SiteProfile

    site = SiteProfile(name=f"{kind}8", kind=kind, workers=8)
    ev = Run(src, conv_model, f"{tmp_path}/out.n5:pred", site=site, block=(16, 16, 16)).execute()
    assert ev.ok and ev.total == 48
    if kind == "local":  # the blocks were spread over worker processes
        done = Ledger(str(tmp_path / "out.n5"), "pred").summary().done
        assert len({r["worker"] for r in done.values()}) > 1
    full = forward(conv_model, data)[0]
    np.testing.assert_allclose(
        Volume.open(tmp_path / "out.n5", "pred").data.compute()[2:-2, 2:-2, 2:-2],
        full[2:-2, 2:-2, 2:-2],
        atol=1e-4,
    )


def test_any_block_size_gets_chunks_that_divide_it(tmp_path, conv_model, float_volume):
    # 23 and 29 are primes: the largest divisor up to 64 was 1, and each block wrote one chunk
    # file per voxel column (thousands); such an axis is now one chunk per block
    src, data = float_volume
    ev = Run(src, conv_model, f"{tmp_path}/out.n5:p", site="threads", block=(20, 23, 29)).execute()
    assert ev.ok and ev.total == 2 * 3 * 3
    out = Volume.open(tmp_path / "out.n5", "p")
    assert out.chunks == (20, 23, 29)
    full = forward(conv_model, data)[0]
    np.testing.assert_allclose(out.data.compute()[2:-2, 2:-2, 2:-2], full[2:-2, 2:-2, 2:-2],
                               atol=1e-4)  # fmt: skip


def test_batched_equals_unbatched(tmp_path, conv2d_model, float_volume):
    src, _ = float_volume
    batched = Run(src, conv2d_model, f"{tmp_path}/out.n5:b", site="threads")
    single = Run(src, conv2d_model, f"{tmp_path}/out.n5:s", site="threads", batch=1)
    assert batched.execute().ok and single.execute().ok
    from napari_emparsl.execution.runner import _auto_batch

    assert _auto_batch((1, 32, 32), (0, 2, 2), (40, 50, 60)) > 1  # (this volume's 2D blocks)
    # sized by what a whole block reads with the run's halo, not the model's (2: 16 blocks a
    # batch; with --halo 48 that was ~8× the voxels meant for one forward), nor by one block of
    # the plan that the volume's edge cut short (it reads less)
    from napari_emparsl.execution.runner import _BATCH_VOXELS

    assert _auto_batch((1, 48, 48), (0, 48, 48), (40, 50, 60)) == _BATCH_VOXELS // (144 * 144)
    assert _auto_batch((1, 256, 256), (0, 32, 32), (1, 300, 300)) == 2  # any block's: 320²
    np.testing.assert_allclose(  # batched convolutions may round differently
        Volume.open(tmp_path / "out.n5", "b").data.compute(),
        Volume.open(tmp_path / "out.n5", "s").data.compute(),
        atol=1e-5,
    )


def test_trained_unet_off_its_grid_equals_whole_forward(tmp_path):
    # The shipped U-Net pools by 4 (size multiple 4) and, trained, its logits change by whole
    # units when a block reads from a voxel off that grid (a random-weight U-Net's hardly do:
    # the tests above could not see it). A volume whose sizes are no multiples of 4, blocks that
    # do not divide it, and a halo of 26 (rounded up to 28, with a warning): every logit equals
    # one whole-volume forward's, up to the border. Before, 0.035 off inside, 26 at the far edge.
    from napari_emparsl.core.blockwise import run_model_on_array
    from napari_emparsl.core.models.loaders import load_model
    from napari_emparsl.core.sample import make_sample
    from napari_emparsl.execution.runner import RunError

    raw = make_sample((42, 70, 74), seed=4).raw
    save_array(tmp_path / "in.n5", "raw", raw, chunks=(4, 4, 4))
    x = raw.astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    opts = {"kind": "image", "classes": [], "out_channels": 3,
            "normalize": "fixed", "norm_values": [mean, std]}  # fmt: skip
    model = load_model("unet3d-em", opts)
    full = run_model_on_array(model.module, model.spec, ((x - mean) / std)[None])
    src = f"{tmp_path}/in.n5:raw"
    run = Run(src, "unet3d-em", f"{tmp_path}/out.n5:logits", site="threads",
              block=(28, 32, 36), halo=(26, 26, 26), model_options=opts)  # fmt: skip
    ev = run.execute()
    assert ev.ok and ev.total == 2 * 3 * 3
    assert any("26,26,26 was rounded up to 28,28,28" in w for w in run.warnings)
    tiled = Volume.open(tmp_path / "out.n5", "logits").data.compute()
    assert tiled.shape == full.shape == (3, 42, 70, 74)
    assert np.abs(tiled - full).max() < 1e-4
    # a block off the grid is refused in one sentence, before anything is written
    with pytest.raises(RunError, match=r"Block 28,30,36 does not line up .* e\.g\. "
                       r"--block 28,28,36 or 28,32,36\.$"):  # fmt: skip
        Run(src, "unet3d-em", f"{tmp_path}/new.n5:x", site="threads", block=(28, 30, 36)).execute()
    assert not (tmp_path / "new.n5" / "x").exists()


def test_many_classes_get_a_wider_label_dtype_and_outputs_are_gzip(tmp_path, save_model,
                                                                    float_volume):  # fmt: skip
    # 300 classes do not fit uint8: the labels are uint16 (the argmax of every class kept);
    # every output is gzip-compressed N5, readable by every N5 implementation
    import json

    class Ramp(torch.nn.Module):
        """Logit c is -(x·299 - c)²: the class nearest to x·299 wins."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = torch.arange(300, dtype=x.dtype).view(1, 300, 1, 1, 1)
            return -((x * 299.0 - c) ** 2)

    classes = ", ".join(f"c{i}" for i in range(300))
    model = save_model(Ramp(), tmp_path / "ramp.pt",
                       f"kind: labels\nclasses: [{classes}]\nnormalize: none\nblock: [16, 16, 16]\n")  # fmt: skip
    src, data = float_volume
    assert Run(src, model, f"{tmp_path}/out.n5:many", site="threads").execute().ok
    out = Volume.open(tmp_path / "out.n5", "many")
    assert out.dtype == np.uint16 and len(out.class_names) == 300
    np.testing.assert_array_equal(out.data.compute(), np.rint(data * 299).astype(np.uint16))
    attrs = json.loads((tmp_path / "out.n5" / "many" / "attributes.json").read_text())
    assert attrs["compression"]["type"] == "gzip"


@pytest.mark.parametrize(
    "name, key, crop, block",
    [  # CREMI ssTEM (40×4×4 nm, anisotropic; chunks 8×128×128, partial on every axis) and
        # a FIB-SEM crop (gala, 16×64×64 chunks): blocks that do not divide either volume
        ("cremi_C_crop/cremi_C_crop.n5", "raw", (slice(None), slice(0, 198), slice(0, 230)),
         (24, 96, 128)),
        ("gala_fibsem_tiny/gala_tiny.n5", "test/raw", (slice(None),) * 3, (32, 64, 96)),
    ],
)  # fmt: skip
def test_real_em_tiled_equals_whole_forward(tmp_path, shared_data, name, key, crop, block):
    # Real EM from ../shared/data: the shipped U-Net tiled (its exact halo, blocks that do not
    # divide the volume) gives every logit of one whole-volume forward, up to the border
    # (edge: none, as the built-in model declares), and the same labels.
    from napari_emparsl.core.blockwise import run_model_on_array
    from napari_emparsl.core.models.loaders import load_model

    real = Volume.open(shared_data / name, key)
    raw = np.asarray(real.data[crop])
    save_array(tmp_path / "in.n5", "raw", raw, chunks=real.chunks, voxel_size=real.voxel_size)
    x = raw.astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    fixed = {"normalize": "fixed", "norm_values": [mean, std]}
    as_image = {"kind": "image", "classes": [], "out_channels": 3}
    model = load_model("unet3d-em", fixed | as_image)
    full = run_model_on_array(model.module, model.spec, ((x - mean) / std)[None])
    src = f"{tmp_path}/in.n5:raw"
    ev = Run(src, "unet3d-em", f"{tmp_path}/out.n5:logits", site="threads", block=block,
             model_options=fixed | as_image).execute()  # fmt: skip
    n = int(np.prod([-(-s // b) for s, b in zip(raw.shape, block, strict=True)]))
    assert ev.ok and ev.total == n > 1 and all(s % b for s, b in zip(raw.shape, block, strict=True))
    tiled = Volume.open(tmp_path / "out.n5", "logits")
    assert tiled.voxel_size == real.voxel_size
    tiled = tiled.data.compute()
    assert tiled.shape == full.shape == (3, *raw.shape)
    assert np.abs(tiled - full).max() < 1e-4
    # the labels run (argmax of the same logits) gives the whole forward's labels
    ev = Run(src, "unet3d-em", f"{tmp_path}/out.n5:seg", site="threads", block=block,
             model_options=fixed).execute()  # fmt: skip
    assert ev.ok
    seg = Volume.open(tmp_path / "out.n5", "seg").data.compute()
    mismatch = float((seg != full.argmax(0)).mean())
    assert mismatch < 1e-4, mismatch
    assert 0.01 < float((seg == 1).mean()) < 0.99  # a real segmentation, not one class
