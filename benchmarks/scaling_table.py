"""What fits per GPU for each DiT size at the paper's batch: a meta-device calculation.

Each DiT/2 size is built on `torch.device("meta")` (no memory, no GPU) for 4x32x32 latents (256
px images through the SD autoencoder) and run forward and backward once at the per-GPU batch,
with `torch.autograd.graph.saved_tensors_hooks` adding up the tensors autograd keeps for the
backward pass (the activations). Training memory per GPU:

    weights fp32 4P + gradients fp32 4P + AdamW moments fp32 8P + EMA fp32 4P  (= 20 P bytes)
    + activations: the meta pass's saved tensors in float32, halved for bf16 autocast
      (matmul / attention inputs are saved in bf16; norms and the few float32 kernels are
      counted at half their size too, so this is an estimate, not a measurement)
    + a 20% allowance for the allocator, cuDNN / NCCL workspaces and the CUDA context.

    python -m benchmarks.scaling_table [--batch 256] [--gpus 8]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from lfm_core.velocity import VelocityConfig, build_velocity

SIZES = ("dit-s", "dit-b", "dit-l", "dit-xl")
LATENT_CHANNELS, LATENT_SIDE = 4, 32
PAPER_BATCH, GPUS_PER_NODE = 256, 8
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weights, grads, AdamW m and v, EMA
BF16_SHRINK = 0.5
OVERHEAD = 1.2
GIB = 2**30
# GPU memory of the node types the cluster files name (GiB).
GPUS = {"A10G (g5)": 24, "L40S (g6e)": 48, "A100 40GB (p4d)": 40, "H100 80GB (p5)": 80}


@dataclass(frozen=True)
class Row:
    """One DiT size at one per-GPU batch."""

    name: str
    params: int
    state_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return (self.state_gib + self.activations_gib) * OVERHEAD


def saved_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes of the tensors autograd saves for backward in one float32 forward (meta device)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    x = torch.randn(batch, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, device="meta")
    t = torch.rand(batch, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t).sum().backward()
    return total


def row(name: str, per_gpu_batch: int) -> Row:
    """The memory of training `name` at `per_gpu_batch` samples per GPU."""
    config = VelocityConfig(name=name, in_channels=LATENT_CHANNELS, sample_size=LATENT_SIDE)
    with torch.device("meta"):
        model = build_velocity(config)
    params = sum(p.numel() for p in model.parameters())
    activations = saved_bytes(model, per_gpu_batch) * BF16_SHRINK
    return Row(name, params, params * STATE_BYTES_PER_PARAM / GIB, activations / GIB)


def table(batch: int, gpus: int) -> str:
    """The Markdown table: each size, its memory per GPU, and which GPUs hold it."""
    per_gpu = batch // gpus
    head = f"| DiT/2 (batch {batch} on {gpus} GPUs: {per_gpu} per GPU) | params | "
    head += "weights+grads+AdamW+EMA | activations (bf16) | total x1.2 | " + " | ".join(GPUS)
    lines = [head + " |", "|" + "---|" * (5 + len(GPUS))]
    for name in SIZES:
        r = row(name, per_gpu)
        fits = ["yes" if r.total_gib <= memory else "no" for memory in GPUS.values()]
        lines.append(
            f"| {name} | {r.params / 1e6:.1f} M | {r.state_gib:.1f} GiB | "
            f"{r.activations_gib:.1f} GiB | {r.total_gib:.1f} GiB | " + " | ".join(fits) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=PAPER_BATCH, help="global batch")
    parser.add_argument("--gpus", type=int, default=GPUS_PER_NODE, help="data-parallel GPUs")
    args = parser.parse_args()
    print(table(args.batch, args.gpus))


if __name__ == "__main__":
    main()
