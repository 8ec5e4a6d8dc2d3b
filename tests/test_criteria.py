"""Scoring criteria: exact subset sizes, the named orderings, seeds, and one-line errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lfm_core.criteria import (
    CLUSTER_CRITERIA,
    CRITERIA,
    FEATURE_CRITERIA,
    LABEL_CRITERIA,
    SCORE_CRITERIA,
    balanced_counts,
    class_counts,
    class_skew,
    clusters,
    compute_clustering,
    interior_t_grid,
    kcenter_greedy,
    labels_needed,
    normalise_scores,
    per_sample_scores,
    proportional_counts,
    score_kind,
    select,
    spherical_kmeans,
)
from lfm_core.criteria.coreset import herd
from lfm_core.criteria.scores import _squared_grad_norms
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
    features, labels = _blobs((n // 4, n // 4, n // 4, n - 3 * (n // 4)))
    kept = select(
        criterion,
        fraction,
        features=features,
        scores=_scores(n),
        num_clusters=NUM_BLOBS,
        labels=labels,
    )
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


def _loop_scores(model, latents, kind, t_values, bank, normalise="mean"):
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
    if normalise == "mean":
        return (per_t / per_t.mean(0)).mean(1)
    # The paper's loop (grad_loss_scoring.py compute_one_sample_scores), samples in order.
    ema, scores = [1.0] * per_t.shape[1], []
    for row in per_t.tolist():
        scores.append(sum(v / (e + 1e-8) for v, e in zip(row, ema, strict=True)) / len(row))
        ema = [0.9 * e + 0.1 * v for v, e in zip(row, ema, strict=True)]
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("normalise", ["mean", "ema"])
@pytest.mark.parametrize(("kind", "grad_chunk"), [("loss", None), ("grad", None), ("grad", 1)])
def test_per_sample_scores_match_a_per_sample_loop(kind, grad_chunk, normalise):
    latents = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    latents[2] *= 4.0  # a hard sample
    model = _Affine()
    scores = per_sample_scores(
        model,
        latents,
        kind,
        num_noise=2,
        seed=5,
        batch_size=3,
        progress=False,
        normalise=normalise,
        grad_chunk=grad_chunk,
    )
    bank = torch.randn((2, 2, 3, 3), generator=torch.Generator().manual_seed(5))
    expected = _loop_scores(model, latents, kind, interior_t_grid(), bank, normalise)
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
            "criterion: unknown value 'entropy'; allowed: " + ", ".join(CRITERIA),
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
        (
            lambda: per_sample_scores(_Affine(), torch.zeros(4, 1), normalise="median"),
            "normalise: unknown value 'median'; allowed: mean, ema",
        ),
        (
            lambda: select("cluster_nearest", 0.5, features=torch.zeros(10, 2), kmeans="cosine"),
            "kmeans: unknown value 'cosine'; allowed: euclidean, spherical",
        ),
        (
            lambda: select("class_skew", 0.5, features=torch.zeros(10, 2)),
            "criterion 'class_skew' needs labels of shape (N,)",
        ),
        (
            lambda: select("class_skew", 0.5, labels=torch.zeros(10).long(), skew=1.5),
            "skew: 1.5 is outside the allowed range [0.0, 1.0]",
        ),
        (
            lambda: select("random", 0.5, num_samples=10, labels=torch.zeros(9).long()),
            "select: need features, scores or num_samples of one length N, "
            "got {'num_samples': 10, 'labels': 9}",
        ),
    ],
)
def test_bad_inputs_give_one_line_config_errors(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message


def _circle(degrees: torch.Tensor) -> torch.Tensor:
    radians = degrees * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1)


def test_spherical_and_euclidean_kmeans_disagree_and_each_is_a_fixed_point():
    # A tight arc at 0 degrees and a wide one over [30, 330]: the wide cluster's mean is short,
    # so Euclidean assignment (to the mean) gives it more of the boundary than cosine does.
    x = _circle(torch.cat([torch.linspace(-5, 5, 40), torch.linspace(30, 330, 60)]))
    euclidean = compute_clustering(x, 2, kmeans="euclidean")
    spherical = compute_clustering(x, 2, kmeans="spherical")
    tight = [int((c.labels == c.labels[0]).sum()) for c in (euclidean, spherical)]
    assert tight == [62, 65]
    assert torch.equal(torch.cdist(x.double(), euclidean.centres).argmin(1), euclidean.labels)
    assert torch.allclose(spherical.centres.norm(dim=1), torch.ones(2))
    assert torch.equal((x @ spherical.centres.T).argmax(1), spherical.labels)
    assert torch.allclose(
        spherical.distances, (x - spherical.centres[spherical.labels]).norm(dim=1).double()
    )


def test_spherical_kmeans_recovers_the_blobs_and_stops_at_the_tolerance():
    features, truth = _blobs((30, 40, 50, 60))
    labels, centres, iterations = spherical_kmeans(features, NUM_BLOBS, seed=1)
    assert len(torch.unique(labels)) == NUM_BLOBS and iterations < 100
    for blob in range(NUM_BLOBS):
        assert len(torch.unique(labels[truth == blob])) == 1
    _, _, capped = spherical_kmeans(features, NUM_BLOBS, seed=1, max_iter=1)
    assert capped == 1


@pytest.mark.parametrize("kmeans", ["euclidean", "spherical"])
@pytest.mark.parametrize("criterion", CLUSTER_CRITERIA)
def test_a_shared_clustering_gives_the_same_subsets(criterion, kmeans):
    features, _ = _blobs((30, 40, 50, 60))
    clustering = compute_clustering(features, NUM_BLOBS, seed=2, kmeans=kmeans)
    direct = select(
        criterion, 0.3, features=features, num_clusters=NUM_BLOBS, seed=2, kmeans=kmeans
    )
    shared = select(criterion, 0.3, features=features, clustering=clustering, seed=2)
    assert torch.equal(direct, shared)
    if criterion not in ("balanced_kcenter", "balanced_herding"):  # the clustering only
        assert torch.equal(shared, select(criterion, 0.3, clustering=clustering, seed=2))


def _is_kept(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    return mask


def _by_blob(features, truth, blob):
    """Members of a blob in ascending order of distance to their (Euclidean) cluster centre."""
    clustering = compute_clustering(features, NUM_BLOBS)
    members = torch.nonzero(truth == blob)[:, 0]
    return members[torch.argsort(clustering.distances[members], stable=True)]


def test_cluster_mid_keeps_the_middle_of_each_cluster():
    sizes = (30, 40, 50, 60)
    features, truth = _blobs(sizes)
    is_kept = _is_kept(select("cluster_mid", 0.5, features=features, num_clusters=NUM_BLOBS), 180)
    for blob, size in enumerate(sizes):
        ranked = _by_blob(features, truth, blob)
        dropped = (size - size // 2) // 2  # off the far end; the near end loses the rest
        near = size - size // 2 - dropped
        assert is_kept[ranked].tolist() == [False] * near + [True] * (size // 2) + [False] * dropped


def test_cluster_mix_keeps_the_nearest_fifth_and_the_furthest_rest():
    sizes = (30, 40, 50, 60)
    features, truth = _blobs(sizes)
    is_kept = _is_kept(select("cluster_mix", 0.5, features=features, num_clusters=NUM_BLOBS), 180)
    for blob, size in enumerate(sizes):
        ranked = _by_blob(features, truth, blob)
        near, far = round(size * 0.2), size // 2 - round(size * 0.2)
        middle = size - near - far
        assert is_kept[ranked].tolist() == [True] * near + [False] * middle + [True] * far
    low = select("cluster_mix", 0.1, features=features, num_clusters=NUM_BLOBS)
    assert torch.equal(low, select("cluster_nearest", 0.1, features=features, num_clusters=4))


def test_drop_cluster_keeps_whole_clusters_or_their_nearest_points():
    features, truth = _blobs((50, 50, 50, 50))
    halves = torch.bincount(truth[select("drop_cluster", 0.5, features=features, num_clusters=4)])
    assert sorted(halves.tolist(), reverse=True)[:2] == [50, 50] and halves.sum() == 100
    # 60 points do not fit in round(0.3 x 4) = 1 cluster: two clusters, 30 nearest of each.
    kept = select("drop_cluster", 0.3, features=features, num_clusters=4, seed=1)
    counts = torch.bincount(truth[kept], minlength=4)
    assert sorted(counts.tolist()) == [0, 0, 30, 30]
    for blob in torch.nonzero(counts)[:, 0].tolist():
        assert _is_kept(kept, 200)[_by_blob(features, truth, blob)[:30]].all()


def _plain_kcenter(features, total, seed):
    """The farthest-first loop, one pick at a time over every point."""
    x = F.normalize(features.float(), dim=1)
    first = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(seed)))
    chosen, min_distance = [first], (x - x[first]).norm(dim=1)
    for _ in range(total - 1):
        chosen.append(int(min_distance.argmax()))
        min_distance = torch.minimum(min_distance, (x - x[chosen[-1]]).norm(dim=1))
    return chosen


@pytest.mark.parametrize("pool_size", [1, 7, 4096])
def test_kcenter_in_rounds_equals_the_plain_loop(pool_size):
    features = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    chosen = kcenter_greedy(features, 60, seed=4, pool_size=pool_size)
    assert chosen.tolist() == _plain_kcenter(features, 60, seed=4)


def test_kcenter_with_duplicate_points_returns_unique_indices():
    features = torch.eye(3).repeat(4, 1)  # 3 distinct points, 12 rows
    chosen = kcenter_greedy(features, 10, pool_size=2)
    assert len(torch.unique(chosen)) == 10


def test_balanced_kcenter_is_kcenter_inside_each_cluster():
    features, truth = _blobs((30, 40, 50, 60))
    kept = select("balanced_kcenter", 0.3, features=features, num_clusters=NUM_BLOBS, seed=3)
    clustering = compute_clustering(features, NUM_BLOBS, seed=3)
    counts = balanced_counts(clustering.sizes(), 54)
    for cluster in range(NUM_BLOBS):
        members = torch.nonzero(clustering.labels == cluster)[:, 0]
        local = _plain_kcenter(features[members], int(counts[cluster]), seed=3 + 10_000 * cluster)
        assert set(members[local].tolist()) <= set(kept.tolist())
    assert torch.bincount(truth[kept]).tolist() == [13, 13, 14, 14]


def test_herding_picks_the_point_nearest_the_residual_mean():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # mu = (1, 2/3): <z, mu> = (2, 2/3, 5/3) picks 0; then r = mu - z_0 = (-1, 2/3) picks 1.
    assert herd(z, 2).tolist() == [0, 1]
    assert herd(z, 3).tolist() == [0, 1, 2]


def test_herding_is_seeded_and_balanced_herding_is_balanced():
    features, truth = _blobs((30, 40, 50, 60))
    a = select("herding", 0.25, features=features, seed=1)
    assert torch.equal(a, select("herding", 0.25, features=features, seed=1))
    kept = select("balanced_herding", 0.3, features=features, num_clusters=NUM_BLOBS)
    assert torch.bincount(truth[kept]).tolist() == [13, 13, 14, 14]


@pytest.mark.parametrize(("criterion", "largest"), [("loss_lowest", False), ("grad", True)])
def test_score_criteria_keep_the_named_end(criterion, largest):
    scores = _scores(40)
    kept = select(criterion, 0.25, scores=scores)
    assert criterion in SCORE_CRITERIA
    assert set(kept.tolist()) == set(torch.argsort(scores, descending=largest)[:10].tolist())
    assert torch.equal(
        select("grad_lowest", 0.25, scores=scores), select("loss_lowest", 0.25, scores=scores)
    )


def test_class_skew_counts():
    labels = torch.cat([torch.full((40,), 0), torch.full((30,), 1), torch.full((30,), 2)])

    def counts(fraction, **options):
        kept = select("class_skew", fraction, labels=labels, **options)
        return class_counts(labels, kept, 3).tolist()

    assert counts(0.3) == [30, 0, 0]  # one class only, as the paper's gender subsets
    assert counts(0.6) == [40, 10, 10]  # the class runs out: the rest in proportion
    assert counts(0.5, skew=0.5) == [25, 13, 12]
    assert counts(0.5, skew=0.0, skew_class=2) == [29, 21, 0]  # none of class 2
    assert counts(0.3, skew=1.0, skew_class=1) == [0, 30, 0]
    assert torch.equal(class_skew(labels, 30, 0.5, 0, 7), class_skew(labels, 30, 0.5, 0, 7))


def test_ema_normalisation_is_the_papers_running_mean():
    per_t = torch.tensor([[2.0], [4.0]], dtype=torch.float64)
    ema = normalise_scores(per_t, "ema", alpha=0.5)
    assert ema.tolist() == [2.0 / (1.0 + 1e-8), 4.0 / (1.5 + 1e-8)]
    assert normalise_scores(per_t, "mean").tolist() == [2.0 / 3.0, 4.0 / 3.0]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 12)
        self.embed = nn.Embedding(3, 12)

    def forward(self, x, t, class_labels=None):
        h = torch.tanh(self.linear(x.flatten(1)) + t[:, None] + self.embed(class_labels))
        return h.reshape(x.shape)


def _full_vmap_norms(model, x1, x0, t, cond):
    """The previous implementation: every per-sample gradient at once (B x P), then norms."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(p, x1_i, x0_i, t_i, cond_i):
        one = {key: value[None] for key, value in cond_i.items()}
        prediction = functional_call(
            model, p, (x1_i[None] * t_i + (1 - t_i) * x0_i[None], t_i[None]), one
        )
        return (prediction - (x1_i - x0_i)[None]).pow(2).mean()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x1, x0, t, cond)
    return sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads.values())


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_grad_norms_equal_the_full_per_sample_gradients(chunk):
    torch.manual_seed(0)
    model = _Tiny()
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    t, cond = torch.rand(5, generator=g), {"class_labels": torch.tensor([0, 1, 2, 1, 0])}
    expected = _full_vmap_norms(model, x1, x0, t, cond)
    assert torch.allclose(_squared_grad_norms(model, x1, x0, t, cond, chunk), expected, rtol=1e-6)


def test_the_criterion_tables_cover_every_criterion_once():
    grouped = {"random", *SCORE_CRITERIA, *FEATURE_CRITERIA, *LABEL_CRITERIA}
    assert grouped == set(CRITERIA) and len(CRITERIA) == len(set(CRITERIA))
    assert [score_kind(c) for c in SCORE_CRITERIA] == ["loss", "grad", "loss", "grad"]
