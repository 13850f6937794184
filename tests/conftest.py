"""Shared fixtures: real N5 files only (tmp folders and ../shared/data), no mocks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMPARSL_SHARED_DATA", REPO.parent / "shared" / "data"))

#: set in this test session's environment, so inherited by every process its runs start (sites,
#: their interchanges, pools, workers and guards, CLI subprocesses): the process checks count
#: those alone, not the sites of another session or program on the same machine (which made
#: "nothing left" fail, or "a pool is running" pass without this test's)
SESSION_MARK = "EMPARSL_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{os.urandom(4).hex()}"


class HtexProcesses:
    """The processes of emparsl's local HTEX sites this test session started, found by command
    line and :data:`SESSION_MARK` in their environment (they are not children of the test:
    Parsl's LocalProvider starts the worker pool detached)."""

    POOLS = ("process_worker_pool.py", "-m napari_emparsl.execution.sites")

    @staticmethod
    def _cmdlines() -> dict[int, str]:
        import psutil

        mark = os.environ[SESSION_MARK]
        return {
            p.pid: " ".join(p.info["cmdline"] or [])
            for p in psutil.process_iter(["cmdline", "environ"])
            if (p.info["environ"] or {}).get(SESSION_MARK) == mark
        }

    def pools(self) -> list[int]:
        """Pids of the worker pools (Parsl's script, or emparsl's pool with a fork server)."""
        return [pid for pid, cmd in self._cmdlines().items() if any(m in cmd for m in self.POOLS)]

    def all(self, guards: bool = True, interchanges: bool = True) -> list[int]:
        """The pools, the fork servers with emparsl preloaded and every process forked from them
        (workers and the pool's manager process carry the fork server's command line), the
        interchanges (at the coordinator's priority) unless ``interchanges`` is false, and the
        sites' guards (idle shells, at the coordinator's priority) unless ``guards`` is false."""
        return [
            pid
            for pid, cmd in self._cmdlines().items()
            if any(m in cmd for m in self.POOLS)
            or ("multiprocessing.forkserver" in cmd and "napari_emparsl" in cmd)
            or (
                interchanges and ("HTEX interchange" in cmd or "high_throughput.interchange" in cmd)
            )
            or (guards and "emparsl-site-guard" in cmd)
        ]

    def gone(self, timeout: float = 15) -> bool:
        """Whether none of :meth:`all` is left (within ``timeout`` seconds)."""
        import time

        deadline = time.time() + timeout
        while self.all() and time.time() < deadline:
            time.sleep(0.2)
        return self.all() == []


@pytest.fixture(autouse=True)
def _own_config_and_cache(tmp_path_factory, monkeypatch):
    """Each test its own config and cache folders, not the user's: a profile saved in
    ~/.config/napari-emparsl/sites (a `local` of one's own) replaces the built-in site of that
    name that the tests run on, and tests would write the user's recent list and log."""
    base = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "cache"))
    monkeypatch.delenv("EMPARSL_SITES", raising=False)


@pytest.fixture
def htex() -> HtexProcesses:
    """Finds the processes of local HTEX sites (to check that none is left behind)."""
    return HtexProcesses()


@pytest.fixture
def shared_data() -> Path:
    """The real EM / interoperability data beside the checkout (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def copy_shared(shared_data: Path, tmp_path: Path):
    """Copy a folder of the shared data into tmp_path (writable) and return the copy's path."""

    def copy(rel: str) -> Path:
        dst = tmp_path / Path(rel).name
        shutil.copytree(shared_data / rel, dst)
        for p in dst.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        dst.chmod(0o755)
        return dst

    return copy


@pytest.fixture
def small_n5(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A small uint8 dataset 'raw' (20×40×50, chunks 8×16×16, voxel 30×10×10 nm)."""
    from napari_emparsl.core.volume import save_array

    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, size=(20, 40, 50), dtype=np.uint8)
    path = tmp_path / "small.n5"
    save_array(path, "raw", data, chunks=(8, 16, 16), voxel_size=(30, 10, 10))
    return path, data


class SuperRes(nn.Module):
    """×2 in y, x: conv, nearest upsample, conv (radius 1 input + 1 output voxel)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 1, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = nn.functional.interpolate(y, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.b(y)


@pytest.fixture
def superres_model(tmp_path) -> str:
    torch.manual_seed(3)
    path = tmp_path / "sr.pt"
    torch.jit.save(torch.jit.script(SuperRes().eval()), str(path))
    (tmp_path / "sr.pt.yaml").write_text(
        "kind: image\nhalo: [2, 2, 2]\nscale: [1, 2, 2]\nblock: [16, 16, 16]\n"
    )
    return str(path)


class TwoConvs(nn.Module):
    """Two 3×3(×3) convolutions, 2 voxels of context per side: a network for model packages."""

    def __init__(self, dims: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.a = conv(1, 4, 3, padding=1)
        self.b = conv(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="session")
def write_package():
    """``write(folder, x, rdf, dims=3, seed=0, expected=None)`` writes a bioimage.io package
    folder as its authors would: a TorchScript :class:`TwoConvs` of ``dims`` (weights from
    ``seed``; its SHA-256 recorded in ``rdf``), the test input ``x`` (test_input.npy), its test
    output (test_output.npy: ``expected(net)``, by default sigmoid(net(x z-scored))) and ``rdf``
    as rdf.yaml; returns the test output."""
    import hashlib

    import yaml

    def write(folder: Path, x: np.ndarray, rdf: dict, dims=3, seed=0, expected=None):
        torch.manual_seed(seed)
        net = torch.jit.script(TwoConvs(dims).eval())
        folder.mkdir(exist_ok=True)
        torch.jit.save(net, folder / "weights.pt")
        digest = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
        rdf["weights"]["torchscript"]["sha256"] = digest
        if expected is None:
            with torch.no_grad():
                out = torch.sigmoid(net(torch.from_numpy((x - x.mean()) / x.std()))).numpy()
        else:
            out = expected(net)
        np.save(folder / "test_input.npy", x)
        np.save(folder / "test_output.npy", out)
        (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
        return out

    return write
