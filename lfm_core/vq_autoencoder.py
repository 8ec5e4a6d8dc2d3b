"""VQ autoencoders (diffusers' VQModel): build, train on small data, load, with a measured scale.

The paper trains its own VQ-GAN f8 (4 latent channels for faces, 8 for ImageNet) and runs flow
matching on the *quantized* latents (briqr/explo-r-it-ing_lfm_stability src/precompute_latents.py:
`vae.encode(images)["quantized"]`), scaled by 1 / their std (train_consts.py: 0.80-0.83).
`VQAutoencoder` is a VQModel that speaks AutoencoderKL's interface as `lfm_core.autoencoder`
uses it: `encode(x).latent_dist.mode()` is the quantized latent and `decode(z)` decodes a latent
as it is (generated latents are not snapped to the codebook), so `encode`, `decode` and
`reconstruction_psnr` of lfm_core.autoencoder serve both kinds. As there, the scale is
1 / std of the training images' latents, stored as `config.scaling_factor`.
The adversarial and perceptual terms of a VQ-GAN are left out: training here is reconstruction
(MSE, + L1) plus the codebook / commitment loss of diffusers' VectorQuantizer (beta 0.25).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL, AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.autoencoders.vq_model import VQModel
from torch import Tensor
from tqdm.auto import tqdm

from lfm_core.autoencoder import (
    UNMEASURED_SCALING_FACTOR,
    AutoencoderConfig,
    block_kwargs,
    encode,
)
from lfm_core.errors import ConfigError

# The codebook size of the paper's taming VQ-GAN configs (configs/taming_vq/*.yaml use 16384 at
# full scale); small data sets here get a smaller default.
DEFAULT_CODEBOOK = 256
VQ_CLASS_NAMES = ("VQModel", "VQAutoencoder")


class VQAutoencoder(VQModel):
    """A diffusers VQModel with AutoencoderKL's encode / decode interface (see the module)."""

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:  # type: ignore[override]
        """Quantized latents as a point-mass `latent_dist` (mode() = sample() = the latent)."""
        quantized = self.quantize(super().encode(x).latents)[0]
        return AutoencoderKLOutput(latent_dist=IdentityDistribution(quantized))  # type: ignore[arg-type]

    def decode(self, z: Tensor, return_dict: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        """Images from (quantized or generated) latents, without snapping them to the codebook."""
        return super().decode(z, force_not_quantize=True)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(decoded images, codebook + commitment loss) through the straight-through quantizer."""
        quantized, codebook_loss, _ = self.quantize(super().encode(x).latents)
        out = super().decode(quantized, force_not_quantize=True)
        assert isinstance(out, DecoderOutput)
        return out.sample, codebook_loss


def as_autoencoder(vae: VQAutoencoder) -> AutoencoderKL:
    """The same object typed as the AutoencoderKL that lfm_core.autoencoder's helpers take.

    Those helpers use only `encode(x).latent_dist.mode()`, `decode(z).sample`, `config` and
    the parameters, which VQAutoencoder provides; the cast records that duck type for mypy.
    """
    return cast(AutoencoderKL, vae)


def build_vq_autoencoder(
    cfg: AutoencoderConfig, num_vq_embeddings: int = DEFAULT_CODEBOOK
) -> VQAutoencoder:
    """A freshly initialised VQAutoencoder (scale 1); its weights depend on cfg.seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VQAutoencoder(
            **block_kwargs(cfg),
            num_vq_embeddings=num_vq_embeddings,
            scaling_factor=UNMEASURED_SCALING_FACTOR,
        )


def train_vq_autoencoder(
    images: Tensor,
    cfg: AutoencoderConfig,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> VQAutoencoder:
    """Train a VQAutoencoder on images (N, C, H, W) in [-1, 1] and store its measured scale.

    Loss per batch: mean (x_hat - x)^2 + l1_weight mean |x_hat - x| + the quantizer's codebook
    and commitment loss; AdamW with cfg's lr (cosine-decayed when cfg.cosine_lr), cfg.epochs
    passes of batch cfg.batch_size, shuffled by a generator seeded with cfg.seed. Then
    scaling_factor = 1 / std of the quantized latents of `images`.
    """
    if images.ndim != 4 or images.shape[1] != cfg.in_channels or images.shape[0] == 0:
        raise ConfigError(
            f"images: shape {tuple(images.shape)} must be (N > 0, in_channels={cfg.in_channels}, H, W)"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = build_vq_autoencoder(cfg)
    torch.nn.Module.to(vae, device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * math.ceil(images.shape[0] / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)) if cfg.cosine_lr else 1.0
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    with tqdm(total=total, desc="vq autoencoder", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            for index in torch.randperm(images.shape[0], generator=generator).split(cfg.batch_size):
                x = images[index].to(device)
                recon, codebook_loss = vae.reconstruct(x)
                loss = F.mse_loss(recon, x) + codebook_loss.mean()
                if cfg.l1_weight:
                    loss = loss + cfg.l1_weight * F.l1_loss(recon, x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
    vae.eval()
    std = encode(as_autoencoder(vae), images, progress=progress).double().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def is_vq_folder(folder: str | Path) -> bool:
    """Whether a save_pretrained folder holds a VQModel (or VQAutoencoder) config."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("_class_name") in VQ_CLASS_NAMES


def load_vq_autoencoder(folder: str | Path, subfolder: str | None = None) -> VQAutoencoder:
    """A VQAutoencoder from a local folder saved with save_pretrained (a plain VQModel too).

    Raises:
        ConfigError: the folder or its config.json is missing, or it holds no VQModel.
    """
    path = Path(folder).expanduser() / (subfolder or "")
    if not (path / "config.json").is_file():
        raise ConfigError(f"autoencoder: {str(path / 'config.json')!r} is missing (vq, local only)")
    if not is_vq_folder(path):
        raise ConfigError(f"autoencoder: {str(path)!r} holds no VQModel (autoencoder.kind=vq)")
    return VQAutoencoder.from_pretrained(path).eval()
