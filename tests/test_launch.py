"""compare --launcher local: one submitit job per missing result, records stored once by the
submitting process (even after kill -9), failures in one line with their log; SLURM options."""
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dcbench import evaluate, launch
from dcbench.checkpoint import save_checkpoint
from dcbench.cli import main
from dcbench.data.synthetic import make_image_folder
from dcbench.errors import UsageError
from dcbench.models import build_backbone

FAST = ["--set", "image_size=64", "--set", "workers=0", "--set", "batch_size=8", "--set", "knn.ks=[5]",
        "--set", "linear.cached=true", "--set", "linear.epochs=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "shapes", n_classes=3, per_class=6, image_size=64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c")
    for name, seed in (("A", 1), ("B", 2)):
        save_checkpoint(folder / f"{name}.pth", build_backbone("alexnet", input_size=64, seed=seed))
    return folder / "A.pth", folder / "B.pth"


def _counts(store: Path) -> dict:
    with sqlite3.connect(store) as db:
        return {(p, c): n for p, c, n in db.execute(
            "select protocol, checkpoint_name, count(*) from results group by protocol, checkpoint_name")}


def test_kill_9_then_rerun_stores_every_result_once_and_a_third_call_submits_nothing(data, ckpts, tmp_path):
    store, jobs = tmp_path / "r.db", tmp_path / "jobs"
    args = ["compare", *map(str, ckpts), "--protocol", "knn", "--protocol", "linear", "--data", str(data),
            "--store", str(store), "--launcher", "local", "--jobs", "2", "--job-dir", str(jobs), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "dcbench", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(jobs.glob("*/result.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # at least one job finished; the others may still run
    first.wait()
    assert list(jobs.glob("*/result.json"))

    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert _counts(store) == {(p, c): 1 for p in ("knn", "linear") for c in ("A", "B")}
    assert "knn · top1_k5 (val)" in second.stdout and "linear · top1 (val)" in second.stdout
    record = json.loads((next(jobs.glob("knn-A-*")) / "result.json").read_text())
    assert record["extra"]["launcher"] == "submitit-local" and record["extra"]["world_size"] == 1
    assert record["extra"]["job"]["id"]

    submitted = sorted(jobs.glob("*/*_submitted.pkl"))
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 0, third.output
    assert "submitted" not in third.output and sorted(jobs.glob("*/*_submitted.pkl")) == submitted
    assert _counts(store) == {(p, c): 1 for p in ("knn", "linear") for c in ("A", "B")}
    assert third.stdout == second.stdout


def test_a_failing_job_is_one_line_with_its_log_and_the_others_are_stored(data, ckpts, tmp_path):
    store, jobs = tmp_path / "r.db", tmp_path / "jobs"
    # the linear root is checked by its job (data may be mounted only where jobs run): it fails there
    result = CliRunner().invoke(main, ["compare", str(ckpts[0]), "--protocol", "linear", "--protocol", "knn",
                                       "--data", str(data), "--data", f"linear={tmp_path / 'missing'}",
                                       "--store", str(store), "--launcher", "local", "--jobs", "2",
                                       "--job-dir", str(jobs), *FAST])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("job failed:")]
    assert len(failed) == 1 and "linear on A" in failed[0] and "DataError" in failed[0] and "missing" in failed[0]
    log_path = Path(failed[0].rsplit("(log: ", 1)[1].rstrip(")"))
    assert log_path.is_file() and "DataError" in log_path.read_text()
    assert _counts(store) == {("knn", "A"): 1}
    assert "knn · top1_k5 (val)" in result.stdout and "1 job(s) failed" in result.output
    progress = [line for line in result.output.splitlines() if line.startswith("jobs: ")]
    assert len(progress) == 2 and progress[-1].startswith("jobs: 2/2 evaluations done, ")  # failures count as ended


def test_a_batch_the_gpus_per_job_do_not_divide_is_refused_before_anything_is_submitted(data, ckpts, tmp_path):
    jobs = tmp_path / "jobs"
    result = CliRunner().invoke(main, ["compare", str(ckpts[0]), "--protocol", "knn", "--protocol", "linear",
                                       "--data", str(data), "--store", str(tmp_path / "r.db"), "--launcher", "slurm",
                                       "--gpus-per-job", "3", "--job-dir", str(jobs), *FAST,
                                       "--set", "linear.cached=false", "--set", "linear.batch_size=8"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: --gpus-per-job 3 runs linear as 3 processes") and "batch_size 8" in line
    assert "--set linear.batch_size=N with N a multiple of 3" in line
    assert not jobs.exists() or not any(jobs.iterdir())  # nothing submitted, not even the knn job


def test_a_job_of_two_tasks_runs_data_parallel_through_submitits_torch_environment(data, ckpts, tmp_path):
    import submitit

    p = evaluate.plan("knn", {"image_size": 64, "workers": 0, "ks": [5], "batch_size": 8}, data)
    ckpt = evaluate.load_for(p, str(ckpts[0]))
    cell = launch.cell_of(p, str(ckpts[0]), ckpt, "cpu", None, False, 1)
    folder = cell.folder(tmp_path)
    assert folder.name.startswith("knn-A-") and cell.folder(tmp_path) == folder and cell.label == "knn on A (seed 0)"
    executor = launch.LaunchOptions("local", job_dir=tmp_path).executor(folder, "dcbench-knn", tasks=2)
    job = executor.submit(launch.run_cell, cell, str(folder))  # what --gpus-per-job 2 submits, on gloo here
    assert job.results() == [str(folder / launch.RESULT), None]  # rank 0 writes the record
    back = launch.read_result(folder)
    assert back.checkpoint["sha256"] == ckpt.sha256 and back.settings == p.plain_settings
    assert back.extra["world_size"] == 2 and back.extra["launcher"] == "submitit-local" and back.metrics
    assert back.extra["ranks_max_abs_diff"] == 0.0


def test_run_cell_leaves_one_error_line(data, ckpts, tmp_path):
    p = evaluate.plan("knn", {"image_size": 64, "workers": 0, "ks": [5]}, data)
    cell = launch.cell_of(p, str(ckpts[0]), evaluate.load_for(p, str(ckpts[0])), "cpu", None, False, None)
    folder = cell.folder(tmp_path)
    folder.mkdir()
    bad = launch.Cell(**{**cell.__dict__, "root": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="not a folder"):
        launch.run_cell(bad, str(folder))
    assert (folder / launch.ERROR).read_text().startswith("DataError: ")


class _FakeJob:
    job_id, state = "42", "RUNNING"

    def __init__(self, folder):
        self.paths = type("P", (), {"stderr": Path(folder) / "42_0_log.err"})()
        self.cancelled = False

    def done(self):
        return False

    def cancel(self, check=True):
        self.cancelled = True


def test_ctrl_c_cancels_the_jobs_this_call_submitted(data, ckpts, tmp_path, monkeypatch):
    submitted = []

    class Executor:
        def __init__(self, folder):
            self.folder = folder

        def submit(self, fn, *args):
            submitted.append(_FakeJob(self.folder))
            return submitted[-1]

    monkeypatch.setattr(launch.LaunchOptions, "executor", lambda self, folder, *a, **k: Executor(folder))
    monkeypatch.setattr(launch.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    plans = [evaluate.plan("knn", {"image_size": 64}, data, check_data=False)]
    opts = launch.LaunchOptions("local", job_dir=tmp_path / "jobs", jobs=2)
    with evaluate.main_store(tmp_path / "r.db") as store, pytest.raises(KeyboardInterrupt):
        launch.fan_out(plans, [str(c) for c in ckpts], store, opts)
    assert len(submitted) == 2 and all(job.cancelled for job in submitted)


def test_live_status_lines_on_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    cell = launch.Cell("A.pth", "A", "0" * 64, "knn", "2", {"seed": 0}, "/data")
    job = launch._Job(0, cell, Path("/jobs/x"), "7", time.time() - 65, _FakeJob("/jobs/x"))
    tty, plain = Tty(), io.StringIO()
    launch._Board(tty).show([job])
    launch._Board(plain).show([job])
    assert "RUNNING" in tty.getvalue() and "00:01:05" in tty.getvalue() and "knn on A (seed 0)" in tty.getvalue()
    assert plain.getvalue() == ""


def test_slurm_options_become_sbatch_lines():
    from submitit.slurm.slurm import _make_sbatch_string

    opts = launch.launch_options("slurm", jobs=None, job_dir="/shared/jobs", slurm_time="1-02:30:00",
                                 gpus_per_job=4, cpus_per_job=40, slurm_partition="gpu", slurm_account="vision",
                                 slurm_option=("qos=high", "reservation=paper"))
    assert opts.time_min == 24 * 60 + 150 and opts.limit > 1000 and opts.tasks(True) == 4 and opts.tasks(False) == 1
    assert opts.threads(4) == 10 and opts.threads(1) == 40
    script = _make_sbatch_string("python -m x", "/shared/jobs/cell", **launch.slurm_parameters(opts, 4, "dcbench-knn"))
    for line in ("--partition=gpu", "--account=vision", "--time=1590", "--gpus-per-node=4", "--ntasks-per-node=4",
                 "--cpus-per-task=10", "--qos=high", "--reservation=paper", "--job-name=dcbench-knn"):
        assert f"#SBATCH {line}" in script, line


def test_launch_option_errors():
    assert launch.parse_time("90") == 90 and launch.parse_time("01:30:00") == 90 and launch.parse_time("2-0") == 2880
    for bad in ("1h", "", "0"):
        if bad:
            with pytest.raises(UsageError):
                launch.parse_time(bad)
    with pytest.raises(UsageError, match="--launcher"):
        launch.launch_options(None, jobs=2)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        launch.parse_options(["qos"])
    with pytest.raises(UsageError, match="need --launcher slurm"):
        launch.LaunchOptions("local", slurm_options={"qos": "x"})
    assert launch.launch_options(None, jobs=None, gpus_per_job=0, slurm_option=()) is None


def test_eval_launcher_local_runs_one_job_and_a_second_call_reuses_it(data, ckpts, tmp_path):
    store, jobs = tmp_path / "r.db", tmp_path / "jobs"
    args = ["eval", "--protocol", "knn", "--checkpoint", str(ckpts[0]), "--data", str(data), "--store", str(store),
            "--launcher", "local", "--job-dir", str(jobs), "--json", "--set", "image_size=64", "--set", "workers=0",
            "--set", "ks=[5]"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    record = json.loads(first.stdout.strip().splitlines()[-1])
    assert record["protocol"] == "knn" and record["extra"]["launcher"] == "submitit-local"
    assert _counts(store) == {("knn", "A"): 1} and len(list(jobs.glob("*/result.json"))) == 1
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "nothing submitted" in second.stdout and _counts(store) == {("knn", "A"): 1}
    assert json.loads(second.stdout.strip().splitlines()[-1])["metrics"] == record["metrics"]
