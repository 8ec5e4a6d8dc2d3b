"""k-means clusterings (Euclidean as today, spherical as the paper's) and per-cluster selection.

The clustering is computed once (`compute_clustering`) and shared by every cluster criterion of
the same features, k, seed and k-means kind (`select(..., clustering=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor

from lfm_core.configs import KMEANS_KINDS
from lfm_core.errors import check_choice, check_range

KMEANS_N_INIT = 4  # scikit-learn k-means restarts; the best inertia wins
SPHERICAL_ITERATIONS = 100  # the paper's cluster_features.py --iterations
SPHERICAL_TOL = 1e-6  # cluster_features.py stops when the mean centre shift is below this
CHUNK_ELEMENTS = 2**24  # rows x columns of one distance block (64 MiB in float32): never N x N


def chunk_rows(columns: int) -> int:
    """Rows of a (rows, columns) block of at most CHUNK_ELEMENTS entries (at least one row)."""
    return max(1, CHUNK_ELEMENTS // max(1, columns))


@dataclass(frozen=True)
class Clustering:
    """A k-means assignment shared by the cluster criteria.

    Attributes:
        labels: (N,) int64 cluster of each point, on the CPU.
        distances: (N,) float64 Euclidean distance of each unit-norm point to its centre.
        centres: (K, D) centres: cluster means of the unit-norm features ("euclidean") or those
            means renormalised to unit length ("spherical", as the paper's cluster files).
        iterations: k-means iterations run (of the best restart for "euclidean").
    """

    labels: Tensor
    distances: Tensor
    centres: Tensor
    iterations: int = 0

    @property
    def num_clusters(self) -> int:
        return int(self.centres.shape[0])

    def sizes(self) -> Tensor:
        """(K,) points per cluster."""
        return torch.bincount(self.labels, minlength=self.num_clusters)


def _euclidean(features: Tensor, num_clusters: int, seed: int) -> Clustering:
    """scikit-learn k-means++ (float64, CPU) on unit-norm features; centres are cluster means."""
    x = F.normalize(features.detach().double().cpu(), dim=1)
    kmeans = KMeans(n_clusters=num_clusters, n_init=KMEANS_N_INIT, random_state=seed)
    labels = torch.from_numpy(kmeans.fit_predict(x.numpy())).long()
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    centroids = sums / torch.bincount(labels, minlength=num_clusters).clamp(min=1)[:, None]
    distances = (x - centroids[labels]).norm(dim=1)
    return Clustering(labels, distances, centroids, int(kmeans.n_iter_))


def _assign(x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Highest-cosine centre of each row of x (N, D), in blocks: labels (N,), cosines (N,)."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    cosines = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = chunk_rows(centres.shape[0])
    for start in range(0, x.shape[0], step):
        cosines[start : start + step], labels[start : start + step] = (
            x[start : start + step] @ centres.T
        ).max(dim=1)
    return labels, cosines


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """(K, D) sums of the rows of each cluster; a one-hot matmul off the CPU, where index_add_
    would add in a nondeterministic order."""
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    step = chunk_rows(k)
    for start in range(0, x.shape[0], step):
        one_hot = F.one_hot(labels[start : start + step], k).to(x.dtype)
        sums += one_hot.T @ x[start : start + step]
    return sums


def spherical_kmeans(
    features: Tensor,
    num_clusters: int,
    seed: int = 0,
    max_iter: int = SPHERICAL_ITERATIONS,
    tol: float = SPHERICAL_TOL,
) -> tuple[Tensor, Tensor, int]:
    """The paper's k-means (cluster_features.py: init_centers, assign_*, update_centers_*).

    x_i = features_i / ||features_i||; centres start at num_clusters distinct points drawn by a
    seeded permutation; each iteration assigns l_i = argmax_c <x_i, c> and sets each non-empty
    centre to the renormalised mean of its points; it stops after max_iter iterations or when
    the mean centre shift is below tol. Runs on the features' device, in float32, in blocks.

    Returns:
        labels (N,) int64, centres (K, D) unit-norm (both on the features' device), iterations.
    """
    x = F.normalize(features.detach().float(), dim=1)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    centres = F.normalize(x[order[:num_clusters].to(x.device)], dim=1)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        labels, _ = _assign(x, centres)
        sums = _cluster_sums(x, labels, num_clusters)
        counts = torch.bincount(labels, minlength=num_clusters)
        nonempty = counts > 0
        updated = centres.clone()
        updated[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        updated = F.normalize(updated, dim=1)
        shift = float((updated - centres).norm(dim=1).mean())
        centres = updated
        if shift < tol:
            break
    labels, _ = _assign(x, centres)
    return labels, centres, iterations


def compute_clustering(
    features: Tensor,
    num_clusters: int,
    seed: int = 0,
    kmeans: str = "euclidean",
    max_iter: int = SPHERICAL_ITERATIONS,
) -> Clustering:
    """k-means on unit-norm features (N, D) with k = num_clusters.

    kmeans: "euclidean" (scikit-learn k-means++, KMEANS_N_INIT restarts, float64 on the CPU:
    this project's default) or "spherical" (the paper's, `spherical_kmeans`, on the features'
    device, at most max_iter iterations). Distances are Euclidean, unit-norm point to its
    cluster's centre.
    """
    check_choice("kmeans", kmeans, KMEANS_KINDS)
    check_range("num_clusters", num_clusters, 1, features.shape[0])
    if kmeans == "euclidean":
        return _euclidean(features, num_clusters, seed)
    labels, centres, iterations = spherical_kmeans(features, num_clusters, seed, max_iter)
    x = F.normalize(features.detach().float(), dim=1)
    distances = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = chunk_rows(x.shape[1])
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        distances[rows] = (x[rows] - centres[labels[rows]]).norm(dim=1)
    return Clustering(labels.cpu(), distances.double().cpu(), centres.cpu(), iterations)


def clusters(
    features: Tensor, num_clusters: int, seed: int = 0, kmeans: str = "euclidean"
) -> tuple[Tensor, Tensor]:
    """labels (N,) and distances to the centre (N,) of `compute_clustering`."""
    clustering = compute_clustering(features, num_clusters, seed, kmeans)
    return clustering.labels, clustering.distances


def proportional_counts(sizes: Tensor, total: int) -> Tensor:
    """Per-cluster quotas proportional to cluster sizes (K,) summing to total (largest remainder)."""
    quota = sizes.double() * total / sizes.sum()
    counts = quota.floor().long()
    remainder_order = torch.argsort(quota - counts, descending=True, stable=True)
    counts[remainder_order[: total - int(counts.sum())]] += 1
    return counts


def balanced_counts(sizes: Tensor, total: int) -> Tensor:
    """Equal per-cluster quotas (differences <= 1) summing to total, capped by cluster sizes (K,).

    Clusters are filled from the smallest: each takes an equal share of what is left, so the
    deficit of a cluster too small for its share moves to the larger ones (which also get the +1s).
    """
    counts = torch.zeros_like(sizes)
    remaining = total
    order = torch.argsort(sizes, stable=True).tolist()
    for position, cluster in enumerate(order):
        counts[cluster] = min(int(sizes[cluster]), remaining // (len(order) - position))
        remaining -= int(counts[cluster])
    return counts


def ranked_in_cluster(clustering: Clustering, descending: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Points ordered by (cluster, distance to its centre), ascending or descending distance.

    Returns:
        ranked (N,) point indices, their clusters (N,), and each one's rank in its cluster (N,).
    """
    labels, sizes = clustering.labels, clustering.sizes()
    # A stable sort by distance, then a stable sort by label.
    by_distance = torch.argsort(clustering.distances, descending=descending, stable=True)
    ranked = by_distance[torch.argsort(labels[by_distance], stable=True)]
    cluster = labels[ranked]
    starts = torch.cumsum(sizes, 0) - sizes
    return ranked, cluster, torch.arange(len(ranked)) - starts[cluster]


def ends_select(clustering: Clustering, total: int, balanced: bool, furthest: bool) -> Tensor:
    """cluster_* / balanced_*: per cluster keep its quota nearest to / furthest from the centre
    (clustering.py furthestmid_cluster and equal_cluster)."""
    sizes = clustering.sizes()
    counts = balanced_counts(sizes, total) if balanced else proportional_counts(sizes, total)
    ranked, cluster, rank = ranked_in_cluster(clustering, descending=furthest)
    return ranked[rank < counts[cluster]]


def mid_select(clustering: Clustering, total: int) -> Tensor:
    """cluster_mid: per cluster drop equal shares of its nearest and furthest points and keep the
    proportional quota in the middle (clustering.py mid_cluster: (1 - pr) / 2 off each end)."""
    sizes = clustering.sizes()
    counts = proportional_counts(sizes, total)
    furthest_dropped = (sizes - counts) // 2
    low = sizes - counts - furthest_dropped
    ranked, cluster, rank = ranked_in_cluster(clustering, descending=False)
    return ranked[(rank >= low[cluster]) & (rank < (low + counts)[cluster])]


def mix_select(clustering: Clustering, total: int, fraction: float, nearest: float) -> Tensor:
    """cluster_mix: per cluster keep `nearest` x size nearest points and the rest of its
    proportional quota furthest (clustering.py furthestnearest_cluster, rat = 0.2); below
    fraction = nearest, the whole quota is nearest."""
    sizes = clustering.sizes()
    counts = proportional_counts(sizes, total)
    near = torch.round(counts.double() * min(nearest, fraction) / fraction).long()
    ranked, cluster, rank = ranked_in_cluster(clustering, descending=False)
    far_start = (sizes - (counts - near))[cluster]
    return ranked[(rank < near[cluster]) | (rank >= far_start)]


def drop_select(clustering: Clustering, total: int, fraction: float, seed: int) -> Tensor:
    """drop_cluster: keep round(fraction x K) whole clusters drawn by a seeded permutation (more
    if they hold fewer than total points) and, in them, the proportional quota nearest to the
    centre (clustering.py drop_clusters, which keeps int(pr x size) per cluster and so about
    pr^2 of the data; here the subset has exactly total points)."""
    sizes = clustering.sizes()
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed))
    held = torch.cumsum(sizes[order], 0)
    keep = max(round(fraction * len(sizes)), int(torch.searchsorted(held, total)) + 1, 1)
    kept_sizes = torch.zeros_like(sizes)
    kept_sizes[order[:keep]] = sizes[order[:keep]]
    counts = proportional_counts(kept_sizes, total)
    ranked, cluster, rank = ranked_in_cluster(clustering, descending=False)
    return ranked[rank < counts[cluster]]
