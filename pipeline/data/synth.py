"""Synthetic MovieLens-shaped ratings with a planted low-rank structure, and the error of the truth behind them.

Two things are planted: how a user rates an item (biases plus <p_u, q_i>, with noise), and which items a user
rates at all (popularity, and with synth.choice > 0 the same factors: users pick what they like, as in real
data), so that a rating model and a ranking model each have a truth to recover.

The output is laid out like an ml-20m release (`ratings.csv/` and `movies.csv/` as Spark part files with a
header each, half-star scale or whole stars), so `prepare` ingests it like real data. Ratings are drawn
in fixed blocks of row ids, each from its own random stream keyed by (seed, block): the same config gives
the same bytes whatever the number of partitions, executors or shuffle partitions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.config import SynthConfig

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
BLOCK = 1 << 16  # rows per random stream
ROWS_PER_FILE = 1_000_000  # ratings.csv part files, decided by the config alone so the bytes do not vary
MU, USER_BIAS_STD, ITEM_BIAS_STD, INTERACTION_STD = 3.5, 0.3, 0.4, 0.8
USER_EXPONENT, ITEM_EXPONENT = 0.7, 1.0  # power laws of activity and popularity over rank
GENRE_SHARE = 0.15  # the top share of items along a genre's direction has that genre
FIRST_TIME, END_TIME = 946_684_800, 1_577_836_800  # 2000-01-01 and 2020-01-01 UTC
CHOICE_CANDIDATES = 8  # popularity draws a user picks one from, by planted affinity (see draw_block)
DRAWN = "id long, userId int, movieId int, rating double, timestamp long, score double"


@dataclass
class Planted:
    """The model behind the ratings. Per-user and per-item arrays are indexed by id - 1."""
    mu: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_popularity: np.ndarray  # probability of the user of each activity rank, descending
    item_popularity: np.ndarray
    user_by_rank: np.ndarray  # index of the user at each activity rank
    item_by_rank: np.ndarray
    genre_directions: np.ndarray  # [len(GENRES), rank], unit vectors in factor space
    genres: np.ndarray  # bool [items, len(GENRES)]
    years: np.ndarray

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The true noise-free scores of 0-based user and item indices."""
        return (self.mu + self.user_bias[users] + self.item_bias[items]
                + np.einsum("ij,ij->i", self.user_factors[users], self.item_factors[items]))


def scale(cfg: SynthConfig) -> tuple[float, float, float]:
    """(lowest, highest, step) of the written ratings."""
    return (0.5, 5.0, 0.5) if cfg.half_stars else (1.0, 5.0, 1.0)


def planted(cfg: SynthConfig) -> Planted:
    """The planted model of a config, drawn on the driver; the same config always gives the same model."""
    rng = np.random.default_rng([cfg.seed, 0])
    # <p, q> over `rank` products of two N(0, s) factors has variance rank * s^4
    sigma = (INTERACTION_STD ** 2 / cfg.rank) ** 0.25
    user_factors = rng.normal(0, sigma, (cfg.users, cfg.rank))
    item_factors = rng.normal(0, sigma, (cfg.items, cfg.rank))
    user_bias = rng.normal(0, USER_BIAS_STD, cfg.users)
    item_bias = rng.normal(0, ITEM_BIAS_STD, cfg.items)
    user_by_rank = rng.permutation(cfg.users)
    item_by_rank = rng.permutation(cfg.items)
    directions = rng.normal(size=(len(GENRES), cfg.rank))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    years = rng.integers(1920, 2020, cfg.items)
    along = item_factors @ directions.T
    genres = along >= np.quantile(along, 1 - GENRE_SHARE, axis=0)
    none = ~genres.any(axis=1)
    genres[none, along[none].argmax(axis=1)] = True
    return Planted(MU, user_bias, item_bias, user_factors, item_factors,
                   _power_law(cfg.users, USER_EXPONENT), _power_law(cfg.items, ITEM_EXPONENT),
                   user_by_rank, item_by_rank, directions, genres, years)


def _power_law(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _cdf(p: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(p)
    return cdf / cdf[-1]  # ends at exactly 1, so searchsorted of a draw in [0, 1) stays in range


def draw_block(model: Planted, cfg: SynthConfig, block: int, rows: int) -> pd.DataFrame:
    """Rows block*rows .. (block+1)*rows-1 of the endless stream of independent draws, before deduplication."""
    rng = np.random.default_rng([cfg.seed, 1, block])
    users = model.user_by_rank[np.searchsorted(_cdf(model.user_popularity), rng.random(rows), side="right")]
    candidates = CHOICE_CANDIDATES if cfg.choice else 1  # with one, the same stream as before choices were planted
    items = model.item_by_rank[np.searchsorted(_cdf(model.item_popularity), rng.random((rows, candidates)),
                                               side="right")]
    items = items[np.arange(rows), pick(model, cfg.choice, users, items, rng)]
    score = model.score(users, items)
    low, high, step = scale(cfg)
    rating = np.clip(np.round((score + rng.normal(0, cfg.noise, rows)) / step) * step, low, high)
    return pd.DataFrame({"id": block * rows + np.arange(rows, dtype=np.int64),
                         "userId": (users + 1).astype(np.int32), "movieId": (items + 1).astype(np.int32),
                         "rating": rating, "timestamp": rng.integers(FIRST_TIME, END_TIME, rows),
                         "score": score})


def pick(model: Planted, strength: float, users: np.ndarray, candidates: np.ndarray, rng) -> np.ndarray:
    """Which of each row's candidate items (drawn by popularity) its user picks: the one with the highest
    strength x <p_u, q_i> / INTERACTION_STD plus Gumbel noise, so a user picks item i with probability in
    proportion to exp(strength x affinity) among the candidates: exposure that depends on popularity and on the
    planted factors, which a ranking model can recover and most-popular cannot."""
    if candidates.shape[1] == 1:
        return np.zeros(len(users), dtype=np.int64)
    affinity = np.einsum("rd,rcd->rc", model.user_factors[users], model.item_factors[candidates]) / INTERACTION_STD
    return np.argmax(strength * affinity - np.log(-np.log(rng.random(candidates.shape))), axis=1)


def draws_needed(user_p: np.ndarray, item_p: np.ndarray, target: float, cap: int) -> int:
    """Independent draws expected to give `target` distinct pairs (at most `cap`).

    Skewed popularity repeats the popular pairs, more so the denser the catalog. The expectation
    sum over pairs of 1 - exp(-draws * p_u * p_i) is taken over a few hundred bins of neighbouring
    popularity ranks instead of every pair.
    """
    (wu, nu), (wi, ni) = _bins(user_p), _bins(item_p)
    pairs, rate = np.outer(nu, ni), np.outer(wu, wi)

    def distinct(draws):
        return (pairs * -np.expm1(-draws * rate)).sum()

    if distinct(cap) < target:
        return cap
    low, high = 0.0, float(cap)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if distinct(mid) < target else (low, mid)
    return int(np.ceil(high))


def _bins(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.unique(np.geomspace(1, len(p), 300).astype(np.int64)) - 1
    counts = np.diff(np.append(starts, len(p)))
    return np.add.reduceat(p, starts) / counts, counts


def _first_draws(spark: SparkSession, bc, cfg: SynthConfig, blocks: int, rows: int, parts: int,
                 files: int) -> DataFrame:
    """The first draw of every (user, item) pair, partitioned by user into `files` parts sorted by user, item."""
    def draw(batches):
        model = bc.value
        for batch in batches:
            for block in batch["id"]:
                yield draw_block(model, cfg, int(block), rows)

    first = Window.partitionBy("userId", "movieId").orderBy("id")
    # the window is clustered within the explicit repartition: one shuffle, into a number of partitions
    # that depends on the config alone
    return (spark.range(0, blocks, numPartitions=parts).mapInPandas(draw, DRAWN)
            .repartition(files, "userId")
            .withColumn("_n", F.row_number().over(first)).where("_n = 1").drop("_n"))


def _cut(kept: DataFrame, block, wanted: int, per_block: list) -> int | None:
    """The row id below which exactly `wanted` kept rows lie; None when fewer were kept."""
    below = 0
    for b, n in per_block:
        if below + n >= wanted:
            ids = np.sort(kept.where(block == b).select("id").toPandas()["id"].to_numpy())
            return int(ids[wanted - below - 1]) + 1
        below += n
    return None


def _summary(ratings: DataFrame, cfg: SynthConfig) -> dict:
    low, high, step = scale(cfg)
    grid = np.arange(low, high + step / 2, step)
    err = F.col("score") - F.col("rating")
    clipped = F.least(F.greatest(F.col("score"), F.lit(low)), F.lit(high)) - F.col("rating")
    row = ratings.agg(
        F.count(F.lit(1)), F.sum(err * err), F.sum(F.abs(err)), F.sum(clipped * clipped),
        F.countDistinct("userId"), F.countDistinct("movieId"),
        *[F.sum((F.col("rating") == float(v)).cast("long")) for v in grid]).first()
    n, sq, ab, clipped_sq, users, items = row[:6]
    return {
        "counts": {"ratings": n, "users": users, "items": items, "movies": cfg.items},
        "histogram": {str(float(v)): int(c or 0) for v, c in zip(grid, row[6:])},
        "oracle_rmse": float(np.sqrt(sq / n)),
        "oracle_mae": float(ab / n),
        # clip(score) to the scale is a little better than the raw score where ratings were clipped
        "oracle_clipped_rmse": float(np.sqrt(clipped_sq / n)),
    }


def movies(model: Planted) -> pd.DataFrame:
    ids = np.arange(1, len(model.years) + 1)
    return pd.DataFrame({
        "movieId": ids.astype(np.int32),
        "title": [f"Synthetic Movie {i} ({y})" for i, y in zip(ids, model.years)],
        "genres": ["|".join(g for g, has in zip(GENRES, row) if has) for row in model.genres]})


def generate(spark: SparkSession, cfg: SynthConfig, out: str, force: bool = False) -> dict:
    """Writes ratings.csv/, movies.csv/ and manifest.json to `out` atomically; returns the manifest."""
    storage.check_output(out, "synth", force)
    model = planted(cfg)
    rows = BLOCK  # read once here: the workers get it through the closure
    wanted = min(cfg.ratings, cfg.users * cfg.items)
    cap = max(20 * wanted, rows)
    # a margin over the expectation for the chance variation in distinct pairs; a shortfall draws more
    draws = draws_needed(model.user_popularity, model.item_popularity, wanted * 1.005 + 4 * wanted ** 0.5, cap)
    parts = cfg.partitions or max(spark.sparkContext.defaultParallelism, cfg.ratings // 1_000_000)
    files = -(-wanted // ROWS_PER_FILE)
    block = F.floor(F.col("id") / rows)
    bc = spark.sparkContext.broadcast(model)
    kept = None
    try:
        while True:
            # the kept rows are always the first `wanted` distinct pairs of the same endless stream,
            # so drawing more only costs time
            blocks = -(-draws // rows)
            kept = _first_draws(spark, bc, cfg, blocks, rows, min(parts, blocks), files)
            kept = kept.persist(StorageLevel.MEMORY_AND_DISK)
            per_block = sorted(tuple(r) for r in kept.groupBy(block.alias("b")).count().collect())
            if sum(n for _, n in per_block) >= wanted or blocks * rows >= cap:
                break
            kept.unpersist()
            draws = min(cap, int(draws * 1.5))
        cut = _cut(kept, block, wanted, per_block)
        ratings = kept if cut is None else kept.where(F.col("id") < cut)
        with storage.publish(out, "synth", force) as tmp:
            (ratings.select("userId", "movieId", "rating", "timestamp").sortWithinPartitions("userId", "movieId")
             .write.csv(storage.url(f"{tmp}/ratings.csv"), header=True))
            (spark.createDataFrame(movies(model)).coalesce(1)
             .write.csv(storage.url(f"{tmp}/movies.csv"), header=True))
            manifest = storage.write_manifest(tmp, {
                "stage": "synth", "config": dataclasses.asdict(cfg),
                "scale": dict(zip(("min", "max", "step"), scale(cfg))),
                "planted": {"rank": cfg.rank, "noise": cfg.noise, "choice": cfg.choice,
                            "choice_candidates": CHOICE_CANDIDATES if cfg.choice else 1},
                **_summary(ratings, cfg),
                "draws": blocks * rows, "partitions": min(parts, blocks), "files": files})
        return manifest
    finally:
        if kept is not None:
            kept.unpersist()
        bc.destroy()
