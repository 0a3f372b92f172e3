"""Most popular and EASE, the peers in evaluate's report, against brute force on tiny cases."""
import numpy as np
import pytest
import torch

from pipeline import peers
from pipeline.scoring import topk


def tiny(seed=0, n_users=40, n_items=25, density=0.25):
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < density * np.linspace(0.3, 2, n_items)).astype(np.float64)
    users, items = np.nonzero(x)
    return x, users, items


def brute_top(scores: np.ndarray, x: np.ndarray, k: int) -> list[list[int]]:
    lists = []
    for u in range(len(scores)):
        unseen = [i for i in range(scores.shape[1]) if not x[u, i]]
        lists.append(sorted(unseen, key=lambda i: (-scores[u, i], i))[:k])
    return lists


def test_most_popular_is_the_most_rated_unseen_items():
    x, users, items = tiny()
    counts = x.sum(axis=0)
    seen = topk.by_user(users, items, len(x))
    lists = topk.top_lists(peers.popularity_scores(counts), np.arange(len(x)), seen, 5)
    assert lists == brute_top(np.tile(counts, (len(x), 1)), x, 5)


def test_ease_matches_its_closed_form_computed_plainly():
    x, users, items = tiny(1)
    lam = 7.0
    rated = topk.by_user(users, items, len(x))
    b = peers.ease_weights(peers.gram(rated, x.shape[1]), lam).double().numpy()
    # Steck's closed form, one column at a time: B_ij = -P_ij / P_jj, B_jj = 0.
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    expected = np.array([[0.0 if i == j else -p[i, j] / p[j, j] for j in range(x.shape[1])]
                         for i in range(x.shape[1])])
    assert b == pytest.approx(expected, abs=1e-5)
    # It also minimises ||X - XB||^2 + lam ||B||^2 under diag(B) = 0: a small step off it costs more.
    def loss(m):
        return ((x - x @ m) ** 2).sum() + lam * (m ** 2).sum()
    step = np.random.default_rng(2).normal(size=b.shape) * 1e-3
    np.fill_diagonal(step, 0)
    assert loss(b) < loss(b + step) and loss(b) < loss(b - step)
    lists = topk.top_lists(peers.ease_scores(rated, torch.as_tensor(b).float()), np.arange(len(x)), rated, 4)
    assert [set(a) for a in lists] == [set(a) for a in brute_top(x @ b, x, 4)]


def test_evaluate_peers_picks_the_best_lambda_and_skips_big_catalogs():
    x, users, items = tiny(3, n_users=80)
    counts = x.sum(axis=0)
    seen = topk.by_user(users, items, len(x))
    rng = np.random.default_rng(4)
    relevant = [set(rng.choice(np.flatnonzero(x[u] == 0), 2, replace=False).tolist()) for u in range(len(x))]
    report, popular = peers.evaluate_peers(seen, counts, np.arange(len(x)), relevant, 5, ease_max_items=1000,
                                           lambdas=(1.0, 10.0, 100.0))
    ease = report["ease"]
    assert ease["ndcg@5"] == max(ease["ndcg_by_lambda"].values()) and f"{ease['lambda']:g}" in ease["ndcg_by_lambda"]
    assert peers.same_lists(popular, popular) == 1.0 and len(popular) == len(x)
    report, _ = peers.evaluate_peers(seen, counts, np.arange(len(x)), relevant, 5, ease_max_items=10)
    assert "more than evaluate.ease_max_items=10" in report["ease"]["skipped"]
