"""Scoring criteria: exact subset sizes, the named orderings, seeds, and one-line errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfm_core.criteria import (
    CRITERIA,
    balanced_counts,
    class_counts,
    clusters,
    interior_t_grid,
    labels_needed,
    per_sample_scores,
    proportional_counts,
    select,
)
from lfm_core.errors import ConfigError
from lfm_core.paths import per_sample_fm_loss

NUM_BLOBS = 4


def _blobs(sizes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight blobs around orthogonal directions: clusters are known even after normalising."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)])
    centres = 10.0 * torch.eye(len(sizes) + 2)[: len(sizes)]
    return centres[labels] + 0.5 * torch.randn(len(labels), len(sizes) + 2, generator=g), labels


def _scores(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("n", [7, 203])
@pytest.mark.parametrize("fraction", [0.1, 0.333, 0.5, 0.75, 1.0])
def test_exact_size_unique_sorted(criterion, n, fraction):
    features, _ = _blobs((n // 4, n // 4, n // 4, n - 3 * (n // 4)))
    kept = select(criterion, fraction, features=features, scores=_scores(n), num_clusters=NUM_BLOBS)
    assert kept.dtype == torch.long and len(kept) == round(fraction * n)
    assert torch.equal(kept, torch.unique(kept))  # unique and sorted ascending
    assert int(kept.min()) >= 0 and int(kept.max()) < n


def test_kmeans_recovers_the_blobs():
    features, truth = _blobs((30, 40, 50, 60))
    labels, _ = clusters(features, NUM_BLOBS)
    for blob in range(NUM_BLOBS):
        assert len(torch.unique(labels[truth == blob])) == 1
    assert len(torch.unique(labels)) == NUM_BLOBS


@pytest.mark.parametrize("criterion", ["cluster_nearest", "cluster_furthest"])
def test_proportional_clustering_keeps_the_named_end_of_each_cluster(criterion):
    sizes = (30, 40, 50, 60)
    features, truth = _blobs(sizes)
    kept = select(criterion, 0.5, features=features, num_clusters=NUM_BLOBS)
    unit = F.normalize(features.double(), dim=1)
    is_kept = torch.zeros(len(truth), dtype=torch.bool)
    is_kept[kept] = True
    for blob, size in enumerate(sizes):
        members = truth == blob
        distance = (unit[members] - unit[members].mean(0)).norm(dim=1)
        near, far = distance[is_kept[members]], distance[~is_kept[members]]
        assert len(near) == size // 2
        if criterion == "cluster_nearest":
            assert near.max() < far.min()
        else:
            assert near.min() > far.max()


@pytest.mark.parametrize("criterion", ["balanced_nearest", "balanced_furthest"])
def test_balanced_clustering_keeps_equal_counts(criterion):
    features, truth = _blobs((30, 40, 50, 60))
    kept = select(criterion, 0.3, features=features, num_clusters=NUM_BLOBS)
    per_blob = torch.bincount(truth[kept], minlength=NUM_BLOBS)
    assert per_blob.sum() == 54 and per_blob.max() - per_blob.min() <= 1


def test_balanced_clustering_moves_the_deficit_of_a_small_cluster():
    features, truth = _blobs((5, 40, 50, 60))
    kept = select("balanced_nearest", 0.5, features=features, num_clusters=NUM_BLOBS)
    # 78 kept: the 5-point blob whole, 73 over the rest, the +1 to the largest blob.
    assert torch.bincount(truth[kept], minlength=NUM_BLOBS).tolist() == [5, 24, 24, 25]


def test_quota_helpers():
    assert balanced_counts(torch.tensor([3, 10, 10]), 15).tolist() == [3, 6, 6]
    assert balanced_counts(torch.tensor([10, 10, 10]), 8).tolist() == [2, 3, 3]
    assert proportional_counts(torch.tensor([10, 20, 30]), 30).tolist() == [5, 10, 15]
    assert proportional_counts(torch.tensor([1, 1, 1]), 2).tolist() == [1, 1, 0]


def test_random_is_seeded():
    a = select("random", 0.5, num_samples=100, seed=1)
    assert torch.equal(a, select("random", 0.5, num_samples=100, seed=1))
    assert not torch.equal(a, select("random", 0.5, num_samples=100, seed=2))


@pytest.mark.parametrize("criterion", ["cluster_nearest", "balanced_furthest", "kcenter"])
def test_feature_criteria_are_deterministic_per_seed(criterion):
    features, _ = _blobs((30, 40, 50, 60))
    a = select(criterion, 0.4, features=features, num_clusters=NUM_BLOBS, seed=3)
    assert torch.equal(a, select(criterion, 0.4, features=features, num_clusters=NUM_BLOBS, seed=3))


def test_kcenter_picks_the_outliers_first():
    g = torch.Generator().manual_seed(0)
    bulk = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(50, 3, generator=g)
    outliers = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    kept = select("kcenter", 4 / 53, features=torch.cat([bulk, outliers]))
    assert {50, 51, 52} <= set(kept.tolist())


def test_loss_keeps_the_highest_scores():
    scores = _scores(40)
    kept = select("loss", 0.25, scores=scores)
    assert set(kept.tolist()) == set(torch.argsort(scores, descending=True)[:10].tolist())
    assert torch.equal(kept, select("grad", 0.25, scores=scores))


def test_labels_needed_and_class_counts():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    kept = torch.tensor([1, 3, 4])
    assert labels_needed(labels, kept) == 3
    assert class_counts(labels, kept, 4).tolist() == [0, 1, 2, 0]


class _Affine(nn.Module):
    """v(x, t) = a x + b with one sample-independent weight pair: exact FM losses are known."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(-0.25))

    def forward(self, x, t, class_labels=None):
        return self.a * x + self.b


def _loop_scores(model, latents, kind, t_values, bank):
    """Reference: one sample at a time, autograd per sample."""
    rows = []
    for x1 in latents:
        row = []
        for t in t_values:
            values = []
            for x0 in bank:
                loss = per_sample_fm_loss(model, x1[None], x0[None], t.reshape(1))[0]
                if kind == "grad":
                    grads = torch.autograd.grad(loss, list(model.parameters()))
                    loss = sum(g.pow(2).sum() for g in grads)
                values.append(loss.item())
            row.append(sum(values) / len(values))
        rows.append(row)
    per_t = torch.tensor(rows, dtype=torch.float64)
    return (per_t / per_t.mean(0)).mean(1)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_per_sample_scores_match_a_per_sample_loop(kind):
    latents = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    latents[2] *= 4.0  # a hard sample
    model = _Affine()
    scores = per_sample_scores(
        model, latents, kind, num_noise=2, seed=5, batch_size=3, progress=False
    )
    bank = torch.randn((2, 2, 3, 3), generator=torch.Generator().manual_seed(5))
    expected = _loop_scores(model, latents, kind, interior_t_grid(), bank)
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert int(scores.argmax()) == 2 and model.training


def test_interior_grid_has_ten_values_inside_the_unit_interval():
    t = interior_t_grid()
    assert len(t) == 10 and t.min() > 0 and t.max() < 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: select("entropy", 0.5, num_samples=10),
            "criterion: unknown value 'entropy'; allowed: random, cluster_nearest, "
            "cluster_furthest, balanced_nearest, balanced_furthest, loss, grad, kcenter",
        ),
        (
            lambda: select("random", 0.0, num_samples=10),
            "fraction: 0.0 is outside the allowed range (0.0, 1.0]",
        ),
        (
            lambda: select("random", 1.5, num_samples=10),
            "fraction: 1.5 is outside the allowed range (0.0, 1.0]",
        ),
        (lambda: select("random", 0.01, num_samples=10), "fraction: 0.01 of 10 samples keeps none"),
        (
            lambda: select("random", 0.5),
            "select: need features, scores or num_samples of one length N, got {}",
        ),
        (
            lambda: select("loss", 0.5, features=torch.zeros(10, 2)),
            "criterion 'loss' needs scores of shape (N,)",
        ),
        (
            lambda: select("kcenter", 0.5, scores=torch.zeros(10)),
            "criterion 'kcenter' needs features of shape (N, D)",
        ),
        (
            lambda: select("loss", 0.5, features=torch.zeros(9, 2), scores=torch.zeros(10)),
            "select: need features, scores or num_samples of one length N, "
            "got {'features': 9, 'scores': 10}",
        ),
        (
            lambda: select("cluster_nearest", 0.5, features=torch.zeros(10, 2), num_clusters=11),
            "num_clusters: 11 is outside the allowed range [1, 10]",
        ),
        (
            lambda: per_sample_scores(_Affine(), torch.zeros(4, 1), "hessian"),
            "kind: unknown value 'hessian'; allowed: loss, grad",
        ),
    ],
)
def test_bad_inputs_give_one_line_config_errors(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message
