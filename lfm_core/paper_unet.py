"""The paper's UNet-S/M/L velocity networks: FiLM-conditioned ResNet levels, no attention.

Written after briqr/explo-r-it-ing_lfm_stability src/unet_fm.py (UNetFM, `_make_unet`): base
channels 160 (S, multipliers 1, 2, 2, 3), 192 (M) and 256 (L) (both 1, 2, 3, 4), two FiLM
ResNet blocks per level and in the middle, strided-conv downsampling, nearest-neighbour
upsampling, a 1x1 projection of [upsampled, skip] per level; time as raw t over 128 sinusoids
(sin first) and a 2-layer MLP to 4 x base channels, plus a class embedding. One deliberate
difference: the class table has num_classes + 1 rows, the last the null label for guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_core.configs import VelocityConfig
from lfm_core.velocity import VelocityModel

TIME_FREQUENCIES = 128  # unet_fm.py: timestep_embedding(t, 128)
MAX_PERIOD = 10000.0
NORM_GROUPS = 32
RES_BLOCKS = 2
# Channel multipliers per size (unet_fm.py `_make_unet`).
CHANNEL_MULTS = {"s": (1, 2, 2, 3), "m": (1, 2, 3, 4), "l": (1, 2, 3, 4)}


def paper_time_embedding(t: Tensor, dim: int = TIME_FREQUENCIES) -> Tensor:
    """[sin(t f_i), cos(t f_i)] with f_i = exp(-linspace(0, log 10000, dim / 2)_i), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-torch.linspace(0.0, math.log(MAX_PERIOD), half, device=t.device))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as the paper; fewer only for widths it never used (a `width` override).
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class FiLMBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x))))) * (1 + scale) + shift) + x."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(channels), _norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * channels))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[..., None, None].chunk(2, dim=1)
        return self.conv2(F.silu(self.norm2(h)) * (1 + scale) + shift) + x


def _conv1x1_or_identity(c_in: int, c_out: int) -> nn.Module:
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)


class PaperUNetVelocity(VelocityModel):
    """The paper's UNetFM as a velocity network (`punet-s`, `punet-m`, `punet-l`)."""

    def __init__(self, config: VelocityConfig, base_width: int, channel_mult: tuple[int, ...]):
        super().__init__(config)
        base = config.width or base_width
        chs = [base * m for m in channel_mult]
        emb = 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCIES, emb), nn.SiLU(), nn.Linear(emb, emb)
        )
        self.label_embed = nn.Embedding(config.num_classes + 1, emb) if config.num_classes else None
        self.in_conv = nn.Conv2d(config.in_channels, base, 3, padding=1)
        previous = [base, *chs[:-1]]
        self.down_proj = nn.ModuleList(
            _conv1x1_or_identity(p, c) for p, c in zip(previous, chs, strict=True)
        )
        self.down_res = nn.ModuleList(self._blocks(c, emb) for c in chs)
        self.downs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in chs[:-1])
        self.mid = self._blocks(chs[-1], emb)
        levels = list(reversed(range(len(chs))))
        self.up_match = nn.ModuleList(
            _conv1x1_or_identity(chs[min(lv + 1, len(chs) - 1)], chs[lv]) for lv in levels
        )
        self.up_proj = nn.ModuleList(nn.Conv2d(2 * chs[lv], chs[lv], 1) for lv in levels)
        self.up_res = nn.ModuleList(self._blocks(chs[lv], emb) for lv in levels)
        self.ups = nn.ModuleList(nn.Conv2d(chs[lv], chs[lv], 3, padding=1) for lv in levels[:-1])
        self.out_norm = _norm(chs[0])
        self.out_conv = nn.Conv2d(chs[0], config.in_channels, 3, padding=1)

    @staticmethod
    def _blocks(channels: int, emb: int) -> nn.ModuleList:
        return nn.ModuleList(FiLMBlock(channels, emb) for _ in range(RES_BLOCKS))

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.time_mlp(paper_time_embedding(t))
        if self.label_embed is not None and class_labels is not None:
            emb = emb + self.label_embed(class_labels)
        h, skips = self.in_conv(x), []
        for i, (proj, blocks) in enumerate(zip(self.down_proj, self.down_res, strict=True)):
            h = proj(h)
            for block in blocks.children():
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        for block in self.mid:
            h = block(h, emb)
        for i, (match, proj, blocks) in enumerate(
            zip(self.up_match, self.up_proj, self.up_res, strict=True)
        ):
            skip = skips[len(skips) - 1 - i]
            if h.shape[2:] != skip.shape[2:]:
                h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = proj(torch.cat([match(h), skip], dim=1))
            for block in blocks.children():
                h = block(h, emb)
            if i < len(self.ups):
                h = self.ups[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))
