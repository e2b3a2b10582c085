"""Hydra multiruns through the real CLI: basic and joblib launchers, failing jobs, experiment=sweep_sparsity,
W&B naming per job, the report over sweep dirs, and (slow) submitit_local with a requeued, resumed job."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cli import ONE_THREAD, REPO, TINY, run_cli, run_in_process

import codeq.loggers
from codeq.rundir import read_metrics

ONE_EPOCH = [*TINY, "trainer.epochs=1", "logger=none"]
VOLATILE = ("time/", "train/images_per_s")
# group_lasso's λ on the command line: -1 (bad input: the first job fails before training), 0 (no term), 1e-3.
BASIC_GRID = ["sparsity=group_lasso", "sparsity.weight=-1,0,1e-3"]
# lr 1e30 diverges at step 1: a job failing in the middle of training, in a joblib worker process.
JOBLIB_GRID = [
    "sparsity=group_lasso",
    "sparsity.weight=1e-3",
    "optimizer.lr=1e30,1e-3,2e-3",
    "hydra/launcher=joblib",
    "hydra.launcher.n_jobs=2",
]
SWEEP_SPARSITY = [(wd, weight) for wd in ("0.01", "0.05") for weight in ("0", "0.0001", "0.0005", "0.002")]


def job_overrides(job_dir: Path) -> dict[str, str]:
    """The job's .hydra/overrides.yaml as {key: value}."""
    lines = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    return dict(line.split("=", 1) for line in lines)


def job_config(job_dir: Path) -> dict:
    return yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())


def summary_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def stable(rows):
    """Rows without wall-clock timings: what two runs of the same seed must share exactly."""
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("basic")
    return sweep, run_cli("-m", *ONE_EPOCH, *BASIC_GRID, f"hydra.sweep.dir={sweep}")


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("joblib")
    return sweep, run_cli("-m", *ONE_EPOCH, *JOBLIB_GRID, f"hydra.sweep.dir={sweep}")


def assert_completed_one_epoch(job_dir: Path, weight: float):
    """A completed 1-epoch job: its own files, and loss = CE + λ·sparsity with its own λ (constant schedule: 1)."""
    assert (job_dir / ".hydra" / "config.yaml").exists() and (job_dir / "last.pt").exists()
    assert not (job_dir / "failed.json").exists()
    (row,) = read_metrics(job_dir / "metrics.jsonl")
    assert row["epoch"] == 0 and row["train/sparsity_coeff"] == 1.0
    assert row["train/loss"] == pytest.approx(row["train/ce_loss"] + weight * row["train/sparsity_loss"], rel=1e-5)
    assert (row["train/sparsity_loss"] > 0) == (weight > 0)
    summary = summary_of(job_dir)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1 and summary["final"] == row


def test_basic_launcher_runs_every_job_in_its_own_dir_and_a_bad_one_fails_alone(basic_sweep):
    sweep, proc = basic_sweep
    assert proc.returncode == 1  # some job failed
    assert "Traceback" not in proc.stderr
    assert "error: sparsity.weight must be a finite number >= 0, got -1" in proc.stderr.splitlines()
    assert (sweep / "multirun.yaml").exists()
    bad, without, with_lasso = job_dirs(sweep)  # the basic launcher runs them in this order, one after the other
    assert [job_overrides(d)["sparsity.weight"] for d in (bad, without, with_lasso)] == ["-1", "0", "0.001"]
    assert_completed_one_epoch(without, 0.0)
    assert_completed_one_epoch(with_lasso, 1e-3)

    failed = json.loads((bad / "failed.json").read_text())
    assert failed == {
        "error": "sparsity.weight must be a finite number >= 0, got -1",
        "type": "ConfigError",
        "epoch": None,
    }
    assert summary_of(bad)["status"] == "failed" and summary_of(bad)["epochs_completed"] == 0
    assert not (bad / "metrics.jsonl").exists()


def test_joblib_runs_jobs_in_parallel_workers_and_a_diverging_one_fails_alone(joblib_sweep):
    sweep, proc = joblib_sweep
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Launching 3 jobs, 2 at a time, each in its own process" in proc.stdout
    assert any(
        line.startswith("error: training diverged: non-finite loss at epoch 0") for line in proc.stderr.splitlines()
    )
    diverged, first, second = job_dirs(sweep)
    assert [job_overrides(d)["optimizer.lr"] for d in (diverged, first, second)] == ["1e+30", "0.001", "0.002"]
    for job_dir in (first, second):
        assert_completed_one_epoch(job_dir, 1e-3)
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["runtime"]["choices"]["hydra/launcher"] == "joblib"
    # same seed and data, different lr: the two jobs really trained with their own settings
    assert (
        read_metrics(first / "metrics.jsonl")[0]["train/ce_loss"]
        != read_metrics(second / "metrics.jsonl")[0]["train/ce_loss"]
    )

    failed = json.loads((diverged / "failed.json").read_text())
    assert failed["type"] == "TrainingDiverged" and failed["epoch"] is None
    assert failed["error"].startswith("training diverged: non-finite loss at epoch 0")
    assert summary_of(diverged)["status"] == "diverged"


def test_report_over_two_sweeps_has_one_row_per_job(basic_sweep, joblib_sweep, tmp_path):
    (basic, _), (joblib, _) = basic_sweep, joblib_sweep
    proc = subprocess.run(
        [sys.executable, "-m", "codeq.report", str(basic), str(joblib), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    runs = [f"{sweep.name}/{n}" for sweep in (basic, joblib) for n in range(3)]
    assert [row["run"] for row in rows] == runs
    assert list(rows[0]) == [
        "run",
        "sparsity.weight",
        "optimizer.lr",
        "final_accuracy_pct",
        "best_accuracy_pct",
        "unstructured_sparsity_pct",
        "mean_bits",
        "structured_rel_bops_pct",
        "structured_bops_ratio",
        "unstructured_rel_bops_pct",
        "unstructured_bops_ratio",
        "epochs_completed",
        "epochs_planned",
        "status",
        "error",
        "front",
    ]
    assert [row["status"] for row in rows] == ["failed", "completed", "completed", "diverged", "completed", "completed"]
    assert [row["sparsity.weight"] for row in rows] == ["-1", "0", "0.001", "0.001", "0.001", "0.001"]
    assert [row["optimizer.lr"] for row in rows] == ["", "", "", "1e+30", "0.001", "0.002"]
    for row in rows:
        job = basic.parent / row["run"]  # both sweeps sit in the same temp dir
        if row["status"] == "completed":
            final = summary_of(job)["final"]
            assert float(row["final_accuracy_pct"]) == pytest.approx(100 * final["eval/accuracy"])
            assert float(row["unstructured_rel_bops_pct"]) == pytest.approx(
                final["compression/unstructured_rel_bops_pct"]
            )
            assert row["epochs_completed"] == "1" and row["error"] == ""
        else:
            assert (
                row["epochs_completed"] == "0"
                and row["error"] == json.loads((job / "failed.json").read_text())["error"]
            )
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.split() and line.split()[0] in runs] == runs  # table rows
    assert f"{runs[0]}: failed: sparsity.weight must be a finite number >= 0, got -1" in lines
    assert any(line.startswith(f"{runs[3]}: diverged: training diverged") for line in lines)
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "report.md").exists()


class RecordingLogger(codeq.loggers.NullLogger):
    """NullLogger that records the W&B identity main.py gives each job."""

    runs: list[dict] = []

    def __init__(self, run_dir, config, name, group=None, job_type=None, run_id=None):
        super().__init__(run_dir, config, name, group, job_type, run_id)
        RecordingLogger.runs.append({"dir": Path(run_dir), "name": name, "group": group, "job_type": job_type})


@pytest.fixture(scope="module")
def sparsity_sweep(tmp_path_factory):
    """experiment=sweep_sparsity on tiny data, in this process, with the W&B identity of each job recorded."""
    sweep = tmp_path_factory.mktemp("sweep_sparsity")
    RecordingLogger.runs = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(codeq.loggers, "NullLogger", RecordingLogger)
        code = run_in_process(
            "experiment=sweep_sparsity", *ONE_EPOCH, f"hydra.sweep.dir={sweep}", monkeypatch=monkeypatch
        )
    return sweep, code, list(RecordingLogger.runs)


def test_sweep_sparsity_runs_the_eight_run_grid(sparsity_sweep):
    sweep, code, _ = sparsity_sweep
    assert code == 0
    jobs = job_dirs(sweep)
    assert [
        (job_overrides(d)["optimizer.weight_decay_dz"], job_overrides(d)["sparsity.weight"]) for d in jobs
    ] == SWEEP_SPARSITY
    for job_dir, (wd, weight) in zip(jobs, SWEEP_SPARSITY):
        cfg = job_config(job_dir)
        assert cfg["optimizer"]["weight_decay_dz"] == float(wd) and cfg["sparsity"]["weight"] == float(weight)
        assert cfg["sparsity"]["_target_"] == "codeq.sparsity.group_lasso_channels"
        assert cfg["schedule"]["_target_"] == "codeq.schedules.linear_warmup"
        assert cfg["trainer"]["resume"] is True and cfg["name"] == "sweep_sparsity"
        (row,) = read_metrics(job_dir / "metrics.jsonl")
        assert row["train/sparsity_coeff"] == 0.0  # linear_warmup (delay 0, ramp 3) at epoch 0
        assert (row["train/sparsity_loss"] > 0) == (float(weight) > 0)
        assert summary_of(job_dir)["status"] == "completed"
        # resume=true on a fresh job: one info line, not a warning (it is every sweep job's first start)
        log = (job_dir / "main.log").read_text()
        assert "[INFO] - trainer.resume=true but" in log and "[WARNING] - trainer.resume" not in log


def test_each_sweep_job_is_its_own_wandb_run_grouped_by_the_sweep(sparsity_sweep):
    sweep, _, runs = sparsity_sweep
    assert [run["dir"] for run in runs] == job_dirs(sweep)
    assert {run["group"] for run in runs} == {str(sweep)}
    assert {run["job_type"] for run in runs} == {"sweep_sparsity"}
    assert len({run["name"] for run in runs}) == 8
    for run, (wd, weight) in zip(runs, SWEEP_SPARSITY):
        parts = run["name"].split(",")
        assert f"optimizer.weight_decay_dz={wd}" in parts and f"sparsity.weight={weight}" in parts
        assert not any(part.startswith(("logger", "trainer.device", "trainer.resume")) for part in parts)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sparsity.weight=5e-4", [("0.01", "0.0005"), ("0.05", "0.0005")]),
        ("optimizer.weight_decay_dz=0,1", [(wd, w) for wd in ("0", "1") for w in ("0", "0.0001", "0.0005", "0.002")]),
    ],
    ids=["value", "sweep"],
)
def test_a_command_line_override_of_a_swept_key_replaces_its_grid(override, expected, tmp_path, monkeypatch):
    code = run_in_process(
        "experiment=sweep_sparsity",
        *TINY,
        "logger=none",
        "trainer.epochs=-1",
        override,
        f"hydra.sweep.dir={tmp_path}",
        monkeypatch=monkeypatch,
    )
    assert code == 1  # trainer.epochs=-1 fails every job at once: only the grid is under test here
    jobs = job_dirs(tmp_path)
    assert [
        (job_overrides(d)["optimizer.weight_decay_dz"], job_overrides(d)["sparsity.weight"]) for d in jobs
    ] == expected


def test_slurm_preset_renders_an_sbatch_array_with_one_gpu_per_job(tmp_path):
    """The real launcher down to sbatch: a stand-in sbatch on PATH keeps the script and refuses to submit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$CAPTURED_SBATCH"\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that srun exists
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "sbatch.sh"
    proc = run_cli(
        "experiment=sweep_sparsity",
        "dataset=synthetic",
        "hydra/launcher=slurm_1gpu",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CAPTURED_SBATCH": str(script)},
    )
    assert proc.returncode != 0 and script.exists(), proc.stderr
    lines = script.read_text().splitlines()
    for option in (
        "--array=0-7%8",
        "--gpus-per-node=1",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=4",
        "--mem=16GB",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",
        "--job-name=codeq",
    ):
        assert f"#SBATCH {option}" in lines
    assert lines[-1].endswith(f"{sys.executable} -u -m submitit.core._submit {tmp_path / 'sweep'}/.submitit/%j")


def test_slurm_ddp_preset_renders_one_task_per_gpu_on_every_node(tmp_path):
    """hydra/launcher=slurm_ddp with 2 nodes of 4 GPUs: one sbatch job of 2 x 4 tasks, one GPU each, USR2 before the
    time limit (submitit's requeue), every task started by srun (one rank each)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$CAPTURED_SBATCH"\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "sbatch.sh"
    proc = run_cli(
        "-m",
        *ONE_EPOCH,
        "trainer.resume=true",
        "hydra/launcher=slurm_ddp",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CAPTURED_SBATCH": str(script)},
    )
    assert proc.returncode != 0 and script.exists(), proc.stderr
    lines = script.read_text().splitlines()
    for option in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--mem=128GB",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",
        "--job-name=codeq",
    ):
        assert f"#SBATCH {option}" in lines
    assert not any(line.startswith("#SBATCH --array") for line in lines)  # one job, not an array
    assert lines[-1].startswith("srun --unbuffered ")
    assert lines[-1].endswith(f"{sys.executable} -u -m submitit.core._submit {tmp_path / 'sweep'}/.submitit/%j")


def submitit_task_pid(sweep: Path, job_id: str) -> int:
    """The pid of local job ``job_id``'s task: runs submitit.core._submit on the sweep's .submitit/%j folder,
    with SUBMITIT_LOCAL_JOB_ID=<job_id> in its environment."""
    folder = str(sweep / ".submitit").encode()
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                command = (proc_dir / "cmdline").read_bytes().split(b"\0")
                environ = (proc_dir / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                b"submitit.core._submit" in command
                and any(arg.startswith(folder) for arg in command)
                and f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in environ
            ):
                return int(proc_dir.name)
    raise AssertionError(f"no submitit task for job {job_id} under {sweep}")


@pytest.mark.slow
def test_submitit_local_requeues_a_preempted_job_which_resumes_exactly(tmp_path, monkeypatch):
    """SIGUSR2 (what SLURM sends before a timeout) -> submitit requeues the job in its own dir -> resume=true continues
    from last.pt; the rows equal an uninterrupted run's. The other job diverges: the sweep still exits 1, one line."""
    training = [
        "dataset=synthetic",
        "dataset.input_size=[3,16,16]",
        "dataset.train_size=512",
        "dataset.test_size=64",
        "dataset.batch_size=32",
        "trainer.device=cpu",
        "trainer.epochs=5",
        "trainer.viz_interval=100",
        "logger=none",
    ]
    reference = tmp_path / "reference"
    assert run_in_process(*training, f"hydra.run.dir={reference}", monkeypatch=monkeypatch) == 0

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "codeq.main",
            "-m",
            *training,
            "trainer.resume=true",
            "optimizer.lr=1e-3,1e30",
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )
    job = sweep / "0"
    deadline = time.monotonic() + 240
    while len(read_metrics(job / "metrics.jsonl")) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "job too slow"
        time.sleep(0.05)
    job_id = str(yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])
    os.kill(submitit_task_pid(sweep, job_id), signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 1 and "Traceback" not in err
    assert any(line.startswith("error: training diverged") for line in err.splitlines())
    assert json.loads((sweep / "1" / "failed.json").read_text())["type"] == "TrainingDiverged"
    submitit_log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in submitit_log and f"Requeued job {job_id}" in submitit_log
    assert "Resuming from" in (job / "main.log").read_text()
    assert stable(read_metrics(job / "metrics.jsonl")) == stable(read_metrics(reference / "metrics.jsonl"))
    assert summary_of(job)["status"] == "completed"
