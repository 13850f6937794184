"""Runs end to end: failing blocks, resume after kill -9, retries, bad input, status."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import z5py

from napari_emparsl.cli import main
from napari_emparsl.core.blockwise import BlockJob
from napari_emparsl.core.errors import UserError
from napari_emparsl.core.geometry import Roi, plan_blocks
from napari_emparsl.core.ledger import Ledger
from napari_emparsl.core.volume import Volume, save_array
from napari_emparsl.execution.runner import Run, RunError


def test_failed_run_without_output_names_the_output_it_wrote(tmp_path, failing_model, capsys):
    """Without --output the run writes to the suggested one; its failure said `emparsl status
    None`."""
    data = np.zeros((16, 16, 32), np.float32)
    data[3, 3, 3] = 255.0  # block 0 of 2
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    code = main(["run", "--input", f"{tmp_path}/in.n5:raw", "--model", failing_model,
                 "--site", "threads", "--retries", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "None" not in err
    assert f"see `emparsl status {tmp_path}/in.n5:predictions/raw` (their tracebacks are in " in err


def test_failing_blocks_reported_then_only_they_rerun(
    tmp_path, failing_model, save_model, capsys, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the log file goes
    data = np.zeros((32, 32, 32), np.float32)
    data[3, 3, 3] = 255.0  # block 0
    data[20, 30, 20] = 255.0  # block 1*4 + 1*2 + 1 = 7
    data[20, 3, 5] = 100.0  # block 4: done, its output 0 but one voxel of 200
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    src, out = f"{tmp_path}/in.n5:raw", f"{tmp_path}/out.n5:pred"
    code = main(
        [
            "run",
            "--input",
            src,
            "--model",
            failing_model,
            "--output",
            out,
            "--site",
            "threads",
            "--retries",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "2 blocks failed" in captured.err and "marker found" in captured.err
    assert "Finished: 6/8 blocks done, 2 failed" in captured.out
    # the failure's traceback is in the log file the message names, once for the one error
    log = tmp_path / "cache" / "napari-emparsl" / "emparsl.log"
    assert f"(their tracebacks are in {log})" in captured.err
    text = log.read_text()
    assert text.count(f" of {out} failed on ") == 1 and "Traceback" in text
    assert "marker found: this model cannot handle saturated voxels" in text
    # the bar counts failed blocks as handled and says how many (it stood still, its ETA
    # growing, while thousands failed)
    # blocks handled / total, time spent < time left (ETA), blocks/s, voxels written per second
    # (kept when a block fails) and failures
    assert re.search(r"run: 100%\|[^\n\r]*\| 8/8 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+block/s, "
                     r"\d+\.\d\d Mvox/s, 2 failed\]", captured.err), captured.err  # fmt: skip
    # nothing claimed for the failed blocks
    summary = Ledger(str(tmp_path / "out.n5"), "pred").summary()
    assert sorted(summary.failed) == [0, 7] and len(summary.done) == 6
    assert Volume.open(tmp_path / "out.n5", "pred").data[:16, :16, :16].compute().max() == 0

    code = main(["status", out, "--json"])
    status = json.loads(capsys.readouterr().out)
    assert code == 0 and status["failed"] == 2 and status["done"] == 6
    assert status["state"] == "failed" and status["region"] is None
    assert "marker found" in status["failed_blocks"]["0"]
    from napari_emparsl import __version__

    prov = status["provenance"]
    assert prov["input"] == src and prov["model"] == failing_model and prov["site"] == "threads"
    assert prov["version"] == __version__ and prov["model_options"] == {}
    assert prov["block"] == [16, 16, 16]
    import hashlib  # the model file's own (not its sidecar's, nor another file's)

    assert prov["model_sha256"] == hashlib.sha256(Path(failing_model).read_bytes()).hexdigest()
    last = status["last_run"]  # throughput of the run, from the ledger's time stamps
    assert last["blocks_done"] == 6 and last["voxels_per_second"] > 0
    assert last["blocks_per_second"] == pytest.approx(6 / last["seconds"], rel=0.01)
    # per block: attempts (a failed block retried once: 2), worker, timings, output statistics
    records = summary.done | summary.failed
    assert {records[i]["attempt"] for i in (0, 7)} == {2} and records[1]["attempt"] == 1
    assert all(
        r["worker"] and r["t_compute"] > 0 and r["t_read"] > 0 for r in summary.done.values()
    )
    # the output's statistics are in the ledger's records (a summary does not keep them)
    ledger_lines = (tmp_path / "out.n5" / "pred" / "emparsl-ledger.jsonl").read_text().splitlines()
    on_disk = [r for r in map(json.loads, ledger_lines) if r.get("status") == "done"]
    assert len(on_disk) == 6
    assert all(sum(r["histogram"]) == 16**3 for r in on_disk)  # every voxel of the block
    stats = {r["id"]: (r["out_min"], r["out_max"], r["histogram"][-1]) for r in on_disk}
    assert stats.pop(4) == (0.0, 200.0, 1)  # the one voxel of 100, doubled, in the top bin
    assert set(stats.values()) == {(0.0, 0.0, 0)}
    assert "marker found" in records[0]["error"]
    main(["status", out])
    printed = capsys.readouterr().out
    assert "last run: 6 blocks done in" in printed and "2 blocks (0, 7) failed" in printed

    # "fix" the model: same description, new weights file
    fixed = torch.nn.Identity()
    save_model(fixed, Path(failing_model), Path(failing_model + ".yaml").read_text())
    events = list(Run(src, failing_model, out, site="threads").events())
    assert events[0].todo == 2 and events[-1].ok
    done_ids = [e.result.block_id for e in events if type(e).__name__ == "BlockDone"]
    assert sorted(done_ids) == [0, 7]
    assert Volume.open(tmp_path / "out.n5", "pred").data[3, 3, 3].compute() == 255.0


def _ledger_done(path: Path) -> list[int]:
    p = path / "pred" / "emparsl-ledger.jsonl"
    if not p.exists():
        return []
    ids = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "block" and rec.get("status") == "done":
            ids.append(rec["id"])
    return ids


@pytest.mark.parametrize("site", ["threads", "local"])
def test_resume_after_kill_9(tmp_path, unet_model, htex, site, classes_mixed):
    """kill -9 of the coordinator mid-run, on the in-process site and on `local` (the default:
    worker processes), then the same command again."""
    data = np.random.default_rng(7).random((96, 96, 128)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    args = [
        "--input",
        f"{tmp_path}/in.n5:raw",
        "--model",
        unet_model,
        "--block",
        "32,32,32",
        "--site",
        site,
    ]
    # the reference: an uninterrupted run
    assert main(["run", *args[:-1], "threads", "--output", f"{tmp_path}/ref.n5:pred"]) == 0
    cmd = [
        sys.executable,
        "-m",
        "napari_emparsl.cli",
        "run",
        *args,
        "--output",
        f"{tmp_path}/out.n5:pred",
    ]
    # where the runs' Parsl folders go (a short path: under a long one they go to /tmp)
    short = Path(tempfile.mkdtemp(prefix="k9-", dir="/tmp"))
    (tmp_path / "tmp").symlink_to(short)
    env = {**os.environ, "TMPDIR": str(short)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while (
        len(_ledger_done(tmp_path / "out.n5")) < 10
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _ledger_done(tmp_path / "out.n5")
    assert 5 <= len(before) < 36, len(before)  # killed mid-run (36 blocks)
    if site == "threads":
        assert len(list((tmp_path / "tmp").glob("emparsl-parsl-*"))) == 1  # the killed run's
    else:  # the site's guard stops the worker pool its coordinator left
        assert htex.gone(timeout=30), htex.all()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr
    # the next run removed the killed one's folder (a `threads` site has no guard), then its own
    assert list((tmp_path / "tmp").glob("emparsl-parsl-*")) == []
    assert htex.gone()
    shutil.rmtree(short)
    assert f"({len(before)} already done, resuming)" in done.stdout
    after = _ledger_done(tmp_path / "out.n5")
    recomputed = [i for i in set(before) if after.count(i) > 1]
    assert recomputed == []  # blocks finished before the kill were not computed again
    assert sorted(set(after)) == list(range(36))
    ref = Volume.open(tmp_path / "ref.n5", "pred").data.compute()
    classes_mixed(ref)  # (one class everywhere: a block written wrong would be equal too)
    np.testing.assert_array_equal(
        Volume.open(tmp_path / "out.n5", "pred").data.compute(),
        ref,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "/nope/model.pt"}, "does not exist"),
        ({"block": (32, 16, 16)}, "was made with block 16×16×16, not 32×16×16; give the same"),
        ({"block": (16, 16, 16), "halo": (20, 2, 2)}, "smaller than the halo"),
        ({"roi": "50:60,0:4,0:4"}, "outside the volume"),
        ({"output": "{tmp}/in.n5:raw"}, "is the input"),
        # a mistyped folder was made, with every folder above it
        ({"output": "{tmp}/no/such/o.n5:x"}, "/no/such does not exist, so the output"),
        ({"output": ""}, "Give the output as OUT.n5:DATASET (none given)."),
        ({"model": ""}, "No model was given; give a model file or a built-in name"),
        ({"site": "nowhere"}, "Unknown site 'nowhere'"),
        ({"retries": -1}, "Retries are a count of 0 or more, not -1."),
        ({"model_options": {"in_channels": 2}}, "expects 2 input channel(s)"),
        ({"model_options": {"normalize": "max"}}, "must be one of none, zscore, percentile"),
        (
            {"model_options": {"spatial_dims": 2, "multiple": [4, 4, 4]}},
            "A 2D model runs slice by slice",
        ),
    ],
)
def test_bad_input_one_sentence(tmp_path, conv_model, float_volume, kwargs, message):
    src, data = float_volume
    # an existing output to compare against, so block-size checks see its chunks
    params = {"model": conv_model, "output": f"{tmp_path}/out.n5:pred", "site": "threads"} | kwargs
    params["output"] = params["output"].format(tmp=tmp_path)
    if "block" in kwargs and "halo" not in kwargs:
        Run(src, conv_model, params["output"], site="threads", block=(16, 16, 16)).execute()
    model = params.pop("model")
    output = params.pop("output")

    def files() -> dict[str, bytes]:  # a lock file's content: who holds it, from when
        return {str(p): b"" if p.name.endswith("emparsl-lock") else p.read_bytes()
                for p in sorted(tmp_path.rglob("*")) if p.is_file()}  # fmt: skip

    before = files()
    with pytest.raises(Exception) as err:
        list(Run(src, model, output, **params).events())
    assert message in str(err.value) and "\n" not in str(err.value)
    np.testing.assert_array_equal(Volume.open(*src.split(":")).data.compute(), data)
    # nothing made, written or marked done: no output, no ledger record, no folder
    assert files() == before
    assert not (tmp_path / "no").exists()


def test_resume_refusal_names_what_differs(tmp_path, conv_model, float_volume):
    """Each difference from the output's last run is named, with both values."""
    src, data = float_volume
    out = f"{tmp_path}/out.n5:pred"
    assert Run(src, conv_model, out, site="threads", block=(16, 16, 16)).execute().ok
    with pytest.raises(RunError) as err:
        Run(
            src, conv_model, out, site="threads", block=(16, 16, 16), halo=(3, 3, 3),
            model_options={"normalize": "percentile"},
        ).prepare()  # fmt: skip
    text = str(err.value)
    last = Ledger(str(tmp_path / "out.n5"), "pred").summary().last_run
    assert last["halo"] == [2, 2, 2] and last["spec"]["normalize"] != "percentile"
    assert f"normalize: {last['spec']['normalize']}, not percentile" in text, text
    assert "halo 2×2×2, not 3×3×3" in text and "give the same to resume it" in text, text
    assert "block" not in text and "the input" not in text and "\n" not in text
    np.testing.assert_array_equal(Volume.open(*src.split(":")).data.compute(), data)


def _as_written_by_another_tool(dataset) -> None:
    """Take emparsl's write id off a dataset, as if another program had written it."""
    from napari_emparsl.core.volume import WRITE_ID

    for path in dataset.rglob("attributes.json"):
        attrs = json.loads(path.read_text())
        attrs.pop(WRITE_ID, None)
        path.write_text(json.dumps(attrs))


def test_resume_refuses_a_changed_input_shape_and_another_model(
    tmp_path, conv_model, float_volume, save_model, capsys
):
    """Done blocks are known by id, which is a place only on the same grid: an input whose
    shape changed since is refused (before: a region was left unwritten and the run said
    finished); so is another model (before: one output, two models). The same model file
    changed (a fix) resumes, with a warning."""
    import shutil

    src, data = float_volume
    # written by another program (no write id, which would tell a writing again at once): its
    # shape tells
    _as_written_by_another_tool(tmp_path / "in.n5" / "raw")
    out = f"{tmp_path}/out.n5:pred"
    roi = Roi((0, 0, 0), (16, 16, 16))
    assert Run(src, conv_model, out, site="threads", block=(16, 16, 16), roi=roi).execute().ok
    # the input written again, smaller
    save_array(
        tmp_path / "in.n5",
        "raw",
        data[:, :32],
        chunks=(16,) * 3,
        voxel_size=(40, 8, 8),
        overwrite=True,
    )
    _as_written_by_another_tool(tmp_path / "in.n5" / "raw")
    with pytest.raises(RunError) as err:
        Run(src, conv_model, out, site="threads", block=(16, 16, 16)).prepare()
    assert str(err.value) == (
        f"The output {out} has 40×50×60 voxels, but this input ({tmp_path}/in.n5:raw) gives "
        "40×32×60: the input changed since; pass --overwrite to start again, or choose another "
        "output name."
    )
    save_array(
        tmp_path / "in.n5", "raw", data, chunks=(16,) * 3, voxel_size=(40, 8, 8), overwrite=True
    )
    _as_written_by_another_tool(tmp_path / "in.n5" / "raw")
    # another model file with the same description
    other = tmp_path / "other.pt"
    shutil.copy(conv_model, other)
    shutil.copy(conv_model + ".yaml", str(other) + ".yaml")
    module = torch.jit.load(str(other))
    with torch.no_grad():
        for p in module.parameters():
            p.neg_()
    torch.jit.save(module, str(other))
    with pytest.raises(RunError) as err:
        Run(src, str(other), out, site="threads", block=(16, 16, 16)).prepare()
    assert f"was made with the model {conv_model}, not {other}; give the same" in str(err.value)
    # another model with another description: the model is said, not every key it differs in
    # ("a model description with architecture: None, not unet3d, arch_options: {}, not …")
    with pytest.raises(RunError) as err:
        Run(src, "unet3d-em", out, site="threads", block=(16, 16, 16)).prepare()
    assert str(err.value) == (
        f"The output {out} was made with the model {conv_model}, not unet3d-em; give the same "
        "to resume it, pass --overwrite to start again, or choose another output name."
    )
    # the same file fixed (here: changed) resumes, and says that earlier blocks keep theirs
    shutil.copy(other, conv_model)
    run = Run(src, conv_model, out, site="threads", block=(16, 16, 16))
    result = run.execute()
    changed = [w for w in run.warnings if "other.pt" not in w and "changed since" in w]
    ledger = Ledger(str(tmp_path / "out.n5"), "pred").summary()
    older = sum(
        1 for r in ledger.done.values() if r["model_sha256"] != ledger.last_run["model_sha256"]
    )
    assert result.ok and 0 < older < len(ledger.done) == result.total
    assert changed == [
        f"The model file conv.pt changed since it computed blocks of this output "
        f"({older}/{older} of the blocks done): they keep what the earlier file computed (the "
        "ledger records each block's model hash); pass --overwrite to compute all with this one."
    ]
    assert len({rec["model_sha256"] for rec in ledger.done.values()}) == 2
    # a run with nothing left to compute records this file too: it still says so (it did not:
    # the last run's hash was the file's), and so does the output's status
    again = Run(src, conv_model, out, site="threads", block=(16, 16, 16))
    assert again.execute().ok
    assert any(f"({older}/{len(ledger.done)} of the blocks done)" in w for w in again.warnings)
    capsys.readouterr()
    assert main(["status", out]) == 0
    assert (
        f"{older} block{'s' * (older > 1)} of the {len(ledger.done)} done "
        f"{'were' if older > 1 else 'was'} computed with another model file"
        in capsys.readouterr().out
    )
    assert main(["status", out, "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["block_models"].values()) == sorted(
        [older, len(ledger.done) - older]
    )


def test_unsafe_pickle_and_non_torchscript_refused(tmp_path, float_volume):
    src, data = float_volume
    torch.save(torch.nn.Conv3d(1, 1, 3), tmp_path / "pickled.pt")  # a whole module: needs code
    with pytest.raises(RunError, match="needs code to load") as err:
        list(Run(src, str(tmp_path / "pickled.pt"), f"{tmp_path}/o.n5:x", site="threads").events())
    assert "TorchScript" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(Exception, match="not a TorchScript or PyTorch file") as err:
        list(Run(src, str(tmp_path / "notes.pt"), f"{tmp_path}/o2.n5:x", site="threads").events())
    assert "\n" not in str(err.value)
    # the input untouched, no output made
    np.testing.assert_array_equal(Volume.open(*src.split(":")).data.compute(), data)
    assert not (tmp_path / "o.n5").exists() and not (tmp_path / "o2.n5").exists()


def test_invalid_site_profile_names_the_field(tmp_path, conv_model, float_volume, capsys):
    src, _ = float_volume
    profile = tmp_path / "mysite.yaml"
    profile.write_text("kind: local\nworkers: 0\n")
    code = main(
        [
            "run",
            "--input",
            src,
            "--model",
            conv_model,
            "--output",
            f"{tmp_path}/o.n5:x",
            "--site",
            str(profile),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "field 'workers': workers is a whole number of at least 1, or auto, not 0." in err
    )
    assert not (tmp_path / "o.n5" / "x" / "emparsl-ledger.jsonl").exists()


def test_sites_list_and_show(capsys):
    assert main(["sites", "list"]) == 0
    out = capsys.readouterr().out
    assert "threads" in out and "local" in out
    assert main(["sites", "show", "local"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy_period"] == 0.2
    assert main(["sites", "test", "local"]) == 0  # starts HTEX workers and runs a no-op
    assert "Site local: first result after" in capsys.readouterr().out


def test_site_started_early_is_shut_down_when_no_block_runs(
    tmp_path, conv_model, float_volume, htex
):
    # the site starts (and warms its workers up) while the coordinator loads the model; a model
    # that then fails to load, or a caller that stops after Planned, must not leave workers behind
    src, data = float_volume
    (tmp_path / "notes.pt").write_text("not a model")
    (tmp_path / "notes.pt.yaml").write_text("kind: image\n")
    with pytest.raises(RunError, match="not a TorchScript or PyTorch file"):
        list(Run(src, str(tmp_path / "notes.pt"), f"{tmp_path}/o.n5:x", site="local").events())
    assert not (tmp_path / "o.n5" / "x").exists()
    events = Run(src, conv_model, f"{tmp_path}/o2.n5:x", site="local").events()
    assert type(next(events)).__name__ == "Planned"
    events.close()
    assert htex.gone()
    np.testing.assert_array_equal(Volume.open(*src.split(":")).data.compute(), data)


def _open_paths(pid: int) -> set[str]:
    """The files a process has open (from /proc: psutil lists regular files only)."""
    paths = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            paths.add(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile
    return paths


def test_cancel_leaves_no_workers_and_resume_completes(tmp_path, unet_model, htex, classes_mixed):
    import psutil

    from napari_emparsl.core.events import BlockDone, Cancelled

    data = np.random.default_rng(9).random((64, 96, 96)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(32, 32, 32))
    src, out = f"{tmp_path}/in.n5:raw", f"{tmp_path}/out.n5:seg"
    run = Run(src, unet_model, out, site="local")
    last = None
    niceness = []
    for event in run.events():
        last = event
        if isinstance(event, BlockDone) and not niceness:
            # the local site lowers its workers' priority (nice 10): a GUI stays responsive
            site = htex.all(guards=False, interchanges=False)
            niceness = [psutil.Process(pid).nice() for pid in site]
            # the output's lock is the coordinator's alone: a site process that inherited it
            # would keep the output locked after a kill -9 of the coordinator
            lock = str(tmp_path / "out.n5" / ".seg.emparsl-lock")
            holders = [pid for pid in htex.all() if lock in _open_paths(pid)]
            held_here = lock in _open_paths(os.getpid())
            run.cancel()
    assert isinstance(last, Cancelled) and last.done < last.total
    # the pool, the fork server, 2 workers, ...
    assert len(niceness) >= 3 and set(niceness) == {10}, niceness
    assert held_here and holders == []
    assert lock not in _open_paths(os.getpid())  # let go when the run ended

    assert htex.gone()
    summary = Ledger(str(tmp_path / "out.n5"), "seg").summary()
    assert summary.done and all(r["model_sha256"] for r in summary.done.values())
    assert Run(src, unet_model, out, site="threads").execute().ok
    ref = Run(src, unet_model, f"{tmp_path}/ref.n5:seg", site="threads").execute()
    assert ref.ok
    ref = Volume.open(tmp_path / "ref.n5", "seg").data.compute()
    classes_mixed(ref)  # (one class everywhere: a block written wrong would be equal too)
    np.testing.assert_array_equal(Volume.open(tmp_path / "out.n5", "seg").data.compute(), ref)


def test_cancel_on_threads_begins_no_queued_block_and_records_what_finished(
    tmp_path, conv_model, float_volume, monkeypatch
):
    """Cancel on the threads site: blocks queued but not begun are not computed (before, the
    pool ran every queued one while shutting down), and every block that was computed — so
    written — is recorded done and counted (before, those finishing after the cancel were
    written but not recorded, and computed again on resume)."""
    import threading

    from napari_emparsl.core.events import BlockDone, Cancelled
    from napari_emparsl.execution import runner as runner_module

    real = runner_module.process_batch
    begun: list[int] = []
    lock = threading.Lock()

    def slow(jobs):  # a slower model: the run is still going when it is cancelled
        with lock:
            begun.extend(j.block.id for j in jobs)
        time.sleep(0.4)
        return real(jobs)

    monkeypatch.setattr(runner_module, "process_batch", slow)
    src, _ = float_volume
    out = f"{tmp_path}/o.n5:x"
    run = Run(src, conv_model, out, site="threads", block=(16, 16, 16), batch=1)
    events = []
    for event in run.events():
        events.append(event)
        if isinstance(event, BlockDone) and event.done == 1:
            run.cancel()
    last = events[-1]
    assert isinstance(last, Cancelled) and last.total == 48
    done_ids = set(Ledger(str(tmp_path / "o.n5"), "x").summary().done)
    assert done_ids == set(begun) and last.done == len(begun) < 48
    assert {e.result.block_id for e in events if isinstance(e, BlockDone)} == done_ids


def test_resume_after_the_input_was_written_again_is_refused(tmp_path, conv_model, float_volume):
    """The input written again with the same shape (`emparsl import … --overwrite`, `sample
    --overwrite`): the resume said "Finished", the blocks done before holding what the old input
    gave — or, partly done, one output from two inputs. Each writing has its own id now, which
    the ledger records."""
    src, data = float_volume
    out = f"{tmp_path}/o.n5:x"
    assert Run(src, conv_model, out, site="threads", roi="0:16,0:16,0:16").execute().ok
    assert Run(src, conv_model, out, site="threads", roi="0:32,0:16,0:16").execute().ok  # same
    root, key = src.rsplit(":", 1)
    save_array(
        root, key, data[::-1].copy(), chunks=(16, 16, 16), voxel_size=(40, 8, 8), overwrite=True
    )
    before = open(Ledger(str(tmp_path / "o.n5"), "x").path).read()
    with pytest.raises(RunError) as err:
        Run(src, conv_model, out, site="threads").execute()
    assert str(err.value) == (
        f"The input {src} was written again since the output {out} was begun, so its blocks "
        "done so far hold what the input held then; pass --overwrite to compute the output "
        "anew, or choose another output name."
    )
    assert open(Ledger(str(tmp_path / "o.n5"), "x").path).read() == before  # nothing recorded
    assert Run(src, conv_model, out, site="threads", overwrite=True).execute().ok
    assert Run(src, conv_model, out, site="threads").execute().ok  # resumes the new one


def _ones_and_identity(tmp_path, save_model) -> tuple[str, str, str]:
    """An identity image model of 8³ blocks, a 16³ input of ones, an output: model, in, out."""
    from torch import nn

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    model = save_model(Identity(), tmp_path / "id.pt", "kind: image\nblock: [8, 8, 8]\n")
    save_array(tmp_path / "in.n5", "raw", np.ones((16, 16, 16), np.float32), chunks=(8, 8, 8))
    return model, f"{tmp_path}/in.n5:raw", f"{tmp_path}/out.n5:p"


def test_an_input_written_again_during_the_run_fails_the_blocks_after(tmp_path, save_model):
    """The input written again while a run goes on (`emparsl import --overwrite`, a napari
    save over it): the blocks after read the new data into an output begun with the old, and
    the run said complete (a helper's review). They fail now, saying why; the resume is
    refused until --overwrite computes the output anew."""
    from napari_emparsl.core.events import BlockDone, BlockFailed

    model, src, out = _ones_and_identity(tmp_path, save_model)
    run = Run(src, model, out, site="threads", retries=1, batch=1)
    done, failed = [], []
    for event in run.events():
        if isinstance(event, BlockDone):
            done.append(event.result.block_id)
            if len(done) == 2:  # written again meanwhile, the same shape
                save_array(tmp_path / "in.n5", "raw", np.full((16, 16, 16), 5, np.float32),
                           chunks=(8, 8, 8), overwrite=True)  # fmt: skip
        elif isinstance(event, BlockFailed) and event.final:
            failed.append(event)
    assert not event.ok and failed and event.done == len(done) < 8
    assert failed[0].error == (
        f"The input {src} was written again during the run (an import or a save over it), so "
        "the blocks done before hold what it held then; once that writing has finished, run "
        "again with --overwrite."
    )
    output = Volume.open(tmp_path / "out.n5", "p").data.compute()
    blocks = plan_blocks((16, 16, 16), (8, 8, 8), (0, 0, 0))
    for b in blocks:  # the blocks done hold the old input alone, the others nothing
        part = output[b.write_roi.to_slices()]
        assert (part == (1.0 if b.id in done else 0.0)).all(), b.id
    with pytest.raises(RunError, match="was written again since the output"):
        Run(src, model, out, site="threads").execute()
    assert Run(src, model, out, site="threads", overwrite=True).execute().ok
    assert (Volume.open(tmp_path / "out.n5", "p").data.compute() == 5.0).all()


def test_a_read_failing_as_the_input_is_written_again_says_so(tmp_path, save_model):
    """A block whose read fails because the input is being written anew (its chunks
    half-written: unreadable) is said to be the rewriting, not the symptom (a decode error)."""
    import glob

    from napari_emparsl.core.events import BlockDone, BlockFailed

    model, src, out = _ones_and_identity(tmp_path, save_model)
    failed, done = [], []
    for event in Run(src, model, out, site="threads", retries=0, batch=1).events():
        if isinstance(event, BlockDone):
            done.append(event.result.block_id)
            if len(done) == 1:  # being written again: a new id, chunks not readable yet
                save_array(tmp_path / "in.n5", "raw", np.full((16, 16, 16), 5, np.float32),
                           chunks=(8, 8, 8), overwrite=True)  # fmt: skip
                chunks = glob.glob(f"{tmp_path}/in.n5/raw/*/*/*")
                assert len(chunks) == 8
                for chunk in chunks:
                    with open(chunk, "wb") as f:
                        f.write(b"half")
        elif isinstance(event, BlockFailed):
            failed.append(event.error)
    # (blocks in flight when it was rewritten may have read the old data before)
    assert not event.ok and failed and len(failed) == 8 - len(done), (done, failed)
    assert set(failed) == {
        f"The input {src} was written again during the run (an import or a save over it), so "
        "the blocks done before hold what it held then; once that writing has finished, run "
        "again with --overwrite."
    }


def test_an_output_pasted_quoted_then_given_a_key(tmp_path, conv_model, float_volume):
    """A path pasted with its quotes, then `:pred` typed after it: the run said the output
    "was removed while the run wrote it" and left a half-made dataset (the quotes were
    dropped where the folder was made, not where its ledger was looked for)."""
    src, _ = float_volume
    (tmp_path / "dir with space").mkdir()
    out = f"'{tmp_path}/dir with space/q.n5':pred"
    assert Run(src, conv_model, out, site="threads", roi="0:16,0:16,0:16").execute().ok
    assert Ledger(str(tmp_path / "dir with space" / "q.n5"), "pred").summary().done


def test_cancel_while_preparing_changes_nothing(tmp_path, conv_model, float_volume):
    """Cancel before the plan is made (the panel's Cancel during 'preparing…'), with the output
    to be replaced: the run ends Cancelled and the output is as it was (before: replaced
    anyway, and its blocks planned)."""
    from napari_emparsl.core.events import Cancelled

    src, _ = float_volume
    out = f"{tmp_path}/o.n5:x"
    assert Run(src, conv_model, out, site="threads", roi="0:16,0:16,0:16").execute().ok
    ledger = Ledger(str(tmp_path / "o.n5"), "x")
    before = open(ledger.path).read()
    data = Volume.open(tmp_path / "o.n5", "x").data.compute()
    run = Run(src, conv_model, out, site="threads", overwrite=True)
    run.cancel()
    assert list(run.events()) == [Cancelled(0, 0)]
    assert open(ledger.path).read() == before
    np.testing.assert_array_equal(Volume.open(tmp_path / "o.n5", "x").data.compute(), data)
    assert Run(src, conv_model, out, site="threads").execute().ok  # not left locked


def test_cancel_as_the_last_block_fails_with_retries_left_is_cancelled(tmp_path, failing_model):
    """A cancel that comes with a failure that would be retried: the run says Cancelled (the
    block was not retried), not Finished with nothing failed."""
    from napari_emparsl.core.events import BlockFailed, Cancelled

    data = np.zeros((16, 16, 16), np.float32)
    data[2, 2, 2] = 255.0  # the model raises on it
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    run = Run(f"{tmp_path}/in.n5:raw", failing_model, f"{tmp_path}/o.n5:x", site="threads",
              retries=2)  # fmt: skip
    events = []
    for event in run.events():
        events.append(event)
        if isinstance(event, BlockFailed):
            assert not event.final and "marker found" in event.error
            run.cancel()
    assert sum(isinstance(e, BlockFailed) for e in events) == 1  # not retried
    assert isinstance(events[-1], Cancelled) and events[-1].done == 0


def test_block_started_where_the_site_tells(tmp_path, conv_model, float_volume):
    from napari_emparsl.core.events import BlockDone, BlockStarted

    src, _ = float_volume
    events = list(Run(src, conv_model, f"{tmp_path}/o.n5:x", site="threads").events())
    started = [e.block_id for e in events if isinstance(e, BlockStarted)]
    done = [e.result.block_id for e in events if isinstance(e, BlockDone)]
    assert sorted(started) == sorted(done) == list(range(48))
    for block_id in done:  # each block is reported started before it is reported done
        first_start = next(i for i, e in enumerate(events)
                           if isinstance(e, BlockStarted) and e.block_id == block_id)  # fmt: skip
        first_done = next(i for i, e in enumerate(events)
                          if isinstance(e, BlockDone) and e.result.block_id == block_id)  # fmt: skip
        assert first_start < first_done
    # HTEX workers report finished tasks only: no BlockStarted, the run is otherwise the same
    events = list(Run(src, conv_model, f"{tmp_path}/o2.n5:x", site="local").events())
    assert not any(isinstance(e, BlockStarted) for e in events)
    assert sum(isinstance(e, BlockDone) for e in events) == 48


def _in_fresh_python(*lines: str) -> list[str]:
    """Run lines of code in a fresh interpreter (nothing imported yet); its printed words."""
    res = subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, check=True
    )
    return res.stdout.split()


def test_coordinator_of_a_worker_site_needs_no_torch_for_builtin_models(tmp_path, float_volume):
    # importing torch takes seconds of CPU that the starting workers need more
    src, _ = float_volume

    def prepare(site: str, out: str) -> list[str]:
        return _in_fresh_python(
            "import sys",
            "from napari_emparsl.execution.runner import Run",
            f"plan = Run({src!r}, 'unet3d-em', {f'{tmp_path}/{out}:x'!r}, site={site!r}).prepare()",
            "print(len(plan.blocks), 'torch' in sys.modules, 'dask' in sys.modules)",
        )

    # no dask either (its import is ~0.3 s of CPU): the statistics are read with z5py
    assert prepare("local", "o.n5") == ["1", "False", "False"]
    # on the in-process site the coordinator loads it (and so checks it) itself
    assert prepare("threads", "t.n5")[:2] == ["1", "True"]


def test_a_block_worker_imports_no_dask(tmp_path, float_volume):
    # a worker only reads and writes its block with z5py; dask would add ~0.3 s to its start
    src, _ = float_volume
    plan = Run(src, "unet3d-em", f"{tmp_path}/o.n5:x", site="threads").prepare()
    job = BlockJob(
        f"{tmp_path}/in.n5", "raw", f"{tmp_path}/o.n5", "x", plan.blocks[0], "unet3d-em",
        {}, plan.norm, 1, True,
    )  # fmt: skip
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    words = _in_fresh_python(
        "import pickle, sys",
        "from napari_emparsl.core.blockwise import process_block",
        f"r = process_block(pickle.loads(open({str(tmp_path / 'job.pkl')!r}, 'rb').read()))",
        "print(r.ok, r.error.replace(' ', '_') or '-', 'dask' in sys.modules)",
    )
    assert words == ["True", "-", "False"]
    assert Volume.open(tmp_path / "o.n5", "x").read().any()  # the block was really written


def test_builtin_model_with_options_is_still_checked_before_running(tmp_path, float_volume, htex):
    # options may change a built-in model's architecture: then its weights are checked up front
    src, _ = float_volume
    run = Run(
        src,
        "unet3d-em",
        f"{tmp_path}/o.n5:x",
        site="local",
        model_options={"arch_options": {"base": 4, "depth": 2}},
    )
    with pytest.raises(RunError, match="do not fit the architecture"):
        list(run.events())
    assert not (tmp_path / "o.n5" / "x").exists()
    assert htex.gone()


def test_nan_voxels_enter_the_model_as_zero(tmp_path, conv_model):
    """Masked float data (NaN, ±inf voxels): they enter the model as 0 once normalized instead
    of spreading through every convolution of their blocks; the rest of the output is as if
    they had been 0, and all of it is finite."""
    data = np.random.default_rng(0).random((32, 48, 48)).astype(np.float32)
    masked = data.copy()
    masked[8:12, 10:20, :] = np.nan
    masked[20, 5, 5], masked[25, 40, 30] = np.inf, -np.inf
    zeroed = np.where(np.isfinite(masked), masked, 0).astype(np.float32)
    for key, arr in (("masked", masked), ("zeroed", zeroed)):
        save_array(tmp_path / "v.n5", key, arr, chunks=(16, 16, 16))
        events = list(
            Run(f"{tmp_path}/v.n5:{key}", conv_model, f"{tmp_path}/v.n5:p_{key}", site="threads",
                model_options={"normalize": "none"}).events()
        )  # fmt: skip
        assert events[-1].failed == 0
    out = Volume.open(tmp_path / "v.n5", "p_masked").data.compute()
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, Volume.open(tmp_path / "v.n5", "p_zeroed").data.compute())


@pytest.mark.parametrize("dtype", ["uint32", "float64", "int64"])
def test_wide_inputs_keep_their_detail_through_normalization(tmp_path, save_model, dtype):
    """Values of a large offset (a uint32 volume of 3e9 + 0..100, float64 around 1e7) were cast
    to float32 before the volume's mean was subtracted: float32 steps by 256 at 3e9, and the
    model was given one constant (every block 'done'). Normalized in float64 first now."""
    from torch import nn

    class Identity(nn.Module):
        def forward(self, x):
            return x

    model = save_model(Identity(), tmp_path / "id.pt",
                       "kind: image\nblock: [8, 8, 8]\nnormalize: zscore\n")  # fmt: skip
    rng = np.random.default_rng(0)
    detail = rng.integers(0, 100, (8, 16, 16))
    data = (3_000_000_000 if dtype != "float64" else 10_000_000) + detail
    data = data.astype(dtype)
    save_array(tmp_path / "v.n5", "raw", data, chunks=(8, 8, 8))
    assert Run(f"{tmp_path}/v.n5:raw", model, f"{tmp_path}/v.n5:p", site="threads").execute().ok
    out = Volume.open(tmp_path / "v.n5", "p").data.compute()
    expected = (data.astype(np.float64) - data.mean()) / data.std()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_normalization_statistics_leave_nan_out(tmp_path):
    from napari_emparsl.core.models.spec import ModelSpec
    from napari_emparsl.core.volume import volume_stats
    from napari_emparsl.execution.runner import _norm

    data = np.random.default_rng(1).normal(100, 20, (16, 32, 32)).astype(np.float32)
    data[:4] = np.nan
    data[5, 5, 5] = np.inf
    vol = save_array(tmp_path / "v.n5", "raw", data, chunks=(16, 16, 16))
    finite = data[np.isfinite(data)].astype(np.float64)
    mean, std = volume_stats(vol)
    assert mean == pytest.approx(finite.mean()) and std == pytest.approx(finite.std())
    lo, span = _norm(vol, ModelSpec(kind="image", normalize="percentile"))
    expected = np.percentile(finite, [1.0, 99.8])
    assert (lo, lo + span) == pytest.approx(tuple(expected))
    empty = save_array(tmp_path / "v.n5", "nan", np.full((8, 8, 8), np.nan, np.float32))
    assert volume_stats(empty) == (0.0, 1.0)
    assert _norm(empty, ModelSpec(kind="image", normalize="percentile")) == (0.0, 1.0)


def test_blocks_left_counts_the_whole_plan(tmp_path, conv_model, float_volume, capsys):
    """After a region run: the whole volume's blocks not done yet (what the GUI's estimate of
    a full run counts), earlier runs included."""
    src, _ = float_volume  # 40×50×60, blocks 16³: 3 × 4 × 4 = 48
    out = f"{tmp_path}/out.n5:pred"
    first = Run(src, conv_model, out, site="threads", roi="0:1,0:20,0:20")  # 4 blocks
    assert first.blocks_left() is None  # not planned yet
    list(first.events())
    assert first.blocks_left() == 44
    # `emparsl status` counts the whole volume too: a region run leaves most of it pending
    assert main(["status", out, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["blocks"], status["done"], status["pending"]) == (48, 4, 44)
    second = Run(src, conv_model, out, site="threads", roi="0:1,10:40,0:20")  # 2 new ones
    list(second.events())
    assert second.blocks_left() == 42
    full = Run(src, conv_model, out, site="threads")
    list(full.events())
    assert full.blocks_left() == 0


@pytest.mark.parametrize(("kind", "bad"), [("image", "nan"), ("labels", "nan"), ("labels", "inf")])
def test_model_output_with_nan_fails_the_block_unwritten(tmp_path, save_model, kind, bad):
    """A model that returns NaN (or ±inf) where the input is bright: those blocks fail with one
    sentence and are not written (nor marked done); the others are done. numpy's own warning
    (inf − inf in the check's sum) no longer reaches the terminal before that sentence."""
    import warnings

    class NanWhereBright(torch.nn.Module):
        def __init__(self, labels, value):
            super().__init__()
            self.labels, self.value = labels, value

        def forward(self, x):
            y = torch.where(x > 200.0, torch.full_like(x, self.value), x)
            return torch.cat([y, -y], dim=1) if self.labels else y

    data = np.zeros((32, 32, 32), np.float32)
    data[3, 3, 3] = 255.0  # block 0 of 8 (16³)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    m = NanWhereBright(kind == "labels", float(bad))
    sidecar = "kind: labels\nclasses: [a, b]\n" if m.labels else "kind: image\n"
    model = save_model(m, tmp_path / "nan.pt", sidecar + "block: [16, 16, 16]\nhalo: [0, 0, 0]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a warning fails the block otherwise
        events = list(Run(f"{tmp_path}/in.n5:raw", model, f"{tmp_path}/o.n5:p",
                          site="threads", retries=0).events())  # fmt: skip
    failed = [e for e in events if type(e).__name__ == "BlockFailed"]
    assert [e.block_id for e in failed] == [0] and events[-1].done == 7
    n = 2 if kind == "labels" else 1  # one voxel: one value per output channel
    # emparsl's own sentence, without an exception type (it was "ValueError: The model's …")
    assert failed[0].error.startswith(f"The model's output holds {n} NaN or infinite value(s)")
    summary = Ledger(str(tmp_path / "o.n5"), "p").summary()
    assert 0 not in summary.done and sorted(summary.done) == list(range(1, 8))
    assert not (tmp_path / "o.n5" / "p" / "0" / "0" / "0").exists()  # block 0's chunk unwritten


@pytest.mark.parametrize(
    ("signum", "code", "how", "target"),
    [
        (signal.SIGINT, 130, "interrupted", "group"),
        (signal.SIGTERM, 143, "stopped by SIGTERM", "group"),
        (signal.SIGTERM, 143, "stopped by SIGTERM", "interchange too"),
    ],
)
def test_ctrl_c_stops_the_local_site_and_says_how_to_resume(tmp_path, unet_model, htex, signum,
                                                            code, how, target):  # fmt: skip
    """Ctrl-C (SIGINT) during a run on a real local site — or SIGTERM, as a batch scheduler
    sends at a job's time limit: exit 130 / 143 within seconds, no site process left, one
    sentence with the blocks done and how to go on; the next run resumes.

    The signal goes to the run's whole process group, as a terminal's Ctrl-C does (before:
    Parsl's interchange, in that group, died of it, and the run's shutdown waited for its
    answer for ever), or to every process, the interchange too, as Slurm does (a shutdown
    that cannot finish is given up on, and the site's processes stopped)."""
    import psutil

    data = np.random.default_rng(8).random((64, 96, 96)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", unet_model, "--block", "32,32,32", "--site", "local",
           "--output", f"{tmp_path}/out.n5:pred"]  # fmt: skip
    # as from a terminal: a suite started in the background by a non-interactive shell has
    # SIGINT ignored, which its children inherit (and then Ctrl-C does nothing, as it should)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not _ledger_done(tmp_path / "out.n5") and time.time() < deadline:
        time.sleep(0.05)
    if target == "group":
        os.killpg(proc.pid, signum)
    else:
        [interchange] = [c for c in psutil.Process(proc.pid).children()
                         if "interchange" in " ".join(c.cmdline())]  # fmt: skip
        interchange.send_signal(signum)
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=90)  # stops within moments (no timed assertion)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not stop") from None
    assert proc.returncode == code
    done = len(set(_ledger_done(tmp_path / "out.n5")))
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert 1 <= done < 18, done  # stopped mid-run (18 blocks)
    assert last == (
        f"emparsl: {how} at {done}/18 blocks done; finished blocks stay done, run the "
        "same command again to resume."
    )
    assert "Traceback" not in err
    assert htex.gone()  # interchange, pool, workers, fork server: all stopped
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and f"({done} already done, resuming)" in again.stdout


def test_sigterm_while_the_site_starts_leaves_nothing(tmp_path, unet_model, htex):
    """SIGTERM the moment the site's interchange has started (Parsl still starting its
    executor): exit 143 with the run's one sentence last, and nothing left running. Before, the
    interchange was not stopped: it failed on the run folder removed under it and printed its
    traceback after that sentence (FileNotFoundError: …/certificates; 2 runs in 6), or lived
    on."""
    import psutil

    data = np.random.default_rng(8).random((32, 64, 64)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", unet_model, "--block", "32,32,32", "--site", "local",
           "--output", f"{tmp_path}/out.n5:pred"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    started = False
    while not started and time.time() < deadline and proc.poll() is None:
        try:
            started = any("interchange" in " ".join(c.cmdline())
                          for c in psutil.Process(proc.pid).children())  # fmt: skip
        except psutil.Error:
            pass
    assert started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)  # the standard streams' end: every writer gone
    assert proc.returncode == 143
    assert "Traceback" not in err and "Error" not in err, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("emparsl: stopped by SIGTERM") and "run the same command" in last
    assert htex.gone()


def test_a_signal_while_the_run_waits_for_its_site_shuts_the_site_down(unet_model, htex):
    """Ctrl-C or SIGTERM while the run waits for its site to start (a loaded machine: seconds):
    the site is shut down once it is up, nothing left. Before, the interrupted wait (a thread's
    join) marked the starting thread ended in Python 3.11 while it went on: the run removed its
    folder under the starting interchange, which printed a traceback after the run's last line
    (4 runs of 8 under load) or lived on."""
    from napari_emparsl.execution.runner import _SiteStarter
    from napari_emparsl.execution.sites import load_site

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGALRM, interrupt)
    starter = _SiteStarter(load_site("local"), unet_model, {})
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # the site takes a second or more to start
        with pytest.raises(KeyboardInterrupt):
            starter.dfk()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    starter.close()
    assert not starter._thread.is_alive()
    assert htex.gone()


def test_a_site_that_fails_after_its_interchange_started_leaves_nothing(htex, monkeypatch):
    """Parsl failing after it started the site's executor (its interchange up, the worker pool
    launched) leaves no process behind (before: the interchange and pool lived on)."""
    from parsl.dataflow.dflow import DataFlowKernel

    from napari_emparsl.execution.sites import load_site, new_run_dir, start_kernel

    add = DataFlowKernel.add_executors

    def add_then_fail(self, executors):  # a fault, injected: Parsl's own start failing
        add(self, executors)
        if any(getattr(e, "interchange_proc", None) is not None for e in executors):
            raise RuntimeError("injected fault after the executor started")

    monkeypatch.setattr(DataFlowKernel, "add_executors", add_then_fail)
    run_dir = new_run_dir()
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            start_kernel(load_site("local"), run_dir)
        assert htex.gone()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_a_run_under_nohup_outlives_its_terminal(tmp_path, unet_model, htex):
    """SIGHUP stops a run (its terminal closed) unless the run ignores it, as under `nohup
    emparsl run … &`: a signal ignored before the run stays ignored."""
    data = np.random.default_rng(8).random((64, 96, 96)).astype(np.float32)
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", f"{tmp_path}/in.n5:raw",
           "--model", unet_model, "--block", "32,32,32", "--site", "local",
           "--output", f"{tmp_path}/out.n5:pred"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # fmt: skip
    deadline = time.time() + 120
    while not _ledger_done(tmp_path / "out.n5") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Finished: 18/18 blocks done, 0 failed" in out
    assert htex.gone()


def test_site_whose_workers_cannot_start_is_one_sentence(tmp_path, conv_model, float_volume,
                                                         htex, capsys):  # fmt: skip
    """A local site whose worker pool exits at once (a worker_init that fails): every block
    fails with what happened and what to do, not Parsl's "Error 1:"; nothing is left running;
    `emparsl sites test` says the same."""
    src, _ = float_volume
    site = tmp_path / "broken.yaml"
    site.write_text('kind: local\nworkers: 1\nworker_init: "exit 3"\n')
    events = list(Run(src, conv_model, f"{tmp_path}/o.n5:x", site=str(site), roi="0:1,0:4,0:4",
                      retries=0).events())  # fmt: skip
    failed = [e for e in events if type(e).__name__ == "BlockFailed"]
    assert failed and events[-1].done == 0
    assert failed[0].error == (
        "The site's workers could not start (their pool exited with code 3); check "
        f"the site's worker_init and settings, e.g. with `emparsl sites test {site}`."
    )
    assert htex.gone()
    assert main(["sites", "test", str(site)]) == 2
    assert capsys.readouterr().err.strip() == (
        "emparsl: error: The site 'broken' could not start its workers (their pool exited with "
        "code 3); check its worker_init and settings."
    )
    # a worker_init whose command is not found (a mistyped `module load`) fails too: the pool
    # ran on without it, and the test passed ("first result after 2.3 s")
    site.write_text('kind: local\nworkers: 1\nworker_init: "export A=1\\nnot_a_command_xyz"\n')
    assert main(["sites", "test", str(site)]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(
        "emparsl: error: The site 'broken' could not start its workers (their pool exited with "
        "code 127: "
    ) and said.endswith(
        "not_a_command_xyz: command not found); check its worker_init and settings."
    )
    assert ".sh: line" not in said  # the shell's words, not the job script's path
    # other statuses go on, as Parsl's (a sourced ~/.bashrc may end in `[ -f x ] && . x`: 1)
    site.write_text('kind: local\nworkers: 1\nworker_init: "export A=1; [ -f /nonexistent ]"\n')
    assert main(["sites", "test", str(site)]) == 0
    assert htex.gone()


@pytest.mark.parametrize("folder", ["with space", "t" * 60])
def test_a_temporary_folder_with_a_space_or_a_long_path(tmp_path, conv_model, float_volume, folder):
    """Parsl puts the run folder unquoted on its worker pool's command line: under a TMPDIR
    with a space the pool never started and the run waited forever. Under one whose path is
    long (macOS's /var/folders/…/T/ is 49 characters), the run folder was too long to be the
    site's TMPDIR, and each local run left 7 files and folders of its processes there
    (multiprocessing's pymp-*, the queue's files and locks). The site's folder then goes to
    /tmp."""
    src, _ = float_volume
    tmp = tmp_path / folder
    tmp.mkdir()
    cmd = [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", src, "--model",
           conv_model, "--output", f"{tmp_path}/o.n5:x", "--site", "local", "--roi", "0:1,0:4,0:4"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Finished: 1/1 blocks done" in done.stdout
    assert list(tmp.iterdir()) == []  # nothing of the site's went there, nothing left


def _refused_before_any_block(tmp_path, src, model, options=None):
    """The run's sentence, once it was refused before planning (no output made)."""
    run = Run(src, model, f"{tmp_path}/o.n5:x", site="threads", roi="0:1,0:4,0:4", retries=2,
              model_options=options or {})  # fmt: skip
    with pytest.raises(RunError) as err:
        list(run.events())
    assert not (tmp_path / "o.n5").exists()
    return str(err.value)


def test_model_output_not_the_declared_scale_is_refused_before_any_block(
    tmp_path, conv_model, float_volume
):
    """A description that says ×2 for a model that does not upsample. Once it wrote
    wrong-sized blocks and called them done; then every block failed with this sentence, each
    retried, through the whole run. A trial on zeros finds it before any block."""
    src, _ = float_volume
    said = _refused_before_any_block(tmp_path, src, conv_model, {"scale": [1, 2, 2]})
    assert said == (
        "The model's output is 16×16×16 voxels for an input of 16×16×16, but its scale "
        "[1, 2, 2] says 16×32×32; set the scale (and halo, multiple) the model really has."
    )


_THRESHOLDED = (
    "a labels model of one channel is thresholded (threshold, 0.5 by default) into 0 and 1: "
    "remove its classes (classes= empty), or export one logit per class."
)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"kind": "labels", "classes": ["a", "b", "c"]}, f"3 classes (a, b, c); {_THRESHOLDED}"),
        ({"kind": "labels", "classes": ["bg", "mito"]}, f"2 classes (bg, mito); {_THRESHOLDED}"),
        ({"out_channels": 2}, "2 output channel(s); set out_channels to what the model produces."),
    ],
)
def test_model_output_not_the_declared_channels_is_refused_before_any_block(
    tmp_path, conv_model, float_volume, options, said
):
    """A description with more classes (or channels) than the model gives (once a labels run
    took the argmax over the channels there were and wrote blocks whose classes did not match
    the names; then each block failed): refused with both counts before any block. A labels
    model of one channel is told it is thresholded without classes (it was told to set its
    classes to what it produces: one class, which is refused)."""
    src, _ = float_volume
    assert _refused_before_any_block(tmp_path, src, conv_model, options) == (
        f"The model's output has 1 channel(s) but its description says {said}"
    )
    if "classes" in options:  # what it says to do works
        fixed = {**options, "classes": []}
        run = Run(src, conv_model, f"{tmp_path}/t.n5:x", site="threads", roi="0:1,0:16,0:16",
                  model_options=fixed)  # fmt: skip
        assert run.execute().ok
        assert Volume.open(tmp_path / "t.n5", "x").dtype == np.uint8


def test_an_undescribed_model_of_several_channels_is_told_to_name_its_classes(
    tmp_path, float_volume
):
    """A TorchScript file without a description, of 3 output channels: the run panel asks for
    its classes, and the run said "set out_channels", which made unnamed labels."""
    src, _ = float_volume
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 3, 3, padding=1).eval()),
                   str(tmp_path / "bare.pt"))  # fmt: skip
    assert _refused_before_any_block(tmp_path, src, str(tmp_path / "bare.pt")) == (
        "The model's output has 3 channel(s) but its description says 1 output channel(s); "
        "name its 3 classes with classes (one name per channel, e.g. classes=c0,c1,c2), or set "
        "kind: image and out_channels: 3 for an image model."
    )


def test_model_that_returns_a_tuple_is_refused_in_a_sentence(tmp_path, float_volume, save_model):
    """A model whose forward returns (output, aux), as deep-supervision nets do (was
    "AttributeError: 'tuple' object has no attribute 'float'" in every block)."""

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    src, _ = float_volume
    model = save_model(Pair(), tmp_path / "pair.pt", "kind: image\n")
    assert _refused_before_any_block(tmp_path, src, model) == (
        "The model returned a tuple of 2, not one tensor; export it so that its forward "
        "returns the output tensor alone (e.g. a wrapper whose forward returns net(x)[0])."
    )


@pytest.mark.parametrize(
    ("dims", "said", "expected"),
    [
        # a 3D model described as 2D took the batch of slices for one unbatched volume: a
        # reshape error in every block ("shape '[1, 1, 1, 66, 66]' is invalid for input …")
        (3, 2, "The model is a 3D model (its convolutions are conv3d), but its description "
               "says spatial_dims: 2; set spatial_dims: 3."),
        # a 2D model described as 3D: torch's "Expected 3D (unbatched) or 4D (batched) input to
        # conv2d" in every block
        (2, 3, "The model is a 2D model (its convolutions are conv2d), but its description "
               "says spatial_dims: 3; set spatial_dims: 2."),
    ],
)  # fmt: skip
def test_model_of_other_dimensions_than_described_is_refused(
    tmp_path, float_volume, save_model, dims, said, expected
):
    conv = torch.nn.Conv3d(1, 1, 3, padding=1) if dims == 3 else torch.nn.Conv2d(1, 1, 3, padding=1)
    model = save_model(conv, tmp_path / f"c{dims}.pt", f"kind: image\nspatial_dims: {said}\n")
    src, _ = float_volume
    assert _refused_before_any_block(tmp_path, src, model) == expected


def test_model_taking_other_channels_than_described_is_refused(tmp_path, float_volume, save_model):
    """Weights for 2 input channels, described (and given) as 1: torch's "expected input … to
    have 2 channels, but got 1 channels instead" in every block; said up front now."""
    model = save_model(torch.nn.Conv3d(2, 1, 3, padding=1), tmp_path / "c.pt", "kind: image\n")
    src, _ = float_volume
    assert _refused_before_any_block(tmp_path, src, model) == (
        "The model takes 2 input channel(s), not the 1 its description says; set in_channels: 2 "
        "(and give it a volume with 2 channel(s))."
    )


def test_chained_run_on_an_unfinished_output_is_refused(tmp_path, conv_model, float_volume,
                                                        capsys):  # fmt: skip
    """A run whose input is another run's output (or one of its levels) reads only what that
    run has written: its unwritten chunks would read as zeros and be computed and marked done.
    A region inside what is done runs; once the first run is finished, the whole volume."""
    src, _ = float_volume  # 40×50×60, chunks 16³; conv_model's block 16³: 3×4×4 = 48 blocks
    first = f"{tmp_path}/a.n5:x"
    assert main(["run", "--input", src, "--model", conv_model, "--output", first, "--site",
                 "threads", "--roi", "0:32,0:32,0:32"]) == 0  # fmt: skip  # 8 blocks
    second = ["run", "--input", first, "--model", conv_model, "--site", "threads"]
    with pytest.raises(RunError, match=(
        r"a.n5:x is the output of a run that is not finished: 40 of the 48 blocks this run reads "
        r"are not written yet \(they would read as zeros\); finish that run first \(see `emparsl "
        r"status .*a.n5:x`\), or choose a region inside what it has done.")):  # fmt: skip
        Run(first, conv_model, f"{tmp_path}/b.n5:y", site="threads").prepare()
    assert not (tmp_path / "b.n5").exists()
    # a region whose blocks and their halo (2) lie inside the done blocks
    assert main([*second, "--output", f"{tmp_path}/b.n5:y", "--roi", "0:16,0:16,0:16"]) == 0
    # the same blocks as the first run: their halo reads unwritten chunks
    with pytest.raises(RunError, match="19 of the 27 blocks this run reads are not written"):
        Run(first, conv_model, f"{tmp_path}/b.n5:z", site="threads", roi="0:32,0:32,0:32").prepare()
    # an output big enough for coarser levels: a level's region maps onto the same blocks
    save_array(
        tmp_path / "big.n5", "raw", np.zeros((32, 288, 288), np.float32), chunks=(32, 96, 96)
    )
    big = f"{tmp_path}/c.n5:x"
    list(Run(f"{tmp_path}/big.n5:raw", conv_model, big, site="threads", block=(32, 96, 96),
             roi="0:32,0:96,0:96").events())  # fmt: skip
    assert Volume.open(tmp_path / "c.n5", "x").levels == ("x/s0", "x/s1")
    with pytest.raises(RunError, match=r"c.n5:x/s1 is the output of a run that is not finished: "
                       r"8 of the 9 blocks"):  # fmt: skip
        Run(f"{big}/s1", conv_model, f"{tmp_path}/b.n5:l", site="threads").prepare()
    capsys.readouterr()
    assert main(["status", f"{big}/s1"]) == 0  # a level's status is its run's
    assert capsys.readouterr().out.startswith(f"{big}: 1/9 blocks done, 0 failed, 8 pending\n")
    assert main([*second[:2], f"{big}/s1", *second[3:], "--output", f"{tmp_path}/b.n5:l",
                 "--roi", "0:16,0:32,0:32"]) == 0  # fmt: skip
    assert main(["run", "--input", src, "--model", conv_model, "--output", first, "--site",
                 "threads"]) == 0  # fmt: skip
    assert main([*second, "--output", f"{tmp_path}/b.n5:z"]) == 0


def test_evaluate_of_an_unfinished_output_counts_its_written_blocks(tmp_path, save_model, capsys):
    """`emparsl evaluate` of a run's output with blocks still unwritten (a preview, a stopped run)
    counts those blocks only, and says so: their zeros are not background predictions."""

    class Split(torch.nn.Module):
        def forward(self, x):
            return torch.cat([0.5 - x, x - 0.5], dim=1)  # class 1 where x > 0.5

    data = np.random.default_rng(3).random((32, 32, 32)).astype(np.float32)
    truth = (data > 0.5).astype(np.uint8)
    truth[16:] = 1  # outside the written block: nothing like the prediction's zeros there
    save_array(tmp_path / "e.n5", "raw", data, chunks=(16, 16, 16))
    save_array(tmp_path / "e.n5", "truth", truth, chunks=(16, 16, 16))
    model = save_model(Split(), tmp_path / "split.pt",
                       "kind: labels\nclasses: [bg, fg]\nblock: [16, 16, 16]\n")  # fmt: skip
    e = f"{tmp_path}/e.n5"
    assert main(["run", "--input", f"{e}:raw", "--model", model, "--output", f"{e}:pred",
                 "--site", "threads", "--roi", "0:16,0:16,0:16"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", f"{e}:pred", f"{e}:truth", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"dice": {"bg": 1.0, "fg": 1.0}}  # the written block is exact
    assert err == (
        "emparsl: note: the prediction is the output of a run that is not finished (1 of 8 "
        "blocks written); the Dice is over those blocks only (12% of the volume).\n"
    )
    # given as the ground truth (two runs compared): its unwritten blocks are left out too
    assert main(["evaluate", f"{e}:truth", f"{e}:pred", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"dice": {"bg": 1.0, "fg": 1.0}}  # (before: fg 0.22)
    assert err.startswith("emparsl: note: the ground truth is the output of a run that is not")
    assert main(["info", f"{e}:pred"]) == 0  # info says how much of a run's output is there
    assert "run          1 of 8 blocks written (the rest read as zeros; see `emparsl status`)" in (
        capsys.readouterr().out
    )
    assert main(["run", "--input", f"{e}:raw", "--model", model, "--output", f"{e}:pred",
                 "--site", "threads"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", f"{e}:pred", f"{e}:truth", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["dice"]["fg"] < 0.9  # all blocks: truth[16:] counts


def test_two_runs_never_write_one_output_at_once(tmp_path, conv_model, float_volume, capsys):
    src, _ = float_volume
    out = f"{tmp_path}/o.n5:x"
    first = Run(src, conv_model, out, site="threads").events()
    assert next(first).todo == 48  # Planned: the first run holds the output from here on
    assert main(["status", out]) == 0  # status says so (and takes nothing from the run)
    assert f"a run is writing it now: process {os.getpid()} on " in capsys.readouterr().out
    busy = f"The output {tmp_path}/o.n5:x is being written by another run (process {os.getpid()}"
    for overwrite in (False, True):  # --overwrite must not delete it under the first run either
        with pytest.raises(UserError, match=re.escape(busy)):
            Run(src, conv_model, out, site="threads", overwrite=overwrite).execute()
    # another process (a terminal beside the GUI): one sentence, exit code 2
    other = subprocess.run(
        [sys.executable, "-m", "napari_emparsl.cli", "run", "--input", src, "--model", conv_model,
         "--output", out, "--site", "threads"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert other.returncode == 75 and other.stderr.startswith(f"emparsl: error: {busy}")
    assert "wait for it to end (or cancel it)" in other.stderr
    *_, last = first
    assert (last.done, last.failed) == (48, 0)
    assert main(["status", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is None
    # an import or a napari save holding the output: the sentence says which (before: "by
    # another run" for an import too)
    from napari_emparsl.core.ledger import OutputLock

    for what, said, status in (
        ("import", "an import (`emparsl import`)", "an import"),
        ("napari save", "a save from napari", "a save from napari"),
    ):
        held = OutputLock(f"{tmp_path}/o.n5", "x", what)
        held.acquire()
        with pytest.raises(UserError) as err:
            Run(src, conv_model, out, site="threads").execute()
        assert str(err.value).startswith(
            f"The output {tmp_path}/o.n5:x is being written by {said} (process {os.getpid()} on "
        )
        assert main(["status", out]) == 0
        assert f"{status} is writing it now: process {os.getpid()} on " in capsys.readouterr().out
        assert main(["status", out, "--json"]) == 0
        polled = json.loads(capsys.readouterr().out)
        assert polled["running"]["what"] == what and polled["state"] == "running"
        held.release()
    # once a run ends (also by an error before it wrote anything), the output is free again
    assert Run(src, conv_model, out, site="threads").execute().done == 48
    with pytest.raises(RunError, match="smaller than the halo"):
        Run(src, conv_model, f"{tmp_path}/new.n5:x", site="threads", block=(1, 1, 1)).execute()
    assert not (tmp_path / "new.n5").exists()  # nothing left of the refused run, nor its lock
    with pytest.raises(RunError, match="smaller than the halo"):  # nor the groups made for it
        Run(src, conv_model, f"{tmp_path}/o.n5:a/b/x", site="threads", block=(1, 1, 1)).execute()
    assert sorted(os.listdir(tmp_path / "o.n5")) == [".x.emparsl-lock", "attributes.json", "x"]
    assert Run(src, conv_model, f"{tmp_path}/new.n5:x", site="threads").execute().done == 48
    assert list(z5py.File(str(tmp_path / "new.n5"), "r").keys()) == ["x"]  # the lock is a file
    # a dataset inside a group of a new container: the lock makes no folder of its own
    assert Run(src, conv_model, f"{tmp_path}/fresh.n5:a/b", site="threads").execute().done == 48
    assert sorted(os.listdir(tmp_path / "fresh.n5")) == [
        ".a%2Fb.emparsl-lock",
        "a",
        "attributes.json",
    ]


def test_output_removed_during_the_run_stops_it_in_one_sentence(tmp_path, conv_model, float_volume):
    """Deleting the output's folder mid-run (by hand, or an unmounted disk) stops the run with
    one sentence instead of an OS error about the ledger file."""
    from napari_emparsl.core.events import BlockDone
    from napari_emparsl.core.ledger import OutputGone

    src, data = float_volume
    run = Run(src, conv_model, f"{tmp_path}/out.n5:pred", site="threads", block=(16, 16, 16))
    done = 0
    with pytest.raises(OutputGone) as err:
        for event in run.events():
            if isinstance(event, BlockDone):
                done += 1
                # moved away at once (the other thread may be writing into it right now)
                os.rename(tmp_path / "out.n5" / "pred", tmp_path / "removed")
    assert done == 1
    assert str(err.value) == (
        f"The output {tmp_path}/out.n5:pred was removed while the run wrote it (its folder is "
        "gone); the run stopped — run it again to start the output anew."
    )
    assert isinstance(err.value, UserError)
    import shutil

    shutil.rmtree(tmp_path / "out.n5" / "pred", ignore_errors=True)  # what writes recreated
    assert main(["run", "--input", src, "--model", conv_model, "--output",
                 f"{tmp_path}/out.n5:pred", "--site", "threads", "--block", "16,16,16"]) == 0  # fmt: skip
    np.testing.assert_array_equal(Volume.open(*src.split(":")).data.compute(), data)


def test_a_cancel_never_records_blocks_that_did_not_begin(tmp_path, unet_model, float_volume):
    """A cancel landing between a batch's submission and an idle thread taking it: the batch
    was "not begun", and was recorded failed ("block 1 failed: not begun: the run was
    cancelled", offered to Retry failed), counted final on a last attempt. Cancelled at random
    moments, 40 times (before: such a failure in 1–4 of 40): no block ever failed, and a run
    whose every block finished as it was cancelled says Finished, not Cancelled."""
    import random
    import threading

    from napari_emparsl.core.events import BlockFailed, Planned

    src, _ = float_volume
    rng = random.Random(5)
    failures, ends = [], set()
    for _ in range(40):
        run = Run(src, unet_model, f"{tmp_path}/o.n5:p", site="threads", block=(16, 16, 16),
                  halo=(8, 8, 8), overwrite=True, batch=1)  # fmt: skip
        delay = rng.uniform(0.0, 0.05)

        def seen(event, run=run, delay=delay):
            if isinstance(event, Planned):
                threading.Timer(delay, run.cancel).start()
            elif isinstance(event, BlockFailed):
                failures.append(event.error)

        run.callbacks.append(seen)
        last = run.execute()
        ends.add(type(last).__name__)
        assert type(last).__name__ == "Cancelled" or last.done == last.total
        summary = Ledger(str(tmp_path / "o.n5"), "p").summary()
        assert not summary.failed
    assert failures == []
    assert "Cancelled" in ends


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ({"batch": 0}, "batch must be a whole number ≥ 1 (got 0)."),
        ({"batch": -1}, "batch must be a whole number ≥ 1 (got -1)."),
        (
            {"in_flight_per_worker": "2"},
            "in_flight_per_worker must be a whole number ≥ 1 (got '2').",
        ),
        (
            {"in_flight_per_worker": None},
            "in_flight_per_worker must be a whole number ≥ 1 (got None).",
        ),
        ({"retries": 1.5}, "Retries are a count of 0 or more, not 1.5."),
        ({"block_ids": 5}, "block_ids must be a list of block ids (got 5); None runs every block."),
        # (these raised TypeErrors: "unhashable type: 'dict'", "expected str, bytes or …")
        (
            {"site": None},
            "The site must be a site's name (local, threads) or a profile's path, "
            "given as text or a path, not None.",
        ),
        (
            {"site": {"kind": "threads"}},
            "The site must be a site's name (local, threads) or a "
            "profile's path, given as text or a path, not "
            "{'kind': 'threads'}.",
        ),
        (
            {"model_options": 5},
            "The model options must be a dict such as {'halo': 8} (or 'key=value' texts), not 5.",
        ),
        ({"block_ids": [-1]}, "block_ids must be block ids, whole numbers ≥ 0 (got [-1])."),
        (
            {"block_ids": [2, 999]},
            "Block id 999 is not in this run's plan of 48 blocks (ids "
            "0–47): they were listed with another block size, halo or "
            "region; run again without them.",
        ),
    ],
)
def test_python_api_options_are_checked(tmp_path, conv_model, float_volume, option, said):
    """The Python API's run options (before: batch=-1 and block_ids=[999] "Finished" with
    nothing computed, block_ids=5 and in_flight_per_worker="2" raised TypeErrors, the latter
    after the output was made). One sentence each; no output made."""
    src, _ = float_volume
    with pytest.raises(UserError) as err:
        Run(src, conv_model, f"{tmp_path}/o.n5:p", **({"site": "threads"} | option)).execute()
    assert str(err.value) == said
    assert not (tmp_path / "o.n5").exists()


def test_python_api_input_model_output_and_option_texts(tmp_path, conv_model, float_volume):
    """None as input, model or output was a TypeError from deep inside; model options may be
    the CLI's or the panel's `key=value` texts (a ValueError: "dictionary update sequence")."""
    src, _ = float_volume
    out = f"{tmp_path}/o.n5:p"
    for args, said in (
        ((None, conv_model, out), "The input must be a volume, as DATA.n5:DATASET, given as "
                                  "text or a path, not None."),
        ((src, None, out), "The model must be a built-in model's name or a model file's path, "
                           "given as text or a path, not None."),
        ((src, conv_model, 5), "The output must be a dataset to write, as OUT.n5:DATASET, given "
                               "as text or a path, not 5."),
    ):  # fmt: skip
        with pytest.raises(UserError) as err:
            Run(*args, site="threads")
        assert str(err.value) == said
    for given in ("halo=4; normalize=zscore", ["halo=4", "normalize=zscore"]):
        run = Run(src, conv_model, out, site="threads", model_options=given)
        assert run.model_options == {"halo": 4, "normalize": "zscore"}
    assert not (tmp_path / "o.n5").exists()


def test_a_fixed_size_models_halo_advice_works(tmp_path, small_n5):
    """A model of a fixed input size (32³) whose own halo (24) does not fit it: the refusal of a
    halo too big suggested just under half the size (15: blocks of 2 voxels, 64 blocks for 8³);
    a quarter now (blocks of half the size). A halo below the context was told to "leave the
    halo out", which brought back the model's 24 and was refused."""
    src, out = f"{small_n5[0]}:raw", f"{tmp_path}/o.n5:p"
    fixed = {"fixed": [32, 32, 32], "multiple": [1, 1, 1]}
    with pytest.raises(
        RunError, match=r"use a halo below half of that size, e\.g\. --halo 8,8,8\.$"
    ):
        Run(src, "unet3d-em", out, site="threads", halo=20, model_options=fixed).prepare()
    run = Run(src, "unet3d-em", out, site="threads", halo=8, model_options=fixed)
    run.prepare()
    assert run.warnings[-1].endswith(
        "(faster, not exact); its fixed input size leaves no room for that whole context."
    ), run.warnings


def test_a_halo_below_the_models_context_is_said_to_be_inexact(tmp_path, unet_model,
                                                              conv_model, float_volume):  # fmt: skip
    """A given halo smaller than the context the model declares: the run says blocks may
    differ from one whole forward (before: `--halo 10` was "rounded up to 12 … (no seams)",
    though 12 < the model's 24, and `--halo 8` said nothing). A halo that covers the context
    says nothing, or (rounded up) that it is exact."""
    src, _ = float_volume
    cases = [
        (unet_model, (10, 10, 10), "The halo 10,10,10 was rounded up to 12,12,12 (a multiple of "
         "the model's size multiple 4,4,4), still smaller than the context the model declares "
         "(24,24,24): blocks may differ slightly from one whole-volume forward near their edges "
         "(faster, not exact); leave the halo out for an exact result."),
        (unet_model, (8, 8, 8), "The halo 8,8,8 is smaller than the context the model declares "
         "(24,24,24): blocks may differ slightly from one whole-volume forward near their edges "
         "(faster, not exact); leave the halo out for an exact result."),
        (unet_model, (26, 26, 26), "The halo 26,26,26 was rounded up to 28,28,28 (a multiple of "
         "the model's size multiple 4,4,4), so that blocks compute what one whole-volume forward "
         "computes (no seams)."),
        (conv_model, (2, 2, 2), None),
    ]  # fmt: skip
    for i, (model, halo, said) in enumerate(cases):
        run = Run(src, model, f"{tmp_path}/o.n5:p{i}", site="threads", halo=halo)
        events = run.events()
        next(events)  # planned
        events.close()
        halo_warnings = [w for w in run.warnings if w.startswith("The halo")]
        assert halo_warnings == ([said] if said else []), halo_warnings


def test_a_label_volume_as_input_is_said(tmp_path, conv_model):
    """`--input my.n5:labels` (a group whose only dataset is labels/sparse, uint32 ids) ran the
    model on label ids without a word. The run now says the input looks like a label volume,
    and which dataset the group opened; an image says nothing of the kind."""
    rng = np.random.default_rng(0)
    save_array(tmp_path / "my.n5", "labels/sparse", rng.integers(0, 9, (16, 16, 16), np.uint32),
               labels=True)  # fmt: skip
    save_array(tmp_path / "my.n5", "raw", rng.random((16, 16, 16), np.float32))
    for key, said in (
        ("labels", f"The input {tmp_path}/my.n5:labels/sparse (opened for {tmp_path}/my.n5:"
                   "labels) looks like a label volume (uint32), not an image: check the input, "
                   "the model runs on what it is given."),
        ("raw", None),
    ):  # fmt: skip
        run = Run(f"{tmp_path}/my.n5:{key}", conv_model, f"{tmp_path}/o.n5:{key}",
                  site="threads")  # fmt: skip
        assert run.execute().ok
        labels = [w for w in run.warnings if "looks like a label volume" in w]
        assert labels == ([said] if said else []), labels


def test_block_ids_may_come_from_a_generator(tmp_path, conv_model, float_volume):
    """`block_ids=(i for i in failed)`: read once (a check that read it first left none, and
    the run computed nothing)."""
    src, _ = float_volume
    last = Run(src, conv_model, f"{tmp_path}/o.n5:p", site="threads",
               block_ids=(i for i in (0, 5))).execute()  # fmt: skip
    assert (last.done, last.total) == (2, 2)
    assert sorted(Ledger(str(tmp_path / "o.n5"), "p").summary().done) == [0, 5]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "The model one.pt has no description of its kind, halo, classes (no one.pt.yaml "
             "beside it), so it runs as a labels model and with no halo (blocks may differ from "
             "one whole-volume forward near their edges); describe it in one.pt.yaml (`emparsl "
             "describe-model {model}` prints a description to edit) or with --model-option."),
        ({"one.yaml": "kind: image\nhalo: 2\n"},
         "The model one.pt has no description of its kind, halo, classes (one.yaml beside it is "
         "not read: a model's description is named one.pt.yaml), so it runs as a labels model "
         "and with no halo"),
        ({"one.pt.yaml": "kind: image\n"},
         "The description of the model one.pt does not give its halo, so it runs with no halo "
         "(blocks may differ"),
        ({"one.pt.yaml": "kind: image\nhalo: 0\n"}, None),
    ],
)  # fmt: skip
def test_a_model_run_on_defaults_it_does_not_say_is_warned(tmp_path, float_volume, files,
                                                           expected):  # fmt: skip
    """A model file without its description (or with it under another name) ran silently as a
    labels model (a thresholded mask where an image was meant) with no halo (seams)."""
    model = tmp_path / "one.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 3, padding=1)), str(model))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    src, _ = float_volume
    run = Run(src, str(model), f"{tmp_path}/o.n5:x", site="threads", roi="0:1,0:4,0:4")
    planned = next(e for e in run.events() if type(e).__name__ == "Planned")
    said = [w for w in planned.warnings if "one.pt" in w]
    if expected is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(expected.format(model=model))


def test_a_changed_description_after_every_block_failed_says_nothing_is_lost(
    tmp_path, failing_model
):
    """Every block failed; the user changes the description as a block's error suggested, and
    the run told them to give the old one back to resume (0 blocks done: nothing to resume)."""
    data = np.full((16, 32, 32), 255.0, np.float32)  # the model fails on every block
    save_array(tmp_path / "in.n5", "raw", data, chunks=(16, 16, 16))
    src, out = f"{tmp_path}/in.n5:raw", f"{tmp_path}/out.n5:pred"
    first = list(Run(src, failing_model, out, site="threads", retries=0).events())
    assert first[-1].done == 0 and first[-1].failed == first[-1].total
    with pytest.raises(RunError) as err:
        list(Run(src, failing_model, out, site="threads", model_options={"halo": 4}).events())
    assert str(err.value) == (
        f"The output {out} was begun with a model description with halo: 0×0×0, not 4×4×4, but "
        "no block of it is done, "
        "so nothing is lost by starting again: pass --overwrite to compute it with this one "
        "(or choose another output name)."
    )


def test_a_2d_model_s_block_depth_is_said_to_be_one_slice(tmp_path, conv2d_model, float_volume):
    """`--block 16,32,32` for a 2D model became 1×32×32 without a word."""
    src, _ = float_volume
    run = Run(src, conv2d_model, f"{tmp_path}/o.n5:x", site="threads", block=(16, 32, 32),
              roi="0:1,0:32,0:32")  # fmt: skip
    events = list(run.events())
    assert events[-1].done == 1
    assert (
        "The model is a 2D model, which computes one slice at a time: the block 16,32,32 is "
        "1,32,32." in run.warnings
    )
    quiet = Run(src, conv2d_model, f"{tmp_path}/o.n5:y", site="threads", block=(1, 32, 32),
                roi="0:1,0:32,0:32")  # fmt: skip
    list(quiet.events())
    assert not [w for w in quiet.warnings if "one slice at a time" in w]
    # a halo in z likewise (it became 0 without a word)
    halo = Run(src, conv2d_model, f"{tmp_path}/o.n5:z", site="threads", halo=(2, 4, 4),
               roi="0:1,0:32,0:32")  # fmt: skip
    assert list(halo.events())[-1].done == 1
    assert (
        "The model is a 2D model, which takes no context from the slices above and below: the "
        "halo 2,4,4 is 0,4,4." in halo.warnings
    )
    assert not [w for w in quiet.warnings + run.warnings if "no context from the slices" in w]


def test_a_model_is_tried_on_zeros_once_per_description(tmp_path, conv_model, float_volume,
                                                        monkeypatch):  # fmt: skip
    """The trial cost a preview in napari 0.1–0.2 s each time (1.08× its block instead of
    1.02×): once per loaded model and description is enough."""
    from napari_emparsl.execution import runner

    tried = []
    real = runner.run_model_on_array

    def counted(module, spec, x):  # the real trial, counted
        tried.append(spec.halo)
        return real(module, spec, x)

    monkeypatch.setattr(runner, "run_model_on_array", counted)
    # (another test's run tried the same weights)
    monkeypatch.setattr(runner, "_TRIED", weakref.WeakKeyDictionary())
    src, _ = float_volume
    for name, options in (("a", {}), ("b", {}), ("c", {"halo": 4})):
        run = Run(src, conv_model, f"{tmp_path}/o.n5:{name}", site="threads", roi="0:1,0:4,0:4",
                  model_options=options)  # fmt: skip
        run.prepare()
        run.release()
    assert tried == [(2, 2, 2), (4, 4, 4)]


def test_values_a_model_does_not_use_are_said(tmp_path, conv_model, float_volume):
    """A threshold on an image model, an out_range on a float32 output: accepted without a word
    before (the user believed them applied)."""
    src, _ = float_volume
    run = Run(src, conv_model, f"{tmp_path}/o.n5:x", site="threads", roi="0:16,0:16,0:16",
              model_options={"threshold": 0.3, "out_range": "0,255"})  # fmt: skip
    assert list(run.events())[-1].ok
    assert [w for w in run.warnings if " is not used: " in w] == [
        "The model's threshold 0.3 is not used: it cuts the one output channel of a labels model "
        "into a mask; this image model's values are written as they are.",
        "The model's out_range [0, 255] is not used: it maps an image model's values to 0..255 "
        "with out_dtype: uint8; this output is float32, written as the model gives it.",
    ]
    quiet = Run(src, conv_model, f"{tmp_path}/o.n5:y", site="threads", roi="0:16,0:16,0:16",
                model_options={"out_dtype": "uint8", "out_range": "-1,1"})  # fmt: skip
    assert list(quiet.events())[-1].ok
    assert not [w for w in quiet.warnings if " is not used: " in w]
    labels = Run(src, "unet3d-em", f"{tmp_path}/o.n5:z", site="threads", roi="0:16,0:16,0:16",
                 model_options={"threshold": 0.9})  # fmt: skip
    assert list(labels.events())[-1].ok
    assert [w for w in labels.warnings if " is not used: " in w] == [
        "The model's threshold 0.9 is not used: it cuts the one output channel of a labels model "
        "into a mask; this model's classes are told apart by their largest logit."
    ]


def test_an_output_resumes_whatever_block_its_description_preferred(
    tmp_path, conv2d_model, float_volume
):
    """The same command resumes an output whose blocks the model's default no longer gives: an
    output begun when a 2D model's default block was 1×64×64 resumes now that it is 1×512×512
    (it was refused: "made with block 1×64×64, not 1×512×512"), and the description's
    preferred block, recorded with it, does not matter either."""
    import json

    src, _ = float_volume
    out = f"{tmp_path}/o.n5:x"
    first = Run(src, conv2d_model, out, site="threads", roi="0:1,:,:", block=(1, 16, 16))
    assert list(first.events())[-1].ok
    ledger = tmp_path / "o.n5" / "x" / "emparsl-ledger.jsonl"
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    for r in records:
        if "spec" in r:
            r["spec"]["block"] = [64, 64, 64]  # as an older version recorded its default
    ledger.write_text("".join(json.dumps(r) + "\n" for r in records))
    again = Run(src, conv2d_model, out, site="threads", roi="0:2,:,:")  # no block given
    events = list(again.events())
    assert events[-1].ok and events[0].todo == events[0].total // 2 == 4 * 4
    assert Ledger(f"{tmp_path}/o.n5", "x").last_run_record()["block"] == [1, 16, 16]
    # given, another block is still refused, saying which one it was made with
    with pytest.raises(RunError, match="was made with block 1×16×16, not 1×32×32"):
        list(Run(src, conv2d_model, out, site="threads", block=(1, 32, 32)).events())


def test_an_interrupt_waits_until_a_block_is_recorded_and_counted():
    """Ctrl-C between a block's ledger record and its count made an interrupted run say one
    block fewer done than its ledger held ("at 0/18 blocks done", 1 recorded); the two are
    now done with interrupts held back, which arrive right after."""
    from napari_emparsl.execution.runner import _interrupts_held

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)  # arrives "during" the record
            time.sleep(0.05)
            steps.append("recorded")
            steps.append("counted")
        steps.append("after")  # never: the interrupt comes as the block ends
    assert steps == ["recorded", "counted"]


def test_a_runs_normalization_adds_the_models_eps(tmp_path, save_model):
    """norm_eps (a package's eps) is added to the divisor of zscore and percentile runs."""
    import z5py
    from torch import nn

    import napari_emparsl
    from napari_emparsl.core.models.loaders import describe_model
    from napari_emparsl.core.models.spec import ModelError

    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    data = np.random.default_rng(0).normal(10, 0.2, (8, 16, 16)).astype(np.float32)
    z5py.File(str(tmp_path / "in.n5"), "a").create_dataset("raw", data=data, chunks=(8, 16, 16))
    model = save_model(Identity(), tmp_path / "id.pt", "kind: image\nnormalize: zscore\n")
    for eps in (0.0, 0.1):
        out = f"{tmp_path}/o.n5:e{eps}"
        napari_emparsl.run(f"{tmp_path}/in.n5:raw", model, out, site="threads",
                           model_options={"norm_eps": eps})  # fmt: skip
        got = z5py.File(str(tmp_path / "o.n5"), "r")[f"e{eps}"][:]
        want = (data.astype(np.float64) - data.mean()) / (data.std() + eps)
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ModelError, match="'norm_eps' must be a number of 0 or more, not -1"):
        describe_model(model, {"norm_eps": -1})
