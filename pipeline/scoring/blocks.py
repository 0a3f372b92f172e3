"""Scoring with a trained model inside Spark tasks: every user of a list against the catalog, in blocks (never a
row-level users x items cross join), and given (user, item) pairs.

The model's weights are broadcast once (`ship`); each task rebuilds the model, scores blocks of users against every
item (one matrix product for the ranking score and the dot-product models, `score_all`'s split first layer for dmf
and neumf), masks what each user has already rated, and keeps the N best. By predicted rating, items are ranked by
the unclipped rating: clipped to the scale, every item above it would tie at the top. Tasks take contiguous runs
of users, so the output comes out in user order with no shuffle or sort.

Two-stage mode (`candidates` > 0): a block is first scored by the dot product of a dot-product retrieval model,
which is cheap for any catalog, and only each user's best `candidates` unseen items are scored by the model.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Iterator, Tuple

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType

from pipeline.models import registry
from pipeline.models.base import RatingModel
from pipeline.models.spec import ModelSpec
from pipeline.scoring.topk import TOPK_CHUNK, best_rows, dot_scores, mask_seen, recent_queries, top_k

TOP_SCHEMA = "user_idx int, rank int, item_idx int, score float"
Build = Callable[[], RatingModel]


def ship(spark: SparkSession, model: RatingModel, spec: dict) -> Build:
    """`build()`, which rebuilds a loaded model inside a Spark task from its spec (a manifest's) and weights,
    broadcast once."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    shipped = spark.sparkContext.broadcast((spec, buffer.getvalue()))

    def build() -> RatingModel:
        torch.set_num_threads(1)  # Spark runs one task per core already
        spec, weights = shipped.value
        m = registry.build(ModelSpec.of(spec))
        m.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
        return m.eval()

    return build


def top_n(spark: SparkSession, build: Build, n_items: int, users: np.ndarray, seen: tuple[np.ndarray, np.ndarray],
          n: int, block: int, order: str = "rating", retrieval: Build | None = None,
          candidates: int = 0, recent: tuple[int, float] = (0, 0.0)) -> DataFrame:
    """(user_idx, rank, item_idx, score) for the given users, best first, in the order of `users`; the items
    of `seen` (artifacts.seen_items) are left out. `order` is what ranks the items: "ranking" (the model's ranking
    score, each user's query leaning towards their `recent` = (items, weight) last rated: topk.recent_queries, which
    needs `seen` in the order rated) or "rating" (its unclipped predicted rating; `recent` stays (0, 0.0)). With
    `candidates` > 0 the model scores only each user's best `candidates` unseen items by the `retrieval` model (a
    dot-product model trained on the same data)."""
    shipped = spark.sparkContext.broadcast((np.asarray(users, dtype=np.int64), *seen))

    def score(batches):
        model = build()
        recent_dim = model.ranking_user.embedding_dim if order == "ranking" else 0
        if order == "ranking":
            dot = model.ranking_factors()
        elif candidates:
            dot = retrieval().dot_factors()
        else:
            dot = model.dot_factors() if model.kind.dot_product else None
        all_users, seen_offsets, seen_items = shipped.value
        # One buffer per task, its width padded for top_k; the padding stays -inf.
        grid = torch.full((block, -(-n_items // TOPK_CHUNK) * TOPK_CHUNK), -torch.inf)
        for pdf in batches:
            for b in pdf.id:
                users = torch.from_numpy(all_users[b * block:(b + 1) * block])
                scores = grid[:len(users)]
                with torch.no_grad():
                    if dot is None:
                        scores[:, :n_items] = model.score_all(users, torch.arange(n_items), clip=False)
                    else:
                        queries = recent_queries(dot, users.numpy(), seen_offsets, seen_items, *recent, recent_dim)
                        dot_scores(queries, dot[1], scores[:, :n_items])
                        rating_term = model.ranking_rating_term(users) if order == "ranking" else None
                        if rating_term is not None:
                            scores[:, :n_items] += rating_term
                    mask_seen(scores, users.numpy(), seen_offsets, seen_items)
                    yield (best_rows(users, *top_k(scores, n)) if not candidates
                           else _rerank(model, users, *top_k(scores, candidates), n))

    blocks = -(-len(users) // block)
    # spark.range hands each task a contiguous run of blocks: the output comes out in the order of `users`.
    parts = max(1, min(blocks, spark.sparkContext.defaultParallelism * 2))
    return spark.range(0, blocks, 1, parts).mapInPandas(score, TOP_SCHEMA)


def _rerank(model, users: torch.Tensor, reach: torch.Tensor, cand: torch.Tensor, n: int) -> pd.DataFrame:
    """The model's n best of each user's retrieved candidates (reach: their retrieval scores)."""
    # Unreached candidates (seen items, or padding when candidates reach past the unseen items) may carry
    # any index: point them at item 0 and drop them below.
    cand = torch.where(torch.isfinite(reach), cand, 0)
    # In item order, so that with every item a candidate the ranking (ties included) is the exact one.
    cand, order = cand.sort(dim=1)
    reach = reach.gather(1, order)
    fine = model.expected(model(users[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))).reshape(cand.shape)
    fine[~torch.isfinite(reach)] = -torch.inf
    best, at = torch.topk(fine, min(n, fine.shape[1]), dim=1)
    return best_rows(users, best, cand.gather(1, at))


def predict_pairs(build: Build, pairs: DataFrame) -> DataFrame:
    """`pairs` (user_idx, item_idx, ...) with a `prediction` column added; a null index (a user or item outside
    training) gets the model's fallback (RatingModel.predict_or_fallback)."""

    # An iterator UDF rebuilds the model once per task, and leaves the other columns to Spark untouched.
    @F.pandas_udf(FloatType())
    def rating(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = build()
        for users, items in batches:
            yield pd.Series(ratings(model, users.to_numpy(np.float64), items.to_numpy(np.float64)))

    return pairs.withColumn("prediction", rating("user_idx", "item_idx"))


def ratings(model: RatingModel, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The model's ratings of (user_idx, item_idx) pairs, NaN where an index is unknown."""
    user_known, item_known = ~np.isnan(users), ~np.isnan(items)
    with torch.no_grad():
        out = model.predict_or_fallback(torch.as_tensor(np.where(user_known, users, 0), dtype=torch.long),
                                        torch.as_tensor(np.where(item_known, items, 0), dtype=torch.long),
                                        torch.from_numpy(user_known), torch.from_numpy(item_known))
    return out.numpy().astype(np.float32)
