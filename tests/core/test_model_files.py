"""Model files as people save them: other float types, checkpoint wrappers, package folders,
pickles that need code, models whose output is smaller than their input."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.models.loaders import _stamp, load_model
from napari_emparsl.core.models.unet import UNet
from napari_emparsl.core.volume import Volume, save_array
from napari_emparsl.execution.runner import Run


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 1, 3, padding=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_runs(tmp_path, dtype):
    """Every block failed: "Input type (float) and bias type (c10::Half) should be the same"."""
    data = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    model = _conv_model().eval()
    path = tmp_path / "half.pt"
    torch.jit.save(torch.jit.script(model.to(dtype)), str(path))
    (tmp_path / "half.pt.yaml").write_text("kind: image\nhalo: [2, 2, 2]\nnormalize: none\n")
    result = Run(f"{tmp_path}/in.n5:raw", str(path), f"{tmp_path}/o.n5:p", site="threads",
                 block=(16, 16, 16)).execute()  # fmt: skip
    assert result.ok and result.failed == 0
    with torch.inference_mode():
        want = model(torch.from_numpy(data)[None, None].to(dtype))[0, 0].float().numpy()
    got = Volume.open(tmp_path / "o.n5", "p").data.compute()
    inner = (slice(2, -2),) * 3  # away from the border (padded by reflection there)
    assert np.abs(got[inner] - want[inner]).max() < 0.05  # half precision: rounding only


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
    ],
    ids=["data-parallel", "lightning", "checkpoint"],
)
def test_state_dicts_in_the_usual_wrappers_load(tmp_path, wrap):
    """Refused as "22 parameter(s) of the architecture are not in the weights … check
    in_channels, classes / out_channels and arch_options", which could not help."""
    torch.manual_seed(1)
    net = UNet(1, 3, base=8, depth=2, dims=3).eval()
    path = tmp_path / "sd.pt"
    torch.save(wrap(net.state_dict()), path)
    side = {"kind": "labels", "classes": ["a", "b", "c"], "architecture": "unet3d",
            "arch_options": {"base": 8, "depth": 2}}  # fmt: skip
    (tmp_path / "sd.pt.yaml").write_text(yaml.safe_dump(side))
    loaded = load_model(str(path)).module
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), net(x).numpy(), atol=1e-5)


def test_a_package_folder_changes_with_a_file_in_a_subfolder(tmp_path):
    """A package folder's stamp looked at its top-level entries only: weights/weights.pt
    written again kept the old module (and its hash) in a long-running process."""
    (tmp_path / "pk" / "weights").mkdir(parents=True)
    (tmp_path / "pk" / "rdf.yaml").write_text("name: x\n")
    weights = tmp_path / "pk" / "weights" / "weights.pt"
    weights.write_bytes(b"one")
    before = _stamp(str(tmp_path / "pk"))
    weights.write_bytes(b"two, longer")
    # (a file written again in place changes nothing of the folder holding it)
    assert _stamp(str(tmp_path / "pk")) != before


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused_for_that(tmp_path, monkeypatch):
    """Said to be "not a TorchScript or PyTorch file" (torch: "unsupported GLOBAL posix.system
    whose module posix is blocked"); the reason is that it would run code."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(UserError, match="is a pickled Python object that needs code to load"):
        load_model(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_valid_convolutions_are_said_to_need_same_padding(tmp_path):
    """A model whose output is smaller than its input: the message suggested setting a scale,
    halo or multiple, none of which makes such a model run here."""
    data = np.zeros((16, 32, 32), np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    path = tmp_path / "valid.pt"
    torch.jit.save(torch.jit.script(nn.Conv3d(1, 1, 5).eval()), str(path))
    (tmp_path / "valid.pt.yaml").write_text("kind: image\nhalo: [2, 2, 2]\nnormalize: none\n")
    events = list(Run(f"{tmp_path}/in.n5:raw", str(path), f"{tmp_path}/o.n5:p", site="threads",
                      block=(16, 16, 16), retries=0).events())  # fmt: skip
    errors = {e.error for e in events if type(e).__name__ == "BlockFailed"}
    assert errors and all("needs 'same' padding to run here" in e for e in errors), errors
