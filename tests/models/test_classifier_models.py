import subprocess
import sys

import pytest
import torch

from raugment.models.classifier import MODELS, build_model, load_classifier, save_classifier, write_tiny_classifier


def test_registry_has_the_three_models_and_names_them_on_error():
    assert {"resnet50", "resnet18", "tiny_cnn"} <= set(MODELS.names())
    with pytest.raises(ValueError, match="known: .*resnet50"):
        build_model("vgg", 10)


def test_models_have_requested_outputs_and_resnet50_is_the_real_architecture():
    x = torch.randn(2, 3, 32, 32)
    assert build_model("tiny_cnn", 7)(x).shape == (2, 7)
    assert build_model("resnet18", 5)(x).shape == (2, 5)
    r50 = build_model("resnet50", 1000)
    # torchvision's ResNet-50 has 25,557,032 parameters at 1000 classes
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032


def test_tiny_bundle_round_trips_through_the_loading_path(tmp_path):
    out = write_tiny_classifier(tmp_path / "classifier", seed=3)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    model = load_classifier(out)
    torch.manual_seed(3)
    fresh = build_model("tiny_cnn", 4).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(model(x), fresh(x))
    assert not model.training


def test_save_then_load_keeps_trained_weights(tmp_path):
    model = build_model("tiny_cnn", 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_classifier(model, "tiny_cnn", 3, tmp_path / "b", extra={"image_size": 32})
    loaded = load_classifier(tmp_path / "b")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), loaded(x))


def test_load_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        load_classifier(tmp_path)


def test_importing_the_module_does_not_import_torch():
    code = "import sys, raugment.models.classifier; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
