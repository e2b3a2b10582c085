"""The benchmark command runs end to end and reports every comparison (no timing assertions)."""
import json

from codeq import bench


def test_bench_reports_every_comparison(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--repeats", "1", "--warmup", "0", "--batches", "4", "--depths", "resnet20",
                "--data-size", "256", "--fashion-root", "", "--out", str(out)])
    results = json.loads(out.read_text())
    step = results["training_step"]["4"]
    assert set(step) == {"plain", "deadzone", "deadzone+group_lasso", "deadzone+group_lasso_blocks",
                         "deadzone+l1_kernel", "deadzone+group_lasso, uncached"}
    assert step["plain"]["ratio_to_plain"] == 1.0
    assert set(results["vs_step"]) == {"training step", "evaluator"}
    assert results["scaling"]["resnet20"]["layers"] == 18
    assert results["data"]["synthetic 3x32x32"]["images"] == 256
    assert "images/s" in capsys.readouterr().out
