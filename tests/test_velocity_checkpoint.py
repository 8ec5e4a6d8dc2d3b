"""Velocity registry, input checks, checkpoint round trips and verification."""

import pytest
import torch

from lfm_core.checkpoint import load_config, load_velocity, save_checkpoint, save_velocity
from lfm_core.errors import ConfigError
from lfm_core.velocity import VELOCITY_SIZES, VelocityConfig, build_velocity, count_parameters


@pytest.mark.parametrize("name", ["unet-xs", "dit-xs"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_velocity_shapes_and_conditioning(name, num_classes):
    torch.manual_seed(0)
    model = build_velocity(VelocityConfig(name=name, num_classes=num_classes, width=16))
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if num_classes:
        labelled = model(x, t, class_labels=torch.tensor([1, 2, 3]))
        assert torch.equal(model(x, t, class_labels=torch.full((3,), 10)), out)
        # DiT's adaLN-Zero starts at zero output; perturb so labels must matter.
        for p in model.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
        assert not torch.equal(model(x, t, class_labels=torch.tensor([1, 2, 3])), model(x, t))
        assert labelled.shape == x.shape


# Parameter counts computed once from the architectures and written in: a change to a network
# or to how `width` overrides its base width (unet-s: 32, dit-xs: 128) shows up here.
@pytest.mark.parametrize(
    ("name", "width", "count"),
    [
        ("unet-s", 8, 45_404),
        ("unet-s", 16, 177_716),
        ("unet-s", 32, 703_076),
        ("unet-s", None, 703_076),
        ("dit-xs", 64, 317_520),
        ("dit-xs", None, 1_257_616),
    ],
)
def test_width_knob_sets_the_exact_size(name, width, count):
    assert count_parameters(build_velocity(VelocityConfig(name=name, width=width))) == count


def test_bad_model_inputs_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        build_velocity(VelocityConfig(name="unet-xxl"))
    assert "model: unknown value 'unet-xxl'; allowed: " + ", ".join(VELOCITY_SIZES) == str(
        err.value
    )
    model = build_velocity(VelocityConfig(name="dit-xs", width=16))
    with pytest.raises(
        ConfigError,
        match=r"input shape \(4, 16, 16\) does not fit model 'dit-xs'; expected \(4, 8, 8\)",
    ):
        model(torch.randn(1, 4, 16, 16), torch.rand(1))


def test_save_load_round_trip_bit_exact(tmp_path):
    torch.manual_seed(1)
    model = build_velocity(VelocityConfig(name="unet-xs", num_classes=10, width=8))
    save_velocity(tmp_path / "ckpt", model, {"note": "round trip"})
    loaded = load_velocity(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert load_config(tmp_path / "ckpt")["note"] == "round trip"
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert torch.equal(model.eval()(x, t), loaded(x, t))


def test_missing_truncated_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint file not found: .*config.json"):
        load_velocity(tmp_path / "nowhere")
    model = build_velocity(VelocityConfig(name="unet-xs", width=8))
    save_velocity(tmp_path / "a", model)
    weights = tmp_path / "a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        load_velocity(tmp_path / "a")
    other = build_velocity(VelocityConfig(name="unet-xs", width=16))
    save_checkpoint(tmp_path / "b", {"model": other}, {"velocity": model.config.to_dict()})
    with pytest.raises(ConfigError, match="does not fit the model"):
        load_velocity(tmp_path / "b")
