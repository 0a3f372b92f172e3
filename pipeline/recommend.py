"""Top-N for every user, scored in blocks: never a row-level users x items cross join.

The model's weights are broadcast once; each task rebuilds the model, scores a block of users
against every item with the model's `score_all` (a matrix product for mf and two_tower, a split
first layer for dmf and neumf), masks what each user has already rated, and keeps the N best. Items are
ranked by the unclipped predicted rating: clipped to the scale, every item above it would tie at the top.

Two-stage mode (`recommend.candidates` > 0): a block is first scored by the dot product of an mf or
two_tower retrieval model, which is cheap for any catalog, and only each user's best `candidates`
unseen items are scored by the model. Its recall against exact scoring is measured on a sample of users.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Iterator, Tuple

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType

from pipeline import storage
from pipeline.config import Config
from pipeline.storage import StageError
from pipeline.train import load_model, read_table

log = logging.getLogger(__name__)
TOP_SCHEMA = "user_idx int, rank int, item_idx int, score float"
RETRIEVAL_MODELS = ("mf", "two_tower")
RECALL_USERS = 1000  # users whose two-stage top-N is compared with exact scoring


def seen_items(spark: SparkSession, data_dir: str, data: dict, splits: tuple[str, ...]) -> DataFrame:
    """user_idx -> the item_idx list each user rated in the given splits."""
    rows = [spark.read.parquet(f"{data_dir.rstrip('/')}/{data['paths'][s]}").select("user_idx", "item_idx")
            for s in splits]
    union = rows[0]
    for other in rows[1:]:
        union = union.unionByName(other)
    return union.groupBy("user_idx").agg(F.collect_list("item_idx").alias("seen"))


def shipped_model(spark: SparkSession, model_dir: str):
    """(build, manifest): weights broadcast once; `build()` rebuilds the model inside a task."""
    model, manifest = load_model(model_dir)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    shipped = spark.sparkContext.broadcast((manifest["spec"], buffer.getvalue()))

    def build():
        from pipeline import models

        torch.set_num_threads(1)  # Spark runs one task per core already
        spec, weights = shipped.value
        m = models.build(spec)
        m.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
        return m.eval()

    return build, manifest


def top_n(spark: SparkSession, model_dir: str, users: DataFrame, n: int, block: int,
          retrieval_dir: str | None = None, candidates: int = 0) -> DataFrame:
    """(user_idx, rank, item_idx, score) for the users in `users` (user_idx, seen), best first.

    With `candidates` > 0 the model scores only each user's best `candidates` unseen items by the
    retrieval model (`retrieval_dir`, an mf or two_tower model trained on the same data)."""
    build, manifest = shipped_model(spark, model_dir)
    build_retrieval = shipped_model(spark, retrieval_dir)[0] if candidates else None
    n_items = manifest["spec"]["n_items"]

    def score(batches):
        model, items = build(), torch.arange(n_items)
        vectors = retrieval_vectors(build_retrieval()) if candidates else None
        for pdf in batches:
            for start in range(0, len(pdf), block):
                part = pdf.iloc[start:start + block]
                yield (_top_block(model, part, items, n) if vectors is None
                       else _two_stage_block(model, vectors, part, n, candidates))

    parts = max(1, spark.sparkContext.defaultParallelism * 2)
    return users.repartition(parts, "user_idx").mapInPandas(score, TOP_SCHEMA)


def predict_pairs(spark: SparkSession, model_dir: str, pairs: DataFrame) -> DataFrame:
    """`pairs` (user_idx, item_idx, ...) with a `prediction` column added (see `_ratings` for null indices)."""
    build, _ = shipped_model(spark, model_dir)

    # An iterator UDF rebuilds the model once per task, and leaves the other columns to Spark untouched.
    @F.pandas_udf(FloatType())
    def rating(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = build()
        for users, items in batches:
            yield pd.Series(_ratings(model, users.to_numpy(np.float64), items.to_numpy(np.float64)))

    return pairs.withColumn("prediction", rating("user_idx", "item_idx"))


def _ratings(model, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The model's ratings of (user_idx, item_idx) pairs. A NaN index (a user or item outside training)
    gets the fallback: global mean + the bias of whichever side is known, clipped to the rating scale."""
    user_known, item_known = ~np.isnan(users), ~np.isnan(items)
    u = torch.as_tensor(np.where(user_known, users, 0), dtype=torch.long)
    i = torch.as_tensor(np.where(item_known, items, 0), dtype=torch.long)
    with torch.no_grad():
        out = model.global_mean.expand(len(u)).clone()
        for table, idx, known in ((model.user_bias, u, user_known), (model.item_bias, i, item_known)):
            if table is not None:  # dmf and neumf with the softmax head have no biases
                out += table(idx)[:, 0] * torch.as_tensor(known)
        out = out.clamp(model.levels[0], model.levels[-1])
        both = torch.as_tensor(user_known & item_known)
        if both.any():
            out[both] = model.predict(u[both], i[both])
    return out.numpy().astype(np.float32)


def retrieval_vectors(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user vectors, item vectors, item bias) of an mf or two_tower model: <u, v> + b_i orders a user's
    items as the model's score does, without the clipping to the rating scale that would tie the top."""
    with torch.no_grad():
        return model.user_vectors().detach(), model.item_vectors().detach(), model.item_bias.weight[:, 0].detach()


def _user_tensor(pdf: pd.DataFrame) -> torch.Tensor:
    return torch.as_tensor(pdf.user_idx.to_numpy(), dtype=torch.long)


def _mask_seen(scores: torch.Tensor, seen: pd.Series) -> torch.Tensor:
    for row, rated in enumerate(seen):
        if rated is not None and len(rated):
            scores[row, torch.as_tensor(np.asarray(rated, dtype=np.int64))] = -torch.inf
    return scores


def _top_block(model, pdf: pd.DataFrame, items: torch.Tensor, n: int) -> pd.DataFrame:
    users = _user_tensor(pdf)
    with torch.no_grad():
        scores = _mask_seen(model.score_all(users, items, clip=False), pdf.seen)
    return _best(users, scores, items.expand(len(users), -1), n)


def _two_stage_block(model, vectors, pdf: pd.DataFrame, n: int, candidates: int) -> pd.DataFrame:
    users = _user_tensor(pdf)
    user_vectors, item_vectors, item_bias = vectors
    with torch.no_grad():
        coarse = _mask_seen(user_vectors[users] @ item_vectors.T + item_bias, pdf.seen)
        reach, cand = torch.topk(coarse, min(candidates, coarse.shape[1]), dim=1)
        # In item order, so that with every item a candidate the ranking (ties included) is the exact one.
        cand, order = cand.sort(dim=1)
        reach = reach.gather(1, order)
        fine = model.expected(model(users[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))).reshape(cand.shape)
        fine[~torch.isfinite(reach)] = -torch.inf  # seen items, when candidates reach past the unseen ones
    return _best(users, fine, cand, n)


def _best(users: torch.Tensor, scores: torch.Tensor, item_of: torch.Tensor, n: int) -> pd.DataFrame:
    """The n best finite scores of each row; item_of[row, col] is the item_idx that scores[row, col] rates."""
    best, idx = torch.topk(scores, min(n, scores.shape[1]), dim=1)
    keep = torch.isfinite(best)  # a user who has rated all but 3 items gets 3
    rows, cols = keep.nonzero(as_tuple=True)
    return pd.DataFrame({"user_idx": users[rows].numpy().astype(np.int32), "rank": (cols + 1).numpy().astype(np.int32),
                         "item_idx": item_of.gather(1, idx)[rows, cols].numpy().astype(np.int32),
                         "score": best[rows, cols].numpy().astype(np.float32)})


def model_and_data(model_dir: str, data_dir: str | None) -> tuple[str, dict]:
    """The prepared data a model was trained on (its own record unless data_dir is given), checked unchanged."""
    model_manifest = storage.read_manifest(model_dir, "train")
    data_dir = data_dir or model_manifest["data"]["path"]
    data = storage.read_manifest(data_dir, "prepare")
    if data["created_at"] != model_manifest["data"]["created_at"]:
        raise StageError(f"{model_dir} was trained on the {data_dir} written at "
                         f"{model_manifest['data']['created_at']}, which has since been rewritten "
                         f"({data['created_at']}): train again")
    return data_dir, data


def retrieval_model(cfg: Config, model_dir: str, data_dir: str, retrieval_model_dir: str | None) -> str | None:
    """The model that retrieves two-stage candidates (None when recommend.candidates is 0), checked before any
    Spark work: an mf or two_tower model trained on the same prepared data as the model."""
    candidates = cfg.recommend.candidates
    if candidates == 0:
        if retrieval_model_dir:
            raise StageError(f"a retrieval model ({retrieval_model_dir}) was given but recommend.candidates is 0: "
                             f"set it to the number of candidates to retrieve per user")
        return None
    retrieval = retrieval_model_dir or model_dir
    kind = storage.read_manifest(retrieval, "train")["spec"]["model"]
    if kind not in RETRIEVAL_MODELS:
        raise StageError(f"two-stage recommend (recommend.candidates={candidates}) retrieves candidates by a dot "
                         f"product, and {retrieval} is a {kind} model: give a retrieval model trained as "
                         f"{' or '.join(RETRIEVAL_MODELS)} on the same data")
    model_and_data(retrieval, data_dir)
    return retrieval


def recommend(spark: SparkSession, cfg: Config, model_dir: str, data_dir: str | None, out: str,
              retrieval_model_dir: str | None = None) -> dict:
    started = time.time()
    data_dir, data = model_and_data(model_dir, data_dir)
    retrieval = retrieval_model(cfg, model_dir, data_dir, retrieval_model_dir)
    n, block, candidates = cfg.recommend.top_n, cfg.recommend.users_per_block, cfg.recommend.candidates
    users = spark.createDataFrame(read_table(data_dir, data, "users")[["user_idx", "user_id"]])
    items = spark.createDataFrame(read_table(data_dir, data, "items")[["item_idx", "item_id", "title"]])
    seen = seen_items(spark, data_dir, data, ("train", "valid"))
    todo = users.select("user_idx").join(seen, "user_idx", "left")

    def with_ids(top):
        return top.join(F.broadcast(items), "item_idx").join(users, "user_idx")

    top = top_n(spark, model_dir, todo, n, block, retrieval, candidates)
    result = with_ids(top).select("user_id", "rank", "item_id", "score", "title")
    with storage.publish(out) as tmp:
        writer = result.orderBy("user_id", "rank").write
        if cfg.recommend.format == "csv":
            writer.option("header", True).csv(f"{tmp}/recommendations")
        else:
            writer.parquet(f"{tmp}/recommendations")
        written = spark.read.parquet(f"{tmp}/recommendations") if cfg.recommend.format == "parquet" else \
            spark.read.option("header", True).csv(f"{tmp}/recommendations")
        stats = written.agg(F.countDistinct("user_id").alias("users"), F.count(F.lit(1)).alias("rows"),
                            F.countDistinct("item_id").alias("items")).first()
        two_stage = None
        if retrieval:
            sample = todo.orderBy(F.xxhash64("user_idx")).limit(RECALL_USERS)
            exact = with_ids(top_n(spark, model_dir, sample, n, block)).select("user_id", "item_id")
            hits = written.select(F.col("user_id").cast("long"), F.col("item_id").cast("long"), F.lit(1).alias("hit"))
            check = exact.join(hits, ["user_id", "item_id"], "left").agg(
                F.countDistinct("user_id").alias("users"), F.count(F.lit(1)).alias("items"),
                F.count("hit").alias("hits")).first()
            two_stage = {"candidates": candidates, "retrieval_model": retrieval,
                         "recall_vs_exact": check.hits / check["items"] if check["items"] else None,
                         "users_checked": check.users}
        storage.write_manifest(tmp, {
            "stage": "recommend", "model": model_dir, "data": data_dir, "top_n": n,
            "format": cfg.recommend.format, "path": "recommendations",
            "counts": {"users": stats.users, "rows": stats.rows, "items_covered": stats["items"],
                       "catalog": data["counts"]["items"]},
            "two_stage": two_stage, "seconds": time.time() - started})
    return storage.read_manifest(out, "recommend")


def summary(manifest: dict, out: str) -> str:
    c, two = manifest["counts"], manifest.get("two_stage")
    text = (f"recommendations -> {out}/recommendations\n  top {manifest['top_n']} for {c['users']:,} users, "
            f"{c['rows']:,} rows, {c['items_covered']:,} of {c['catalog']:,} items recommended, "
            f"{manifest['seconds']:.0f} s")
    if two:
        recall = "n/a" if two["recall_vs_exact"] is None else f"{two['recall_vs_exact']:.3f}"
        text += (f"\n  two-stage: {two['candidates']:,} candidates per user from {two['retrieval_model']}, "
                 f"recall {recall} of the exact top {manifest['top_n']} on {two['users_checked']:,} users")
    return text
