"""The FLOP model of coarse-to-fine sampling: what a forward pass costs, what a split can save."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: nn.Module, x: Tensor, **cond: Tensor) -> int:
    """FLOPs of one forward pass of model on x (B, C, H, W), counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, torch.full((x.shape[0],), 0.5), **cond)
    return counter.get_total_flops()


def flop_speedup_bound(flops_coarse: int, flops_fine: int, nfe_coarse: int, nfe_fine: int) -> float:
    """The speedup over the fine model alone that FLOP counts allow (same total NFE).

    bound = flops_fine (nfe_coarse + nfe_fine) / (flops_coarse nfe_coarse + flops_fine nfe_fine).
    """
    total = flops_coarse * nfe_coarse + flops_fine * nfe_fine
    return flops_fine * (nfe_coarse + nfe_fine) / total
