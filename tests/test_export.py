"""codeq.export: channel surgery on hand-killed channels, packed weights, parity checks, the CLI and its bad input."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from codeq.checkpoint import FORMAT_VERSION
from codeq.cost import QuantizationComparison
from codeq.evaluator import Evaluator
from codeq.export import SurgeryError, export_run, load_packed, slim_model
from codeq.export.cli import main as export_main
from codeq.export.measure import ParityError, check_mac_parity, reported_layer_macs
from codeq.export.packing import Grid, pack_weight, unpack_weight
from codeq.main import CONF_DIR, attach_quantizers, instantiate_group
from codeq.report import METRIC_COLUMNS, Report, collect_runs

REPO = Path(__file__).resolve().parents[1]
INPUT = (1, 12, 12)
STREAM_1 = 7  # a residual-stream channel of stage 1, dead on every path
STREAM_2 = STREAM_1 + 8  # the same channel in stage 2, after the option-A shortcut pads 8 channels in front
BRANCH_ONLY = 5  # dead at layer1.0.conv2, live on that block's shortcut: must stay
INSIDE_BLOCK = 3  # dead at layer1.0.conv1: gone from conv1's outputs, bn1 and conv2's inputs


def kill_channels(model: nn.Module) -> None:
    """Zero the filters of the channels above; BatchNorm biases made positive so that dead channels carry
    non-zero constants through ReLU (what the surgery must fold)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.uniform_(0.1, 1.0)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        model.layer1[0].conv1.weight[INSIDE_BLOCK] = 0
        model.layer1[0].conv2.weight[BRANCH_ONLY] = 0
        for conv in [model.conv1, *(block.conv2 for block in model.layer1)]:
            conv.weight[STREAM_1] = 0
        for block in model.layer2:
            block.conv2.weight[STREAM_2] = 0


def compose_run_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "dataset=synthetic",
                f"dataset.input_size=[{','.join(map(str, INPUT))}]",
                "logger=none",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def killed_resnet():
    cfg = compose_run_config()
    model = instantiate_group(cfg, "model").eval()
    kill_channels(model)
    return model


@pytest.fixture(scope="module")
def slimmed(killed_resnet):
    return slim_model(killed_resnet, INPUT)


def flop_counter_macs(model: nn.Module) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *INPUT))
    root = type(model).__name__
    return {
        key[len(root) + 1 :]: sum(ops.values()) // 2
        for key, ops in counter.get_flop_counts().items()
        if key.startswith(root + ".") and key.count(".") >= 1
    }


def test_surgery_removes_channels_dead_on_every_path_and_keeps_outputs(killed_resnet, slimmed):
    result = slimmed
    layers = result.layer_channels
    assert layers["conv1"]["out_kept"] == 15  # the stream channel
    assert layers["layer1.0.conv1"] == {"in": 16, "out": 16, "in_kept": 15, "out_kept": 15}
    assert layers["layer1.0.conv2"]["out_kept"] == 14  # both its dead filters go from the branch ...
    assert layers["layer1.1.conv1"]["in_kept"] == 15  # ... but the branch-only channel stays in the stream
    assert layers["layer2.0.conv1"]["in_kept"] == 15
    assert layers["layer3.0.conv1"]["in_kept"] == 31  # stage-2 stream channel, dead through the shortcut and adds
    assert layers["linear"] == {"in": 64, "out": 10, "in_kept": 64, "out_kept": 10}
    assert result.model.layer1_0_bn1.num_features == 15
    assert result.bias_maps, "a constant dead input of a padded 3x3 conv differs at the border: a per-position map"

    x = torch.randn(6, *INPUT)
    with torch.no_grad():
        reference, slimmed = killed_resnet(x), result.model(x)
    assert (slimmed - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_slimmed_layers_hold_exactly_the_structured_macs(killed_resnet, slimmed):
    counted = {layer.name: layer.macs for layer in _structured_stats(killed_resnet).layers}
    measured = flop_counter_macs(slimmed.model)
    assert {name: measured[name.replace(".", "_")] for name in counted} == counted
    assert sum(counted.values()) < sum(flop_counter_macs(killed_resnet)[name] for name in counted)


def _structured_stats(model):
    qc = QuantizationComparison(INPUT)
    qc.set_baseline(model)
    return qc.calculate_stats(model)


def test_an_op_without_a_channel_rule_is_named():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3), nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    with pytest.raises(SurgeryError, match=r"^cat \(cat\): unsupported op"):
        slim_model(Concat(), INPUT)


def test_packed_weights_rebuild_exactly_and_pick_the_smaller_zero_index():
    grid = Grid(step=torch.tensor([0.25]), shift=torch.tensor([0.1]), levels=7, bits=4)
    codes = torch.zeros(4000)
    codes[[5, 900, 3999]] = torch.tensor([3.0, -7.0, 1.0])
    sparse = torch.addcmul(codes * grid.step, torch.sign(codes), grid.shift)
    record = pack_weight(sparse, grid)
    assert record["index_kind"] == "runlength" and record["nnz"] == 3
    assert record["codes"].numel() == 2  # 3 codes × 4 bits
    assert torch.equal(unpack_weight(record), sparse)

    dense_codes = torch.randint(-7, 8, (64, 9)).float()
    dense = torch.addcmul(dense_codes * grid.step, torch.sign(dense_codes), grid.shift)
    record = pack_weight(dense, grid)
    assert record["index_kind"] == "bitmask" and record["index"].numel() == 64 * 9 // 8
    assert torch.equal(unpack_weight(record), dense)


def test_mac_parity_names_the_layer_that_differs():
    dense = {"conv": 1000, "fc": 40}
    row = {"epoch": 3, "layers/conv/structured_pruning": 1 - 250 / 1000, "layers/fc/structured_macs": 30}
    reported = reported_layer_macs(row, dense)
    assert reported == {"conv": 250, "fc": 30}
    check_mac_parity({"conv": 250, "fc": 30}, reported)
    with pytest.raises(ParityError, match=r"^MAC parity failed: fc \(measured 40, reported 30\)$"):
        check_mac_parity({"conv": 250, "fc": 40}, reported)


def write_run_dir(run_dir: Path) -> None:
    """A run dir as codeq.main leaves it, for the hand-killed ResNet with dead-zone quantizers: config,
    last.pt and the metrics.jsonl row the evaluator computes for those weights."""
    cfg = compose_run_config()
    model = instantiate_group(cfg, "model")
    kill_channels(model)
    evaluator = Evaluator(model, input_size=INPUT)
    attach_quantizers(cfg, model)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(cfg_yaml(cfg))
    row = {"epoch": 0, **evaluator.evaluate(model).as_metrics()}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    torch.save(
        {"version": FORMAT_VERSION, "epoch": 0, "model": model.state_dict(), "partial": None}, run_dir / "last.pt"
    )


def cfg_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_run_dir(run_dir)
    out, result = export_run(run_dir, repeats=1, batches=(1, 3))
    return run_dir, out, result


def test_export_writes_every_artefact_with_parity(exported):
    run_dir, out, result = exported
    assert out == run_dir / "export"
    assert json.loads((out / "export.json").read_text()) == result
    assert sorted(result["files"]) == sorted(p.name for p in out.iterdir())
    assert set(result["outputs"]["max_relative_difference"]) == {"eager", "torch_export", "onnxruntime"}
    assert all(d <= 1e-4 for d in result["outputs"]["max_relative_difference"].values())
    macs = result["macs"]
    row = json.loads((run_dir / "metrics.jsonl").read_text())
    assert macs["slimmed_measured"] == macs["reported_structured"] == row["compression/structured_macs"]
    assert macs["slimmed_measured"] < macs["dense"]
    sizes = result["sizes"]
    assert sizes["theoretical_code_bytes"] <= sizes["packed_layers_bytes"] < sizes["quantized_layers_dense_fp32_bytes"]
    assert {(r["engine"], r["batch"]) for r in result["latency"]["rows"]} >= {
        ("eager", 1),
        ("eager", 3),
        ("onnxruntime", 1),
        ("onnxruntime", 3),
    }


def test_exported_files_load_back(exported):
    _, out, _ = exported
    x = torch.randn(2, *INPUT)
    program = torch.export.load(out / "model.pt2").module()
    source = (out / "model.py").read_text()
    assert "codeq" not in source.split('"""', 2)[2]  # plain torch below the docstring
    spec = importlib.util.spec_from_file_location("slim_model_file", out / "model.py")
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    model = plain.load(out / "state_dict.pt")
    state = torch.load(out / "state_dict.pt", weights_only=True)
    rebuilt = load_packed(out / "packed.pt")
    assert rebuilt.keys() == state.keys() and all(torch.equal(rebuilt[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), program(x))


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "codeq.export", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys):
    run_dir, out, _ = exported
    before = (out / "export.json").read_text()
    assert export_main([str(run_dir)]) == 2
    assert capsys.readouterr().err == f"error: {out} exists; pass --force to replace it\n"
    assert (out / "export.json").read_text() == before

    foreign = tmp_path / "foreign"
    (foreign / ".hydra").mkdir(parents=True)
    (foreign / ".hydra" / "config.yaml").write_text("model: {name: resnet}\n")
    assert export_main([str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a config of this codeq version (no model._target_" in err
    assert err.count("\n") == 1 and not (foreign / "export").exists()

    no_checkpoint = tmp_path / "no_checkpoint"
    (no_checkpoint / ".hydra").mkdir(parents=True)
    (no_checkpoint / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    assert export_main([str(no_checkpoint), "--checkpoint", "best"]) == 2
    assert capsys.readouterr().err == (
        f"error: {no_checkpoint / 'best.pt'} not found: --checkpoint best needs best.pt in the run dir\n"
    )
    assert sorted(p.name for p in no_checkpoint.iterdir()) == [".hydra"]


@pytest.mark.slow
def test_a_trained_group_lasso_run_exports_with_parity(tmp_path):
    """A short real training run (synthetic data, dead-zone quantizers, group lasso), exported by the CLI."""
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "codeq.main",
            "dataset=synthetic",
            "dataset.input_size=[1,12,12]",
            "trainer.epochs=2",
            "logger=none",
            "sparsity=group_lasso",
            "sparsity.weight=0.05",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    done = run_export(run_dir, "--repeats", "2", "--batch-sizes", "1", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((run_dir / "export" / "export.json").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["epoch"] == last["epoch"] == 1
    assert result["macs"]["slimmed_measured"] == last["compression/structured_macs"]
    assert all(d <= 1e-4 for d in result["outputs"]["max_relative_difference"].values())
    assert "MACs" in done.stdout and "latency" in done.stdout


def test_report_shows_the_export_columns_when_export_json_is_present(exported, tmp_path):
    run_dir, _, result = exported
    plain_run = tmp_path / "plain"
    plain_run.mkdir()
    (plain_run / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    assert Report.of(collect_runs([plain_run])).columns == METRIC_COLUMNS

    report = Report.of(collect_runs([run_dir, plain_run]))
    header, cells = report.table()
    assert header[-6:-3] == ["measured MACs", "packed KB", "ORT speed-up"]
    onnx_rows = [r for r in result["latency"]["rows"] if r["engine"] == "onnxruntime"]
    largest = max(onnx_rows, key=lambda r: r["batch"])
    exported_row, plain_row = (dict(zip(header, row)) for row in cells)
    assert exported_row["measured MACs"] == f"{result['macs']['slimmed_measured']:,}"
    assert exported_row["packed KB"] == f"{result['sizes']['packed_bytes'] / 1024:.1f}"
    assert exported_row["ORT speed-up"] == f"{largest['speedup']:.2f}x"
    assert plain_row["measured MACs"] == plain_row["packed KB"] == plain_row["ORT speed-up"] == "-"
