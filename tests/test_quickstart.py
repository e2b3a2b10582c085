"""The quick start's promise (`make run`), checked on real Fashion-MNIST: slow, minutes on a 2-core CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_quickstart_reaches_its_accuracy_at_a_tenth_of_the_bit_operations(tmp_path):
    """≥ 0.85 test accuracy at ≤ 10 % unstructured Rel. BOPs, printing the final table."""
    run = subprocess.run(
        [sys.executable, "-m", "codeq.main", "experiment=quickstart", "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert final["eval/accuracy"] >= 0.85
    assert final["compression/unstructured_rel_bops_pct"] <= 10.0
    assert "Rel. BOPs %" in run.stdout and str(tmp_path) in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_structured_quickstart_kills_channels_down_to_six_percent_of_the_bit_operations(tmp_path):
    """≥ 0.87 test accuracy at ≤ 6 % structured Rel. BOPs (only whole dead channels count), dead channels listed."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "codeq.main",
            "experiment=quickstart_structured",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert final["eval/accuracy"] >= 0.87
    assert final["compression/structured_rel_bops_pct"] <= 6.0
    assert final["layers/layer3.0.conv1/dead_channels"] >= 32
    assert "dead channels" in run.stdout
