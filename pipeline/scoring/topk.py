"""Scoring a block of users against the catalog: rated items masked, the k best kept.

The top-N engine under recommend, evaluate, the peers, training's ranking validation and the benchmarks:
every list the project judges is cut the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

USERS_PER_BLOCK = 1024


def by_user(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n_users + 1], items): user u's items are items[offsets[u]:offsets[u + 1]]."""
    order = np.argsort(users, kind="stable")
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=offsets[1:])
    return offsets, np.asarray(items)[order].astype(np.int32)


DOT_ITEM_CHUNK = 4096  # items per matrix product: a block's scores for them stay in cache for the write


def dot_scores(queries: torch.Tensor, item_factors: torch.Tensor, out: torch.Tensor) -> None:
    """out = queries @ item_factors, in chunks of items."""
    for start in range(0, item_factors.shape[1], DOT_ITEM_CHUNK):
        end = start + DOT_ITEM_CHUNK
        torch.mm(queries, item_factors[:, start:end], out=out[:, start:end])


def recent_queries(factors: tuple[torch.Tensor, torch.Tensor], users: np.ndarray, offsets: np.ndarray,
                   items: np.ndarray, recent: int, weight: float, dim: int) -> torch.Tensor:
    """The users' rows of factors[0] (user vectors, item vectors transposed), their first `dim` columns x leaning
    towards the item vectors of each user's last `recent` items (items[offsets[u]:offsets[u + 1]], in the order
    rated): x + weight |x| v / |v|, v the sum of those items' first `dim` columns. A user with no items keeps x."""
    user_factors, item_factors = factors
    queries = user_factors[torch.from_numpy(users)]  # a copy: rows picked by index
    if not recent or not weight:
        return queries
    ends = offsets[users + 1]
    rows, at = _runs(np.maximum(offsets[users], ends - recent), ends)
    picked = item_factors[:dim, torch.from_numpy(items[at].astype(np.int64))].T
    v = torch.zeros(len(users), dim, dtype=queries.dtype).index_add_(0, torch.from_numpy(rows), picked)
    x = queries[:, :dim]
    x += weight * x.norm(dim=1, keepdim=True) / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * v
    return queries


def mask_seen(scores: torch.Tensor, users: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """Set row r's items[offsets[users[r]]:offsets[users[r] + 1]] (what user users[r] rated) to -inf."""
    rows, at = _runs(offsets[users], offsets[users + 1])
    scores[torch.from_numpy(rows), torch.from_numpy(items[at].astype(np.int64))] = -torch.inf
    return scores


def _runs(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) of every position in the runs [starts[r], ends[r]), run by run."""
    lengths = ends - starts
    rows = np.repeat(np.arange(len(starts)), lengths)
    at = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    return rows, at


TOPK_CHUNK = 128  # columns per chunk in top_k's first pass


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k, dim=1), faster on wide rows: a row's k best values lie in the k
    chunks of TOPK_CHUNK columns with the best maxima, so only those chunks are searched."""
    rows, width = scores.shape
    k = min(k, width)
    if width % TOPK_CHUNK or k * TOPK_CHUNK >= width:
        return torch.topk(scores, k, dim=1)
    chunks = scores.view(rows, -1, TOPK_CHUNK)
    best_chunks = torch.topk(chunks.amax(dim=2), k, dim=1).indices
    candidates = chunks.gather(1, best_chunks[:, :, None].expand(-1, -1, TOPK_CHUNK)).reshape(rows, -1)
    values, at = torch.topk(candidates, k, dim=1)
    return values, best_chunks.gather(1, at // TOPK_CHUNK) * TOPK_CHUNK + at % TOPK_CHUNK


def top_lists(score_rows: Callable[[np.ndarray], torch.Tensor], users: np.ndarray,
              seen: tuple[np.ndarray, np.ndarray], k: int) -> list[list[int]]:
    """Each user's k best unseen items, best first, from score_rows(block of users) -> [block, items]."""
    lists = []
    for start in range(0, len(users), USERS_PER_BLOCK):
        block = users[start:start + USERS_PER_BLOCK]
        scores = mask_seen(score_rows(block), block, *seen)
        values, items = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        lists += [row[np.isfinite(vals)].tolist() for row, vals in zip(items.numpy(), values.numpy())]
    return lists


def best_rows(users: torch.Tensor, scores: torch.Tensor, items: torch.Tensor) -> pd.DataFrame:
    """Rows of (user, rank, item, score) from each user's scores, best first, and the items they score:
    the finite ones only (a user who has rated all but 3 items gets 3)."""
    rows, cols = torch.isfinite(scores).nonzero(as_tuple=True)
    return pd.DataFrame({"user_idx": users[rows].numpy().astype(np.int32), "rank": (cols + 1).numpy().astype(np.int32),
                         "item_idx": items[rows, cols].numpy().astype(np.int32),
                         "score": scores[rows, cols].numpy().astype(np.float32)})
