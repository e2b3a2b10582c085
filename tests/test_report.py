"""Tests for `python -m codeq.report`: run discovery, the table, CSV/MD/PNG outputs, failure lines."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from codeq.report import (
    Report,
    collect_runs,
    differing_override_keys,
    find_run_dirs,
    load_run,
    main,
    read_metrics,
    short_key_names,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def metrics_row(epoch, accuracy, s_ratio, u_ratio, sparsity=0.5, bits=4.0):
    """A metrics.jsonl row as the trainer writes it (fractions; Rel. BOPs % = 100 / ratio)."""
    return {
        "epoch": epoch,
        "eval/accuracy": accuracy,
        "sparsity/unstructured": sparsity,
        "bits/mean": bits,
        "compression/structured_bops_ratio": s_ratio,
        "compression/unstructured_bops_ratio": u_ratio,
        "compression/structured_rel_bops_pct": 100.0 / s_ratio,
        "compression/unstructured_rel_bops_pct": 100.0 / u_ratio,
    }


def make_run(run_dir, overrides, rows=(), status="completed", epochs=None, failed=None):
    """Write a run dir per RUNDIR.md: .hydra/, metrics.jsonl, summary.json, failed.json."""
    hydra = run_dir / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text("seed: 0\n")
    (hydra / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    if rows:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {
        "status": status,
        "epochs": epochs if epochs is not None else len(rows),
        "epochs_completed": len(rows),
        "best_accuracy": max((r["eval/accuracy"] for r in rows), default=None),
        "final": rows[-1] if rows else {},
    }
    if failed is not None:
        summary["error"] = failed
        (run_dir / "failed.json").write_text(json.dumps({"error": failed, "type": "RuntimeError", "epoch": None}))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    """A 3-job sweep: job 0 and 1 differ in sparsity and weight, job 2 failed before any epoch."""
    root = tmp_path / "multirun" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    make_run(
        root / "0",
        ["sparsity=group_lasso", "sparsity.weight=0.1", "trainer.epochs=2"],
        [metrics_row(0, 0.80, 10.0, 20.0), metrics_row(1, 0.90, 25.0, 40.0, sparsity=0.75, bits=3.5)],
    )
    make_run(
        root / "1",
        ["sparsity=l1_kernel", "sparsity.weight=0.1", "trainer.epochs=2"],
        [metrics_row(0, 0.85, 5.0, 50.0), metrics_row(1, 0.82, 8.0, 80.0)],
    )
    make_run(
        root / "2",
        ["sparsity=bogus", "sparsity.weight=0.1", "trainer.epochs=2"],
        status="failed",
        epochs=2,
        failed="sparsity: unknown option 'bogus'",
    )
    return root


def test_differing_override_keys_keeps_first_seen_order_and_counts_absence():
    runs = [
        {"sparsity": "group_lasso", "seed": "0", "lr": "0.1"},
        {"sparsity": "l1_kernel", "seed": "0", "lr": "0.1", "schedule": "cosine_anneal"},
        {"sparsity": "l1_kernel", "seed": "0", "lr": "0.2"},
    ]
    assert differing_override_keys(runs) == ["sparsity", "lr", "schedule"]
    assert differing_override_keys([{"a": "1"}]) == []
    assert short_key_names(["sparsity.weight", "quantizer.weight", "lr"]) == {
        "sparsity.weight": "sparsity.weight",
        "quantizer.weight": "quantizer.weight",
        "lr": "lr",
    }
    assert short_key_names(["sparsity.weight", "schedule"]) == {
        "sparsity.weight": "weight",
        "schedule": "schedule",
    }


def test_find_run_dirs_orders_jobs_naturally(tmp_path):
    for job in ("10", "2", "0"):
        make_run(tmp_path / "sweep" / job, [], [metrics_row(0, 0.5, 2.0, 2.0)])
    (tmp_path / "sweep" / "11").mkdir()
    (tmp_path / "sweep" / "11" / "metrics.jsonl").write_text("")
    (tmp_path / "sweep" / "notes").mkdir()
    names = [p.name for p in find_run_dirs(tmp_path)]
    assert names == ["0", "2", "10", "11"]


def test_table_rows_and_values(sweep):
    report = Report.of(collect_runs([sweep]))
    assert report.names == ["0", "1", "2"]
    assert report.keys == ["sparsity"]
    header, cells = report.table()
    assert header == [
        "run",
        "sparsity",
        "final acc %",
        "best acc %",
        "sparsity %",
        "mean bits",
        "struct BOPs %",
        "struct ratio",
        "unstruct BOPs %",
        "unstruct ratio",
        "epochs",
        "status",
        "front",
    ]
    # job 0: final 0.90, best 0.90, sparsity 0.75, bits 3.5, ratios 25 (4 %) and 40 (2.5 %); cheaper and more
    # accurate than job 1 structured (S front), more accurate but dearer unstructured: both on the U front
    assert cells[0] == [
        "0",
        "group_lasso",
        "90.00",
        "90.00",
        "75.0",
        "3.50",
        "4.00",
        "25.0x",
        "2.50",
        "40.0x",
        "2/2",
        "completed",
        "S+U",
    ]
    # job 1: final 0.82 but best 0.85 (epoch 0); ratios 8 (12.5 %) and 80 (1.25 %)
    assert cells[1] == [
        "1",
        "l1_kernel",
        "82.00",
        "85.00",
        "50.0",
        "4.00",
        "12.50",
        "8.0x",
        "1.25",
        "80.0x",
        "2/2",
        "completed",
        "U",
    ]
    assert cells[2] == ["2", "bogus", *["-"] * 8, "0/2", "failed", "-"]
    assert report.runs[2].error == "sparsity: unknown option 'bogus'"
    assert report.label(0) == "sparsity=group_lasso"


def test_csv_columns_values_and_outputs(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "run",
        "sparsity",
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
    assert float(rows[1]["final_accuracy_pct"]) == pytest.approx(82.0)
    assert float(rows[1]["best_accuracy_pct"]) == pytest.approx(85.0)
    assert float(rows[1]["structured_rel_bops_pct"]) == pytest.approx(12.5)
    assert float(rows[1]["unstructured_bops_ratio"]) == pytest.approx(80.0)
    assert rows[2]["final_accuracy_pct"] == ""
    assert (rows[2]["status"], rows[2]["epochs_completed"], rows[2]["epochs_planned"]) == ("failed", "0", "2")
    assert rows[2]["error"] == "sparsity: unknown option 'bogus'"
    markdown = (out / "report.md").read_text()
    assert "| 1 | l1_kernel | 82.00 | 85.00 |" in markdown
    assert "![accuracy vs Rel. BOPs](report.png)" in markdown
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "group_lasso" in printed and "2: failed: sparsity: unknown option 'bogus'" in printed


def test_single_run_writes_into_its_dir_and_names_the_run(tmp_path):
    run = make_run(tmp_path / "outputs" / "10-00-00", ["seed=1"], [metrics_row(0, 0.6, 2.0, 4.0)])
    assert main([str(run), "--paper"]) == 0
    report = Report.of(collect_runs([run]))
    assert report.keys == [] and report.names == ["10-00-00"]
    assert report.label(0) == "10-00-00"
    for name in ("report.csv", "report.md", "report.png", "pareto_front.yaml"):
        assert (run / name).is_file()


def test_two_sweeps_show_only_differing_keys_with_sweep_prefix(tmp_path):
    for sweep_name, lr in (("a", "0.1"), ("b", "0.2")):
        for job, sparsity in enumerate(("none", "group_lasso")):
            make_run(
                tmp_path / sweep_name / str(job),
                [f"sparsity={sparsity}", f"lr={lr}", "seed=0"],
                [metrics_row(0, 0.5 + job / 10, 2.0, 4.0)],
            )
    report = Report.of(collect_runs([tmp_path / "a", tmp_path / "b"]))
    assert report.names == ["a/0", "a/1", "b/0", "b/1"]
    assert report.keys == ["sparsity", "lr"]
    assert report.label(3) == "sparsity=group_lasso, lr=0.2"


def test_interrupted_run_and_dead_model_infinity(tmp_path):
    dead = metrics_row(2, 0.10, 1.0, 1.0)
    dead.update(
        {
            "compression/structured_bops_ratio": math.inf,
            "compression/unstructured_bops_ratio": math.inf,
            "compression/structured_rel_bops_pct": 0.0,
            "compression/unstructured_rel_bops_pct": 0.0,
        }
    )
    rows = [metrics_row(0, 0.3, 2.0, 4.0), metrics_row(1, 0.4, 2.0, 4.0), dead]
    run = make_run(tmp_path / "run", ["sparsity.weight=100"], rows, status="interrupted", epochs=10)
    assert "Infinity" in (run / "metrics.jsonl").read_text()
    assert main([str(run), "--paper"]) == 0
    _header, cells = Report.of(collect_runs([run])).table()
    assert cells[0][5:12] == ["0.00", "inf", "0.00", "inf", "3/10", "interrupted", "S+U"]
    with (run / "report.csv").open() as handle:
        assert next(csv.DictReader(handle))["structured_bops_ratio"] == "inf"
    assert (run / "report.png").is_file()


def test_failed_job_alone_still_gets_a_report(tmp_path):
    run = make_run(tmp_path / "job", ["model=resnet20"], status="failed", epochs=3, failed="boom")
    (run / "summary.json").unlink()
    loaded = load_run(run)
    assert (loaded.status, loaded.error) == ("failed", "boom")
    assert (loaded.epochs_completed, loaded.epochs_planned) == (0, None)
    assert main([str(run)]) == 0
    assert (run / "report.png").is_file()


def test_partial_last_metrics_line_is_dropped(tmp_path):
    run = make_run(
        tmp_path / "run", [], [metrics_row(0, 0.3, 2.0, 4.0), metrics_row(1, 0.4, 2.0, 4.0)], status="running", epochs=5
    )
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "eval/accura')
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [0, 1]
    loaded = load_run(run)
    # "running" with no live process holding the run dir's lock: the writer was killed mid-row
    assert (loaded.epochs_completed, loaded.metric("eval/accuracy"), loaded.status) == (2, 0.4, "killed")


def test_resumed_epoch_rewritten_keeps_the_last_row(tmp_path):
    rows = [metrics_row(0, 0.3, 2.0, 4.0), metrics_row(1, 0.4, 2.0, 4.0), metrics_row(1, 0.45, 2.0, 4.0)]
    run = make_run(tmp_path / "run", [], rows)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "epochs_completed": 2}))
    loaded = load_run(run)
    assert (loaded.epochs_completed, loaded.metric("eval/accuracy")) == (2, 0.45)
    assert [row["eval/accuracy"] for row in read_metrics(run / "metrics.jsonl")] == [0.3, 0.45]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "codeq.report", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_unreadable_runs_are_one_line_each_and_others_still_report(sweep):
    (sweep / "0" / "summary.json").write_text('{"status": "compl')
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- a=1\n  - : [\n")
    make_run(sweep / "3", ["sparsity=none"], [metrics_row(0, 0.5, 2.0, 4.0)])
    (sweep / "3" / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    make_run(sweep / "4", ["sparsity=group_lasso_blocks"], [metrics_row(0, 0.7, 2.0, 4.0)])
    result = run_cli(str(sweep))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 3
    assert "summary.json is not valid JSON" in skipped[0] and str(sweep / "0") in skipped[0]
    assert ".hydra/overrides.yaml is not valid YAML" in skipped[1]
    assert "metrics.jsonl line 2 is not valid JSON" in skipped[2]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[2:4]] == [["2", "bogus"], ["4", "group_lasso_blocks"]]
    assert lines[4:] == ["2: failed: sparsity: unknown option 'bogus'"]


def test_cli_dir_without_runs_is_one_line_and_fails(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_cli(str(tmp_path / "empty"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"codeq.report: {tmp_path / 'empty'}: no runs found (no metrics.jsonl or .hydra/config.yaml below it)"
    ]
    missing = run_cli(str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"codeq.report: {tmp_path / 'nope'}: no such directory"


def test_cli_empty_dir_beside_a_sweep_still_reports(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(str(sweep), str(tmp_path / "empty"))
    assert result.returncode == 0
    assert "no runs found" in result.stderr and "Traceback" not in result.stderr
    assert (sweep / "report.csv").is_file()


def test_cli_help_explains_usage():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--paper" in result.stdout and "--out" in result.stdout and "Pareto" in result.stdout
    assert "Rel. BOPs % and ratio" in result.stdout
