"""`python -m codeq.main` end to end on tiny synthetic data: the run dir's files, W&B offline, CSV, final table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from codeq.checkpoint import load_checkpoint
from codeq.main import main
from codeq.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
# 32 train / 16 test images of 3×8×8 in batches of 8: a CPU epoch takes a fraction of a second.
TINY = [
    "dataset=synthetic",
    "dataset.input_size=[3,8,8]",
    "dataset.train_size=32",
    "dataset.test_size=16",
    "dataset.batch_size=8",
    "trainer.device=cpu",
]
FIGURES = ["channel_liveness.png", "layer_bitwidths.png", "layer_sparsity.png", "sparsity_map.png"]
ROW_KEYS = [
    "epoch",
    "train/ce_loss",
    "train/sparsity_loss",
    "train/sparsity_coeff",
    "train/accuracy",
    "eval/accuracy",
    "eval/loss",
    "compression/structured_bops_ratio",
    "compression/unstructured_bops_ratio",
    "compression/structured_mac_ratio",
    "compression/unstructured_mac_ratio",
    "compression/structured_rel_bops_pct",
    "compression/unstructured_rel_bops_pct",
    "sparsity/unstructured",
    "bits/mean",
    "lr",
    "time/train_s",
    "time/eval_s",
]
# the 18 quantized block convs of ResNet-20 (conv1 and linear are excluded by default)
QUANTIZED = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in (0, 1, 2) for c in (1, 2)]
# Subprocesses get one intra-op thread too, as this process does (tests/conftest.py says why).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(*args, env=None, timeout=300):
    """The real CLI in a subprocess, from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "codeq.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD, **(env or {})},
        timeout=timeout,
    )


def run_in_process(*args, monkeypatch):
    """codeq.main's Hydra entry point in this process (no interpreter start-up); returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["codeq.main", *args])
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_two_epoch_run_writes_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.epochs=2", "sparsity=group_lasso", "schedule=linear_warmup", "schedule.ramp=2"]
    proc = run_cli(*overrides, "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        for layer in QUANTIZED:
            for key in ("bitwidth", "structured_pruning", "unstructured_pruning"):
                assert f"layers/{layer}/{key}" in row
        assert 0 <= row["train/accuracy"] <= 1 and 0 <= row["eval/accuracy"] <= 1
        assert row["train/sparsity_loss"] > 0
        assert row["compression/unstructured_rel_bops_pct"] == pytest.approx(
            100 / row["compression/unstructured_bops_ratio"]
        )
    # linear_warmup delay 0, ramp 2: c(e) = e / 2
    assert [row["train/sparsity_coeff"] for row in rows] == [0.0, 0.5]
    # group_lasso's λ = 5e-4: loss = CE + λ·c·sparsity (per-batch means, so exact up to float rounding)
    for row in rows:
        expected = row["train/ce_loss"] + 5e-4 * row["train/sparsity_coeff"] * row["train/sparsity_loss"]
        assert row["train/loss"] == pytest.approx(expected, rel=1e-6)

    summary = json.loads((run_dir / "summary.json").read_text())
    best = max(rows, key=lambda row: row["eval/accuracy"])
    assert summary["status"] == "completed" and summary["epochs"] == summary["epochs_completed"] == 2
    assert (summary["best_accuracy"], summary["best_epoch"]) == (best["eval/accuracy"], best["epoch"])
    assert summary["final"] == rows[-1] and "error" not in summary
    for name in FIGURES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())[-1] == "logger=none"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert (run_dir / "main.log").exists() and not (run_dir / "failed.json").exists()
    assert "Rel. BOPs %" in proc.stdout and str(run_dir) in proc.stdout


def test_wandb_offline_run_lives_in_the_run_dir_and_a_resume_continues_it(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=1", "logger=wandb", f"hydra.run.dir={run_dir}"]
    proc = run_cli(*args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    run_id = load_checkpoint(run_dir / "last.pt")["wandb_run_id"]
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert offline_run.name.endswith(f"-{run_id}")
    assert list(offline_run.glob("*.wandb"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_in_process(*args, "trainer.resume=true", monkeypatch=monkeypatch) == 0
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    assert load_checkpoint(run_dir / "last.pt")["wandb_run_id"] == run_id


def test_csv_logger_and_a_pattern_matching_nothing_only_warns(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    code = run_in_process(
        *TINY,
        "trainer.epochs=2",
        "trainer.viz_interval=5",
        "logger=csv",
        "quantizer.exclude_layers=[conv1,linear,bn]",
        f"hydra.run.dir={run_dir}",
        monkeypatch=monkeypatch,
    )
    assert code == 0
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,")
    assert "exclude_layers entry 'bn' matches no module" in (run_dir / "main.log").read_text()
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 2


def test_quantizer_none_trains_the_dense_model(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    code = run_in_process(
        *TINY, "trainer.epochs=1", "logger=none", "quantizer=none", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch
    )
    assert code == 0
    (row,) = read_metrics(run_dir / "metrics.jsonl")
    assert row["bits/mean"] == 32 and row["compression/structured_bops_ratio"] == pytest.approx(1.0)
    assert row["train/sparsity_loss"] == 0.0
    state = load_checkpoint(run_dir / "last.pt")
    assert not any("parametrizations" in key for key in state["model"])
    assert torch.is_tensor(state["model"]["conv1.weight"])
