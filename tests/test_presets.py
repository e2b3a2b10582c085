"""The paper's ImageNet and TinyViT presets compose with its hyperparameters and each runs one tiny epoch on
generated data standing in (JPEG trees at 32x32 crops, synthetic CIFAR-sized images), weights from a file."""

import json

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from image_trees import write_jpeg_tree
from test_cli import run_in_process
from test_config import CONF

from codeq.rundir import read_metrics

# epochs, batch, logit lr, λ_dz, λ_bit (the paper's table)
PAPER = {
    "paper_resnet18_imagenet": (120, 512, 1e-4, 0.02, 0.1),
    "paper_resnet50_imagenet": (120, 256, 1e-4, 0.02, 0.05),
    "paper_tinyvit_cifar10": (200, 128, 1e-3, 0.5, 0.75),
}
TINY_RUN = ["trainer.epochs=1", "trainer.device=cpu", "trainer.viz_interval=1", "logger=none"]


@pytest.mark.parametrize("preset", PAPER)
def test_preset_has_the_papers_hyperparameters(preset):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"])
    epochs, batch, logit_lr, lambda_dz, lambda_bit = PAPER[preset]
    assert (cfg.trainer.epochs, cfg.dataset.batch_size) == (epochs, batch)
    assert cfg.optimizer.lr_dz == cfg.optimizer.lr_bit == logit_lr
    assert (cfg.optimizer.weight_decay_dz, cfg.optimizer.weight_decay_bit) == (lambda_dz, lambda_bit)
    assert cfg.quantizer.learnable_bit and cfg.quantizer.exclude_layers == "auto"
    if "imagenet" in preset:
        assert cfg.model.weights == "IMAGENET1K_V1" and cfg.dataset.name == "imagenet"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_jpeg_tree(tmp_path_factory.mktemp("imagenet"), classes=("n01", "n02"), per_class=4)


def run_preset(tmp_path, monkeypatch, *overrides):
    run_dir = tmp_path / "run"
    code = run_in_process(*overrides, *TINY_RUN, f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch)
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    (row,) = read_metrics(run_dir / "metrics.jsonl")
    assert row["compression/structured_bops_ratio"] > 1 and row["compression/unstructured_bops_ratio"] > 1
    return run_dir, (run_dir / "main.log").read_text()


@pytest.mark.parametrize(
    "preset, name", [("paper_resnet18_imagenet", "resnet18"), ("paper_resnet50_imagenet", "resnet50")]
)
def test_imagenet_preset_fine_tunes_from_weights_for_one_tiny_epoch(preset, name, tree, tmp_path, monkeypatch):
    weights = tmp_path / f"{name}.pth"
    torch.save(torchvision.models.get_model(name).state_dict(), weights)  # ImageNet-shaped: 1000 classes
    _, log = run_preset(
        tmp_path,
        monkeypatch,
        f"experiment={preset}",
        f"dataset.root={tree}",
        "dataset.image_size=32",
        "dataset.resize_size=36",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        f"model.weights={weights}",
    )
    assert "classifier fc re-initialised (1000 -> 2 classes)" in log
    assert "; not quantized: conv1, fc" in log


def test_tinyvit_preset_trains_from_scratch_on_32x32_for_one_tiny_epoch(tmp_path, monkeypatch):
    _, log = run_preset(
        tmp_path,
        monkeypatch,
        "experiment=paper_tinyvit_cifar10",
        "dataset=synthetic",
        "dataset.train_size=16",
        "dataset.test_size=8",
        "dataset.batch_size=8",
    )
    assert "; not quantized: patch_embed.conv1.conv, head.fc" in log


def test_torchvision_model_on_an_image_folder_from_the_cli(tree, tmp_path, monkeypatch):
    run_dir, log = run_preset(
        tmp_path,
        monkeypatch,
        "model=torchvision",
        "model.name=resnet18",
        "dataset=imagefolder",
        f"dataset.root={tree}",
        "dataset.image_size=32",
        "dataset.resize_size=36",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
    )
    assert (run_dir / "last.pt").is_file() and (run_dir / "channel_liveness.png").is_file()
    assert "imagefolder: 8 train / 4 val images in 2 classes" in log
