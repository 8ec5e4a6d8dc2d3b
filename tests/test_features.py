"""Feature extractors: the embedded classifier (accuracy, cache) and hub loaders on tiny models."""

import json

import huggingface_hub
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from lfm_core.arcface import IResNet
from lfm_core.classifier import (
    MNIST_CLASSIFIER_DIR,
    classifier_accuracy,
    load_or_train_mnist_classifier,
)
from lfm_core.data import load_dataset
from lfm_core.errors import ConfigError
from lfm_core.features import DINOV2_BASE_ID, DINOV2_ID, build_feature_extractor
from lfm_core.metrics import fid

transformers = pytest.importorskip("transformers")

MIN_HELDOUT_ACCURACY = 0.97


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """Train the mnist5k classifier once for this module (one thread: the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = tmp_path_factory.mktemp("features")
        load_or_train_mnist_classifier(cache, progress=False)
    finally:
        torch.set_num_threads(threads)
    return cache


def test_mnist_classifier_accuracy_is_measured_and_saved(mnist_cache):
    extractor = build_feature_extractor("mnist_classifier", cache_dir=mnist_cache)
    heldout = load_dataset("mnist5k", "heldout")
    accuracy = classifier_accuracy(extractor.classifier, heldout.images, heldout.labels)
    saved = json.loads((mnist_cache / MNIST_CLASSIFIER_DIR / "config.json").read_text())
    assert len(heldout) == 1000 and accuracy >= MIN_HELDOUT_ACCURACY
    assert accuracy == extractor.heldout_accuracy == saved["config"]["heldout_accuracy"]


def test_mnist_features_are_deterministic_batched_and_reload(mnist_cache):
    images = load_dataset("mnist5k", "heldout").images[:50]
    extractor = build_feature_extractor("mnist_classifier", cache_dir=mnist_cache)
    features = extractor(images)
    assert features.shape == (50, extractor.dim) == (50, 128) and features.min() >= 0
    extractor.batch_size = 7
    assert torch.allclose(extractor(images), features, atol=1e-5)
    again = build_feature_extractor("mnist_classifier", path=mnist_cache / MNIST_CLASSIFIER_DIR)
    assert torch.equal(again(images), features)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Randomly initialised DINOv2 and CLIP vision models saved like hub snapshots."""
    root = tmp_path_factory.mktemp("hub")
    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    transformers.Dinov2Model(transformers.Dinov2Config(**small, patch_size=14)).save_pretrained(
        root / "dinov2"
    )
    clip_config = transformers.CLIPVisionConfig(
        **small, image_size=32, patch_size=8, projection_dim=16
    )
    transformers.CLIPVisionModelWithProjection(clip_config).save_pretrained(root / "clip")
    return root


@pytest.mark.parametrize(("name", "dim"), [("dinov2", 32), ("clip", 16)])
def test_hub_extractors_load_local_models(tiny_models, name, dim):
    extractor = build_feature_extractor(name, path=tiny_models / name)
    gray = torch.rand(5, 1, 32, 32) * 2 - 1
    features = extractor(gray)
    assert extractor.dim == dim and features.shape == (5, dim) and torch.isfinite(features).all()
    # Grayscale is replicated to RGB before the model's own normalisation.
    assert torch.allclose(extractor(gray.expand(-1, 3, -1, -1)), features, atol=1e-5)


def test_torchmetrics_fid_takes_an_extractor_as_its_feature_module(tiny_models):
    extractor = build_feature_extractor("clip", path=tiny_models / "clip")
    g = torch.Generator().manual_seed(0)
    real, fake = (torch.rand(40, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid(extractor(fake), extractor(real)) == pytest.approx(metric.compute().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["dinov2", "dinov2-base", "clip"])
def test_missing_hub_model_offline_is_a_one_line_config_error(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as info:
        build_feature_extractor(name, cache_dir="/nonexistent/hub-cache")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}: cannot load")
    ids = {"dinov2": DINOV2_ID, "dinov2-base": DINOV2_BASE_ID, "clip": "clip-vit-base-patch32"}
    assert ids[name] in message


def test_inception_without_torch_fidelity_is_a_one_line_config_error(monkeypatch):
    import torchmetrics.utilities.imports as imports

    # Whether or not torch-fidelity is installed here: the extractor reads the flag when built.
    monkeypatch.setattr(imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ConfigError, match="^inception: needs torch-fidelity"):
        build_feature_extractor("inception")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: build_feature_extractor("facenet"),
            "feature_extractor: unknown value 'facenet'; allowed: mnist_classifier, dinov2, "
            "dinov2-base, clip, inception, arcface",
        ),
        (
            lambda: build_feature_extractor("mnist_classifier", path="/nonexistent/classifier"),
            "checkpoint file not found: /nonexistent/classifier/config.json",
        ),
    ],
)
def test_bad_inputs_give_one_line_config_errors(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message


def test_wrong_image_shape_is_a_config_error(mnist_cache):
    extractor = build_feature_extractor("mnist_classifier", cache_dir=mnist_cache)
    with pytest.raises(ConfigError, match="expected images"):
        extractor(torch.zeros(2, 32, 32))


def test_dinov2_base_is_the_papers_vit_b14_and_loads_a_local_copy(tiny_models):
    assert DINOV2_BASE_ID == "facebook/dinov2-base"
    extractor = build_feature_extractor("dinov2-base", path=tiny_models / "dinov2")
    assert extractor.name == "dinov2-base" and extractor.dim == 32
    assert extractor(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 32)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_arcface_loads_a_local_iresnet_state_dict(tmp_path, suffix):
    """A tiny randomly initialised IResNet (blocks 1, 2, 1, 1; base 8; 16-d), saved as insightface
    saves its backbones; the loader reads the architecture off the keys."""
    torch.manual_seed(0)
    net = IResNet((1, 2, 1, 1), base_width=8, num_features=16).eval()
    for module in net.modules():  # non-trivial running statistics, so BN must load too
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    extractor = build_feature_extractor("arcface", path=path)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    features = extractor(images)
    assert extractor.dim == 16 and features.shape == (3, 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    resized = torch.nn.functional.interpolate(
        (images + 1) / 2, size=(112, 112), mode="bicubic", antialias=True
    ).clamp(0, 1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(resized * 2 - 1), dim=1)
    torch.testing.assert_close(features, expected)


def test_arcface_without_or_with_a_bad_file_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="arcface: needs path="):
        build_feature_extractor("arcface")
    with pytest.raises(ConfigError, match="does not exist"):
        build_feature_extractor("arcface", path=tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="is not an IResNet state dict"):
        build_feature_extractor("arcface", path=tmp_path / "other.pth")
