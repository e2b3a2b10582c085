"""Data-parallel training through the real CLI: ``torchrun --nproc_per_node=2 -m codeq.main`` on gloo (CPU).

Two ranks equal one process with the same global batch; rank 0's run dir wins; a SIGTERM reaching one rank
stops both at the same step and the resumed run equals the uninterrupted one; a crashing rank ends the job
with one line naming it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import ONE_THREAD, REPO, run_in_process

from codeq.checkpoint import load_checkpoint
from codeq.rundir import read_metrics

TESTS = Path(__file__).resolve().parent
VOLATILE = ("time/", "train/images_per_s")
# 35 training images in global batches of 8 (the last one 3: ranks get 1 and 2), 13 test images; SGD, so that
# float-level differences stay float-level (Adam's first steps are ±lr whatever the gradient's size).
TRAINING = [
    "dataset=synthetic",
    "dataset.input_size=[3,8,8]",
    "dataset.train_size=35",
    "dataset.test_size=13",
    "dataset.batch_size=8",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.log_every_steps=2",
    "optimizer=sgd",
    "optimizer.lr=0.05",
    "sparsity=group_lasso",
    "logger=none",
]


def torchrun(*args, nproc=2, timeout=300):
    """``torchrun --standalone --nproc_per_node=N -m codeq.main ARGS`` from the repo root (tests/ importable)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, "-m", "codeq.main", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
    )


def stable(rows):
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# Float-level equality needs a network without ties: at initialisation the dead-zone quantizer leaves some
# pre-activations within rounding of zero, where a ReLU flips on the last bit of a batch statistic's sum.
# Quantized training runs are compared rank count with rank count (the resume test) and every epoch checks
# that the ranks' quantizers agree.
UNQUANTIZED = [*TRAINING, "quantizer=none"]


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    """Global batch 8 split 4 + 4 (the last 1 + 2), gradients averaged, BatchNorm over the global batch: the
    single-process run's numbers. The run dir's pattern has microseconds, which differ between the ranks."""
    root = tmp_path / "ddp"
    proc = torchrun(*UNQUANTIZED, f"hydra.run.dir={root}/${{now:%H-%M-%S-%f}}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    dirs = list(root.iterdir())
    assert len(dirs) == 1, dirs  # every rank wrote into rank 0's dir
    run_dir = dirs[0]
    single = tmp_path / "single"
    assert run_in_process(*UNQUANTIZED, f"hydra.run.dir={single}", monkeypatch=monkeypatch) == 0

    rows, reference = read_metrics(run_dir / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1]  # written once, by rank 0
    for row, ref in zip(rows, reference):
        for key in ("train/loss", "train/ce_loss", "train/sparsity_loss", "eval/loss"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4), key
        for key in ("train/accuracy", "eval/accuracy", "bits/mean", "sparsity/unstructured"):
            assert row[key] == pytest.approx(ref[key], abs=1e-6), key
    weights = load_checkpoint(run_dir / "last.pt")["model"]
    expected = load_checkpoint(single / "last.pt")["model"]
    assert weights.keys() == expected.keys()  # global BatchNorm keeps BatchNorm's state
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Rank 1 gets SIGTERM while drawing step 1 of epoch 1: both ranks stop after that step (the next sync),
    rank 0 checkpoints, and the resumed run's rows and weights are the uninterrupted run's, bit for bit."""
    reference_dir = tmp_path / "reference"
    assert torchrun(*TRAINING, f"hydra.run.dir={reference_dir}").returncode == 0
    run_dir = tmp_path / "run"
    fault = ["dataset._target_=ddp_faults.synthetic_with_fault", "+dataset.fault=sigterm", "+dataset.fault_rank=1"]
    at = ["+dataset.fault_epoch=1", "+dataset.fault_step=1"]
    proc = torchrun(*TRAINING, *fault, *at, f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "interrupted by SIGTERM at epoch 1, step 1" in lines[0], proc.stderr
    partial = load_checkpoint(run_dir / "last.pt")["partial"]
    assert partial["epoch"] == 1 and len(partial["history"]) == 2  # both ranks stopped after step 1
    assert [row["epoch"] for row in read_metrics(run_dir / "metrics.jsonl")] == [0]

    resumed = torchrun(*TRAINING, "trainer.resume=true", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert stable(read_metrics(run_dir / "metrics.jsonl")) == stable(read_metrics(reference_dir / "metrics.jsonl"))
    weights = load_checkpoint(run_dir / "last.pt")["model"]
    for name, tensor in load_checkpoint(reference_dir / "last.pt")["model"].items():
        assert torch.equal(weights[name], tensor), name


def test_a_crashing_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    fault = ["dataset._target_=ddp_faults.synthetic_with_fault", "+dataset.fault=crash", "+dataset.fault_rank=1"]
    proc = torchrun(*TRAINING, *fault, "+dataset.fault_epoch=0", "+dataset.fault_step=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: rank 1 failed: InjectedFault: injected fault at epoch 0, step 2")
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["error"] == lines[0].removeprefix("error: ") and failed["type"] == "InjectedFault"
