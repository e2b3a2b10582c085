"""The accuracy / compute Pareto search: the front by hand, what a job returns, and a 4-trial NSGA-II study
(hydra/sweeper=pareto) on tiny synthetic data whose front the report marks as Optuna does."""

import math

import pytest
import yaml
from omegaconf import OmegaConf
from test_cli import TINY, run_in_process

from codeq import pareto
from codeq.errors import ConfigError
from codeq.main import two_objective_cost
from codeq.report import Report, collect_runs
from codeq.report import main as report_main


def test_pareto_front_hand_computed():
    # (cost, accuracy): 0 (1, 50) and 1 (2, 70) are on the front; 2 (3, 60) is beaten by 1; 3 (4, 90) is on it;
    # 4 (4, 80) costs as much as 3 for less; 5 (5, 90) costs more for the same; 6 (0.5, nan) is ignored;
    # 7 (2, 70) equals 1: neither dominates the other, both are on it.
    points = [(1, 50), (2, 70), (3, 60), (4, 90), (4, 80), (5, 90), (0.5, math.nan), (2, 70)]
    assert pareto.pareto_front(points) == [0, 1, 7, 3]
    assert pareto.pareto_front([]) == []
    assert pareto.pareto_front([(math.inf, 99.0), (10.0, 10.0)]) == [1]


def test_job_objectives_and_their_checks():
    final = {
        "eval/accuracy": 0.75,
        "compression/structured_rel_bops_pct": 6.5,
        "compression/unstructured_rel_bops_pct": 3.25,
    }
    assert pareto.job_objectives(final, "structured") == (0.75, 6.5)
    assert pareto.job_objectives(final, "unstructured") == (0.75, 3.25)
    assert pareto.check_cost("unstructured") == "unstructured"
    with pytest.raises(ConfigError, match=r"pareto.cost must be one of structured, unstructured, got 'dense'"):
        pareto.check_cost("dense")
    for single in (None, "maximize", ["maximize"]):
        assert not pareto.is_two_objective(single)
    assert pareto.is_two_objective(["maximize", "minimize"])
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction must be \[maximize, minimize\]"):
        pareto.is_two_objective(["minimize", "maximize"])


def test_only_a_two_objective_sweeper_gets_both_objectives():
    cfg = OmegaConf.create({"pareto": {"cost": "unstructured"}})
    basic = OmegaConf.create({"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}})
    single = OmegaConf.create({"sweeper": {"direction": "maximize"}})
    two = OmegaConf.create({"sweeper": {"direction": ["maximize", "minimize"]}})
    assert two_objective_cost(cfg, basic) is None  # a single run or a plain multirun: best accuracy as before
    assert two_objective_cost(cfg, single) is None
    assert two_objective_cost(cfg, two) == "unstructured"


def test_bad_cost_is_one_error_line(tmp_path, monkeypatch, capsys):
    code = run_in_process(
        *TINY, "pareto.cost=dense", "logger=none", f"hydra.run.dir={tmp_path}", monkeypatch=monkeypatch
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error: pareto.cost must be one of structured, unstructured, got 'dense'" in err
    assert "Traceback" not in err


def test_four_trial_study_returns_both_objectives_and_the_report_marks_its_front(tmp_path, monkeypatch):
    sweep = tmp_path / "study"
    study = [
        *TINY,
        "dataset.train_size=16",
        "trainer.epochs=1",
        "logger=none",
        "sparsity=group_lasso",
        "optimizer.lr_dz=0.5",
        "optimizer.lr_bit=0.5",
        "hydra.sweeper.n_trials=4",
    ]
    assert (
        run_in_process("-m", "hydra/sweeper=pareto", *study, f"hydra.sweep.dir={sweep}", monkeypatch=monkeypatch) == 0
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    searched = ("optimizer.weight_decay_dz", "optimizer.weight_decay_bit", "sparsity.weight", "schedule")
    for job in jobs:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert {item.split("=")[0] for item in overrides} >= set(searched)
    optuna_front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert all(set(solution["params"]) == set(searched) for solution in optuna_front)

    assert report_main([str(sweep)]) == 0
    ours = yaml.safe_load((sweep / "pareto_front.yaml").read_text())["structured"]
    # Optuna's non-dominated trials (the values each job returned) are the report's structured front.
    assert len(ours) == len(optuna_front) >= 1
    returned = sorted((round(s["values"][0] * 100, 9), round(s["values"][1], 9)) for s in optuna_front)
    assert returned == sorted((round(e["final_accuracy_pct"], 9), round(e["structured_rel_bops_pct"], 9)) for e in ours)
    report = Report.of(collect_runs([sweep]))
    marked = [row.name for row, mark in zip(report.rows, report.front_marks()) if "S" in mark]
    assert sorted(marked) == sorted(entry["run"] for entry in ours)
    for entry in ours:
        written = yaml.safe_load((sweep / entry["run"] / ".hydra" / "overrides.yaml").read_text())
        assert entry["overrides"] == written
