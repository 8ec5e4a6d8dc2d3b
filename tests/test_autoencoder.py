"""AutoencoderKL: training stores the measured scale, encode / decode, save and load, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lfm_core.autoencoder import (
    AutoencoderConfig,
    build_autoencoder,
    decode,
    encode,
    load_autoencoder,
    reconstruction_psnr,
    train_autoencoder,
)
from lfm_core.data import load_dataset
from lfm_core.errors import ConfigError

TINY = AutoencoderConfig(
    block_out_channels=(8, 8),
    norm_num_groups=4,
    latent_channels=2,
    sample_size=16,
    epochs=1,
    batch_size=16,
)
NUM_IMAGES = 48


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(48, 1, 16, 16) digits in [-1, 1], upsampled from 8x8."""
    digits = load_dataset("digits").images[:NUM_IMAGES]
    return F.interpolate(digits, size=TINY.sample_size, mode="bilinear").clamp(-1, 1)


@pytest.fixture(scope="module")
def vae(images: torch.Tensor):
    return train_autoencoder(images, TINY, progress=False, device="cpu")


def test_training_stores_the_measured_scaling_factor(vae, images: torch.Tensor) -> None:
    with torch.no_grad():
        mode = vae.encode(images).latent_dist.mode().double()
    assert vae.config.scaling_factor == pytest.approx(1 / mode.std().item(), rel=1e-6)
    latents = encode(vae, images, progress=False)
    assert latents.std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(latents, mode.float() * vae.config.scaling_factor, atol=1e-5)


def test_training_is_deterministic_and_learns(vae, images: torch.Tensor) -> None:
    again = train_autoencoder(images, TINY, progress=False, device="cpu")
    for (name, a), (_, b) in zip(vae.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    untrained = build_autoencoder(TINY)
    untrained.register_to_config(scaling_factor=1.0)
    assert reconstruction_psnr(vae, images) > reconstruction_psnr(untrained, images)


def test_encode_decode_shapes_and_range(vae, images: torch.Tensor) -> None:
    latents = encode(vae, images, progress=False)
    # Two blocks downsample once: 16x16 images give 2x8x8 latents.
    assert latents.shape == (NUM_IMAGES, 2, 8, 8) and latents.dtype == torch.float32
    recon = decode(vae, latents, batch_size=5, progress=False)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1


def test_encode_is_batch_size_independent(vae, images: torch.Tensor) -> None:
    whole = encode(vae, images, batch_size=NUM_IMAGES, progress=False)
    for batch_size in (1, 7, 16):
        # Equal up to float rounding: CPU convolutions may pick kernels by batch size.
        parts = encode(vae, images, batch_size=batch_size, progress=False)
        assert torch.allclose(parts, whole, rtol=0, atol=1e-5)


def test_psnr_formula(vae, images: torch.Tensor) -> None:
    recon = decode(vae, encode(vae, images, progress=False), progress=False)
    mse = (recon.double() - images.double()).pow(2).mean()
    expected = 10 * torch.log10(4 / mse).item()  # peak-to-peak 2 over [-1, 1]
    assert reconstruction_psnr(vae, images, batch_size=7) == pytest.approx(expected, rel=1e-5)


def test_save_pretrained_round_trip(vae, images: torch.Tensor, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_autoencoder(tmp_path / "vae")
    assert loaded.config.scaling_factor == vae.config.scaling_factor
    saved, restored = vae.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(encode(loaded, images, progress=False), encode(vae, images, progress=False))


def test_shift_factor_is_undone_by_decode(vae, images: torch.Tensor) -> None:
    shifted = build_autoencoder(TINY)
    shifted.load_state_dict(vae.state_dict())
    shifted.register_to_config(scaling_factor=vae.config.scaling_factor, shift_factor=0.5)
    plain = encode(vae, images, progress=False)
    latents = encode(shifted, images, progress=False)
    assert torch.allclose(latents, plain - 0.5 * vae.config.scaling_factor, atol=1e-5)
    assert torch.allclose(
        decode(shifted, latents, progress=False), decode(vae, plain, progress=False), atol=1e-5
    )


def test_perceptual_term(images: torch.Tensor) -> None:
    cfg = dataclasses.replace(TINY, perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="perceptual_fn"):
        train_autoencoder(images, cfg, progress=False)
    calls = []

    def features(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return F.avg_pool2d(x, 2)

    one_batch = images[: TINY.batch_size]
    train_autoencoder(one_batch, cfg, progress=False, perceptual_fn=features, device="cpu")
    # One optimizer step: features of the target and of the reconstruction.
    assert calls == [one_batch.shape, one_batch.shape]


def test_load_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_autoencoder("lfm-test/no-such-vae")
    message = str(err.value)
    assert "\n" not in message and "'lfm-test/no-such-vae'" in message and "internet" in message
    missing = tmp_path / "no_vae_here"
    with pytest.raises(ConfigError, match="no_vae_here") as err:
        load_autoencoder(missing)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_autoencoder(tmp_path / "empty")


def test_config_and_input_errors(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match="lr"):
        AutoencoderConfig(lr=0.0)
    with pytest.raises(ConfigError, match="in_channels=3"):
        train_autoencoder(images, dataclasses.replace(TINY, in_channels=3), progress=False)


def test_default_config_gives_4x8x8_latents() -> None:
    vae = build_autoencoder(AutoencoderConfig())
    latents = encode(vae, torch.zeros(2, 1, 32, 32), progress=False)
    assert latents.shape == (2, 4, 8, 8)


def test_autocast_and_batch_sizes(vae, images: torch.Tensor) -> None:
    exact = encode(vae, images, batch_size=48, progress=False)
    under_bf16 = encode(vae, images, batch_size=48, progress=False, autocast="bf16")
    assert under_bf16.dtype == torch.float32 and not torch.equal(under_bf16, exact)
    assert torch.allclose(under_bf16, exact, atol=0.1 * exact.abs().max().item())
    recon = decode(vae, exact, batch_size=7, progress=False)
    assert torch.allclose(recon, decode(vae, exact, batch_size=48, progress=False), atol=1e-5)
    psnr = reconstruction_psnr(vae, images, batch_size=16, decode_batch_size=5)
    assert psnr == pytest.approx(reconstruction_psnr(vae, images), abs=1e-3)
    with pytest.raises(ConfigError, match="autocast"):
        encode(vae, images, progress=False, autocast="fp8")
