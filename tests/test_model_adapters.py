"""torchvision/timm models by name, weights by name or file (written here: no network), the MLP, exclusion defaults."""

import logging

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from codeq.errors import ConfigError
from codeq.models import first_and_last_layers, mlp, resnet20, timm_model, torchvision_model
from codeq.quant import DeadZoneLDZCompander, attach_weight_quantizers

SMALL = (3, 32, 32)


def test_torchvision_model_by_name_takes_classes_and_size():
    model = torchvision_model("resnet18", num_classes=7, input_size=SMALL)
    assert isinstance(model, torchvision.models.ResNet) and model.training
    assert model(torch.randn(2, *SMALL)).shape == (2, 7)
    with pytest.raises(ConfigError, match="model.name='resnet19' is not a torchvision classification model"):
        torchvision_model("resnet19", num_classes=7, input_size=SMALL)
    with pytest.raises(ConfigError, match="takes RGB images"):
        torchvision_model("resnet18", num_classes=7, input_size=(1, 28, 28))


def test_an_architecture_that_cannot_take_the_image_size_says_so_in_one_line():
    with pytest.raises(ConfigError, match=r"model.name=alexnet cannot take 3x16x16 inputs \(.+\)"):
        torchvision_model("alexnet", num_classes=10, input_size=(3, 16, 16))


def test_weights_file_with_another_head_reinitialises_the_head(tmp_path, caplog):
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="codeq.models.weights"):
        model = torchvision_model("resnet18", num_classes=10, input_size=SMALL, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 10
    assert "classifier fc re-initialised (1000 -> 10 classes)" in caplog.text
    same = torchvision_model("resnet18", num_classes=1000, input_size=SMALL, weights=str(path))
    assert torch.equal(same.fc.weight, source.fc.weight)
    with pytest.raises(ConfigError, match="does not fit ResNet: missing"):
        torchvision_model("resnet34", num_classes=10, input_size=SMALL, weights=str(path))
    with pytest.raises(ConfigError, match="no such file"):
        torchvision_model("resnet18", num_classes=10, input_size=SMALL, weights=str(tmp_path / "absent.pth"))


def test_weights_name_reads_torchvisions_cache_and_says_where_to_put_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", _offline)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", _offline)
    with pytest.raises(ConfigError, match=f"cannot download .*; put that file at {expected}, or pass model.weights="):
        torchvision_model("resnet18", num_classes=10, input_size=SMALL, weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="allowed: DEFAULT, IMAGENET1K_V1"):
        torchvision_model("resnet18", num_classes=10, input_size=SMALL, weights="IMAGENET9K")
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = torchvision.models.resnet18()
    expected.parent.mkdir(parents=True)
    torch.save(source.state_dict(), expected)
    model = torchvision_model("resnet18", num_classes=5, input_size=SMALL, weights="IMAGENET1K_V1")
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def _offline(*args, **kwargs):
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


def test_tinyvit_from_scratch_on_32x32_and_weights_from_a_safetensors_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="codeq.models.adapters"):
        model = timm_model("tiny_vit_5m_224", num_classes=10, input_size=SMALL)
    assert "takes no img_size argument" in caplog.text
    assert model(torch.randn(2, *SMALL)).shape == (2, 10)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = timm_model("tiny_vit_5m_224", num_classes=100, input_size=SMALL, weights=str(path))
    assert torch.equal(loaded.patch_embed.conv1.conv.weight, model.patch_embed.conv1.conv.weight)
    assert loaded.head.fc.out_features == 100
    with pytest.raises(ConfigError, match="not a pretrained tag of tiny_vit_5m_224; allowed: default, dist_in22k"):
        timm_model("tiny_vit_5m_224", num_classes=10, input_size=SMALL, weights="in9k")
    with pytest.raises(ConfigError, match="model.name='tiny_vit_1m' is not a timm model"):
        timm_model("tiny_vit_1m", num_classes=10, input_size=SMALL)


def test_timm_gets_img_size_where_the_architecture_takes_it():
    model = timm_model("vit_tiny_patch16_224", num_classes=10, input_size=SMALL)
    assert tuple(model.patch_embed.img_size) == (32, 32) and model.pos_embed.shape[1] == 4 + 1


def test_mlp_layers_and_output():
    model = mlp(num_classes=10, input_size=(1, 28, 28), hidden_sizes=[64, 32])
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["fc0", "fc1", "classifier"]
    assert model.fc0.in_features == 784 and model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ConfigError, match="model.hidden_sizes"):
        mlp(num_classes=10, hidden_sizes=[0])


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: resnet20(), ["conv1", "linear"]),
        (lambda: torchvision_model("resnet50", 10, SMALL), ["conv1", "fc"]),
        (lambda: torchvision_model("mobilenet_v2", 10, SMALL), ["features.0.0", "classifier.1"]),
        (lambda: torchvision_model("efficientnet_b0", 10, SMALL), ["features.0.0", "classifier.1"]),
        (lambda: timm_model("tiny_vit_5m_224", 10, SMALL), ["patch_embed.conv1.conv", "head.fc"]),
        (lambda: mlp(10), ["fc0", "classifier"]),
    ],
    ids=["resnet20", "resnet50", "mobilenet_v2", "efficientnet_b0", "tiny_vit_5m_224", "mlp"],
)
def test_exclusion_defaults_are_each_familys_stem_and_classifier(build, expected, caplog):
    model = build()
    assert first_and_last_layers(model) == expected
    with caplog.at_level(logging.INFO, logger="codeq.quant.parametrize"):
        attach_weight_quantizers(model, first_and_last_layers(model), DeadZoneLDZCompander)
    assert f"; not quantized: {', '.join(expected)}" in caplog.text
