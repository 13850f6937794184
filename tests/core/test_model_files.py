"""Model files as people save them: other float types, checkpoint wrappers, package folders,
pickles that need code, models whose output is smaller than their input."""

from __future__ import annotations

import collections
import os
import pickle
import warnings

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
    halo or multiple, none of which makes such a model run here. (The run tries the model
    before planning, so it is refused before any block, not in each.)"""
    data = np.zeros((16, 32, 32), np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    path = tmp_path / "valid.pt"
    torch.jit.save(torch.jit.script(nn.Conv3d(1, 1, 5).eval()), str(path))
    (tmp_path / "valid.pt.yaml").write_text("kind: image\nhalo: [2, 2, 2]\nnormalize: none\n")
    run = Run(f"{tmp_path}/in.n5:raw", str(path), f"{tmp_path}/o.n5:p", site="threads",
              block=(16, 16, 16), retries=0)  # fmt: skip
    with pytest.raises(UserError, match="needs 'same' padding to run here"):
        list(run.events())

    # a ×2 super-resolution model of valid convolutions: the scale is right, the shrinking is
    # what is wrong (it was told to set the scale it has)
    class ValidUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 1, 3)

        def forward(self, x):
            return nn.functional.interpolate(self.conv(x), scale_factor=(1.0, 2.0, 2.0))

    torch.jit.save(torch.jit.script(ValidUp().eval()), str(tmp_path / "up.pt"))
    (tmp_path / "up.pt.yaml").write_text("kind: image\nhalo: [1, 1, 1]\nscale: [1, 2, 2]\n")
    run = Run(f"{tmp_path}/in.n5:raw", str(tmp_path / "up.pt"), f"{tmp_path}/o.n5:up",
              site="threads", block=(16, 16, 16), retries=0)  # fmt: skip
    with pytest.raises(UserError, match="needs 'same' padding to run here"):
        list(run.events())
    # a model that does not scale, described with a scale: told to set the scale it has
    (tmp_path / "same.pt.yaml").write_text("kind: image\nhalo: [1, 1, 1]\nscale: [1, 2, 2]\n")
    torch.jit.save(
        torch.jit.script(nn.Conv3d(1, 1, 3, padding=1).eval()), str(tmp_path / "same.pt")
    )
    run = Run(f"{tmp_path}/in.n5:raw", str(tmp_path / "same.pt"), f"{tmp_path}/o.n5:same",
              site="threads", block=(16, 16, 16), retries=0)  # fmt: skip
    with pytest.raises(UserError, match="set the scale .and halo, multiple. the model really has"):
        list(run.events())


def _first_bytes_cases(tmp_path):
    """Files given as the model that are none, as users give them by mistake."""
    torch.save(UNet(1, 3, base=4, depth=2).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a download cut short
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("class Net:\n    pass\n")  # 'c': pickle's GLOBAL opcode
    (tmp_path / "net.py").write_text("class Net:\n    pass\n")
    (tmp_path / "mine.pt").write_bytes(data)
    (tmp_path / "mine.pt.yaml").write_text("classes: [a, b, c]\n")  # given instead of mine.pt
    # Python's own pickle of other data: "cannot be read (Unsupported operand 149)", and torch
    # warned of the pickle protocol on stderr
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump({"a": collections.OrderedDict(x=1), "f": {1, 2}}, f, protocol=4)
    # torch.save of a dict without tensors (a training log): taken as a state dict, and an
    # architecture asked for
    torch.save({"epoch": 3, "losses": [0.5, 0.2]}, tmp_path / "log.pt")
    return {
        "obj.pkl": "obj.pkl is a Python pickle, not a TorchScript or PyTorch file; ",
        "log.pt": "log.pt holds no weights (no tensors), so it is no model; ",
        "cut.pt": "cut.pt is a damaged zip file (its end, which lists its files, is missing: it "
        "was cut short); save or download it again.",
        "empty.pt": "empty.pt is empty, not a TorchScript or PyTorch file; ",
        "notes.pt": "notes.pt is not a TorchScript or PyTorch file; ",
        "net.py": "net.py is a Python source file, not a model; export the model",
        "mine.pt.yaml": "mine.pt.yaml is a model description (YAML), not a model; give the model "
        f"file it describes ({tmp_path}/mine.pt).",
    }


@pytest.mark.parametrize("architecture", [False, True], ids=["alone", "with-architecture"])
def test_a_file_that_is_no_model_is_said_to_be_what_it_is(tmp_path, architecture):
    """Text starting with "c" (a sidecar, Python) was refused as "a pickled Python object that
    needs code to load"; an empty file with an architecture was an internal error (IndexError),
    a text file "cannot be read (101)"; describe-model (missing_description) advised adding an
    architecture to all of them."""
    from napari_emparsl.core.models.loaders import missing_description

    options = {"architecture": "unet3d"} if architecture else {}
    for name, said in _first_bytes_cases(tmp_path).items():
        path = str(tmp_path / name)
        for ask in (load_model, missing_description):
            with pytest.raises(UserError) as err:
                ask(path, options)
            text = str(err.value)
            assert text.startswith(f"{tmp_path}/{said}"), (ask.__name__, text)
            assert "\n" not in text and text.endswith(".") and "pickled" not in text
            if architecture and name in ("empty.pt", "notes.pt"):  # what to save for one
                assert text.endswith(
                    "save the network's weights with torch.save(model.state_dict(), …)."
                )


def test_describe_model_refuses_a_file_that_is_no_model(tmp_path, capsys):
    """describe-model said nothing was wrong with a text file (exit code 0), only that
    kind, halo, classes and architecture were not described."""
    from napari_emparsl.cli import main

    (tmp_path / "notes.pt").write_text("class Net:\n    pass\n")
    assert main(["describe-model", str(tmp_path / "notes.pt")]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # (was a description of defaults, printed before the refusal)
    assert err == (
        f"emparsl: error: {tmp_path}/notes.pt is not a TorchScript or PyTorch file; export the "
        "model with torch.jit.script or torch.jit.trace and save it with torch.jit.save.\n"
    )


def test_architecture_is_asked_for_only_of_a_state_dict(tmp_path):
    """A pickled module (torch.save(model)) was asked for an architecture, which would not
    load it either; a state dict whose sidecar names its classes was asked for its kind."""
    from napari_emparsl.core.models.loaders import missing_description

    torch.save(UNet(1, 3, base=4, depth=2).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "sd.pt.yaml").write_text("classes: [a, b, c]\nhalo: 8\n")
    assert missing_description(str(tmp_path / "sd.pt")) == ["architecture"]
    torch.save(UNet(1, 3, base=4, depth=2), tmp_path / "module.pt")
    (tmp_path / "module.pt.yaml").write_text("classes: [a, b, c]\nhalo: 8\n")
    with pytest.raises(UserError, match="module.pt is a pickled Python object that needs code"):
        missing_description(str(tmp_path / "module.pt"))
    torch.jit.save(torch.jit.script(_conv_model()), str(tmp_path / "ts.pt"))
    assert missing_description(str(tmp_path / "ts.pt")) == ["kind", "halo", "classes"]


def test_a_torchscript_model_given_an_architecture_is_told_to_drop_it(tmp_path):
    """torch.load(weights_only=True) of the TorchScript file: a UserWarning on the terminal and
    "cannot be read (Cannot use ``weights_only=True`` with TorchScript archives passed to
    ``torch.load``. In PyTorch 2.6, we changed the defa)", cut mid-word."""
    from napari_emparsl.core.models.loaders import missing_description

    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(_conv_model()), str(path))
    (tmp_path / "ts.pt.yaml").write_text("kind: image\nhalo: 2\narchitecture: unet3d\n")
    said = (
        f"{path} is a TorchScript model, which carries its own architecture; remove "
        "`architecture` (and `arch_options`) from its sidecar and model options."
    )
    for ask in (load_model, missing_description):
        with warnings.catch_warnings(record=True) as shown, pytest.raises(UserError) as err:
            warnings.simplefilter("always")
            ask(str(path))
        assert str(err.value) == said and not [str(w.message) for w in shown]


def test_reasons_in_parentheses_are_cut_at_a_sentence_or_a_word():
    """Cut at 120 characters, mid-word ("…we changed the defa"); an empty reason (EOFError(''))
    was an IndexError."""
    from napari_emparsl.core.models.bioimageio import one_line

    assert one_line(EOFError("")) == "EOFError"
    torch_said = (
        "Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``. "
        "In PyTorch 2.6, we changed the default value of the `weights_only` argument."
    )
    assert one_line(RuntimeError(torch_said)) == (
        "Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``"
    )
    words = "word " * 40
    cut = one_line(words, 120)
    assert cut.endswith("word…") and len(cut) <= 121
    assert one_line("Short.\nsecond line") == "Short"
