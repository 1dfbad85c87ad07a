"""``dcbench compare --launcher local|slurm``: one submitit job per missing result.

Each cell of a comparison (checkpoint x protocol x settings x seed) that the store lacks
becomes one job, run by submitit (facebookincubator/submitit): its ``LocalExecutor``
(separate processes on this machine, ``--launcher local``) or its ``SlurmExecutor``
(``--launcher slurm``). A job with several GPUs runs the protocol data-parallel, one task per
GPU, through submitit's torch.distributed environment (``helpers.TorchDistributedEnvironment``),
when the protocol can (:meth:`dcbench.protocol.Protocol.data_parallel`); otherwise as one task.

Nothing lost, nothing twice. Jobs never open the SQLite store (its locking is unreliable on
network file systems): a job writes its record into its own folder, and the submitting
process stores it. The folder of a cell is named by what the cell computes, so a second call
finds it again::

    JOB_DIR/<protocol>-<checkpoint>-<key>/
        cell.json              what the job computes (written before submitting)
        job.json               launcher, job id, host and time of the latest submission
        outcomes.npz           the per-image outcomes (written by the job, first)
        result.json            the Result record (written by the job, atomically, last)
        error.txt              one line, when the job failed
        <id>_<task>_log.out / .err, <id>_submitted.pkl, <id>_<task>_result.pkl   (submitit's)

A call first skips what the store holds, then collects every ``result.json`` a job left
(even one whose submitter was killed), waits for jobs of an earlier call that still run, and
submits only the rest, at most ``--jobs`` at once. A failed job is one line with its log
path; the others go on; Ctrl-C cancels the jobs this call submitted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dcbench import evaluate
from dcbench.errors import DcbenchError, UsageError
from dcbench.fileio import atomic_write_bytes, atomic_write_text
from dcbench.progress import Overall
from dcbench.results import Result, ResultStore, decode_outcomes, encode_outcomes

log = logging.getLogger("dcbench")

RESULT, OUTCOMES, ERROR, CELL, SUBMISSION = "result.json", "outcomes.npz", "error.txt", "cell.json", "job.json"
#: local jobs have no scheduler limit; without --slurm-time they may run a week
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
#: SLURM's time limit when --slurm-time is not given (submitit's default is 5 minutes)
SLURM_TIMEOUT_MIN = 24 * 60
POLL_S = 0.5
#: submitit SlurmExecutor parameters a --slurm-option KEY may name; other keys become #SBATCH --KEY=VALUE
_SLURM_NAMED = {"qos", "mem", "mem_per_gpu", "mem_per_cpu", "constraint", "exclude", "comment", "nodelist",
                "gres", "mail_type", "mail_user", "dependency", "exclusive", "cpus_per_gpu", "gpus_per_task"}


def default_job_dir() -> Path:
    """``$DCBENCH_JOBS`` or ``~/.dcbench/jobs`` (on SLURM: a folder every node sees)."""
    return Path(os.environ.get("DCBENCH_JOBS") or Path.home() / ".dcbench" / "jobs").expanduser()


# ----------------------------------------------------------------------------- what a job computes
@dataclass(frozen=True)
class Cell:
    """One evaluation to run as a job: everything the job needs, in plain types."""

    spec: str  # the checkpoint as given (file, pretrained:NAME, random:ARCH, ...)
    checkpoint_name: str
    checkpoint_sha256: str
    protocol: str
    version: str
    settings: dict  # every resolved setting (the plan's plain settings)
    root: str  # the data root, resolved
    device: str = "auto"
    arch: str | None = None
    trust: bool = False
    threads: int | None = None  # torch threads of each task (--cpus-per-job / tasks)
    strict: bool = False  # --strict: stop at the first unreadable image (not part of key(): cannot move numbers)

    def key(self) -> str:
        """Hash of what the cell computes (weights, protocol version, settings, data root)."""
        what = [self.checkpoint_sha256, self.protocol, self.version, self.settings, self.root]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def folder(self, job_dir: Path) -> Path:
        """This cell's folder under ``job_dir`` (the same in every call)."""
        name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", self.checkpoint_name)[:40]
        return job_dir / f"{self.protocol}-{name}-{self.key()}"

    @property
    def label(self) -> str:
        seed = self.settings.get("seed")
        return f"{self.protocol} on {self.checkpoint_name}" + (f" (seed {seed})" if seed is not None else "")


def cell_of(p: evaluate.Plan, spec: str, ckpt: Any, device: str, arch: str | None, trust: bool,
            threads: int | None, strict: bool = False) -> Cell:
    """The :class:`Cell` of plan ``p`` on loaded checkpoint ``ckpt`` (given as ``spec``)."""
    return Cell(spec, ckpt.name, ckpt.sha256, p.protocol.name, p.protocol.version, p.plain_settings,
                str(p.root.resolve()), device, arch, trust, threads, strict)


# ----------------------------------------------------------------------------- the job
def run_cell(cell: Cell, folder: str) -> str | None:
    """The job: evaluate ``cell`` and write its record into ``folder`` (rank 0 of a
    multi-GPU job); the data layout is checked here, where the data is. Returns the record's path
    (None on ranks > 0). Never opens the results store."""
    out = Path(folder)
    try:
        _job_logging()
        rank0 = _join_job_group()
        if cell.threads:
            import torch  # noqa: PLC0415 (heavy)

            torch.set_num_threads(cell.threads)
        p = evaluate.plan(cell.protocol, cell.settings, cell.root)
        if p.plain_settings != cell.settings or p.protocol.version != cell.version:
            raise DcbenchError(f"{cell.protocol} changed since the job was submitted (version or settings); "
                               f"submit it again")
        ctx = evaluate.context_for(p, cell.device, strict=cell.strict)
        ckpt = evaluate.load_for(p, cell.spec, arch=cell.arch, trust=cell.trust)
        if ckpt.sha256 != cell.checkpoint_sha256:
            raise DcbenchError(f"checkpoint {cell.spec} changed since the job was submitted (sha256 "
                               f"{ckpt.sha256[:12]}, was {cell.checkpoint_sha256[:12]}); submit it again")
        result = evaluate.run(p, ckpt, ctx)
        if not rank0:
            return None
        result.extra["job"] = {"id": _job_id(), "folder": str(out)}
        return str(write_result(out, result))
    except BaseException as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            atomic_write_text(out / ERROR, f"{type(exc).__name__}: {' '.join(str(exc).split())}\n")
        raise


def _job_logging() -> None:
    """dcbench's INFO lines on the job's stderr (its log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _join_job_group() -> bool:
    """Export submitit's torch.distributed environment when the job has several tasks (the
    runner then joins the group); True on the task that writes the record."""
    import submitit  # noqa: PLC0415

    if not os.environ.get("SUBMITIT_EXECUTOR"):  # called outside a job (tests, a debugger)
        return int(os.environ.get("RANK", "0")) == 0
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        # each task keeps the GPUs it sees and picks cuda:LOCAL_RANK, as under torchrun ...
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        import torch  # noqa: PLC0415 (heavy)

        if torch.cuda.is_available() and torch.cuda.device_count() < dist_env.local_world_size:
            os.environ["LOCAL_RANK"] = "0"  # ... unless SLURM bound one GPU to each task: its cuda:0
    return env.global_rank == 0


def _job_id() -> str | None:
    import submitit  # noqa: PLC0415

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not in a submitit job (tests calling run_cell directly)
        return None


def write_result(folder: Path, result: Result) -> Path:
    """The job's record: outcomes first, then ``result.json`` (atomic, last: it marks completion)."""
    if result.outcomes:
        atomic_write_bytes(folder / OUTCOMES, encode_outcomes(result.outcomes)[1])
    return atomic_write_text(folder / RESULT, result.to_json())


def read_result(folder: Path) -> Result | None:
    """The record a job left in ``folder`` (with its outcomes), or None."""
    path = folder / RESULT
    if not path.is_file():
        return None
    try:
        result = Result.from_json(path.read_text())
        if (folder / OUTCOMES).is_file():
            result.outcomes = decode_outcomes((folder / OUTCOMES).read_bytes())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable job record %s (%s): the cell runs again", path, exc)
        return None
    return result


# ----------------------------------------------------------------------------- options
@dataclass
class LaunchOptions:
    """What ``--launcher`` and its options ask for."""

    launcher: Literal["local", "slurm"]
    job_dir: Path = field(default_factory=default_job_dir)
    jobs: int | None = None  # at most this many at once (local default 1, slurm default: all)
    time_min: int | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    partition: str | None = None
    account: str | None = None
    slurm_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in ("local", "slurm"):
            raise UsageError(f"unknown launcher '{self.launcher}': use local or slurm")
        if self.jobs is not None and self.jobs < 1:
            raise UsageError(f"bad value {self.jobs} for --jobs: must be at least 1")
        if self.gpus_per_job < 0 or (self.cpus_per_job is not None and self.cpus_per_job < 1):
            raise UsageError("--gpus-per-job must be >= 0 and --cpus-per-job >= 1")
        if self.launcher == "local" and (self.partition or self.account or self.slurm_options):
            raise UsageError("--slurm-partition, --slurm-account and --slurm-option need --launcher slurm")

    @property
    def limit(self) -> int:
        """Jobs at once."""
        return self.jobs or (1 if self.launcher == "local" else sys.maxsize)

    def tasks(self, data_parallel: bool) -> int:
        """Tasks (processes) of one job: one per GPU when the protocol is data-parallel."""
        return self.gpus_per_job if data_parallel and self.gpus_per_job > 1 else 1

    def threads(self, tasks: int) -> int | None:
        """CPUs (torch threads) of each task: the job's ``--cpus-per-job`` shared by its tasks."""
        return max(1, self.cpus_per_job // tasks) if self.cpus_per_job else None

    def executor(self, folder: Path, name: str, tasks: int, gpus: Sequence[int] = ()) -> Any:
        """A submitit executor whose jobs write into ``folder``."""
        import submitit  # noqa: PLC0415 (only where jobs are launched)

        if self.launcher == "local":
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=self.time_min or LOCAL_TIMEOUT_MIN, gpus_per_node=self.gpus_per_job,
                                 visible_gpus=tuple(gpus), tasks_per_node=tasks)
            return ex
        ex = submitit.SlurmExecutor(folder=folder)
        ex.update_parameters(**slurm_parameters(self, tasks, name))
        return ex


def slurm_parameters(opts: LaunchOptions, tasks: int, name: str) -> dict[str, Any]:
    """The submitit ``SlurmExecutor`` parameters of one job (an sbatch script's ``#SBATCH`` lines)."""
    params: dict[str, Any] = {"job_name": name, "time": opts.time_min or SLURM_TIMEOUT_MIN, "nodes": 1,
                              "ntasks_per_node": tasks}
    if opts.gpus_per_job:
        params["gpus_per_node"] = opts.gpus_per_job
    if opts.cpus_per_job:
        params["cpus_per_task"] = opts.threads(tasks)
    if opts.partition:
        params["partition"] = opts.partition
    if opts.account:
        params["account"] = opts.account
    extra = {}
    for key, value in opts.slurm_options.items():
        name_ = key.strip().lstrip("-").replace("-", "_")
        if name_ in params:
            raise UsageError(f"--slurm-option {key}: use the dedicated option for it")
        (params if name_ in _SLURM_NAMED else extra)[name_] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def parse_time(text: str | None) -> int | None:
    """SLURM's time formats (``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``, ``MM:SS``) -> whole minutes."""
    if not text:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise UsageError(f"bad --slurm-time '{text}': use MINUTES, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = days * 1440 + a * 60 + (b or 0) + (1 if c else 0)
    elif c is not None:  # HH:MM:SS
        minutes = a * 60 + b + (1 if c else 0)
    elif b is not None:  # MM:SS
        minutes = a + (1 if b else 0)
    else:
        minutes = a
    if minutes < 1:
        raise UsageError(f"bad --slurm-time '{text}': at least one minute")
    return minutes


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--slurm-option KEY=VALUE`` pairs -> dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --slurm-option '{pair}': use KEY=VALUE, e.g. --slurm-option qos=high")
        out[key.strip()] = value.strip()
    return out


# ----------------------------------------------------------------------------- tracking jobs
@dataclass
class _Job:
    """A job this call waits for: submitted by it (``handle``), or by an earlier call."""

    index: int  # position among the comparison's cells
    cell: Cell
    folder: Path
    job_id: str
    started: float
    handle: Any = None  # the submitit Job; None for a job of an earlier call
    launcher: str = "local"
    gpus: tuple[int, ...] = ()

    @property
    def log_path(self) -> Path:
        if self.handle is not None:
            return Path(self.handle.paths.stderr)
        from submitit.core.utils import JobPaths  # noqa: PLC0415

        return Path(JobPaths(self.folder, self.job_id, 0).stderr)

    def ended(self) -> bool:
        """The job's processes are gone (finished, failed, cancelled)."""
        if self.handle is not None:
            return bool(self.handle.done())
        return not _still_running({"launcher": self.launcher, "job_id": self.job_id, "host": socket.gethostname()},
                                  self.folder)

    def state(self) -> str:
        if self.handle is None:
            return "RUNNING (earlier call)"
        return str(self.handle.state)

    def failure(self) -> str:
        """One line: why the job left no record."""
        text = ""
        if (self.folder / ERROR).is_file():
            text = (self.folder / ERROR).read_text().strip()
        elif self.handle is not None:
            try:
                exc = self.handle.exception()
            except Exception as unknown:  # no result pickle: killed, cancelled, out of time
                exc = unknown
            lines = [ln for ln in str(exc or "").strip().splitlines() if ln.strip()]
            text = lines[-1].strip() if lines else ""
        return text or f"ended without a result (state {self.state()})"


def _still_running(submission: Mapping[str, Any], folder: Path) -> bool:
    """Whether the job an earlier call submitted (its ``job.json``) still runs."""
    if submission.get("launcher") == "slurm":
        import submitit  # noqa: PLC0415

        return not submitit.SlurmJob(folder, str(submission["job_id"])).done()
    if submission.get("host") != socket.gethostname():
        return False  # a local job of another machine: cannot be watched from here
    return _pid_is_submitit(int(submission["job_id"]))


def _pid_is_submitit(pid: int) -> bool:
    """A live (not zombie) process ``pid`` that runs submitit (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no procfs: trust the signal check
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"submitit" in (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False


class _Board:
    """Progress on stderr: one live line per running job on a terminal, plain log lines otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = 0

    def say(self, text: str, error: bool = False) -> None:
        self._clear()
        (log.error if error else log.info)(text)

    def show(self, jobs: Sequence[_Job]) -> None:
        if not self.live:
            return
        self._clear()
        now = time.time()
        for job in jobs:
            elapsed = time.strftime("%H:%M:%S", time.gmtime(max(0.0, now - job.started)))
            self.stream.write(f"  {job.state():<22} {elapsed}  {job.cell.label}  [job {job.job_id}]\n")
        self.stream.flush()
        self.drawn = len(jobs)

    def _clear(self) -> None:
        if self.live and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.flush()
        self.drawn = 0


# ----------------------------------------------------------------------------- the fan-out
@dataclass
class FanOut:
    """What :func:`fan_out` did: the comparison's results in cell order, the failures' lines."""

    items: list[evaluate.SweepItem]
    failures: list[str]
    submitted: int = 0
    collected: int = 0


@dataclass
class _Pending:
    index: int
    cell: Cell
    data_parallel: bool


def fan_out(plans: Sequence[evaluate.Plan], specs: Sequence[str], store: ResultStore, opts: LaunchOptions, *,
            device: str = "auto", arch: str | None = None, trust: bool = False,
            stream: Any = None, strict: bool = False) -> FanOut:
    """Run every cell of ``plans`` x ``specs`` the store lacks as a submitit job (see the module
    docstring) and store each record once, in this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--launcher submits jobs from one process: do not start it under torchrun")
    board = _Board(stream)
    cells: dict[int, tuple[evaluate.Plan, Any]] = {}
    out = FanOut([], [])
    found: dict[int, evaluate.SweepItem] = {}
    pending: list[_Pending] = []
    running: dict[int, _Job] = {}
    for i, (spec, p, ckpt, stored) in enumerate(evaluate.sweep_cells(plans, specs, store, arch=arch, trust=trust)):
        cells[i] = (p, ckpt)
        if stored is not None:
            log.info("stored: %s on %s (seed %s)", p.protocol.name, ckpt.name, p.seed)
            found[i] = evaluate.SweepItem(p, ckpt, stored, reused=True)
            continue
        data_parallel = p.protocol.data_parallel(p.settings) is None
        if data_parallel:
            check_job_world(p, opts.tasks(True))
        cell = cell_of(p, spec, ckpt, device, arch, trust, opts.threads(opts.tasks(data_parallel)), strict)
        folder = cell.folder(opts.job_dir)
        if _collect(i, cell, folder, cells, store, found, board, "left by an earlier call"):
            out.collected += 1
            continue
        earlier = _earlier_job(i, cell, folder)
        if earlier is not None:
            board.say(f"waiting for {cell.label}: job {earlier.job_id} of an earlier call still runs")
            running[i] = earlier
            continue
        pending.append(_Pending(i, cell, data_parallel))
    overall = Overall(len(cells), "jobs", "evaluations", initial=len(found), enabled=False)
    _wait(pending, running, cells, store, opts, found, out, board, overall)
    out.items = [found[i] for i in sorted(found)]
    return out


def check_job_world(p: evaluate.Plan, tasks: int) -> None:
    """Refuse, before anything is submitted, a cell whose protocol would refuse to run as the
    ``tasks`` processes of its job (a batch size ``--gpus-per-job`` does not divide): the job
    would only fail after waiting in the queue."""
    if tasks <= 1:
        return
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(tasks)  # Protocol.data_parallel reads the launcher's world size
    try:
        reason = p.protocol.data_parallel(p.settings)
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved
    if reason:
        raise UsageError(f"--gpus-per-job {tasks} runs {p.protocol.name} as {tasks} processes, which it refuses: "
                         f"{reason.split(': pass ')[0]}; pass --gpus-per-job with a count that divides it, or "
                         f"--set {p.protocol.name}.batch_size=N with N a multiple of {tasks}")


def _collect(i: int, cell: Cell, folder: Path, cells: Mapping[int, tuple[evaluate.Plan, Any]], store: ResultStore,
             found: dict[int, evaluate.SweepItem], board: _Board, how: str) -> bool:
    """Store the record a job left in ``folder`` (once) and note it; False when there is none."""
    result = read_result(folder)
    if result is None:
        return False
    if result.checkpoint.get("sha256") != cell.checkpoint_sha256 or result.protocol != cell.protocol:
        log.warning("ignoring %s: it is not a record of %s", folder / RESULT, cell.label)
        return False
    if not _already_stored(store, result):
        store.add(result)
    p, ckpt = cells[i]
    found[i] = evaluate.SweepItem(p, ckpt, result, reused=False)
    board.say(f"stored {cell.label} ({how}; {result.wall_s:.1f}s)")
    return True


def _already_stored(store: ResultStore, result: Result) -> bool:
    """Whether this very record (same key, seed and start time) is in the store already, e.g.
    when its data root reads differently here than in the job."""
    return any(r.key() == result.key() and r.seed == result.seed and r.started == result.started
               for r in store.find(result.checkpoint["sha256"], result.protocol, result.settings))


def _earlier_job(i: int, cell: Cell, folder: Path) -> _Job | None:
    """The still-running job an earlier call submitted for ``cell``, if any."""
    try:
        submission = json.loads((folder / SUBMISSION).read_text())
    except (OSError, ValueError):
        return None
    if not _still_running(submission, folder):
        return None
    return _Job(i, cell, folder, str(submission["job_id"]), float(submission.get("time", time.time())),
                launcher=submission.get("launcher", "local"))


def _wait(pending: list[_Pending], running: dict[int, _Job], cells: Mapping[int, tuple[evaluate.Plan, Any]],
          store: ResultStore, opts: LaunchOptions, found: dict[int, evaluate.SweepItem], out: FanOut,
          board: _Board, overall: Overall) -> None:
    """Submit ``pending`` (at most ``opts.limit`` at once) and collect every job as it ends,
    with one line of n/N done and the ETA after each; Ctrl-C cancels the jobs this call submitted."""
    local_gpus = opts.launcher == "local" and opts.gpus_per_job > 0
    free_gpus = _local_gpus(opts) if local_gpus else []  # local jobs get disjoint GPUs
    need = opts.gpus_per_job if local_gpus else 0
    try:
        while pending or running:
            while pending and len(running) < opts.limit and len(free_gpus) >= need:
                job = _submit(pending.pop(0), opts, free_gpus, board)
                running[job.index] = job
                out.submitted += 1
            for i, job in list(running.items()):
                if _finished(job, cells, store, found, out, board):
                    del running[i]
                    free_gpus.extend(job.gpus)
                    board.say(overall.step())
            board.show(list(running.values()))
            if pending or running:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        ours = [job for job in running.values() if job.handle is not None]
        for job in ours:
            job.handle.cancel(check=False)
        board.say(f"interrupted: cancelled {len(ours)} job(s) this call submitted")
        raise
    finally:
        board.show([])


def _finished(job: _Job, cells: Mapping[int, tuple[evaluate.Plan, Any]], store: ResultStore,
              found: dict[int, evaluate.SweepItem], out: FanOut, board: _Board) -> bool:
    """Collect ``job``'s record if it is there; a job that ended without one is a failure line."""
    how = f"job {job.job_id}"
    if _collect(job.index, job.cell, job.folder, cells, store, found, board, how):
        return True
    if not job.ended():
        return False
    if _collect(job.index, job.cell, job.folder, cells, store, found, board, how):  # written as it ended
        return True
    line = f"job failed: {job.cell.label}: {job.failure()} (log: {job.log_path})"
    out.failures.append(line)
    board.say(line, error=True)
    return True


def _local_gpus(opts: LaunchOptions) -> list[int]:
    """The GPUs local jobs share out, ``--gpus-per-job`` each."""
    import torch  # noqa: PLC0415

    count = torch.cuda.device_count()
    if count < opts.gpus_per_job:
        raise UsageError(f"--gpus-per-job {opts.gpus_per_job}: this machine has {count} GPU(s)")
    return list(range(count))


def _submit(item: _Pending, opts: LaunchOptions, free_gpus: list[int], board: _Board) -> _Job:
    """Submit one cell; its folder gets ``cell.json`` and ``job.json``."""
    folder = item.cell.folder(opts.job_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (ERROR, OUTCOMES, RESULT):  # an unreadable record or an earlier failure
        (folder / stale).unlink(missing_ok=True)
    atomic_write_text(folder / CELL, json.dumps(asdict(item.cell), indent=1, sort_keys=True))
    gpus = tuple(free_gpus[:opts.gpus_per_job]) if free_gpus else ()
    del free_gpus[:len(gpus)]
    tasks = opts.tasks(item.data_parallel)
    if opts.gpus_per_job > 1 and tasks == 1:
        board.say(f"{item.cell.label} is not data-parallel: its job runs as one process on one of its GPUs")
    executor = opts.executor(folder, f"dcbench-{item.cell.protocol}", tasks, gpus)
    handle = executor.submit(run_cell, item.cell, str(folder))
    started = time.time()
    atomic_write_text(folder / SUBMISSION, json.dumps({"launcher": opts.launcher, "job_id": str(handle.job_id),
                                                        "host": socket.gethostname(), "time": started}))
    job = _Job(item.index, item.cell, folder, str(handle.job_id), started, handle, opts.launcher, gpus)
    board.say(f"submitted {item.cell.label}: job {job.job_id} (log: {job.log_path})")
    return job


def launch_options(launcher: str | None, **given: Any) -> LaunchOptions | None:
    """:class:`LaunchOptions` from the command line's values (None: run in this process)."""
    if launcher is None:
        ignored = [k for k, v in given.items() if v not in (None, (), 0, False)]
        if ignored:
            raise UsageError(f"--{ignored[0].replace('_', '-')} needs --launcher local or --launcher slurm")
        return None
    return LaunchOptions(launcher, job_dir=Path(given.get("job_dir") or default_job_dir()).expanduser(),
                         jobs=given.get("jobs"), time_min=parse_time(given.get("slurm_time")),
                         gpus_per_job=int(given.get("gpus_per_job") or 0), cpus_per_job=given.get("cpus_per_job"),
                         partition=given.get("slurm_partition"), account=given.get("slurm_account"),
                         slurm_options=parse_options(given.get("slurm_option") or ()))


__all__ = ["Cell", "FanOut", "LaunchOptions", "cell_of", "check_job_world", "default_job_dir", "fan_out", "launch_options",
           "parse_options", "parse_time", "read_result", "run_cell", "slurm_parameters", "write_result"]
