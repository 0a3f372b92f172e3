"""The top-N peers a model's lists are judged against on the same split: most popular and EASE.

Most popular ranks each user's unseen items by how many training ratings they have. EASE (Steck, WWW
2019) is a closed-form item-item model on the binary user x item matrix X of the training ratings:
B = I - P / diag(P) with P = (X^T X + lambda I)^-1 and a zero diagonal; a user's scores are their row of
X times B. It is dense item x item on the driver: float64 G and P of 8 n^2 bytes each (0.8 GB at 10,000
items) and an O(n^3) inversion per lambda tried: 9.6 s for 5,000 items on 2 shared cores, so about 80 s at
10,000, where evaluate.ease_max_items stops by default.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pipeline import metrics
from pipeline.scoring.topk import USERS_PER_BLOCK, mask_seen, top_lists

EASE_LAMBDAS = (30.0, 100.0, 300.0, 1000.0, 3000.0)


def popularity_scores(item_counts: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
    """Scores that order items by training count, ties by lower item_idx."""
    n = len(item_counts)
    order = torch.as_tensor(np.asarray(item_counts, dtype=np.float64) - np.arange(n) / (n + 1.0))
    return lambda users: order.expand(len(users), n).clone()


def gram(rated: tuple[np.ndarray, np.ndarray], n_items: int) -> torch.Tensor:
    """X^T X (float64) for the binary user x item matrix X whose rows are `rated` (by_user's offsets and
    items: the same layout as a sparse CSR matrix), built from dense blocks of rows."""
    n_users = len(rated[0]) - 1
    g = torch.zeros(n_items, n_items, dtype=torch.float64)
    for start in range(0, n_users, USERS_PER_BLOCK):
        rows = dense_rows(rated, np.arange(start, min(start + USERS_PER_BLOCK, n_users)), n_items).double()
        g += rows.T @ rows
    return g


def ease_weights(g: torch.Tensor, lam: float) -> torch.Tensor:
    """B = I - P / diag(P), P = (G + lam I)^-1, zero diagonal (float32)."""
    p = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=g.dtype))
    b = -p / torch.diagonal(p)[None, :]
    b.fill_diagonal_(0.0)
    return b.float()


def ease_scores(rated: tuple[np.ndarray, np.ndarray], b: torch.Tensor) -> Callable[[np.ndarray], torch.Tensor]:
    return lambda users: dense_rows(rated, users, b.shape[0]) @ b


def dense_rows(rated: tuple[np.ndarray, np.ndarray], users: np.ndarray, n_items: int) -> torch.Tensor:
    """Rows `users` of the binary matrix X (float32): 1 where the user rated the item."""
    rows = torch.zeros(len(users), n_items)
    return mask_seen(rows, users, *rated).isinf().float()


def judged(lists: list[list[int]], relevant: list[set], k: int, item_counts: np.ndarray) -> dict:
    """Ranking metrics and the beyond-accuracy ones (coverage, mean popularity) of one method's lists."""
    return {**metrics.ranking_metrics(lists, relevant, k),
            "catalog_coverage": metrics.catalog_coverage(lists, len(item_counts)),
            "mean_popularity": metrics.mean_popularity(lists, item_counts)}


def evaluate_peers(rated: tuple[np.ndarray, np.ndarray], item_counts: np.ndarray, users: np.ndarray,
                   relevant: list[set], k: int, ease_max_items: int,
                   lambdas=EASE_LAMBDAS) -> tuple[dict, list[list[int]]]:
    """({"most_popular": ..., "ease": ...}, the most-popular lists) for the given users and their relevant
    items, from `rated`, each user's training items (by_user's layout), which no list repeats. EASE's
    lambda is the one of `lambdas` with the best NDCG@k on these users (the validation split)."""
    n_items = len(item_counts)
    popular = top_lists(popularity_scores(item_counts), users, rated, k)
    report = {"most_popular": judged(popular, relevant, k, item_counts)}
    if n_items > ease_max_items:
        report["ease"] = {"skipped": f"{n_items:,} items is more than evaluate.ease_max_items={ease_max_items:,}"}
        return report, popular
    g = gram(rated, n_items)
    tried, best = {}, None
    for lam in lambdas:
        result = judged(top_lists(ease_scores(rated, ease_weights(g, lam)), users, rated, k), relevant, k,
                        item_counts)
        tried[f"{lam:g}"] = result[f"ndcg@{k}"]
        if best is None or result[f"ndcg@{k}"] > best[f"ndcg@{k}"]:
            best = {**result, "lambda": lam}
    report["ease"] = {**best, "ndcg_by_lambda": tried}
    return report, popular


def same_lists(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """The share of users whose list holds exactly the items of the other's (NaN for no users)."""
    if not ours:
        return math.nan
    return sum(set(a) == set(b) for a, b in zip(ours, theirs)) / len(ours)
