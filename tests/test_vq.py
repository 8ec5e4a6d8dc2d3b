"""VQ autoencoders: the AutoencoderKL interface, a measured scale, local loading, a VQ sweep."""

import pytest
import torch
from diffusers.models.autoencoders.vq_model import VQModel

from lfm_core.autoencoder import AutoencoderConfig, decode, encode, reconstruction_psnr
from lfm_core.errors import ConfigError
from lfm_core.vq_autoencoder import (
    as_autoencoder,
    build_vq_autoencoder,
    is_vq_folder,
    load_vq_autoencoder,
    train_vq_autoencoder,
)

CFG = AutoencoderConfig(
    in_channels=1,
    latent_channels=4,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    sample_size=16,
    epochs=2,
    batch_size=16,
)


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def test_trained_vq_latents_are_quantized_and_unit_std():
    images = _images()
    vae = train_vq_autoencoder(images, CFG, progress=False, device="cpu")
    latents = encode(as_autoencoder(vae), images, progress=False)
    assert latents.shape == (32, 4, 8, 8)
    assert latents.double().std().item() == pytest.approx(1.0, rel=1e-6)
    # Every unscaled latent vector is a codebook entry.
    raw = latents / vae.config["scaling_factor"]
    codebook = vae.quantize.embedding.weight
    nearest = torch.cdist(raw.permute(0, 2, 3, 1).reshape(-1, 4), codebook).min(1).values
    assert nearest.max().item() < 1e-4
    images_out = decode(as_autoencoder(vae), latents, progress=False)
    assert images_out.shape == images.shape and images_out.abs().max() <= 1
    assert reconstruction_psnr(as_autoencoder(vae), images) > 0


def test_vq_folders_load_locally_including_a_plain_vqmodel(tmp_path):
    vae = build_vq_autoencoder(CFG)
    vae.save_pretrained(tmp_path / "ours")
    plain = VQModel(in_channels=1, out_channels=1, latent_channels=4, norm_num_groups=4)
    plain.save_pretrained(tmp_path / "plain")
    for name, model in (("ours", vae), ("plain", plain)):
        assert is_vq_folder(tmp_path / name)
        loaded = load_vq_autoencoder(tmp_path / name)
        for (key, a), b in zip(
            model.state_dict().items(), loaded.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), key
    x = _images(2)
    reference = load_vq_autoencoder(tmp_path / "ours")
    assert torch.equal(encode(as_autoencoder(reference), x), encode(as_autoencoder(vae), x))
    with pytest.raises(ConfigError, match="is missing"):
        load_vq_autoencoder(tmp_path / "nothing")


def test_a_tiny_sweep_with_a_vq_autoencoder_runs_end_to_end(tmp_path, tiny_dinov2):
    """sweeps/tiny.yaml with autoencoder.kind=vq: every stage of a trial, through the graph."""
    from orchestrator import stage_keys as keys
    from orchestrator.config import load_sweep
    from orchestrator.stages import StageGraph
    from orchestrator.sweep import cache_for
    from orchestrator.trainers import InProcessTrainer
    from orchestrator.trials import Trial
    from tests.test_orch_stages import TINY

    overrides = [
        f"storage={tmp_path}",
        "tracking.uri=http://127.0.0.1:9",
        "data.limit=64",
        "data.heldout_limit=16",
        "sampling.num_samples=16",
        "autoencoder.kind=vq",
    ]
    for role in ("clustering", "fid", "stability"):
        overrides += [f"features.{role}.name=dinov2", f"features.{role}.path={tiny_dinov2}"]
    cfg = load_sweep(TINY, overrides)
    graph = StageGraph(cfg, cache_for(cfg), trainer=InProcessTrainer(), progress=False)
    metrics = graph.metrics(Trial("data_reduction", 0.5, "random", None, None, 0))
    assert all(v == v for v in (metrics["fid"], metrics["stability_similarity"]))
    vae = graph.load_autoencoder(keys.autoencoder(cfg))
    assert type(vae).__name__ == "VQAutoencoder"
    info = graph.info(keys.autoencoder(cfg))
    assert info["scaling_factor"] == vae.config["scaling_factor"] != 1.0
    kl = load_sweep(TINY, [o for o in overrides if o != "autoencoder.kind=vq"])
    assert "kind" in keys.autoencoder(cfg).inputs and "kind" not in keys.autoencoder(kl).inputs
