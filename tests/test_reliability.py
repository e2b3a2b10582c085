"""Reliability through the CLI: kill and resume, bad checkpoints, signals, divergence, full disks, bad input."""

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import ONE_THREAD, REPO, TINY, run_cli, run_in_process

from codeq.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from codeq.data import synthetic
from codeq.rundir import RunFiles, read_metrics

TRAINING = [*TINY, "trainer.epochs=4", "trainer.viz_interval=100", "sparsity=group_lasso"]
RESUMABLE = [*TRAINING, "logger=none"]
VOLATILE = ("time/", "train/images_per_s")


def stable(rows):
    """The rows without wall-clock timings: what must be identical between two runs of the same seed."""
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def poisoned_synthetic(poison_epoch: int, poison_step: int, **kwargs):
    """codeq.data.synthetic whose training batch (poison_epoch, poison_step) is all NaN (a divergence stand-in)."""
    data = synthetic(**kwargs)
    clean = data.train_batches

    def train_batches(epoch, rank=0, world_size=1):
        for step, (x, y) in enumerate(clean(epoch, rank, world_size)):
            yield (torch.full_like(x, math.nan) if (epoch, step) == (poison_epoch, poison_step) else x), y

    data.train_batches = train_batches
    return data


def start_cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "codeq.main", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD, **(env or {})},
    )


def wait_for_rows(proc, run_dir, count, timeout=240):
    """Poll metrics.jsonl until it has ``count`` rows (the process must still be running then)."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(run_dir / "metrics.jsonl")) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.02)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run, in this process; its rows are what every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_in_process(*RESUMABLE, f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch) == 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 4
    return stable(rows)


def test_sigkill_after_epoch_two_then_resume_equals_an_uninterrupted_run(tmp_path, reference, monkeypatch):
    run_dir = tmp_path / "run"
    proc = start_cli(*RESUMABLE, f"hydra.run.dir={run_dir}")
    wait_for_rows(proc, run_dir, 2)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert run_in_process(*RESUMABLE, "trainer.resume=true", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch) == 0
    assert stable(read_metrics(run_dir / "metrics.jsonl")) == reference
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("sig, logger", [(signal.SIGTERM, "wandb"), (signal.SIGINT, "none")], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_exits_non_zero_and_resumes_exactly(sig, logger, tmp_path, reference, monkeypatch):
    run_dir = tmp_path / "run"
    proc = start_cli(*TRAINING, f"logger={logger}", f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline"})
    wait_for_rows(proc, run_dir, 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    (line,) = error_lines(stderr)
    assert f"interrupted by {sig.name}" in line and "trainer.resume=true" in line
    assert "Traceback" not in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] in line
    assert not (run_dir / "failed.json").exists()
    state = load_checkpoint(run_dir / "last.pt")
    if logger == "wandb":  # the W&B run was closed, as failed, and its id is kept for the resume
        (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{state['wandb_run_id']}")
        assert "got exitcode: 1" in (offline_run / "logs" / "debug.log").read_text()
    assert run_in_process(*RESUMABLE, "trainer.resume=true", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch) == 0
    assert stable(read_metrics(run_dir / "metrics.jsonl")) == reference


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_a_bad_checkpoint_is_one_clear_line(damage, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    base = [*TINY, "trainer.viz_interval=100", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_in_process(*base, "trainer.epochs=1", monkeypatch=monkeypatch) == 0
    checkpoint = run_dir / "last.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    capsys.readouterr()
    assert run_in_process(*base, "trainer.epochs=1", "trainer.resume=true", monkeypatch=monkeypatch) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: trainer.resume: ") and str(checkpoint) in line
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 1  # what was written stays
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed == {"error": line.removeprefix("error: "), "type": "CheckpointError", "epoch": 0}


@pytest.mark.parametrize(
    "change, message",
    [
        ("model=resnet32", "does not fit the configured model/optimizer"),
        ("trainer.epochs=2", "trainer.epochs=2 but"),
    ],
)
def test_checkpoint_of_another_config(change, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    base = [*TINY, "trainer.epochs=1", "trainer.viz_interval=100", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_in_process(*base, monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert run_in_process(*base, change, "trainer.resume=true", monkeypatch=monkeypatch) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line


def test_checkpoint_file_helpers(tmp_path):
    path = tmp_path / "last.pt"
    state = {
        "epoch": 3,
        "epochs": 5,
        "model": {"w": torch.arange(4.0)},
        "optimizer": {},
        "lr_scheduler": {},
        "rng": {},
        "wandb_run_id": "abc",
        "partial": None,
    }
    save_checkpoint(path, state)
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = load_checkpoint(path)
    assert (
        loaded["epoch"] == 3
        and loaded["wandb_run_id"] == "abc"
        and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    )
    torch.save({**state, "version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    save_checkpoint(
        tmp_path / "last.pt",
        {
            "epoch": 0,
            "epochs": 1,
            "model": {},
            "optimizer": {},
            "lr_scheduler": {},
            "rng": capture_rng_state(),
            "wandb_run_id": None,
            "partial": None,
        },
    )
    expected = draw()
    restore_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert draw() == expected


def test_resume_without_a_checkpoint_starts_from_epoch_zero(tmp_path, monkeypatch):
    code = run_in_process(
        *TINY,
        "trainer.epochs=1",
        "trainer.viz_interval=100",
        "logger=none",
        "trainer.resume=true",
        f"hydra.run.dir={tmp_path}",
        monkeypatch=monkeypatch,
    )
    assert code == 0
    assert "does not exist: starting from epoch 0" in (tmp_path / "main.log").read_text()
    assert [row["epoch"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_half_written_metrics_line_is_dropped_and_rows_beyond_the_checkpoint_replayed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "eval/accuracy": 0.5}\n{"epoch": 1, "eval/accuracy": 0.6}\n{"epoch": 2, "ev')
    assert [row["epoch"] for row in read_metrics(path)] == [0, 1]
    files = RunFiles(tmp_path, epochs=5)
    files.start(completed_epochs=1)  # the checkpoint holds epoch 0 only: epoch 1 will be trained again
    assert path.read_text() == '{"epoch": 0, "eval/accuracy": 0.5}\n'
    summary = files.write_summary("running")
    assert (summary["epochs_completed"], summary["best_accuracy"], summary["best_epoch"]) == (1, 0.5, 0)


def test_nan_loss_stops_naming_epoch_step_and_knobs(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code = run_in_process(
        *TINY,
        "trainer.epochs=3",
        "trainer.viz_interval=100",
        "logger=none",
        "dataset._target_=test_reliability.poisoned_synthetic",
        "+dataset.poison_epoch=1",
        "+dataset.poison_step=2",
        f"hydra.run.dir={run_dir}",
        monkeypatch=monkeypatch,
    )
    assert code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "non-finite loss at epoch 1, step 2" in line
    assert "optimizer.lr" in line and "sparsity.weight" in line
    assert f"last good checkpoint: {run_dir / 'last.pt'}" in line  # written after epoch 0: it exists
    assert [row["epoch"] for row in read_metrics(run_dir / "metrics.jsonl")] == [0]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    failed = json.loads((run_dir / "failed.json").read_text())
    assert (failed["type"], failed["epoch"]) == ("TrainingDiverged", 0)


def test_an_exploding_finite_loss_stops_as_diverged_without_naming_a_checkpoint_it_never_wrote(
    tmp_path, monkeypatch, capsys
):
    """lr 1e12: the loss jumps from ~3 to ~1e25 at step 1 and stays finite; max_loss_ratio (1e4) stops it."""
    base = [*TINY, "trainer.epochs=3", "trainer.viz_interval=100", "logger=none", "optimizer.lr=1e12"]
    code = run_in_process(*base, f"hydra.run.dir={tmp_path / 'guarded'}", monkeypatch=monkeypatch)
    assert code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "above trainer.max_loss_ratio=10000 x the first logged loss" in line and "at epoch 0, step 1" in line
    assert "no checkpoint was written" in line and "last.pt" not in line
    assert not (tmp_path / "guarded" / "last.pt").exists()
    assert json.loads((tmp_path / "guarded" / "summary.json").read_text())["status"] == "diverged"
    assert json.loads((tmp_path / "guarded" / "failed.json").read_text())["type"] == "TrainingDiverged"

    unguarded = tmp_path / "unguarded"
    code = run_in_process(*base, "trainer.max_loss_ratio=null", f"hydra.run.dir={unguarded}", monkeypatch=monkeypatch)
    assert code == 0  # null disables the guard: the same run "succeeds" with a loss of ~1e25
    assert read_metrics(unguarded / "metrics.jsonl")[0]["train/loss"] > 1e20


BAD_OVERRIDES = [
    (["trainer.epochs=-1"], "trainer.epochs"),
    (["schedule=linear_warmup", "schedule.ramp=-1"], "schedule.ramp"),
    (["schedule=linear_warmup", "schedule.delay=-2"], "schedule.delay"),
    (["schedule=cosine_anneal", "schedule.delay=-1"], "schedule.delay"),
    (["sparsity=group_lasso_blocks", "sparsity.block_size=0"], "sparsity.block_size"),
    (["sparsity=group_lasso", "sparsity.weight=-0.1"], "sparsity.weight"),
    (["dataset.batch_size=0"], "dataset.batch_size"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.viz_interval=0"], "trainer.viz_interval"),
    (["trainer.precision=fp16"], "trainer.precision"),
    (["trainer.sparsity_layer=layer9.conv"], "trainer.sparsity_layer"),
    (["optimizer.lr=-0.001"], "optimizer.lr"),
    (["quantizer.max_bits=1"], "quantizer.max_bits"),
    (["quantizer.exclude_layers=5"], "quantizer.exclude_layers"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["seed=-3"], "seed"),
]


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES, ids=[k for _, k in BAD_OVERRIDES])
def test_bad_value_is_one_line_naming_the_key(overrides, key, tmp_path, monkeypatch, capsys):
    code = run_in_process(
        *TINY, "trainer.epochs=1", "logger=none", *overrides, f"hydra.run.dir={tmp_path}", monkeypatch=monkeypatch
    )
    stderr = capsys.readouterr().err
    assert code == 2
    (line,) = error_lines(stderr)
    assert line.startswith(f"error: {key}") and "Traceback" not in stderr
    assert json.loads((tmp_path / "failed.json").read_text())["error"] == line.removeprefix("error: ")


def test_missing_dataset_without_download_names_the_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("codeq.data.DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    for dataset in ("cifar10", "fashion_mnist"):
        code = run_in_process(
            "trainer.device=cpu",
            "logger=none",
            f"dataset={dataset}",
            f"dataset.root={tmp_path}",
            "dataset.download=false",
            f"hydra.run.dir={tmp_path / dataset}",
            monkeypatch=monkeypatch,
        )
        stderr = capsys.readouterr().err
        assert code == 2
        (line,) = error_lines(stderr)
        assert "dataset.root" in line and "dataset.download=true" in line and "Traceback" not in stderr


@pytest.mark.parametrize("group, option", [("model", "resnet21"), ("dataset", "imagenet21k"), ("sparsity", "lasso")])
def test_unknown_option_lists_the_options(group, option, tmp_path, monkeypatch, capsys):
    code = run_in_process(*TINY, f"{group}={option}", f"hydra.run.dir={tmp_path}", monkeypatch=monkeypatch)
    stderr = capsys.readouterr().err
    assert code == 1
    assert f"Could not find '{group}/{option}'" in stderr and f"Available options in '{group}'" in stderr
    assert "Traceback" not in stderr


def test_bad_input_through_the_real_process(tmp_path):
    proc = run_cli(*TINY, "trainer.epochs=-5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: trainer.epochs must be an integer >= 1, got -5"]


def fill_disk_at(monkeypatch, run_dir, name, nth):
    """From the ``nth`` fsync of ``run_dir/name`` on, every fsync of a file in ``run_dir`` raises ENOSPC.

    A write that fails with a full disk fails at the latest at fsync, where the data must reach it: this is
    a disk filling up mid-run (every later write fails too, the error path's own files included).
    """
    real_fsync = os.fsync
    state = {"count": 0, "full": False}

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == run_dir:
            state["count"] += path.name == name
            state["full"] = state["full"] or state["count"] >= nth
            if state["full"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    "failing, rows_kept",
    [(".last.pt.tmp", [0, 1]), ("metrics.jsonl", [0])],
    ids=["checkpoint", "metrics-row"],
)
def test_a_full_disk_stops_the_run_keeps_what_was_written_and_resume_continues(
    failing, rows_kept, tmp_path, reference, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fill_disk_at(monkeypatch, run_dir, failing, nth=2)  # the second epoch's write fails
    code = run_in_process(*RESUMABLE, f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch)
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr)
    target = run_dir / ("last.pt" if failing == ".last.pt.tmp" else "metrics.jsonl")
    assert f"cannot write {target}: No space left on device" in line
    assert f"the last checkpoint {run_dir / 'last.pt'} is intact" in line
    assert f"trainer.resume=true hydra.run.dir={run_dir}" in line
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 0  # the previous checkpoint, readable
    assert [row["epoch"] for row in read_metrics(run_dir / "metrics.jsonl")] == rows_kept  # no half row
    assert not list(run_dir.glob(".*.tmp"))

    monkeypatch.undo()  # space is back
    assert run_in_process(*RESUMABLE, "trainer.resume=true", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch) == 0
    assert stable(read_metrics(run_dir / "metrics.jsonl")) == reference
