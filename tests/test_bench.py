"""The benchmark command runs end to end and reports every comparison (no timing assertions)."""

import json

import pytest
import torch

from codeq import bench


def test_bench_reports_every_comparison(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batches",
            "4",
            "--depths",
            "resnet20",
            "--data-size",
            "256",
            "--fashion-root",
            "",
            "--imagefolder-images",
            "20",
            "--imagefolder-workers",
            "0",
            "--resnet50-batch",
            "1",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    step = results["training_step"]["4"]
    assert set(step) == {
        "plain",
        "deadzone",
        "deadzone+group_lasso",
        "deadzone+group_lasso_blocks",
        "deadzone+l1_kernel",
        "deadzone+group_lasso, layer by layer",
        "deadzone+group_lasso, uncached",
    }
    assert step["plain"]["ratio_to_plain"] == 1.0
    assert set(results["vs_step"]) == {
        "training step",
        "evaluator",
        "group_lasso loss fwd+bwd",
        "group_lasso_blocks loss fwd+bwd",
        "l1_kernel loss fwd+bwd",
    }
    assert results["scaling"]["resnet20"]["layers"] == 18
    assert results["data"]["synthetic 3x32x32"]["images"] == 256
    assert results["data"]["imagefolder 224x224 JPEG, decode=cpu, 0 workers"]["images"] == 10
    assert set(results["resnet50"]) == {"training step", "evaluator", "batch"}
    assert "images/s" in capsys.readouterr().out


def test_trainer_comparison_reads_the_warm_epochs_of_cli_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batches",
            "4",
            "--depths",
            "resnet20",
            "--data-size",
            "64",
            "--fashion-root",
            "",
            "--imagefolder-images",
            "0",
            "--trainer-runs",
            "1",
            "--trainer-images",
            "64",
            "--trainer-batch",
            "32",
            "--trainer-overrides",
            "dataset.input_size=[3,8,8]",
            "--out",
            str(out),
        ]
    )
    trainer = json.loads(out.read_text())["trainer"]
    assert {name: len(times) for name, times in trainer["epoch_s"].items()} == {"plain": 2, "codeq": 2}
    assert trainer["ratio"] == pytest.approx(trainer["codeq_s"] / trainer["plain_s"])
    assert "dataset.batch_size=32" in trainer["command"]
    assert "x plain" in capsys.readouterr().out.splitlines()[-2]


def test_a_failing_trainer_run_is_one_error_line_and_the_rest_is_kept(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = bench.main(
        [
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batches",
            "4",
            "--depths",
            "resnet20",
            "--data-size",
            "64",
            "--fashion-root",
            "",
            "--imagefolder-images",
            "0",
            "--trainer-runs",
            "1",
            "--trainer-overrides",
            "dataset.batch_size=0",
            "--out",
            str(out),
        ]
    )
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("): error: dataset.batch_size must be an integer >= 1, got 0")
    assert "trainer" not in json.loads(out.read_text()) and "training_step" in json.loads(out.read_text())


@pytest.mark.slow
def test_bench_compares_two_ranks_with_one_process():
    """Two torchrun ranks at global batch 2·4 vs one process at batch 4, on 3×8×8 images: step times per rank."""
    result = bench.bench_ddp(2, 1, 32, 4, torch.device("cpu"), ["dataset.input_size=[3,8,8]"])
    assert result["ranks"] == 2 and result["per_rank_batch"] == 4
    assert len(result["step_s"]["single"]) == len(result["step_s"]["ddp"]) == 2  # the warm epochs 2 and 3
    assert result["efficiency"] == result["single_step_s"] / result["ddp_step_s"] > 0
