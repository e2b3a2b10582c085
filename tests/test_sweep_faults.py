"""Sweep-level faults: a job killed by the OS fails alone, the report names it, and a re-run finishes only it."""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_cli import REPO, TINY, run_cli
from test_runlock import hold_lock

from codeq.data import synthetic
from codeq.report import load_run
from codeq.rundir import read_metrics

KILL_SEED = "CODEQ_TEST_KILL_SEED"


def synthetic_killed_at(kill_epoch: int, **kwargs):
    """codeq.data.synthetic whose job SIGKILLs itself at the start of ``kill_epoch`` when its seed is the one in
    $CODEQ_TEST_KILL_SEED: the OS killing one job of a sweep (the out-of-memory killer does the same)."""
    data = synthetic(**kwargs)
    clean = data.train_batches

    def train_batches(epoch, *args, **kw):
        if epoch == kill_epoch and os.environ.get(KILL_SEED) == str(kwargs["seed"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return clean(epoch, *args, **kw)

    data.train_batches = train_batches
    return data


def running_summary(run_dir, epochs_completed):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "eval/accuracy": 0.5} for e in range(epochs_completed)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"status": "running", "epochs": 3, "epochs_completed": epochs_completed, "final": rows[-1]}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_the_report_tells_a_killed_run_from_a_running_one(tmp_path):
    running_summary(tmp_path / "killed", 1)
    running_summary(tmp_path / "alive", 1)
    holder = hold_lock(tmp_path / "alive")
    try:
        killed, alive = load_run(tmp_path / "killed"), load_run(tmp_path / "alive")
    finally:
        holder.kill()
        holder.wait()
    assert (alive.status, alive.error) == ("running", None)
    assert killed.status == "killed"
    assert killed.error.startswith("its process ended after 1 completed epochs without a word")
    assert "trainer.resume=true" in killed.error


@pytest.mark.slow  # four jobs in fresh worker processes, twice: about a minute on an idle 2-core machine
def test_a_job_killed_by_the_os_fails_alone_and_a_resumed_sweep_finishes_only_it(tmp_path):
    sweep = tmp_path / "sweep"
    grid = [
        *TINY,
        "trainer.epochs=3",
        "trainer.viz_interval=100",
        "logger=none",
        "seed=0,1,2,3",
        "dataset._target_=test_sweep_faults.synthetic_killed_at",
        "+dataset.kill_epoch=1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
    ]
    tests_on_path = {"PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), os.path.dirname(__file__)])}
    first = run_cli("-m", *grid, env={**tests_on_path, KILL_SEED: "2"}, timeout=1200)
    assert first.returncode == 1 and "Traceback" not in first.stderr
    (line,) = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: job #2 was killed (worker exit code SIGKILL(-9)); its dir in ")

    jobs = [sweep / str(n) for n in range(4)]
    for n in (0, 1, 3):  # the other jobs finished
        assert json.loads((jobs[n] / "summary.json").read_text())["status"] == "completed"
        assert [row["epoch"] for row in read_metrics(jobs[n] / "metrics.jsonl")] == [0, 1, 2]
    killed = load_run(jobs[2])
    assert (killed.status, killed.epochs_completed) == ("killed", 1)
    report = run_cli_report(sweep, tmp_path / "report")
    (line,) = [line for line in report.splitlines() if ": killed: " in line]  # the killed job, by name
    assert "2" in line.split(": killed: ")[0] and "its process ended after 1 completed epochs" in line
    finished = {n: (jobs[n] / "metrics.jsonl").read_bytes() for n in (0, 1, 3)}

    second = run_cli("-m", *grid, "trainer.resume=true", env=tests_on_path, timeout=1200)
    assert second.returncode == 0, second.stderr
    assert json.loads((jobs[2] / "summary.json").read_text())["status"] == "completed"
    assert [row["epoch"] for row in read_metrics(jobs[2] / "metrics.jsonl")] == [0, 1, 2]
    assert {n: (jobs[n] / "metrics.jsonl").read_bytes() for n in (0, 1, 3)} == finished  # nothing retrained


def run_cli_report(sweep, out):
    proc = subprocess.run(
        [sys.executable, "-m", "codeq.report", str(sweep), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
