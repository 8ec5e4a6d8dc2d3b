"""Coreset criteria on unit-norm features: greedy k-center and RFF kernel herding, globally or
per cluster with balanced quotas. All run on the features' device in bounded blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lfm_core.criteria.clustering import Clustering, balanced_counts, chunk_rows

KCENTER_POOL = 4096  # candidates a k-center round picks from before one pass over all points
HERDING_RFF_DIM = 512  # kernel_selection.py rff_kernel_herding_on_features rff_dim
HERDING_SIGMA_SAMPLES = 4096  # median_sigma's max_samples there
BALANCED_RFF_DIM = 256  # equal_cluster_kernel_herding rff_dim
BALANCED_ANCHORS = 128  # equal_cluster_kernel_herding anchors_per_cluster
BALANCED_SIGMA_SAMPLES = 2048  # _median_sigma's max_samples there
CLUSTER_SEED_STRIDE = 10_000  # the paper seeds cluster k's local search with seed + 10000 k


def _squared_distances(x: Tensor, x_sq: Tensor, centres: Tensor) -> Tensor:
    """||x_i - c_j||^2 = |x_i|^2 + |c_j|^2 - 2 <x_i, c_j> for x (n, D), centres (m, D): (n, m)."""
    product = x @ centres.T
    return (x_sq[:, None] + centres.pow(2).sum(1)[None] - 2 * product).clamp_min(0)


def _pool_round(x: Tensor, x_sq: Tensor, min_d2: Tensor, budget: int, pool_size: int) -> Tensor:
    """Farthest-first picks among the pool_size points farthest from the chosen set.

    min_d2 is exact for every point, so a pool point whose updated distance is still at least
    the largest outside the pool (an upper bound of every outside point's) is the global
    farthest point: the picks are those of the plain greedy loop. The first pick is always
    valid. Returns the picked indices (at most budget).
    """
    size = min(pool_size, x.shape[0])
    values, pool = torch.topk(min_d2, min(size + 1, x.shape[0]))
    outside = float(values[size]) if size < x.shape[0] else -math.inf
    pool, pool_d2 = pool[:size], values[:size].clone()
    pool_x, pool_sq = x[pool], x_sq[pool]
    picked: list[int] = []
    while len(picked) < budget:
        j = int(pool_d2.argmax())
        if picked and float(pool_d2[j]) < outside:
            break
        picked.append(j)
        to_pick = (pool_sq + pool_sq[j] - 2 * torch.mv(pool_x, pool_x[j])).clamp_min(0)
        pool_d2 = torch.minimum(pool_d2, to_pick)
        pool_d2[j] = -math.inf
    return pool[torch.tensor(picked, dtype=torch.long, device=pool.device)]


def kcenter_greedy(
    features: Tensor, total: int, seed: int = 0, pool_size: int = KCENTER_POOL
) -> Tensor:
    """Greedy k-center coreset (coreset.py kcenter_greedy_coreset) on unit-norm features (N, D).

    Starts at a seeded random point, then repeatedly adds the point farthest from everything
    chosen so far. Picks come in rounds from a pool of the farthest candidates (`_pool_round`);
    after each round one blocked pass updates every point's distance, so memory stays at a
    block and each point is read once per round, not once per pick. Returns (total,) in pick
    order, unique.
    """
    x = F.normalize(features.detach().float(), dim=1)
    x_sq = x.pow(2).sum(1)
    first = int(torch.randint(x.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.tensor([first], dtype=torch.long, device=x.device)
    min_d2 = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    new = chosen
    while True:
        step = chunk_rows(len(new))
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            nearest = _squared_distances(x[rows], x_sq[rows], x[new]).min(dim=1).values
            min_d2[rows] = torch.minimum(min_d2[rows], nearest)
        min_d2[new] = -math.inf
        if len(chosen) == total:
            return chosen.cpu()
        new = _pool_round(x, x_sq, min_d2, total - len(chosen), pool_size)
        chosen = torch.cat([chosen, new])


def balanced_kcenter(features: Tensor, clustering: Clustering, total: int, seed: int) -> Tensor:
    """balanced_kcenter: balanced quotas, k-center greedy inside each cluster, seeded
    seed + 10000 k (coreset.py equal_cluster_kcenter_coreset)."""
    counts = balanced_counts(clustering.sizes(), total)
    kept = [torch.zeros(0, dtype=torch.long)]
    for cluster, quota in enumerate(counts.tolist()):
        if quota:
            members = torch.nonzero(clustering.labels == cluster)[:, 0]
            local = kcenter_greedy(
                features[members.to(features.device)], quota, seed + CLUSTER_SEED_STRIDE * cluster
            )
            kept.append(members[local])
    return torch.cat(kept)


def median_sigma(x: Tensor, generator: torch.Generator, max_samples: int) -> float:
    """RBF bandwidth by the median heuristic, sqrt(median_{i<j} ||x_i - x_j||^2 / 2), over at
    most max_samples points drawn by the generator (kernel_selection.py median_sigma)."""
    if x.shape[0] <= 2:
        return 1.0
    sample = x[torch.randperm(x.shape[0], generator=generator)[:max_samples].to(x.device)]
    d2 = torch.cdist(sample, sample).pow(2)
    upper = torch.triu_indices(len(sample), len(sample), offset=1, device=x.device)
    return math.sqrt(max(float(d2[upper[0], upper[1]].median()), 1e-12) / 2.0)


def random_fourier_features(
    x: Tensor, num_features: int, sigma: float, generator: torch.Generator
) -> Tensor:
    """z(x) = sqrt(2 / F) cos(x W^T + b), W ~ N(0, 1 / sigma^2), b ~ U[0, 2 pi): <z(x), z(y)>
    approximates the RBF kernel exp(-||x - y||^2 / (2 sigma^2)) (kernel_selection.py RFF_RBF)."""
    weight = torch.randn(num_features, x.shape[1], generator=generator) / sigma
    bias = 2.0 * math.pi * torch.rand(num_features, generator=generator)
    weight, bias = weight.to(x), bias.to(x)
    step = chunk_rows(num_features)
    blocks = [x[start : start + step] @ weight.T + bias for start in range(0, len(x), step)]
    return math.sqrt(2.0 / num_features) * torch.cos(torch.cat(blocks))


def herd(z: Tensor, total: int) -> Tensor:
    """Kernel herding on embeddings z (N, F): pick i = argmax_{unpicked} <z_i, mu - m_k>, mu the
    mean embedding and m_k the mean of the k picks so far (greedy MMD). Returns (total,)."""
    mu = z.mean(0)
    mean_picked = torch.zeros_like(mu)
    picked = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    order = []
    for k in range(total):
        scores = (z @ (mu - mean_picked)).masked_fill(picked, -math.inf)
        j = int(scores.argmax())
        order.append(j)
        picked[j] = True
        mean_picked = (mean_picked * k + z[j]) / (k + 1)
    return torch.tensor(order, dtype=torch.long)


def kernel_herding(features: Tensor, total: int, seed: int = 0) -> Tensor:
    """herding: RFF kernel herding over all unit-norm points, sigma by the median heuristic
    (kernel_selection.py rff_kernel_herding_on_features; both draws seeded with seed)."""
    x = F.normalize(features.detach().float(), dim=1)
    sigma = median_sigma(x, torch.Generator().manual_seed(seed), HERDING_SIGMA_SAMPLES)
    z = random_fourier_features(x, HERDING_RFF_DIM, sigma, torch.Generator().manual_seed(seed))
    return herd(z, total)


def balanced_herding(features: Tensor, clustering: Clustering, total: int, seed: int) -> Tensor:
    """balanced_herding: balanced quotas; per cluster, min(quota, 128) anchors by RFF herding
    (256 features, sigma from the cluster) and the rest of the quota nearest to the centre
    (kernel_selection.py equal_cluster_kernel_herding, fill_mode "nearest"). Cluster k's draws
    come from one generator seeded seed + 10000 k."""
    x = F.normalize(features.detach().float(), dim=1)
    counts = balanced_counts(clustering.sizes(), total)
    kept = [torch.zeros(0, dtype=torch.long)]
    for cluster, quota in enumerate(counts.tolist()):
        if not quota:
            continue
        members = torch.nonzero(clustering.labels == cluster)[:, 0]
        xk = x[members.to(x.device)]
        generator = torch.Generator().manual_seed(seed + CLUSTER_SEED_STRIDE * cluster)
        sigma = median_sigma(xk, generator, BALANCED_SIGMA_SAMPLES)
        z = random_fourier_features(xk, BALANCED_RFF_DIM, sigma, generator)
        anchors = herd(z, min(quota, BALANCED_ANCHORS))
        rest = torch.ones(len(members), dtype=torch.bool)
        rest[anchors] = False
        by_distance = torch.argsort(clustering.distances[members], stable=True)
        fill = by_distance[rest[by_distance]][: quota - len(anchors)]
        kept.append(members[torch.cat([anchors, fill])])
    return torch.cat(kept)
