"""Site profiles -> parsl.Config. The only module that imports parsl.

A profile is a small YAML file (one per site) validated with pydantic; built-in profiles ship in
``napari_emparsl/sites/``, user profiles live in ``~/.config/napari-emparsl/sites/`` (or
``$EMPARSL_SITES``), and ``--site`` also takes a file path.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from napari_emparsl.core.errors import UserError
from napari_emparsl.core.paths import user_path

log = logging.getLogger(__name__)

__all__ = [
    "SiteError",
    "SiteProfile",
    "auto_workers",
    "check_site",
    "list_sites",
    "load_site",
    "make_config",
    "new_run_dir",
    "profile_problem",
    "python_app",
    "start_kernel",
]


class SiteError(UserError, ValueError):
    """An unknown or invalid site, in one sentence."""


class SiteProfile(BaseModel):
    """Settings of one compute site."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the profile's name, also its file name (<name>.yaml)")
    kind: Literal["threads", "local"] = Field(
        description="threads: blocks run in this process (previews, tests); local: in worker "
        "processes of this machine (full runs)"
    )
    workers: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="worker processes (threads for kind threads), or auto: one per "
        "threads_per_worker cores this process may use, at most one per 3 GB of memory",
    )
    threads_per_worker: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="torch threads (cores) each worker uses for its blocks, or auto: 1 with "
        "workers auto, else the cores this process may use shared among the workers",
    )
    strategy_period: float = Field(
        0.2,
        gt=0,
        le=60,  # Parsl's poller thread dies on a huge period, and failed workers go unnoticed
        strict=True,  # not `true` read as 1
        allow_inf_nan=False,
        description="seconds between Parsl's checks of the workers it needs (short: the "
        "first blocks start sooner)",
    )
    worker_init: str = Field(
        "", description="shell commands run before each worker starts (e.g. module load …)"
    )
    # niceness of the worker processes (0-19): a desktop running the GUI stays responsive while
    # the workers use every core
    nice: int = Field(
        0,
        ge=0,
        le=19,
        strict=True,
        description="niceness of the worker processes, 0-19 (higher: the desktop stays "
        "responsive while the workers use every core)",
    )
    keep_freed_memory: bool = Field(
        True,
        strict=True,
        description="workers keep the memory a block frees for the next block (a third faster "
        "per block on CPUs; a worker's memory stays at its peak until the run ends)",
    )

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where workers run the model: auto (a GPU where torch sees one, else the "
        "CPU), cpu, or cuda (a GPU or the block fails); a node's workers share its GPUs",
    )

    preload_workers: bool = Field(
        True,
        strict=True,
        description="worker processes are forked from one that has already imported torch and "
        "the engine, instead of each starting a fresh Python (the first blocks start sooner: "
        "1-2 s on 2 cores); off: Parsl's worker pool as it ships",
    )

    @field_validator("workers", "threads_per_worker", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any, info: Any) -> Any:
        # one sentence, not pydantic's two (one per member of the union)
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
            return int(value)
        if isinstance(value, str) and value.strip() == "auto":
            return "auto"
        raise ValueError(
            f"{info.field_name} is a whole number of at least 1, or auto, not {value!r}"
        )

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        # a profile is saved as <sites folder>/<name>.yaml, and Parsl puts the name into its
        # workers' command line unquoted (a space there and no worker ever starts)
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
            raise ValueError(
                "a site's name is the name of its file: letters, digits, '.', '_' and '-' only "
                f"(no spaces), not starting with a dot, not {name!r}"
            )
        if len(name) > 64:  # Parsl names its job files after it: over 255 bytes, none starts
            raise ValueError(f"a site's name is at most 64 characters long, not {len(name)}")
        return name

    @model_validator(mode="after")
    def _process_settings(self) -> SiteProfile:
        # a threads site computes its blocks in this process: there is no worker process to
        # run shell commands before, or to lower the priority of (lowering this process's would
        # slow the viewer) — accepted and ignored, they would look as if they took effect
        if self.kind == "threads":
            if self.worker_init.strip():
                raise ValueError(
                    "worker_init runs before worker processes start, and a threads site has "
                    "none (its blocks run in this process): leave it empty, or use kind local"
                )
            if self.nice:
                raise ValueError(
                    "nice sets the priority of worker processes, and a threads site has none "
                    "(its blocks run in this process): set it to 0, or use kind local"
                )
        return self

    @property
    def worker_count(self) -> int:
        """``workers``, with ``auto`` made a number for this machine (see :func:`auto_workers`)."""
        if self.workers == "auto":
            return auto_workers(self.worker_threads)  # 1 thread each where both are auto
        return self.workers

    @property
    def worker_threads(self) -> int:
        """``threads_per_worker``, with ``auto`` made a number: 1 when ``workers`` is auto (one
        worker per core), else the cores this process may use shared among the workers — so
        that ``workers: 2`` on 16 cores gives each worker 8 threads, not 1."""
        if self.threads_per_worker != "auto":
            return self.threads_per_worker
        if self.workers == "auto":
            return 1
        return max(1, machine_capacity()[0] // self.workers)

    @property
    def workers_keep_memory(self) -> bool:
        """Whether block workers keep freed memory: only processes of their own (not `threads`)."""
        return self.keep_freed_memory and self.kind != "threads"


#: memory a worker may need: a 128³ block of the built-in model peaks at ~2.1 GB (one thread)
AUTO_WORKER_MEMORY = 3 * 2**30


def _cgroup_limit(name: str) -> str:
    """A cgroup v2 limit of this process (``cpu.max``, ``memory.max``); '' where none is set."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            rel = next((ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")), "")
        with open(os.path.join("/sys/fs/cgroup", rel.lstrip("/"), name), encoding="ascii") as f:
            value = f.read().strip()
    except (OSError, StopIteration):
        return ""
    return "" if value.startswith("max") else value


def machine_capacity() -> tuple[int, int]:
    """Cores this process may use (its CPU affinity — a batch job's allocation —, and a
    container's CPU quota) and the memory it may use (physical, or the container's limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_limit("cpu.max").split()
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]):
        cores = min(cores, max(1, int(quota[0]) // int(quota[1])))
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 0
    limit = _cgroup_limit("memory.max")
    if limit.isdigit():
        memory = min(memory, int(limit)) if memory else int(limit)
    return cores, memory


def auto_workers(threads_per_worker: int = 1) -> int:
    """``workers: auto``: one worker per ``threads_per_worker`` cores, at most one per
    AUTO_WORKER_MEMORY of memory, at least one."""
    cores, memory = machine_capacity()
    count = cores // max(1, threads_per_worker)
    if memory:
        count = min(count, memory // AUTO_WORKER_MEMORY)
    return max(1, count)


def user_site_dir() -> Path:
    env = os.environ.get("EMPARSL_SITES")
    if env:  # as a shell would read it: ~ expanded, quotes dropped (`sites list` said so)
        from napari_emparsl.core.paths import user_path

        return Path(user_path(env))
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "napari-emparsl" / "sites"


def _site_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    builtin = resources.files("napari_emparsl") / "sites"
    for entry in sorted(builtin.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            files[entry.name[:-5]] = Path(str(entry))
    user = user_site_dir()
    if user.is_dir():
        # .yml too (as model sidecars); a .yaml wins over a .yml of the same name
        mine: dict[str, Path] = {}
        for p in sorted([*user.glob("*.yml"), *user.glob("*.yaml")], key=lambda p: p.suffix):
            if p.name.startswith("."):  # an editor's lock, macOS's ._ files: no profiles
                continue
            if p.stem not in mine or p.suffix == ".yaml":
                mine[p.stem] = p
        for name in sorted(mine):
            files[name] = mine[name]
    return files


def builtin_kind(name: str) -> str | None:
    """The kind of the built-in site called ``name`` (``threads``, ``local``), None for no
    built-in of that name."""
    entry = resources.files("napari_emparsl") / "sites" / f"{name}.yaml"
    if not entry.is_file():
        return None
    data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
    return str(data.get("kind", name))


def list_sites() -> dict[str, Path]:
    """Site name -> profile file (user profiles override built-in ones of the same name)."""
    return _site_files()


def load_site(site: str) -> SiteProfile:
    """A site by name or profile file path, validated."""
    files = _site_files()
    if site in files:
        path = files[site]
    elif os.path.isfile(typed := user_path(site)):
        path = Path(typed)
    else:
        raise SiteError(
            f"Unknown site '{site}'; known sites: {', '.join(files)} (or give a profile file)."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where: as a model's sidecar error says
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SiteError(
            f"The site profile {path} is not valid YAML ({str(err).splitlines()[0]}{where})."
        ) from None
    except UnicodeDecodeError:
        raise SiteError(f"The site profile {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as err:
        raise SiteError(
            f"The site profile {path} cannot be read ({err.strerror or err})."
        ) from None
    if not isinstance(data, dict):
        raise SiteError(f"The site profile {path} must be a mapping of settings.")
    name = data.get("name")
    if site in files and isinstance(name, str) and name != path.stem:
        # a sites folder's profile is found by its file's name: under another name it could not
        # be chosen, and the site panel would save a second file (a file given by its path may
        # name its site as it likes)
        raise SiteError(
            f"The site profile {path} names itself {data['name']!r}, but a site's name is its "
            f"file's name: rename the file to {data['name']}.yaml, or set name: {path.stem}."
        )
    named = "name" in data
    data.setdefault("name", path.stem)
    try:
        profile = SiteProfile.model_validate(data)
    except ValidationError as err:
        problem = profile_problem(err)
        if not named and problem.startswith("field 'name': "):  # the file's name: say so
            problem = f"its file name {path.stem!r} is no site name: " + problem.removeprefix(
                "field 'name': "
            )
        raise SiteError(f"The site profile {path} is invalid: {problem}.") from None
    builtin = builtin_kind(path.stem) if site in files else None
    if builtin is not None and profile.kind != builtin:
        # it replaces the built-in everywhere (previews run on threads): as the site panel
        # refuses to save one, a file written by hand is refused where it is used
        raise SiteError(
            f"The site profile {path} replaces the built-in site {path.stem} (kind {builtin}) "
            f"but is of kind {profile.kind}; rename it (e.g. my-{profile.kind}.yaml), or make "
            f"it kind {builtin}."
        )
    return profile


def profile_problem(err: ValidationError) -> str:
    """The first problem of a profile, naming its field where it is one field's, in words
    (pydantic's "Extra inputs are not permitted", "Field required", "Input should be a valid
    number" told neither the settings there are nor the value given)."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    problem = first["msg"].removeprefix("Value error, ")
    if not field or first["type"] == "value_error":  # the profile's own checks' sentences
        return f"field '{field}': {problem}" if field else problem
    if first["type"] == "extra_forbidden":
        return (
            f"'{field}' is not a setting of a site profile (check its spelling; the settings "
            f"are {', '.join(SiteProfile.model_fields)})"
        )
    if first["type"] == "missing":
        example = "kind: local or kind: threads" if field == "kind" else f"{field}: …"
        return f"field '{field}' is missing: add {example}"
    msg = first["msg"]
    what = msg.removeprefix("Input ") if msg.startswith("Input ") else msg[:1].lower() + msg[1:]
    return f"field '{field}': {field} {what}, not {first['input']!r}"


def _python_bin_on_path() -> None:
    """Parsl starts interchange.py / process_worker_pool.py from PATH: make this Python's scripts
    findable even when the virtual environment is not activated (e.g. `.venv/bin/emparsl`)."""
    import sys

    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _quiet_local_provider():
    """Parsl's LocalProvider, cancelling its worker pool without forking this process.

    Parsl cancels a local block by running ``kill -- -$(ps -o pgid= PID)`` in a subprocess with a
    pre-exec function, i.e. a full fork() of the coordinator; in napari that process holds
    gigabytes, and the fork stalls the viewer for tens of milliseconds at the end of every run.
    Signalling the pool's process group directly does the same without a subprocess. It also
    tells ``launched`` (the site's :class:`_SiteGuard`) the process group of each pool it starts.
    """
    import signal

    from parsl.providers import LocalProvider

    class QuietLocalProvider(LocalProvider):
        launched = None  # called with the process group of each worker pool it launches

        def submit(self, *args, **kwargs):
            job = super().submit(*args, **kwargs)
            try:
                group = os.getpgid(self.resources[job]["remote_pid"])
            except (KeyError, TypeError, OSError):
                return job
            if self.launched is not None and group != os.getpgid(0):
                self.launched(-group)
            return job

        def cancel(self, job_ids):
            for job in job_ids:
                job_dict = self.resources[job]
                job_dict["cancelled"] = True
                try:
                    pid = job_dict["remote_pid"]
                    group = os.getpgid(pid)
                    if group == os.getpgid(0):  # never our own group (Parsl starts its own)
                        os.kill(pid, signal.SIGTERM)
                    else:
                        os.killpg(group, signal.SIGTERM)
                except (ProcessLookupError, PermissionError, KeyError):
                    pass  # already gone
            return [True for _ in job_ids]

    return QuietLocalProvider


def _worker_init(profile: SiteProfile, run_dir: str) -> str:
    """The profile's worker_init, after lowering the worker pool's priority (inherited),
    making the run's folder the pool's TMPDIR (:func:`_site_tmpdir`; a worker_init may set
    its own) and telling the pool the cores its workers are given.

    Parsl's pool starts min(workers, its node's cores ÷ cores_per_worker) workers: `workers: 3`
    on 2 cores started 2, and a threads_per_worker above the cores started none (every block
    then waited for ever). The profile's numbers are the user's to choose; PARSL_CORES makes
    the pool start exactly ``workers`` of them."""
    import shlex

    renice = f"renice -n {profile.nice} -p $$ >/dev/null 2>&1" if profile.nice else ""
    tmp = _site_tmpdir(run_dir)
    tmpdir = f"export TMPDIR={shlex.quote(tmp)}" if tmp else ""
    cores = f"export PARSL_CORES={profile.worker_count * profile.worker_threads}"
    # a worker_init whose last command is not found or cannot run (`modul load …`: exit 127 or
    # 126) stops the pool with that code, as the site's failure: the workers ran on without the
    # environment it was to set up, and `emparsl sites test` passed. Other statuses go on, as
    # Parsl's: a sourced ~/.bashrc ending in `[ -f x ] && . x` gives 1 and is fine. In the
    # same shell, so that what it sets holds for the pool.
    init = (
        f"{{ {profile.worker_init.strip()}\n}}; _s=$?; "
        '[ "$_s" -eq 126 ] || [ "$_s" -eq 127 ] && exit "$_s"'
        if profile.worker_init.strip()
        else ""
    )
    return "; ".join(cmd for cmd in (renice, tmpdir, cores, init) if cmd)


def _site_tmpdir(run_dir: str) -> str | None:
    """The run's folder, as TMPDIR for the site's processes, where that is safe.

    Python's multiprocessing makes a ``pymp-*`` folder in TMPDIR for its sockets (the worker
    pool's manager does), and removes it when the process exits normally; a site's processes
    are killed when it stops, and left one folder in /tmp per run. In the run's folder, they go
    with it (at the site's end, or by its guard). None where the folder's path is too long for
    a socket path under it (108 bytes on Linux, 104 on macOS).
    """
    return run_dir if len(run_dir) <= 64 else None


def make_config(
    profile: SiteProfile,
    run_dir: str,
    fork_server: str | None = None,
    guard: _SiteGuard | None = None,
):
    """A parsl.Config with one executor labelled after the profile (no global parsl.load).

    ``fork_server``: the address of a :class:`_ForkServer` the worker pool forks its workers from;
    ``guard``: a :class:`_SiteGuard` told about each worker pool launched.
    """
    from parsl.config import Config

    if profile.kind == "threads":
        from parsl.executors import ThreadPoolExecutor

        executor = ThreadPoolExecutor(label=profile.name, max_threads=profile.worker_count)
    else:
        from parsl.executors import HighThroughputExecutor

        _python_bin_on_path()
        provider = _quiet_local_provider()(
            init_blocks=1, min_blocks=1, max_blocks=1, worker_init=_worker_init(profile, run_dir)
        )
        if guard is not None:
            provider.launched = guard.add
        executor = HighThroughputExecutor(
            label=profile.name,
            address="127.0.0.1",
            max_workers_per_node=profile.worker_count,
            cores_per_worker=profile.worker_threads,
            heartbeat_period=2,
            heartbeat_threshold=10,  # a killed worker is noticed in seconds, not minutes
            launch_cmd=_pool_launch_cmd(profile, fork_server),
            provider=provider,
            **_interchange_launch(HighThroughputExecutor),
        )
    return Config(
        executors=[executor],
        run_dir=run_dir,
        strategy="none",
        strategy_period=profile.strategy_period,
        initialize_logging=False,
        usage_tracking=0,
    )


#: The interchange, started in a process group of its own with SIGINT ignored: a terminal's
#: Ctrl-C (or a signal to the coordinator's process group) otherwise killed it alongside the
#: coordinator, whose shutdown then waited for its answer for ever. The coordinator stops it
#: (and the site's guard, if the coordinator dies). Same session: Linux shares CPU time
#: between sessions first (see the fork server).
#: the interchange: a process group of its own, deaf to Ctrl-C (the run stops it), and gone
#: when its coordinator is (a kill -9 in the site's first second, before the site's guard
#: knows it, left it running for good: it never exits when its parent dies)
_INTERCHANGE_LAUNCH = (
    "import os, runpy, signal, sys, threading, time\n"
    "os.setpgid(0, 0)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "def _watch(parent=int(sys.argv[1])):\n"  # the coordinator's pid, given: asked here, it
    "    while os.getppid() == parent:\n"  # was already 1 where the coordinator had just died
    "        time.sleep(0.5)\n"
    "    os._exit(0)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "runpy.run_module('parsl.executors.high_throughput.interchange', run_name='__main__')\n"
)


def _interchange_launch(htex: Any) -> dict[str, Any]:
    """The interchange's launch command, where this Parsl takes one (it starts the
    interchange as a command since 2024; older ones fork it)."""
    import inspect

    if "interchange_launch_cmd" not in inspect.signature(htex.__init__).parameters:
        return {}
    return {"interchange_launch_cmd": [sys.executable, "-c", _INTERCHANGE_LAUNCH, str(os.getpid())]}


def _exited(proc: Any) -> bool:
    """Whether an interchange (a Popen, or an older Parsl's forked Process) has exited."""
    poll = getattr(proc, "poll", None)
    if poll is not None:
        return poll() is not None
    return getattr(proc, "exitcode", None) is not None


def _noop(device: str = "cpu") -> int:
    """The site test's task: this worker's pid, once it has checked the site's ``device`` as a
    block does (``device: cuda`` where torch sees no GPU fails every block, and so the test,
    with :func:`~napari_emparsl.core.blockwise.worker_device`'s sentence)."""
    import os

    if device == "cuda":  # auto and cpu cannot fail (nor import torch for nothing)
        from napari_emparsl.core.blockwise import worker_device

        try:
            worker_device(device)
        except RuntimeError as err:  # its one sentence, as a SiteError (it reaches the user)
            raise SiteError(str(err)) from None
    return os.getpid()


_RUN_DIR_PREFIX = "emparsl-parsl-"


def _run_dir_base() -> str:
    """The temporary folder, or /tmp where its path holds whitespace (Parsl puts the run folder
    unquoted on its worker pool's command line, and the pool then never starts) or is too long
    for the run's folder to be its processes' TMPDIR (:func:`_site_tmpdir`: macOS's
    /var/folders/…/T/ is; their sockets and queue files were then left in it, 7 a run)."""
    import tempfile

    base = tempfile.gettempdir()
    spaced = any(c.isspace() for c in base)
    # the run folder, emparsl-parsl-PID-xxxxxxxx, within _site_tmpdir's limit under it
    if not spaced and _site_tmpdir(os.path.join(base, "r" * 31)):
        return base
    if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK | os.X_OK):
        return "/tmp"
    if not spaced:
        return base  # (its processes' temporary files then go to the system's own)
    raise SiteError(
        f"The temporary folder {base} has a space in its path, where Parsl cannot start "
        "workers; set TMPDIR to a folder without spaces."
    )


def new_run_dir() -> str:
    """A fresh folder for a site's Parsl files, named after this process; removes those of
    coordinators that died without removing theirs (a `threads` site has no guard to do it)."""
    import shutil
    import tempfile

    base = _run_dir_base()
    for old in Path(base).glob(f"{_RUN_DIR_PREFIX}*-*"):
        pid = old.name[len(_RUN_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its coordinator is gone
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # alive (another user's): not ours to remove
            pass
    return tempfile.mkdtemp(prefix=f"{_RUN_DIR_PREFIX}{os.getpid()}-", dir=base)


def import_kernel() -> None:
    """Import what :func:`start_kernel` needs (Parsl's kernel, ~0.25 s), e.g. in the background
    before a first preview."""
    from parsl.dataflow.dflow import DataFlowKernel  # noqa: F401


def start_kernel(profile: SiteProfile, run_dir: str):
    """A DataFlowKernel of its own for ``profile`` (not Parsl's global one): the GUI switches
    sites, and two runs may use two sites. Its executor starts here (HTEX: workers launch)."""
    guard = _SiteGuard(run_dir) if profile.kind == "local" else None
    server = _ForkServer.start(profile, run_dir)  # first: it imports torch while Parsl starts
    config = None
    try:
        if guard is not None and server is not None:
            guard.add(-server.pid)
        from parsl.dataflow.dflow import DataFlowKernel

        config = make_config(profile, run_dir, server and server.address, guard)
        dfk = DataFlowKernel(config)
    except BaseException:
        # stopped (Ctrl-C, SIGTERM) or failed while the executor started: its interchange may
        # run already (it then lived on, or failed on the run folder removed under it and
        # printed its traceback after the run's last line), and worker pools with it
        started = [
            proc
            for executor in (config.executors if config is not None else ())
            if (proc := getattr(executor, "interchange_proc", None)) is not None
        ]
        if guard is not None:
            for proc in started:
                guard.add(proc.pid)
            guard.kill_all(started)
        if server is not None:
            server.stop()
        if guard is not None:
            guard.stop()
        raise
    if guard is None:  # threads: nothing outside this process
        return dfk
    for executor in dfk.executors.values():
        interchange = getattr(executor, "interchange_proc", None)
        if interchange is not None:
            guard.add(interchange.pid)
            _bound_manager_query(executor, interchange)
    cleanup = dfk.cleanup
    interchanges = [
        proc
        for executor in dfk.executors.values()
        if (proc := getattr(executor, "interchange_proc", None)) is not None
    ]

    def cleanup_then_stop() -> None:
        done = False
        try:
            _wait_for_launches(dfk)
            done = _cleanup_within(cleanup, interchanges)
        finally:
            if not done:  # interrupted, failed or stuck: nothing may outlive the coordinator
                guard.kill_all(interchanges)
            if server is not None:
                server.stop()
            guard.stop()

    dfk.cleanup = cleanup_then_stop
    return dfk


#: Seconds Parsl waits for the interchange to say which workers and worker pools it has.
MANAGERS_TIMEOUT = 10.0


def _bound_manager_query(executor: Any, interchange: Any) -> None:
    """Make the executor's questions to the interchange about its workers end.

    Parsl asks the interchange for its workers (``connected_managers``, in its shutdown) and
    for its worker pools (``connected_blocks``, every few seconds from its status poller, whose
    end the shutdown waits for) with no time limit, holding the executor's one command socket
    meanwhile. An interchange that died never answers: the asking thread stayed blocked for
    ever, and with it the shutdown (one such thread for each dead site in a long napari
    session, after the run had given up on it). Now a dead interchange has no workers and no
    pools, and one that does not answer within :data:`MANAGERS_TIMEOUT` seconds is taken to
    have none: the shutdown goes on and stops it.
    """
    client = getattr(executor, "command_client", None)
    if client is None:
        return  # another Parsl: left as it is
    for method, command in (
        ("connected_managers", "MANAGERS"),
        ("connected_blocks", "CONNECTED_BLOCKS"),
    ):
        if not callable(getattr(executor, method, None)):
            continue

        def ask(command: str = command) -> list[Any]:
            if _exited(interchange):
                return []
            try:
                return client.run(command, timeout_s=MANAGERS_TIMEOUT)
            except Exception as err:  # no answer (Parsl's CommandClientTimeoutError), bad socket
                log.warning("the site's interchange did not answer (%s); taken to have none", err)
                return []

        setattr(executor, method, ask)


def _cleanup_within(cleanup: Any, interchanges: list[Any], timeout: float = 60.0) -> bool:
    """Run Parsl's ``cleanup`` and say whether it finished. It asks the interchange for its
    workers with no time limit: an interchange that died (SIGTERM to every process of a batch
    job, the out-of-memory killer) left it waiting for ever. It runs in a thread of its own,
    given up on once the interchange is gone (a moment's grace) or after ``timeout`` seconds."""
    import threading
    import time

    failed: list[BaseException] = []

    def run() -> None:
        try:
            cleanup()
        except BaseException as err:  # said below, in the caller's thread
            failed.append(err)

    stopped: list[Any] = []  # interchanges Parsl's own shutdown stopped: not dead of a signal
    for proc in interchanges:
        terminate = proc.terminate

        def stop(proc: Any = proc, terminate: Any = terminate) -> None:
            stopped.append(proc)
            terminate()

        proc.terminate = stop
    thread = threading.Thread(target=run, name="emparsl-site-cleanup", daemon=True)
    thread.start()
    deadline, dead_since = time.monotonic() + timeout, None
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)
        died = [p for p in interchanges if _exited(p) and p not in stopped]
        if dead_since is None and died:
            dead_since = time.monotonic()
        if dead_since is not None and time.monotonic() - dead_since > 2.0:
            break
    if thread.is_alive():
        log.warning(
            "the site did not shut down %s; stopping its processes",
            "(its interchange had died)" if dead_since is not None else f"within {timeout:.0f} s",
        )
        return False
    if failed:
        raise failed[0]
    return True


def _wait_for_launches(dfk: Any, timeout: float = 60.0) -> None:
    """Wait until Parsl has handed every task submitted so far to its executor.

    Parsl launches tasks from a thread of its own, and its ``cleanup`` shuts the executors down
    before that thread: a launch still sending on the executor's ZeroMQ socket while the
    shutdown closes it aborts the whole process (libzmq asserts; seen when a run failed its
    checks right after the site's warm-up tasks were submitted). The launch thread takes tasks
    in order, so once an empty task queued behind them has run, every launch is done.
    """
    pool = getattr(dfk, "_task_launch_pool", None)
    if pool is None:  # another Parsl: nothing to wait for that we know of
        return
    try:
        pool.submit(lambda: None).result(timeout=timeout)
    except Exception:  # already shut down, or stuck: cleanup goes on as before
        log.debug("waiting for Parsl's task launches failed", exc_info=True)


class _SiteGuard:
    """Ends a local site's processes when the coordinator dies without shutting the site down.

    Parsl's interchange outlives a coordinator that is killed (``kill -9``, the out-of-memory
    killer, a crash), and with it the worker pool and its workers, each holding a model and its
    memory. The guard is a shell in a session of its own whose standard input is a pipe from the
    coordinator: the pipe closes when the coordinator exits, however it ends; if the site was not
    shut down first (the pid file is still there), the guard stops the processes it lists
    (SIGTERM, then SIGKILL) and removes the run's Parsl folder.
    """

    _SCRIPT = """
while read -r _; do :; done  # until the coordinator's end of the pipe closes
[ -e "$EMPARSL_RUN_DIR/site.pids" ] || exit 0
kill -TERM $(cat "$EMPARSL_RUN_DIR/site.pids") 2>/dev/null
sleep 3
kill -KILL $(cat "$EMPARSL_RUN_DIR/site.pids") 2>/dev/null
rm -rf -- "$EMPARSL_RUN_DIR"
"""

    def __init__(self, run_dir: str) -> None:
        import subprocess
        import threading

        self._file = os.path.join(run_dir, "site.pids")
        self._pids: list[int] = []
        self._lock = threading.Lock()  # the pool is launched from Parsl's polling thread
        self._process = subprocess.Popen(
            ["/bin/sh", "-c", self._SCRIPT, "emparsl-site-guard"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "EMPARSL_RUN_DIR": run_dir},
            start_new_session=True,
        )

    def add(self, pid: int) -> None:
        """A process (negative: a process group) to stop if the coordinator dies."""
        with self._lock:
            if self._process.stdin is None:
                return  # stopped
            self._pids.append(pid)
            try:
                with open(self._file + ".new", "w") as f:
                    f.write(" ".join(str(p) for p in self._pids))
                os.replace(self._file + ".new", self._file)
            except OSError:  # a full disk: the site still runs, the guard knows the older list
                pass

    def kill_all(self, children: Sequence[Any] = ()) -> None:
        """Stop every process listed now (SIGTERM, then SIGKILL after up to 3 s), as the guard
        does when the coordinator dies: for a shutdown that was interrupted or got stuck.
        ``children``: those of them that are this process's own (``Popen``s), reaped here."""
        import signal
        import time

        with self._lock:
            pids = list(self._pids)

        def signal_all(signum: int) -> list[int]:
            alive = []
            for pid in pids:
                try:
                    (os.killpg(-pid, signum) if pid < 0 else os.kill(pid, signum))
                    alive.append(pid)
                except OSError:  # gone already
                    pass
            return alive

        if not signal_all(signal.SIGTERM):
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            for child in children:
                _exited(child)  # a child that exited stays a zombie (alive to kill) until reaped
            if not signal_all(0):
                return
            time.sleep(0.1)
        signal_all(signal.SIGKILL)
        for child in children:
            _exited(child)

    def stop(self) -> None:
        """The site was shut down: the guard exits without stopping anything."""
        import subprocess

        with self._lock:
            try:
                os.unlink(self._file)
            except FileNotFoundError:
                pass
            if self._process.stdin is not None:
                self._process.stdin.close()
                self._process.stdin = None
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def python_app(func, dfk, profile: SiteProfile):
    """``func`` as a Parsl app on ``profile``'s executor of ``dfk``: calling it returns a future."""
    from parsl.app.python import PythonApp

    return PythonApp(func, data_flow_kernel=dfk, executors=[profile.name])


def _workers_failed(err: BaseException) -> str | None:
    """Why the site's workers never started, when Parsl failed a task for that (its message,
    "Executor … failed due to: Error 1:", has the reason on the next lines); else None."""
    if type(err).__name__ not in ("BadStateException", "TooManyJobFailuresError"):
        return None
    text = str(err)
    code = re.search(r"EXIT CODE: (-?\d+)", text)
    why = f"their pool exited with code {code.group(1)}" if code else "they never registered"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    stderr = next((ln for ln in reversed(lines) if ln.startswith("STDERR:")), "")
    # the shell's words without the job script's path ("/tmp/…/parsl.x.block-0.….sh: line 1:")
    said = re.sub(r"^\S+\.sh: line \d+: ", "", stderr.removeprefix("STDERR:").strip())
    if said:
        why += f": {said[:150]}"
    elif code and code.group(1) == "127":
        why += ", a command not found"
    return why


def task_error(err: BaseException, site: str) -> str:
    """One sentence for a task that Parsl failed (the worker died, Parsl lost it, or the site's
    workers never started: then what to do)."""
    why = _workers_failed(err)
    if why is not None:
        return (
            f"The site's workers could not start ({why}); check the site's "
            f"worker_init and settings, e.g. with `emparsl sites test {site}`."
        )
    text = str(err)
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(err).__name__}: {first}"


def check_site(profile: SiteProfile, timeout: float = 120) -> float:
    """Start the site, run one no-op task (which checks the site's device, as a block does),
    shut it down; seconds to the first result.

    Raises
    ------
    SiteError
        With the reason when the site cannot start or run a task.
    """
    import shutil
    import time

    run_dir = new_run_dir()
    t0 = time.perf_counter()
    dfk = None
    try:
        dfk = start_kernel(profile, run_dir)
        python_app(_noop, dfk, profile)(profile.device).result(timeout=timeout)
        return time.perf_counter() - t0
    except SiteError:  # the task's: the site's device is not there (worker_device's sentence)
        raise
    except TimeoutError:  # Parsl's future: concurrent.futures.TimeoutError, the same class
        raise SiteError(
            f"The site '{profile.name}' ran no task within {timeout:g} s (no worker took it); check "
            "its settings."
        ) from None
    except Exception as err:
        why = _workers_failed(err)
        what = (
            f"could not start its workers ({why})"
            if why
            else f"could not run a task ({task_error(err, profile.name)})"
        )
        todo = "check its worker_init and settings" if why else "check its settings"
        raise SiteError(f"The site '{profile.name}' {what.removesuffix('.')}; {todo}.") from None
    finally:
        if dfk is not None:
            dfk.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


# -- the worker pool, its workers forked from a process that has torch loaded -------------------
#
# Parsl's pool (process_worker_pool.py) starts each worker as a fresh Python (multiprocessing
# "spawn"): every worker then imports torch and the engine, after the interchange, the pool itself
# and its manager process have started, seconds before the first block. With ``preload_workers``
# the coordinator starts a fork server (:class:`_ForkServer`) as the site starts, which imports
# torch and the engine *while* Parsl starts; the pool is launched as ``python -m
# napari_emparsl.execution.sites --fork-server ADDRESS <the pool's arguments>`` and (Parsl's own
# pool, unchanged) forks its manager process and workers from it. Where the workers need the
# pool's environment (a ``worker_init``), the pool starts the fork server itself. Forking after
# importing torch is safe as long as nothing ran torch there (its thread pools, and CUDA, start
# on first use); the fork server never runs a model.

_POOL_SCRIPT = "process_worker_pool.py"
_POOL_MODULE = "parsl.executors.high_throughput.process_worker_pool"
_PRELOAD = [  # what every block needs, imported once per node, inherited by every worker
    "numpy",
    "torch",
    "z5py",
    "napari_emparsl.core.blockwise",
    "napari_emparsl.core.models.loaders",
    "napari_emparsl.core.volume",
    "napari_emparsl.execution.pool_queue",
    _POOL_MODULE,
]


def _pool_launch_cmd(profile: SiteProfile, fork_server: str | None = None) -> str | None:
    """The worker pool's launch command: Parsl's (None), or its pool run by :func:`_pool_main`
    (forking from the fork server at ``fork_server``, or from one it starts itself)."""
    import shlex
    import sys

    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    if not profile.preload_workers or not DEFAULT_LAUNCH_CMD.startswith(_POOL_SCRIPT):
        return None  # as Parsl ships it (also if a future Parsl launches its pool otherwise)
    ours = f"{shlex.quote(sys.executable)} -m napari_emparsl.execution.sites"
    if fork_server is not None:
        ours += f" {_FORK_SERVER_ARG} {fork_server.encode().hex()}"
    return ours + DEFAULT_LAUNCH_CMD[len(_POOL_SCRIPT) :]


class _ForkServer:
    """A multiprocessing fork server that imports torch and the engine, started by the
    coordinator as the site starts: the import then runs while Parsl starts its interchange and
    the worker pool, instead of after them. The pool forks its workers from it (it is handed the
    server's address); the server runs in a process group of its own, so that a Ctrl-C in the
    terminal does not reach the workers and :meth:`stop` ends every process forked from it.

    Only where the workers share the coordinator's environment (no ``worker_init``) and this
    Python's fork server speaks the protocol below (Python >= 3.11 for ``process_group``);
    elsewhere the pool starts its own server.
    """

    def __init__(self, profile: SiteProfile, run_dir: str) -> None:
        import socket
        import subprocess
        import sys
        from multiprocessing import connection

        from napari_emparsl.core.paths import std_fds_open

        std_fds_open()  # the socket and pipe passed on must not take a standard stream's number
        tmp = _site_tmpdir(run_dir)
        with socket.socket(socket.AF_UNIX) as listener:
            if tmp:  # the socket, and the workers' temporary files, go with the run's folder
                self.address = os.path.join(tmp, "fork_server.sock")
            else:
                self.address = connection.arbitrary_address("AF_UNIX")
            listener.bind(self.address)
            if not self.address.startswith("\0"):
                os.chmod(self.address, 0o600)
            listener.listen()
            alive_r, self._alive_w = os.pipe()  # the server stops when this closes
            code = (
                "from multiprocessing.forkserver import main; "
                f"main({listener.fileno()}, {alive_r}, {_PRELOAD!r})"
            )
            try:  # its output and its workers' go to the run's log folder, as the pool's do
                with open(os.path.join(run_dir, "fork_server.log"), "ab") as log:
                    self._process = subprocess.Popen(
                        [sys.executable, "-c", code],
                        env={**os.environ, "TMPDIR": tmp} if tmp else None,
                        pass_fds=(listener.fileno(), alive_r),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        # a process group of its own, not a session: Linux shares CPU time
                        # between sessions before niceness counts (autogroups), and a session
                        # of its own importing torch took half a core from the viewer's thread
                        process_group=0,
                    )
            except BaseException:
                os.close(self._alive_w)
                raise
            finally:
                os.close(alive_r)
        if profile.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, self._process.pid, profile.nice)
            except OSError:
                pass

    @classmethod
    def start(cls, profile: SiteProfile, run_dir: str) -> _ForkServer | None:
        """A server for ``profile``'s workers, or None where the pool is to start its own."""
        import inspect
        import sys
        from multiprocessing import forkserver

        if profile.kind != "local" or not profile.preload_workers or profile.worker_init:
            return None
        if sys.version_info < (3, 11) or (
            list(inspect.signature(forkserver.main).parameters) != _FORK_SERVER_MAIN
        ):
            return None  # another Python's protocol: the pool starts its own server
        return cls(profile, run_dir)

    def stop(self) -> None:
        """Stop the server and end what is left of the processes forked from it."""
        import signal
        import subprocess

        if self._alive_w is None:
            return
        os.close(self._alive_w)
        self._alive_w = None
        try:
            os.killpg(self._process.pid, signal.SIGTERM)  # its group: the server, its workers
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if not self.address.startswith("\0"):
            try:
                os.unlink(self.address)
            except OSError:
                pass

    @property
    def pid(self) -> int:
        """The server's pid, also its process group's."""
        return self._process.pid


_FORK_SERVER_ARG = "--fork-server"
_FORK_SERVER_MAIN = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]


def _attach_fork_server(address: str) -> None:
    """Make this process's multiprocessing fork its "forkserver" processes from the server at
    ``address`` (a :class:`_ForkServer` another process started) instead of starting one."""
    from multiprocessing import forkserver, resource_tracker

    server = forkserver._forkserver
    server._forkserver_address = address
    # handed to every child as the server's liveness pipe; the children fork nothing themselves
    server._forkserver_alive_fd = os.open(os.devnull, os.O_RDONLY)
    server.ensure_running = resource_tracker.ensure_running  # the server is not ours to start


def _pool_main() -> None:
    """Attach to the coordinator's fork server (``--fork-server ADDRESS``) or start one, then run
    Parsl's worker pool (its arguments are in sys.argv)."""
    import multiprocessing.forkserver
    import runpy
    import sys
    from multiprocessing.context import ForkServerContext

    from napari_emparsl.execution.pool_queue import LockFreeWaitQueue

    class PoolContext(ForkServerContext):
        def Queue(self, maxsize: int = 0):
            # the pool's task queue: a worker killed while idle must not take its lock along
            return LockFreeWaitQueue(maxsize, ctx=self)

    context = PoolContext()
    if sys.argv[1:2] == [_FORK_SERVER_ARG]:  # started by the coordinator, importing already
        _attach_fork_server(bytes.fromhex(sys.argv[2]).decode())
        del sys.argv[1:3]
    else:
        context.set_forkserver_preload(_PRELOAD)
        multiprocessing.forkserver.ensure_running()  # imports _PRELOAD now, beside the pool
    import parsl.multiprocessing

    if hasattr(parsl.multiprocessing, "SpawnContext"):  # the pool's context, taken at its import
        parsl.multiprocessing.SpawnContext = context
    runpy.run_module(_POOL_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _pool_main()
