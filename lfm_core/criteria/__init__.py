"""Scoring criteria for data reduction: pure functions from features / scores to kept indices.

Definitions follow the paper's released code (briqr/explo-r-it-ing_lfm_stability, src/scoring):
- clustering criteria run k-means on L2-normalised features (the paper clusters unit-norm CLIP
  features, k = 24) and rank the points of each cluster by Euclidean distance to its centroid;
  "cluster_*" (proportional) keeps the same fraction of every cluster, "balanced_*" the same
  number per cluster, moving the quota of clusters that are too small to the others.
- "loss" / "grad" keep the top-k scores, i.e. the hardest examples (pruning.py's
  score_based_ind with largest=True); scores come from `per_sample_scores`, which averages
  over the paper's 10 interior times linspace(0, 1, 12)[1:-1] and a seeded noise bank.
- "kcenter" is greedy farthest-first traversal (Sener & Savarese, 2018) on unit-norm features.
Every criterion keeps exactly round(fraction * N) unique indices, returned sorted ascending.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from lfm_core.errors import ConfigError, check_choice, check_range
from lfm_core.paths import per_sample_fm_loss

CRITERIA = (
    "random",
    "cluster_nearest",
    "cluster_furthest",
    "balanced_nearest",
    "balanced_furthest",
    "loss",
    "grad",
    "kcenter",
)
SCORE_CRITERIA = ("loss", "grad")
SCORE_KINDS = SCORE_CRITERIA
DEFAULT_NUM_CLUSTERS = 24  # the paper's cluster_features.py default k
KMEANS_N_INIT = 4  # k-means restarts; the best inertia wins
NUM_SCORE_T = 10  # interior t values the paper's scores average over ("10t")
NUM_SCORE_NOISE = 2  # noise draws per t in the paper's grad_loss_scoring.py


def subset_size(fraction: float, n: int) -> int:
    """Number of kept samples, round(fraction * n); fraction in (0, 1] and at least one kept."""
    check_range("fraction", fraction, 0.0, 1.0, low_open=True)
    total = round(fraction * n)
    if total < 1:
        raise ConfigError(f"fraction: {fraction} of {n} samples keeps none")
    return total


def _dataset_size(features: Tensor | None, scores: Tensor | None, num_samples: int | None) -> int:
    """N, from whichever of features (N, D), scores (N,) and num_samples are given."""
    sizes = {
        key: size
        for key, size in (
            ("features", None if features is None else features.shape[0]),
            ("scores", None if scores is None else scores.shape[0]),
            ("num_samples", num_samples),
        )
        if size is not None
    }
    if not sizes or len(set(sizes.values())) > 1:
        raise ConfigError(
            f"select: need features, scores or num_samples of one length N, got {sizes}"
        )
    return next(iter(sizes.values()))


def clusters(features: Tensor, num_clusters: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means on unit-norm features.

    Args:
        features: (N, D). num_clusters: k. seed: k-means seed.

    Returns:
        labels (N,) int64 and each point's distance to its cluster's centroid (N,), the
        centroid being the mean of the cluster's unit-norm features.
    """
    x = F.normalize(features.detach().double().cpu(), dim=1)
    kmeans = KMeans(n_clusters=num_clusters, n_init=KMEANS_N_INIT, random_state=seed)
    labels = torch.from_numpy(kmeans.fit_predict(x.numpy())).long()
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    centroids = sums / torch.bincount(labels, minlength=num_clusters).clamp(min=1)[:, None]
    return labels, (x - centroids[labels]).norm(dim=1)


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


def _cluster_select(
    features: Tensor, total: int, num_clusters: int, seed: int, balanced: bool, furthest: bool
) -> Tensor:
    labels, distances = clusters(features, num_clusters, seed)
    sizes = torch.bincount(labels, minlength=num_clusters)
    counts = balanced_counts(sizes, total) if balanced else proportional_counts(sizes, total)
    # Rank by (cluster, distance): a stable sort by distance, then by label.
    by_distance = torch.argsort(distances, descending=furthest, stable=True)
    ranked = by_distance[torch.argsort(labels[by_distance], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_cluster = torch.arange(len(ranked)) - starts[labels[ranked]]
    return ranked[rank_in_cluster < counts[labels[ranked]]]


def kcenter_greedy(features: Tensor, total: int, seed: int = 0) -> Tensor:
    """Greedy k-center coreset on unit-norm features (N, D): start at a seeded random point,
    then repeatedly add the point farthest from everything chosen so far. Returns (total,)."""
    x = F.normalize(features.detach().float().cpu(), dim=1)
    first = int(torch.randint(x.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    min_distance = (x - x[first]).norm(dim=1)
    for _ in range(total - 1):
        chosen.append(int(min_distance.argmax()))
        min_distance = torch.minimum(min_distance, (x - x[chosen[-1]]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long)


def _required(criterion: str, key: str, value: Tensor | None, ndim: int) -> Tensor:
    """value, detached, or a ConfigError when a criterion's input is missing or misshapen."""
    if value is None or value.dim() != ndim:
        shape = "(N,)" if ndim == 1 else "(N, D)"
        raise ConfigError(f"criterion {criterion!r} needs {key} of shape {shape}")
    return value.detach()


def select(
    criterion: str,
    fraction: float,
    *,
    features: Tensor | None = None,
    scores: Tensor | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    num_samples: int | None = None,
) -> Tensor:
    """Indices of the samples kept by a criterion.

    Args:
        criterion: one of CRITERIA.
        fraction: kept fraction in (0, 1]; exactly round(fraction * N) samples are kept.
        features: (N, D) embeddings, required by the clustering criteria and "kcenter".
        scores: (N,) per-sample scores, required by "loss" / "grad" (higher = harder = kept).
        num_clusters: k for the clustering criteria (default DEFAULT_NUM_CLUSTERS, at most N).
        seed: seed of k-means, of k-center's first point and of "random".
        num_samples: N, for "random" when neither features nor scores is given.

    Returns:
        LongTensor of kept indices, unique and sorted ascending.
    """
    check_choice("criterion", criterion, CRITERIA)
    n = _dataset_size(features, scores, num_samples)
    total = subset_size(fraction, n)
    if criterion == "random":
        kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:total]
    elif criterion in SCORE_CRITERIA:
        kept = torch.topk(
            _required(criterion, "scores", scores, 1).cpu(), total, largest=True
        ).indices
    elif criterion == "kcenter":
        kept = kcenter_greedy(_required(criterion, "features", features, 2), total, seed)
    else:
        k = DEFAULT_NUM_CLUSTERS if num_clusters is None else num_clusters
        check_range("num_clusters", k, 1, n)
        kept = _cluster_select(
            _required(criterion, "features", features, 2),
            total,
            k,
            seed,
            balanced=criterion.startswith("balanced"),
            furthest=criterion.endswith("furthest"),
        )
    return torch.sort(kept).values


def labels_needed(labels: Tensor, indices: Tensor) -> int:
    """Labels an annotator must provide to train on the subset: one per kept sample of labels."""
    if len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < len(labels):
        raise ConfigError(f"indices: must lie in [0, {len(labels) - 1}]")
    return len(torch.unique(indices))


def class_counts(labels: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """Kept samples per class, (num_classes,) int64."""
    return torch.bincount(labels[indices], minlength=num_classes)


def interior_t_grid(num: int = NUM_SCORE_T) -> Tensor:
    """num equally spaced times strictly inside (0, 1): linspace(0, 1, num + 2)[1:-1]."""
    return torch.linspace(0.0, 1.0, num + 2)[1:-1]


def _squared_grad_norms(model: nn.Module, x1: Tensor, x0: Tensor, t: Tensor, cond: dict) -> Tensor:
    """||d loss_i / d params||^2 for each sample i of the batch, (B,), via torch.func.vmap."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict, x1_i: Tensor, x0_i: Tensor, t_i: Tensor, cond_i: dict) -> Tensor:
        def velocity(x: Tensor, tt: Tensor, **c: Tensor) -> Tensor:
            return functional_call(model, p, (x, tt), c)

        one = {key: value[None] for key, value in cond_i.items()}
        # per_sample_fm_loss only calls its model argument, so a functional velocity fits.
        loss = per_sample_fm_loss(velocity, x1_i[None], x0_i[None], t_i[None], **one)  # type: ignore[arg-type]
        return loss[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x1, x0, t, cond)
    return sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads.values())


def per_sample_scores(
    model: nn.Module,
    latents: Tensor,
    kind: str = "loss",
    t_values: Tensor | None = None,
    num_noise: int = NUM_SCORE_NOISE,
    seed: int = 0,
    batch_size: int = 64,
    labels: Tensor | None = None,
    progress: bool = True,
) -> Tensor:
    """Per-sample difficulty scores from an (early) flow-matching checkpoint.

    score_i = mean over t of L_i(t) / mean_j L_j(t), where L_i(t) averages over a fixed noise bank
    of num_noise draws x0_m (shared by all samples) either the per-sample FM loss ("loss") or
    the squared norm of its gradient w.r.t. the model parameters ("grad"). Dividing by the data
    set mean at each t gives every t equal weight; the paper does the same with a running EMA,
    which made a score depend on the order samples were visited.

    Args:
        model: velocity network model(x, t, class_labels=...); scored in eval mode (restored after).
        latents: (N, C, H, W) training latents x1.
        kind: "loss" or "grad".
        t_values: (T,) times in (0, 1); default interior_t_grid() (10 values).
        num_noise: size of the noise bank. seed: seed of the noise bank.
        batch_size: samples per forward pass (keep small for "grad": per-sample grads).
        labels: (N,) class labels passed as class_labels, or None.
        progress: show a tqdm bar.

    Returns:
        (N,) float64 scores; higher = harder.
    """
    check_choice("kind", kind, SCORE_KINDS)
    if labels is not None and labels.shape[0] != latents.shape[0]:
        raise ConfigError(
            f"labels: length {labels.shape[0]} != number of latents {latents.shape[0]}"
        )
    t_values = interior_t_grid() if t_values is None else t_values
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn((num_noise, *latents.shape[1:]), generator=generator).to(latents)
    was_training = model.training
    model.eval()
    per_t = torch.zeros(latents.shape[0], len(t_values), dtype=torch.float64)
    for start in tqdm(
        range(0, latents.shape[0], batch_size), desc=f"{kind} scores", disable=not progress
    ):
        x1 = latents[start : start + batch_size]
        cond = {} if labels is None else {"class_labels": labels[start : start + batch_size]}
        for column, t_value in enumerate(t_values.tolist()):
            t = torch.full((x1.shape[0],), t_value, device=x1.device, dtype=x1.dtype)
            for x0 in bank:
                x0 = x0.expand_as(x1)
                if kind == "loss":
                    with torch.no_grad():
                        value = per_sample_fm_loss(model, x1, x0, t, **cond)
                else:
                    value = _squared_grad_norms(model, x1, x0, t, cond)
                per_t[start : start + x1.shape[0], column] += value.double().cpu() / num_noise
    model.train(was_training)
    return (per_t / per_t.mean(0)).mean(1)
