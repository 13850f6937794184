"""Where workers run the model: the site's ``device`` (auto | cpu | cuda), on CPUs and on a GPU."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from napari_emparsl.cli import main
from napari_emparsl.core.ledger import Ledger
from napari_emparsl.core.volume import Volume, save_array

GPU = torch.cuda.is_available()


def _site(tmp_path, text: str, name: str = "site") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_device_setting_is_validated(tmp_path, conv_model, float_volume, capsys):
    src, _ = float_volume
    site = _site(tmp_path, "kind: threads\ndevice: gpu\n")
    code = main(["run", "--input", src, "--model", conv_model, "--output", f"{tmp_path}/o.n5:x",
                 "--site", site])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "field 'device'" in err and "'auto', 'cpu' or 'cuda'" in err
    assert not (tmp_path / "o.n5" / "x").exists()


def test_cpu_runs_record_their_device(tmp_path, conv_model, float_volume, capsys):
    src, _ = float_volume
    site = _site(tmp_path, "kind: threads\ndevice: cpu\n")
    assert main(["run", "--input", src, "--model", conv_model, "--output", f"{tmp_path}/o.n5:x",
                 "--site", site]) == 0  # fmt: skip
    done = Ledger(str(tmp_path / "o.n5"), "x").summary().done
    assert done and {r["device"] for r in done.values()} == {"cpu"}
    capsys.readouterr()
    assert main(["status", f"{tmp_path}/o.n5:x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["cpu"]
    assert main(["status", f"{tmp_path}/o.n5:x"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", on cpu")


@pytest.mark.skipif(GPU, reason="needs a machine where torch sees no GPU")
def test_cuda_without_a_gpu_fails_the_blocks_in_one_sentence(
    tmp_path, conv_model, float_volume, capsys
):
    src, _ = float_volume
    site = _site(tmp_path, "kind: threads\ndevice: cuda\n")
    code = main(["run", "--input", src, "--model", conv_model, "--output", f"{tmp_path}/o.n5:x",
                 "--site", site])  # fmt: skip
    out = capsys.readouterr()
    assert code != 0
    text = out.out + out.err
    assert "asks for a GPU (device: cuda), but torch on" in text
    assert "Traceback" not in text
    # one line per distinct error, not one per block (a retry line, then the final one)
    assert text.count("sees no CUDA device") == 2
    summary = Ledger(str(tmp_path / "o.n5"), "x").summary()
    n = len(summary.failed)
    assert not summary.done and n > 8  # nothing claimed as done
    assert re.search(rf"and {n - 9} more failed with the same error as block \d+\n", text)
    assert main(["status", f"{tmp_path}/o.n5:x"]) == 0  # status lists the failed blocks
    status = capsys.readouterr().out
    assert status.count("sees no CUDA device") == 1
    assert f"  {n} blocks (0, 1, 2, 3, 4, 5, 6, 7 and {n - 8} more) failed: The site asks" in status


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_run_is_seamless_and_matches_the_cpu(tmp_path, unet_model):
    """On a GPU: blocks run there (auto), the tiled labels equal one whole-volume forward on the
    GPU away from float ties, and differ from the CPU's run only at near-ties (TF32 convs)."""
    from napari_emparsl.core.models.loaders import load_model

    rng = np.random.default_rng(3)
    data = rng.random((64, 96, 96)).astype(np.float32)  # (the test U-Net scales it by 255)
    save_array(tmp_path / "v.n5", "raw", data, chunks=(32, 32, 32))
    src = f"{tmp_path}/v.n5:raw"
    args = ["--model", unet_model, "--block", "32,32,32"]
    gpu_site = _site(tmp_path, "kind: local\nworkers: 2\ndevice: auto\n")
    assert main(["run", "--input", src, "--output", f"{tmp_path}/v.n5:gpu", "--site", gpu_site,
                 *args]) == 0  # fmt: skip
    records = Ledger(str(tmp_path / "v.n5"), "gpu").summary().done.values()
    assert {r["device"] for r in records} <= {f"cuda:{i}" for i in range(8)}
    cpu_site = _site(tmp_path, "kind: local\nworkers: 2\ndevice: cpu\n", "cpu")
    assert main(["run", "--input", src, "--output", f"{tmp_path}/v.n5:cpu", "--site", cpu_site,
                 *args]) == 0  # fmt: skip
    tiled = Volume.open(tmp_path / "v.n5", "gpu").data.compute()
    cpu = Volume.open(tmp_path / "v.n5", "cpu").data.compute()
    loaded = load_model(unet_model, device="cuda:0")
    x = torch.from_numpy(data.astype(np.float32))[None, None].cuda()
    with torch.inference_mode():
        whole = loaded.module(x)[0].argmax(0).cpu().numpy()
    inner = (slice(24, -24),) * 3
    seam = float((tiled[inner] != whole[inner]).mean())
    vs_cpu = float((tiled != cpu).mean())
    print(f"GPU tiled vs GPU whole forward: {seam:.2e}; GPU vs CPU run: {vs_cpu:.2e}")
    assert seam < 1e-4
    assert vs_cpu < 1e-3


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_training_runs_on_the_models_gpu(tmp_path):
    """A U-Net moved to the GPU (model.cuda()) trains there: train() sends each batch and the
    class weights to the model's device (it fed CPU tensors to a GPU model)."""
    from napari_emparsl.core.models.training import N5TileDataset, train
    from napari_emparsl.core.models.unet import UNet

    raw = np.random.default_rng(0).normal(100, 20, (16, 32, 32)).astype(np.float32)
    save_array(tmp_path / "t.n5", "raw", raw, chunks=(8, 16, 16))
    save_array(tmp_path / "t.n5", "labels", (raw > 100).astype(np.uint8), chunks=(8, 16, 16))
    pair = (Volume.open(f"{tmp_path}/t.n5:raw"), Volume.open(f"{tmp_path}/t.n5:labels"))
    model = UNet(1, 2, base=2, depth=1).cuda()
    before = [p.detach().clone() for p in model.parameters()]
    train(model, N5TileDataset([pair], (8, 16, 16), length=4), steps=3,
          class_weights=[0.5, 1.0], log=lambda _: None)  # fmt: skip
    assert all(p.is_cuda for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
