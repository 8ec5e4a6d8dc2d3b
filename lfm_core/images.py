"""Image grids as PNG files (sample grids, same-seed comparison grids)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] row by row, nrow per row: (rows*H', nrow*W', C) uint8."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // nrow)
    out = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        out[top : top + h, left : left + w] = pixels[i]
    return out


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Write a PNG grid of (N, C, H, W) images in [-1, 1], upscaled by `scale` for viewing."""
    tiles = grid(images, nrow)
    picture = Image.fromarray(tiles[..., 0] if tiles.shape[-1] == 1 else tiles)
    picture = picture.resize(
        (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def save_comparison(rows: Sequence[Tensor], path: str | Path, scale: int = 2) -> Path:
    """Write rows of same-seed images (each (N, C, H, W)) one above the other: column i = seed i."""
    return save_grid(torch.cat(list(rows)), path, nrow=rows[0].shape[0], scale=scale)
