"""Compose the repo's Hydra config and instantiate every option of every group the way codeq.main does."""

from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from codeq.errors import ConfigError
from codeq.loggers import CsvLogger, NullLogger, WandbLogger
from codeq.main import attach_quantizers, instantiate_group, sparsity_layer_of, sparsity_of
from codeq.quant import DeadZoneLDZCompander, UniformSymmetric, quantized_layers
from codeq.sparsity import Proximal
from codeq.trainer import TrainerConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["dataset=synthetic"]
# ResNet-20: stem conv1, 18 block convs, linear. The default exclude_layers (auto: first and last layer) leaves the 18.
RESNET20_BLOCK_CONVS = 18


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_its_options():
    assert options("model") == [
        "mlp",
        "resnet110",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "timm",
        "torchvision",
    ]
    assert options("quantizer") == ["deadzone", "deadzone_fixed", "none", "uniform"]
    assert options("optimizer") == ["adamw", "sgd"]
    assert options("lr_scheduler") == ["constant", "cosine", "cosine_warmup", "step"]
    assert options("logger") == ["csv", "none", "wandb"]
    assert set(options("experiment")) >= {"paper_resnet20_cifar10", "paper_resnet20_cifar10_4bit", "quickstart"}
    assert set(options("experiment")) >= {"baseline", "group_lasso_delay50", "block_lasso_cosine", "l1_kernel_delay50"}
    for group in (
        "model",
        "dataset",
        "quantizer",
        "sparsity",
        "schedule",
        "optimizer",
        "lr_scheduler",
        "trainer",
        "logger",
    ):
        for option in options(group):
            assert make_cfg(f"{group}={option}")[group].get("_target_"), f"{group}/{option}"


def test_defaults_and_run_dirs():
    cfg = make_cfg(hydra=True)
    assert cfg.seed == 0
    assert cfg.dataset.name == "cifar10"
    assert cfg.trainer.epochs == 300 and cfg.trainer.device == "auto" and cfg.trainer.resume is False
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith("outputs/") and cfg.hydra.sweep.dir.startswith("multirun/")
    assert cfg.dataset.root == cfg.paths.data_dir


@pytest.mark.parametrize("model", [option for option in options("model") if option.startswith("resnet")])
def test_every_resnet_takes_classes_and_channels_from_the_dataset(model):
    cfg = make_cfg(f"model={model}", "dataset=fashion_mnist")
    net = instantiate_group(cfg, "model")
    assert net.conv1.in_channels == 1 and net.linear.out_features == 10
    depth = int(model.removeprefix("resnet"))
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == depth - 1


def test_cifar100_sets_100_classes():
    cfg = make_cfg("dataset=cifar100")
    assert (cfg.model.num_classes, cfg.model.in_channels) == (100, 3)


def test_synthetic_dataset_instantiates_on_the_device():
    cfg = make_cfg(*FAST, "dataset.train_size=20", "dataset.test_size=10", "dataset.batch_size=8")
    data = instantiate_group(cfg, "dataset", device=torch.device("cpu"))
    assert (data.num_train, data.num_test, data.num_classes) == (20, 10, 10)
    x, y = next(iter(data.train_batches(0)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion_mnist"])
def test_real_datasets_without_files_name_the_root(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("codeq.data.DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    cfg = make_cfg(f"dataset={dataset}", f"dataset.root={tmp_path}", "dataset.download=false")
    with pytest.raises(ConfigError, match="dataset.root"):
        instantiate_group(cfg, "dataset", device=torch.device("cpu"))


@pytest.mark.parametrize("quantizer", options("quantizer"))
def test_every_quantizer_attaches_to_the_block_convs(quantizer):
    cfg = make_cfg(*FAST, f"quantizer={quantizer}")
    model = instantiate_group(cfg, "model")
    attached = attach_quantizers(cfg, model)
    layers = list(quantized_layers(model))
    if quantizer == "none":
        assert attached == [] and layers == []
        assert sparsity_layer_of(model, None) == "conv1"
        return
    assert len(attached) == RESNET20_BLOCK_CONVS
    assert "conv1" not in attached and "linear" not in attached
    assert sparsity_layer_of(model, None) == "layer1.0.conv1"
    quantizer_type = UniformSymmetric if quantizer == "uniform" else DeadZoneLDZCompander
    assert all(isinstance(fq.quantizer, quantizer_type) for _, _, fq in layers)
    if quantizer == "deadzone_fixed":
        assert all(not fq.quantizer.learnable_bit and fq.quantizer.fixed_bit_val == 4 for _, _, fq in layers)
    if quantizer == "deadzone":
        assert all(fq.quantizer.learnable_bit and fq.quantizer.learnable_deadzone for _, _, fq in layers)
    if quantizer == "uniform":
        assert all(fq.quantizer.bits == 8 for _, _, fq in layers)


def test_exclude_layers_globs_and_unknown_sparsity_layer():
    cfg = make_cfg(*FAST, "quantizer.exclude_layers=[conv1,linear,layer3.*]")
    model = instantiate_group(cfg, "model")
    attached = attach_quantizers(cfg, model)
    assert len(attached) == 12 and not any(name.startswith("layer3") for name in attached)
    with pytest.raises(ConfigError, match="trainer.sparsity_layer='nope'.*allowed: conv1, layer1.0.conv1"):
        sparsity_layer_of(model, "nope")


@pytest.mark.parametrize("sparsity", options("sparsity"))
def test_every_sparsity_loss(sparsity):
    cfg = make_cfg(*FAST, f"sparsity={sparsity}")
    fn, weight = sparsity_of(cfg)
    if sparsity == "none":
        assert fn is None and weight == 0.0
        return
    assert weight == cfg.sparsity.weight > 0
    model = instantiate_group(cfg, "model")
    if isinstance(fn, Proximal):  # a step after the optimizer's: a large η zeroes filters of the block convs
        fn.step(model, 1.0)
        assert (model.layer1[0].conv1.weight.flatten(1) == 0).all(dim=1).any()
        return
    value = fn(model)
    assert value.ndim == 0 and value.item() > 0


def test_sparsity_weight_is_validated_and_zero_disables_the_term():
    assert sparsity_of(make_cfg(*FAST, "sparsity=group_lasso", "sparsity.weight=0")) == (None, 0.0)
    with pytest.raises(ConfigError, match="sparsity.weight"):
        sparsity_of(make_cfg(*FAST, "sparsity=group_lasso", "sparsity.weight=-1"))
    with pytest.raises(ConfigError, match="sparsity.block_size"):
        sparsity_of(make_cfg(*FAST, "sparsity=group_lasso_blocks", "sparsity.block_size=0"))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("linear_warmup", [0.0, 1 / 3, 2 / 3, 1.0]),  # delay 0, ramp 3
        ("cosine_anneal", [0.0, 0.25, 0.75, 1.0]),  # delay 0: ½(1 − cos(π e/3)), cos(π/3) = ½
    ],
)
def test_every_schedule(schedule, expected):
    fn = instantiate_group(make_cfg(*FAST, f"schedule={schedule}"), "schedule")
    assert [fn(epoch, 3) for epoch in range(4)] == pytest.approx(expected)


def test_optimizer_has_three_groups_with_their_settings():
    cfg = make_cfg(
        *FAST,
        "optimizer.lr=0.01",
        "optimizer.weight_decay=0.1",
        "optimizer.lr_dz=0.02",
        "optimizer.weight_decay_dz=0.2",
        "optimizer.lr_bit=0.03",
        "optimizer.weight_decay_bit=0.3",
    )
    model = instantiate_group(cfg, "model")
    attach_quantizers(cfg, model)
    factory = instantiate_group(cfg, "optimizer")
    assert isinstance(factory, partial)
    optimizer = factory(model)
    groups = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    weights = sum(1 for name, _ in model.named_parameters() if not name.endswith(("logit_dz", "logit_bit")))
    assert groups == {"weights": (0.01, 0.1, weights), "deadzone": (0.02, 0.2, 18), "bits": (0.03, 0.3, 18)}


def test_optimizer_without_quantizers_has_only_the_weight_group():
    cfg = make_cfg(*FAST, "quantizer=none")
    model = instantiate_group(cfg, "model")
    optimizer = instantiate_group(cfg, "optimizer")(model)
    assert [g["name"] for g in optimizer.param_groups] == ["weights"]


def test_trainer_group_builds_its_config():
    trainer = instantiate_group(make_cfg(*FAST, "trainer.epochs=7", "trainer.viz_interval=2"), "trainer")
    assert isinstance(trainer, TrainerConfig)
    assert (trainer.epochs, trainer.viz_interval, trainer.precision, trainer.compile) == (7, 2, "fp32", False)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger(logger, tmp_path):
    cfg = make_cfg(*FAST, f"logger={logger}", *(["logger.mode=disabled"] if logger == "wandb" else []))
    factory = instantiate_group(cfg, "logger")
    instance = factory(run_dir=tmp_path, config={"seed": 0}, name="test", group=None, job_type=None, run_id=None)
    expected = {"none": NullLogger, "csv": CsvLogger, "wandb": WandbLogger}[logger]
    assert type(instance) is expected
    instance.log_metrics({"epoch": 0, "eval/accuracy": 0.5}, step=0)
    instance.finish("completed")
    if logger == "csv":
        assert (tmp_path / "metrics.csv").read_text() == "epoch,eval/accuracy\n0,0.5\n"


def test_paper_presets():
    cfg = make_cfg("experiment=paper_resnet20_cifar10")
    assert (cfg.model._target_, cfg.dataset.name, cfg.dataset.batch_size, cfg.trainer.epochs) == (
        "codeq.models.resnet20",
        "cifar10",
        512,
        300,
    )
    assert OmegaConf.to_container(cfg.optimizer, resolve=True) | {"betas": None} == {
        "_target_": "codeq.optim.adamw",
        "_partial_": True,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "lr_dz": 1e-3,
        "weight_decay_dz": 0.01,
        "lr_bit": 1e-3,
        "weight_decay_bit": 0.01,
        "betas": None,
    }
    assert cfg.quantizer.learnable_bit is True
    four_bit = make_cfg("experiment=paper_resnet20_cifar10_4bit")
    assert four_bit.quantizer.learnable_bit is False and four_bit.quantizer.fixed_bit_val == 4
    assert (four_bit.dataset.batch_size, four_bit.trainer.epochs) == (512, 300)


@pytest.mark.parametrize(
    "preset, sparsity, weight, schedule",
    [
        ("baseline", "codeq.sparsity.no_sparsity", 0.0, {"_target_": "codeq.schedules.constant", "value": 1.0}),
        (
            "group_lasso_delay50",
            "codeq.sparsity.group_lasso_channels",
            5e-4,
            {"_target_": "codeq.schedules.linear_warmup", "delay": 50, "ramp": 50},
        ),
        (
            "block_lasso_cosine",
            "codeq.sparsity.group_lasso_blocks",
            1e-3,
            {"_target_": "codeq.schedules.cosine_anneal", "delay": 30},
        ),
        (
            "l1_kernel_delay50",
            "codeq.sparsity.l1_kernel_sparsity",
            3e-5,
            {"_target_": "codeq.schedules.linear_warmup", "delay": 50, "ramp": 50},
        ),
    ],
)
def test_example_presets_are_the_paper_run_with_a_loss_and_schedule(preset, sparsity, weight, schedule):
    cfg = make_cfg(f"experiment={preset}")
    paper = make_cfg("experiment=paper_resnet20_cifar10")
    assert (cfg.sparsity._target_, cfg.sparsity.weight) == (sparsity, weight)
    assert OmegaConf.to_container(cfg.schedule) == schedule
    for group in ("model", "dataset", "quantizer", "optimizer", "lr_scheduler", "trainer"):
        assert cfg[group] == paper[group], group
    if preset == "block_lasso_cosine":
        assert cfg.sparsity.block_size == 4


def test_quickstart_preset():
    cfg = make_cfg("experiment=quickstart")
    assert (cfg.dataset.name, cfg.model.in_channels, cfg.quantizer._target_) == (
        "fashion_mnist",
        1,
        "codeq.quant.DeadZoneLDZCompander",
    )
    assert cfg.name == "quickstart"
