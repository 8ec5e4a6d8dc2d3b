"""Velocity registry, input checks, checkpoint round trips and verification."""

import pytest
import torch

from lfm_core.checkpoint import load_config, load_velocity, save_checkpoint, save_velocity
from lfm_core.errors import ConfigError
from lfm_core.velocity import VELOCITY_SIZES, VelocityConfig, build_velocity, count_parameters


@pytest.mark.parametrize("name", ["unet-xs", "dit-xs", "punet-s"])
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
        ("dit-xs", 64, 329_808),
        ("dit-xs", None, 1_274_000),
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


def _meta(name, **kwargs):
    with torch.device("meta"):
        return build_velocity(VelocityConfig(name=name, **kwargs))


# The DiT paper's Table 1 (Peebles & Xie, 2023), class-conditional on 32x32x4 latents.
@pytest.mark.parametrize(
    ("name", "millions", "heads"),
    [("dit-s", 33, 6), ("dit-b", 130, 12), ("dit-l", 458, 16), ("dit-xl", 675, 16)],
)
def test_dit_sizes_match_the_dit_paper(name, millions, heads):
    model = _meta(name, in_channels=4, sample_size=32, num_classes=1000)
    assert abs(count_parameters(model) / (millions * 1e6) - 1) < 0.01
    assert all(block.heads == heads for block in model.blocks)


def test_dit_patch_sizes_4_and_8():
    for patch in (4, 8):
        model = build_velocity(VelocityConfig(name=f"dit-s/{patch}", in_channels=4, sample_size=16))
        assert model.patch == patch and model.pos.shape == ((16 // patch) ** 2, 384)
        x = torch.randn(2, 4, 16, 16)
        assert model(x, torch.rand(2)).shape == x.shape
    with pytest.raises(ConfigError, match="divisible by 8 for DiT /8"):
        build_velocity(VelocityConfig(name="dit-s/8", in_channels=4, sample_size=12))


def test_dit_embeddings_as_the_papers_code():
    """Label table N(0, 0.02) (not N(0, 1)); time: raw t over 256 frequencies, then the MLP."""
    torch.manual_seed(0)
    model = build_velocity(VelocityConfig(name="dit-s", in_channels=4, num_classes=1000))
    assert model.label_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.time_mlp[0].in_features == 256
    assert model.time_mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)


# The paper's UNet-S/M/L: these counts are those of the released src/unet_fm.py
# (`_make_unet(size, input_size=32, in_channels=4, num_classes=1)`), built on the meta device.
@pytest.mark.parametrize(
    ("name", "count"),
    [("punet-s", 57_133_924), ("punet-m", 133_753_924), ("punet-l", 237_697_796)],
)
def test_paper_unet_sizes_match_the_papers_code(name, count):
    assert count_parameters(_meta(name, in_channels=4, sample_size=32)) == count


def test_paper_unet_forward_shape_and_labels():
    torch.manual_seed(0)
    model = build_velocity(
        VelocityConfig(name="punet-s", in_channels=4, sample_size=8, num_classes=3, width=32)
    )
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    out = model(x, t, class_labels=torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, model(x, t))
