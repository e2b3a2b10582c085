"""The structured presets: a proximal channel target configured like any sparsity option, end to end."""

import json
import re

from test_cli import QUANTIZED, TINY, run_in_process
from test_config import make_cfg

from codeq.main import sparsity_of


def test_quickstart_structured_is_the_quickstart_with_the_channel_target():
    quickstart, structured = make_cfg("experiment=quickstart"), make_cfg("experiment=quickstart_structured")
    assert structured.name == "quickstart_structured"
    assert (structured.sparsity._target_, structured.sparsity.dead_fraction, structured.sparsity.weight) == (
        "codeq.sparsity.trimmed_group_lasso",
        0.5,
        1.0,
    )
    assert structured.sparsity.exclude_layers == structured.quantizer.exclude_layers == "auto"  # stem, classifier
    for key in ("model", "dataset", "quantizer", "trainer"):
        assert structured[key] == quickstart[key]


def test_paper_structured_preset_runs_one_tiny_epoch_and_kills_half_of_every_quantized_conv(
    tmp_path, monkeypatch, capsys
):
    """λ = 100 soft-thresholds by 0.1·√n per step (lr 1e-3): the smaller half of every filter set dies in 2 steps."""
    cfg = make_cfg("experiment=paper_resnet20_cifar10_structured")
    assert (cfg.dataset.name, cfg.trainer.epochs, cfg.dataset.batch_size) == ("cifar10", 300, 512)
    assert cfg.sparsity._target_ == "codeq.sparsity.trimmed_group_lasso"

    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.epochs=1", "sparsity.weight=100", "logger=none", f"hydra.run.dir={run_dir}"]
    code = run_in_process("experiment=paper_resnet20_cifar10_structured", *overrides, monkeypatch=monkeypatch)
    assert code == 0
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    for layer in QUANTIZED:
        assert final[f"layers/{layer}/dead_channels"] >= final[f"layers/{layer}/channels"] // 2
    assert final["layers/conv1/dead_channels"] == 0
    assert final["compression/structured_mac_ratio"] > 2.5
    table = capsys.readouterr().out
    dead = round(sum(final[f"layers/{layer}/dead_channels"] for layer in QUANTIZED))
    assert f"dead channels          {dead} (per layer" in table
    assert re.search(r"layer3\.2\.conv2 +32 / +64", table) and re.search(r"conv1 +0 / +16", table)


def test_another_sparsity_option_replaces_the_presets_channel_target():
    cfg = make_cfg("experiment=quickstart_structured", "sparsity=group_lasso_proximal")
    assert cfg.sparsity._target_ == "codeq.sparsity.group_lasso_proximal" and "dead_fraction" not in cfg.sparsity
    _, weight = sparsity_of(cfg)
    assert weight == cfg.sparsity.weight
