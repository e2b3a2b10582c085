"""codeq.report beyond one row per run: seeds of one setting as mean ± std (n), their error bars, the
non-dominated rows' overrides in pareto_front.yaml, and the paper's results beside the runs (--paper)."""

import csv

import pytest
import yaml
from matplotlib.container import ErrorbarContainer
from test_report import make_run, metrics_row

from codeq.paper import PAPER_RESULTS
from codeq.report import Report, Stat, collect_runs, main, pareto_figure, seed_groups


@pytest.fixture
def seeds(tmp_path):
    """Sweep a: group lasso at seeds 0-2 (accuracy 0.80/0.90/0.85, structured ratio 10/20/40, unstructured twice
    that) and seed 3 failed before an epoch; job 4 no sparsity, seed 0. Sweep b: that job again (a repeat)."""
    for seed, (accuracy, ratio) in enumerate([(0.80, 10.0), (0.90, 20.0), (0.85, 40.0)]):
        make_run(
            tmp_path / "a" / str(seed),
            ["sparsity=group_lasso", f"seed={seed}"],
            [metrics_row(0, accuracy, ratio, 2 * ratio)],
        )
    make_run(tmp_path / "a" / "3", ["sparsity=group_lasso", "seed=3"], status="failed", epochs=1, failed="boom")
    make_run(tmp_path / "a" / "4", ["sparsity=none", "seed=0"], [metrics_row(0, 0.70, 4.0, 8.0)])
    make_run(tmp_path / "b" / "0", ["sparsity=none", "seed=0"], [metrics_row(0, 0.75, 4.0, 8.0)])
    return tmp_path


def test_stat_is_mean_and_sample_std():
    assert Stat.of([80.0, 90.0, 85.0, None]) == Stat(85.0, 5.0, 3)  # sqrt((25 + 25 + 0) / 2)
    assert Stat.of([3.0]) == Stat(3.0, None, 1)
    assert Stat.of([None]) == Stat(None, None, 0)
    assert Stat.of([float("inf"), 2.0]).std is None


def test_runs_differing_only_in_seed_share_a_row(seeds):
    runs = collect_runs([seeds / "a", seeds / "b"])
    assert seed_groups(runs) == [[0, 1, 2, 3], [4], [5]]  # b/0 repeats a/4's seed: a row of its own
    report = Report.of(runs)
    header, cells = report.table()
    assert header[:4] == ["run", "sparsity", "seed", "n"]
    group = dict(zip(header, cells[0]))
    assert (group["run"], group["seed"], group["n"]) == ("a/0,a/1,a/2,a/3", "0,1,2,3", "4")
    # structured Rel. BOPs 10, 5, 2.5 %: mean 5.8333, sample std sqrt((4.1667² + 0.8333² + 3.3333²) / 2) = 3.8188;
    # ratios 10, 20, 40: mean 23.33, std sqrt((13.33² + 3.33² + 16.67²) / 2) = 15.28. [3]: 3 of the 4 runs logged it.
    assert group["final acc %"] == "85.00 ± 5.00 [3]"
    assert group["struct BOPs %"] == "5.83 ± 3.82 [3]"
    assert group["struct ratio"] == "23.3x ± 15.3x [3]"
    assert group["unstruct BOPs %"] == "2.92 ± 1.91 [3]"
    assert (group["epochs"], group["status"], group["front"]) == ("1/1,0/1", "completed,failed", "S+U")
    assert cells[1][:5] == ["a/4", "none", "0", "1", "70.00"]
    assert cells[2][:5] == ["b/0", "none", "0", "1", "75.00"]
    assert report.label(0) == "sparsity=group_lasso, seed=0,1,2,3"


def test_csv_and_front_file_of_seeds(seeds, tmp_path):
    out = tmp_path / "out"
    assert main([str(seeds / "a"), str(seeds / "b"), "--out", str(out)]) == 0
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["n"] for row in rows] == ["4", "1", "1"]
    assert float(rows[0]["final_accuracy_pct"]) == pytest.approx(85.0)
    assert float(rows[0]["final_accuracy_pct_std"]) == pytest.approx(5.0)
    assert float(rows[0]["structured_rel_bops_pct_std"]) == pytest.approx(3.8188, abs=1e-4)
    assert rows[1]["final_accuracy_pct_std"] == ""
    assert rows[0]["error"] == "3: boom"
    front = yaml.safe_load((out / "pareto_front.yaml").read_text())
    (entry,) = front["structured"]
    assert entry["run"] == "a/0,a/1,a/2,a/3" and entry["n"] == 4
    assert entry["structured_rel_bops_pct"] == pytest.approx(35 / 6)
    assert entry["overrides"] == ["sparsity=group_lasso"] and entry["seeds"] == ["0", "1", "2", "3"]
    assert front["unstructured"][0]["run"] == "a/0,a/1,a/2,a/3"
    assert "mean ± sample std" in (out / "report.md").read_text()


def test_plot_draws_one_std_error_bars(seeds):
    figure = pareto_figure(Report.of(collect_runs([seeds / "a", seeds / "b"])))
    bars = [c for c in figure.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # structured and unstructured
    x_errors, y_errors = bars[0].lines[2]
    # the seeds' row at (5.83 %, 85 %): ±3.82 on x, ±5 on y; the one-run rows get no spread
    assert x_errors.get_segments()[0][:, 0] == pytest.approx([35 / 6 - 3.8188, 35 / 6 + 3.8188], abs=1e-4)
    assert y_errors.get_segments()[0][:, 1] == pytest.approx([80.0, 90.0])
    assert y_errors.get_segments()[1][:, 1] == pytest.approx([70.0, 70.0])


def test_paper_rows_beside_the_runs_by_counting_convention(seeds, tmp_path):
    out = tmp_path / "out"
    assert main([str(seeds / "b"), "--paper", "--out", str(out)]) == 0
    report = Report.of(collect_runs([seeds / "b"]), paper=PAPER_RESULTS)
    header, cells = report.table()
    table = {cell[0]: dict(zip(header, cell)) for cell in cells}
    assert len(cells) == 1 + 7
    geta = table["paper: GETA MP (structured)"]
    assert (geta["final acc %"], geta["struct BOPs %"], geta["struct ratio"]) == ("91.42", "4.50", "22.2x")
    assert (geta["unstruct BOPs %"], geta["status"], geta["front"]) == ("-", "paper", "-")
    codeq_mp = table["paper: CoDeQ MP (unstructured)"]
    assert (codeq_mp["unstruct BOPs %"], codeq_mp["unstruct ratio"], codeq_mp["struct BOPs %"]) == (
        "2.61",
        "38.3x",
        "-",
    )
    baseline = table["paper: baseline 32-bit (dense)"]
    assert (baseline["struct BOPs %"], baseline["unstruct BOPs %"]) == ("100.00", "100.00")
    with (out / "report.csv").open() as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert float(rows["paper: CoDeQ 4-bit (unstructured)"]["unstructured_rel_bops_pct"]) == pytest.approx(2.95)
    assert rows["paper: CoDeQ 4-bit (unstructured)"]["structured_rel_bops_pct"] == ""
    assert "| paper: GETA MP (structured) | 91.42 |" in (out / "report.md").read_text()
    stars = {c.get_label(): c.get_offsets().tolist() for c in pareto_figure(report).axes[0].collections}
    assert stars["paper ResNet-20 / CIFAR-10, structured count"] == [[4.5, 91.42]]
    assert len(stars["paper ResNet-20 / CIFAR-10, unstructured count"]) == 5
    assert stars["paper ResNet-20 / CIFAR-10, dense count"] == [[100.0, 91.7]]
