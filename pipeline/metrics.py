"""Rating and ranking metrics as plain numpy functions.

Training validation, the evaluate stage and the benchmarks all call these, so a number means the same
thing wherever it is reported. Rating errors are kept as sums until the end, because Horovod ranks and
Spark partitions add them up before anything is divided.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np


def error_sums(pred, true) -> dict:
    """Sum of squared errors, sum of absolute errors and count, as floats (to be summed, never averaged)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} ratings")
    err = pred - true
    return {"sse": float(err @ err), "sae": float(np.abs(err).sum()), "n": float(err.size)}


def rating_errors(sums: dict) -> dict:
    """RMSE and MAE from `error_sums` (or their sum over ranks); NaN when there were no ratings."""
    n = float(sums["n"])
    if n <= 0:
        return {"rmse": math.nan, "mae": math.nan}
    return {"rmse": math.sqrt(float(sums["sse"]) / n), "mae": float(sums["sae"]) / n}


def round_to_levels(pred, levels) -> np.ndarray:
    """Each prediction snapped to the nearest of the sorted rating levels (a tie goes to the lower level)."""
    levels = np.asarray(levels, dtype=np.float64)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(midpoints, np.asarray(pred, dtype=np.float64), side="left")]


def ranking_metrics(recommended: Sequence[Sequence], relevant: Sequence[Collection], k: int) -> dict:
    """Precision, recall, NDCG, MAP and hit rate at k, averaged over the users with a relevant item.

    `recommended[u]` is user u's list of distinct items, best first (only the first k count);
    `relevant[u]` the items that count as hits for u.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(recommended) != len(relevant):
        raise ValueError(f"{len(recommended)} recommendation lists for {len(relevant)} users")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    totals = np.zeros(5)
    users = 0
    for rec, rel in zip(recommended, relevant):
        rel = set(rel)
        if not rel:
            continue
        hits = np.array([item in rel for item in list(rec)[:k]], dtype=np.float64)
        n_hits = hits.sum()
        ideal = min(k, len(rel))
        dcg = hits @ discount[:len(hits)]
        idcg = discount[:ideal].sum()
        precision_at_i = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        ap = (precision_at_i * hits).sum() / ideal
        totals += [n_hits / k, n_hits / len(rel), dcg / idcg, ap, float(n_hits > 0)]
        users += 1
    means = totals / users if users else np.full(5, math.nan)
    names = ("precision", "recall", "ndcg", "map", "hit_rate")
    return {**{f"{name}@{k}": float(v) for name, v in zip(names, means)}, "users": users}


def catalog_coverage(recommended: Sequence[Sequence], n_items: int) -> float:
    """Distinct items recommended to anyone, as a fraction of the catalog."""
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    distinct = set()
    for rec in recommended:
        distinct.update(rec)
    return len(distinct) / n_items


def mean_popularity(recommended: Sequence[Sequence], item_counts) -> float:
    """Mean of item_counts[item] over every recommendation made (NaN when none was made)."""
    items = [item for rec in recommended for item in rec]
    if not items:
        return math.nan
    return float(np.asarray(item_counts, dtype=np.float64)[np.asarray(items, dtype=np.int64)].mean())
