"""The core's configs and the names they choose among, importable without torch.

One typed, frozen dataclass per component (`TrainConfig`, `AutoencoderConfig`,
`VelocityConfig`) and the velocity size table `VELOCITY_SIZES` (name -> factory; a factory
imports `lfm_core.velocity` only when called). The modules that use them (`lfm_core.train`,
`lfm_core.autoencoder`, `lfm_core.velocity`) re-export them, so either import works; this one
loads in milliseconds, so a command line can validate a sweep file without loading torch,
diffusers or accelerate.

The name tuples below are the choices config validation offers. Those owned by a heavy module
(its registry of implementations) are mirrored here by name; `tests/test_cli.py` checks that
each mirror equals its registry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from lfm_core.errors import ConfigError, check_choice, check_range

if TYPE_CHECKING:
    from lfm_core.velocity import VelocityModel

MIXED_PRECISION = ("no", "fp16", "bf16")
# The narrowest velocity network lfm_core.velocity.build_velocity accepts.
MIN_WIDTH = 4
# Mirrors of heavy modules' registries (the module named is the owner).
T_SAMPLING = ("uniform", "logit_normal")  # lfm_core.paths.T_SAMPLING
AUTOCAST_MODES = ("no", "bf16", "fp16")  # keys of lfm_core.autoencoder.AUTOCAST
DATASETS = ("mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "folder")  # lfm_core.data
METHODS = ("euler", "midpoint", "heun")  # lfm_core.solvers.METHODS
GRIDS = ("uniform", "paper")  # lfm_core.solvers.GRIDS
# lfm_core.criteria.CRITERIA / SCORE_CRITERIA
CRITERIA = (
    "random",
    "cluster_nearest",
    "cluster_furthest",
    "balanced_nearest",
    "balanced_furthest",
    "loss",
    "grad",
    "kcenter",
    "loss_lowest",
    "grad_lowest",
    "cluster_mid",
    "cluster_mix",
    "drop_cluster",
    "balanced_kcenter",
    "herding",
    "balanced_herding",
    "class_skew",
)
SCORE_CRITERIA = ("loss", "grad", "loss_lowest", "grad_lowest")
# Criteria that read a k-means clustering (so its k, seed and kmeans kind); the first seven
# read nothing else, so a precomputed clustering is all they need (owned here, no torch:
# lfm_core.criteria and the stage keys both read them).
CLUSTER_CRITERIA = (
    "cluster_nearest",
    "cluster_furthest",
    "balanced_nearest",
    "balanced_furthest",
    "cluster_mid",
    "cluster_mix",
    "drop_cluster",
    "balanced_kcenter",
    "balanced_herding",
)
FEATURE_CRITERIA = (*CLUSTER_CRITERIA, "kcenter", "herding")  # read features (N, D)
LABEL_CRITERIA = ("class_skew",)  # read class labels (N,)
KMEANS_KINDS = ("euclidean", "spherical")  # scikit-learn's k-means++ | the paper's spherical
NORMALISATIONS = ("mean", "ema")  # per-t score normalisation: data-set mean | the paper's EMA
# lfm_core.features
FEATURE_EXTRACTORS = ("mnist_classifier", "dinov2", "dinov2-base", "clip", "inception", "arcface")
T_SPLIT_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # lfm_core.coarse_to_fine


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one flow-matching model. batch_size is the global batch."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    t_sampling: str = "uniform"
    class_dropout: float = 0.1
    checkpoint_every: int = 0
    log_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be a positive integer")
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("class_dropout", self.class_dropout, 0.0, 1.0, high_open=True)
        check_choice("t_sampling", self.t_sampling, T_SAMPLING)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and training of an AutoencoderKL.

    With n = len(block_out_channels) the encoder downsamples n - 1 times: 32x32 images with the
    default three blocks give latents of shape (latent_channels, 8, 8).

    Attributes:
        in_channels: image channels (1 for MNIST-like sets, 3 for RGB).
        latent_channels: latent channels c.
        block_out_channels: channels of each encoder / decoder block.
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
        mid_block_attention: self-attention in the encoder's and decoder's middle block.
        sample_size: image side length the model is meant for (recorded in its config).
        kl_weight: weight of the KL term (per-sample sum over latent elements, batch mean).
        l1_weight: weight of an L1 reconstruction term added to the MSE one.
        perceptual_weight: weight of an optional feature-space MSE; needs `perceptual_fn`.
        epochs: passes over the training images.
        batch_size: images per optimizer step.
        lr: AdamW learning rate (cosine-decayed to 0 over training when cosine_lr).
        weight_decay: AdamW weight decay.
        cosine_lr: decay the learning rate along a cosine to 0 over all steps.
        seed: seeds the initial weights, the shuffling and the posterior samples.
    """

    in_channels: int = 1
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_attention: bool = True
    sample_size: int = 32
    kl_weight: float = 1e-6
    l1_weight: float = 0.0
    perceptual_weight: float = 0.0
    epochs: int = 4
    # Batch 32 with cosine decay reached 26.97 dB held-out PSNR on mnist5k after 4 epochs against
    # 25.48 dB for batch 64 at a constant lr, at the same CPU cost per epoch (twice the steps).
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    cosine_lr: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            check_range(key, getattr(self, key), 1, math.inf)
        for key in ("sample_size", "epochs", "batch_size"):
            check_range(key, getattr(self, key), 1, math.inf)
        for key in ("kl_weight", "l1_weight", "perceptual_weight", "weight_decay"):
            check_range(key, getattr(self, key), 0.0, math.inf)
        check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        if not self.block_out_channels or any(
            c % self.norm_num_groups for c in self.block_out_channels
        ):
            raise ConfigError(
                f"block_out_channels: {tuple(self.block_out_channels)} must be non-empty and "
                f"each divisible by norm_num_groups={self.norm_num_groups}"
            )


@dataclass(frozen=True)
class VelocityConfig:
    """A velocity network: registry name, latent shape, conditioning and an optional width."""

    name: str = "unet-s"
    in_channels: int = 4
    sample_size: int = 8
    num_classes: int = 0
    width: int | None = None

    def __post_init__(self) -> None:
        if self.width is not None and self.width < MIN_WIDTH:
            raise ConfigError(f"width: {self.width} must be an integer >= {MIN_WIDTH}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VelocitySize:
    """One entry of VELOCITY_SIZES: a network family and its base size, called as a factory.

    Attributes:
        family: "unet" (lfm_core.velocity.UNetVelocity, diffusers' UNet2DModel), "dit"
            (DiTVelocity) or "punet" (lfm_core.paper_unet.PaperUNetVelocity, the paper's UNet).
        base_width: UNet channels of the first level / DiT hidden size (a config's `width`
            overrides it).
        depth: UNet ResNet layers per block / DiT transformer blocks (unused by "punet").
        patch: DiT patch size (2, 4 or 8).
        heads: DiT attention heads (DiT's table); None: hidden size // 64.
        channel_mult: "punet" channel multipliers per level.
    """

    family: str
    base_width: int
    depth: int
    patch: int = 2
    heads: int | None = None
    channel_mult: tuple[int, ...] = ()

    def __call__(self, config: VelocityConfig) -> VelocityModel:
        from lfm_core import velocity  # torch and diffusers: only when a network is built

        if self.family == "unet":
            return velocity.UNetVelocity(config, self.base_width, layers_per_block=self.depth)
        if self.family == "punet":
            from lfm_core.paper_unet import PaperUNetVelocity

            return PaperUNetVelocity(config, self.base_width, self.channel_mult)
        return velocity.DiTVelocity(
            config, self.base_width, depth=self.depth, patch=self.patch, heads=self.heads
        )


# DiT sizes follow the DiT paper (hidden x depth, heads: S 384 x 12, 6; B 768 x 12, 12;
# L 1024 x 24, 16; XL 1152 x 28, 16); "dit-s" is DiT-S/2, "dit-s/4" DiT-S/4 and so on. "punet-*"
# are the paper's UNet-S/M/L (src/unet_fm.py); "xs" sizes are for CPU-scale latents.
_DIT = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
_PUNET = {"s": (160, (1, 2, 2, 3)), "m": (192, (1, 2, 3, 4)), "l": (256, (1, 2, 3, 4))}
VELOCITY_SIZES: dict[str, VelocitySize] = {
    "unet-xs": VelocitySize("unet", base_width=16, depth=1),
    "unet-s": VelocitySize("unet", base_width=32, depth=1),
    "unet-m": VelocitySize("unet", base_width=64, depth=2),
    "unet-l": VelocitySize("unet", base_width=128, depth=2),
    "dit-xs": VelocitySize("dit", base_width=128, depth=4),
    **{
        f"dit-{size}{'' if patch == 2 else f'/{patch}'}": VelocitySize(
            "dit", base_width=width, depth=depth, patch=patch, heads=heads
        )
        for size, (width, depth, heads) in _DIT.items()
        for patch in (2, 4, 8)
    },
    **{
        f"punet-{size}": VelocitySize("punet", base_width=width, depth=0, channel_mult=mult)
        for size, (width, mult) in _PUNET.items()
    },
}
