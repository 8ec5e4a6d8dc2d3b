"""Velocity networks, all called as ``model(x, t, class_labels=None)``.

x: (B, C, H, W) latents, t: (B,) times in [0, 1] (t = 0 noise), class_labels: (B,) int64 or
None. With `num_classes` > 0 the label `num_classes` is the null label used for classifier-free
guidance (and substituted when class_labels is None). Sizes come from the `VELOCITY_SIZES`
registry (name -> factory); `width` overrides a size's base width (UNet channels, DiT hidden).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor, nn

from lfm_core.configs import VELOCITY_SIZES, VelocityConfig
from lfm_core.errors import ConfigError, check_choice

# Both families embed t * TIME_SCALE sinusoidally: continuous t in [0, 1] spread over the
# frequency range the embeddings were designed for (integer diffusion steps 0..999).
TIME_SCALE = 1000.0


class VelocityModel(nn.Module):
    """Base class: checks inputs, fills the null label, records the config."""

    def __init__(self, config: VelocityConfig):
        super().__init__()
        self.config = config

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        c, s = self.config.in_channels, self.config.sample_size
        if tuple(x.shape[1:]) != (c, s, s):
            raise ConfigError(
                f"input shape {tuple(x.shape[1:])} does not fit model {self.config.name!r}; "
                f"expected ({c}, {s}, {s})"
            )
        if self.config.num_classes and class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_label, device=x.device)
        if not self.config.num_classes:
            class_labels = None
        return self.velocity(x, t.to(x.dtype).expand(x.shape[0]), class_labels)

    @abstractmethod
    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        """The network itself: x (B, C, H, W), t (B,), class_labels (B,) or None."""


class UNetVelocity(VelocityModel):
    """diffusers UNet2DModel; channel multipliers (1, 2, 2, ...) with attention at the lowest level."""

    def __init__(self, config: VelocityConfig, base_width: int, layers_per_block: int):
        super().__init__(config)
        width = config.width or base_width
        levels = max(2, min(4, int(math.log2(config.sample_size)) - 1))
        channels = tuple(width * (1 if i == 0 else 2) for i in range(levels))
        self.unet = UNet2DModel(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            layers_per_block=layers_per_block,
            norm_num_groups=math.gcd(width, 8),
            attention_head_dim=max(8, width // 4),
            num_class_embeds=config.num_classes + 1 if config.num_classes else None,
        )

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        return self.unet(x, t * TIME_SCALE, class_labels=class_labels).sample  # type: ignore[operator]


def _sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sine-cosine position embedding, shape (grid * grid, dim) (as in DiT / MAE)."""
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = [f(p.reshape(-1, 1) * freqs) for p in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


# The DiT family embeds raw t in [0, 1] over 256 sinusoidal frequencies, then an MLP, as SiT and
# the paper's code do (briqr/explo-r-it-ing_lfm_stability src/models.py, TimestepEmbedder).
DIT_FREQUENCIES = 256
# DiT's initialisation of the label table and the time MLP (src/models.py, initialize_weights).
DIT_EMBED_INIT_STD = 0.02


def timestep_embedding(t: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding [cos(s t f_i), sin(s t f_i)], f_i = 10000^(-i / (dim / 2)), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _zero(layer: nn.Linear) -> None:
    """adaLN-Zero: the layer starts at 0, so every block starts as the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D) * (1 + scale) + shift, with shift and scale (B, 1, D): one fused kernel."""
    return torch.addcmul(shift, x, 1 + scale)


def _modulations(ada: nn.Module, c: Tensor, count: int) -> tuple[Tensor, ...]:
    """adaLN modulations of conditioning c (B, D): `count` tensors (B, 1, D), views of one
    contiguous (B, count, 1, D) output whose rows are contiguous (not `chunk` views of a
    (B, count * D) row, each a strided slice that every broadcast op then walks)."""
    b, d = c.shape
    return ada(c).view(b, count, 1, d).unbind(1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie, 2023)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        ada_linear = nn.Linear(dim, 6 * dim)
        _zero(ada_linear)
        self.ada = nn.Sequential(nn.SiLU(), ada_linear)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, N, D) tokens, c: (B, D) conditioning."""
        shift1, scale1, gate1, shift2, scale2, gate2 = _modulations(self.ada, c, 6)
        b, n, d = x.shape
        q, k, v = (
            self.qkv(_modulate(self.norm1(x), shift1, scale1))
            .view(b, n, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        # Gated residuals as one addcmul each: x + gate * f(x) without the product's temporary.
        x = torch.addcmul(x, gate1, self.proj(attn))
        return torch.addcmul(x, gate2, self.mlp(_modulate(self.norm2(x), shift2, scale2)))


class DiTVelocity(VelocityModel):
    """A DiT over the latent grid (patch 2, 4 or 8) with adaLN-Zero time and class conditioning.

    As DiT / SiT and the paper's code: time is raw t embedded over DIT_FREQUENCIES sinusoids and
    an MLP, the label table and the time MLP start at N(0, 0.02). `heads` is the size's head count
    (DiT's table: S 6, B 12, L 16, XL 16); with another `width`, width // head_dim heads.
    """

    def __init__(
        self,
        config: VelocityConfig,
        base_width: int,
        depth: int,
        head_dim: int = 64,
        patch: int = 2,
        heads: int | None = None,
    ):
        super().__init__(config)
        self.patch = patch
        dim = config.width or base_width
        if config.sample_size % self.patch:
            raise ConfigError(
                f"sample_size: {config.sample_size} must be divisible by {patch} for DiT /{patch}"
            )
        if heads is None or dim != base_width:
            heads = max(1, dim // head_dim)
        if dim % heads or dim % 4:
            raise ConfigError(f"width: {dim} must be a multiple of 4 and of {heads} heads")
        grid = config.sample_size // self.patch
        c = config.in_channels
        self.embed = nn.Conv2d(c, dim, self.patch, stride=self.patch)
        self.register_buffer("pos", _sincos_2d(dim, grid), persistent=False)
        time_in, time_out = nn.Linear(DIT_FREQUENCIES, dim), nn.Linear(dim, dim)
        self.time_mlp = nn.Sequential(time_in, nn.SiLU(), time_out)
        self.label_embed = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        for table in (time_in, time_out, self.label_embed):
            if table is not None:
                nn.init.normal_(table.weight, std=DIT_EMBED_INIT_STD)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        ada_out_linear = nn.Linear(dim, 2 * dim)
        self.ada_out = nn.Sequential(nn.SiLU(), ada_out_linear)
        self.out = nn.Linear(dim, self.patch * self.patch * c)
        for layer in (ada_out_linear, self.out):
            _zero(layer)

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.time_mlp(timestep_embedding(t, DIT_FREQUENCIES))
        if self.label_embed is not None and class_labels is not None:
            cond = cond + self.label_embed(class_labels)
        for block in self.blocks:
            tokens = block(tokens, cond)
        shift, scale = _modulations(self.ada_out, cond, 2)
        patches = self.out(_modulate(self.norm_out(tokens), shift, scale))
        p, gh, gw = self.patch, h // self.patch, w // self.patch
        patches = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return patches.reshape(b, c, h, w)


def build_velocity(config: VelocityConfig) -> VelocityModel:
    """Build the velocity network named by `config.name` (a key of VELOCITY_SIZES)."""
    check_choice("model", config.name, VELOCITY_SIZES)
    if config.width is not None and config.width < 4:
        raise ConfigError(f"width: {config.width} must be an integer >= 4")
    return VELOCITY_SIZES[config.name](config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
