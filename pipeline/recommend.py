"""Top-N for every user, scored in blocks: never a row-level users x items cross join.

The model's weights are broadcast once; each task rebuilds the model, scores a block of users
against every item with the model's `score_all` (a matrix product for mf and two_tower, a split
first layer for dmf and neumf), masks what each user has already rated, and keeps the N best.
"""
from __future__ import annotations

import io
import logging
import time

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, StructField, StructType

from pipeline import storage
from pipeline.config import Config
from pipeline.train import load_model, read_table

log = logging.getLogger(__name__)
TOP_SCHEMA = "user_idx int, rank int, item_idx int, score float"


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


def top_n(spark: SparkSession, model_dir: str, users: DataFrame, n: int, block: int) -> DataFrame:
    """(user_idx, rank, item_idx, score) for the users in `users` (user_idx, seen), best first."""
    build, manifest = shipped_model(spark, model_dir)
    n_items = manifest["spec"]["n_items"]

    def score(batches):
        model, items = build(), torch.arange(n_items)
        for pdf in batches:
            for start in range(0, len(pdf), block):
                yield _top_block(model, pdf.iloc[start:start + block], items, n)

    parts = max(1, spark.sparkContext.defaultParallelism * 2)
    return users.repartition(parts, "user_idx").mapInPandas(score, TOP_SCHEMA)


def predict_pairs(spark: SparkSession, model_dir: str, pairs: DataFrame) -> DataFrame:
    """`pairs` (user_idx, item_idx, ...) with a `prediction` column added."""
    build, _ = shipped_model(spark, model_dir)
    schema = StructType([*pairs.schema.fields, StructField("prediction", FloatType())])

    def score(batches):
        model = build()
        for pdf in batches:
            with torch.no_grad():
                pred = model.predict(torch.as_tensor(pdf.user_idx.to_numpy(), dtype=torch.long),
                                     torch.as_tensor(pdf.item_idx.to_numpy(), dtype=torch.long))
            yield pdf.assign(prediction=pred.numpy().astype(np.float32))

    return pairs.mapInPandas(score, schema)


def _top_block(model, pdf: pd.DataFrame, items: torch.Tensor, n: int) -> pd.DataFrame:
    users = torch.as_tensor(pdf.user_idx.to_numpy(), dtype=torch.long)
    with torch.no_grad():
        scores = model.score_all(users, items)
    for row, seen in enumerate(pdf.seen):
        if seen is not None and len(seen):
            scores[row, torch.as_tensor(np.asarray(seen, dtype=np.int64))] = -torch.inf
    k = min(n, len(items))
    best, idx = torch.topk(scores, k, dim=1)
    keep = torch.isfinite(best)  # a user who has rated all but 3 items gets 3
    rows, cols = keep.nonzero(as_tuple=True)
    return pd.DataFrame({"user_idx": users[rows].numpy().astype(np.int32), "rank": (cols + 1).numpy().astype(np.int32),
                         "item_idx": idx[rows, cols].numpy().astype(np.int32),
                         "score": best[rows, cols].numpy().astype(np.float32)})


def model_and_data(model_dir: str, data_dir: str | None) -> tuple[str, dict]:
    """The prepared data a model was trained on (its own record unless data_dir is given), checked unchanged."""
    model_manifest = storage.read_manifest(model_dir, "train")
    data_dir = data_dir or model_manifest["data"]["path"]
    data = storage.read_manifest(data_dir, "prepare")
    if data["created_at"] != model_manifest["data"]["created_at"]:
        raise storage.StageError(f"{model_dir} was trained on the {data_dir} written at "
                                 f"{model_manifest['data']['created_at']}, which has since been rewritten "
                                 f"({data['created_at']}): train again")
    return data_dir, data


def recommend(spark: SparkSession, cfg: Config, model_dir: str, data_dir: str | None, out: str) -> dict:
    started = time.time()
    data_dir, data = model_and_data(model_dir, data_dir)
    users = spark.createDataFrame(read_table(data_dir, data, "users")[["user_idx", "user_id"]])
    items = spark.createDataFrame(read_table(data_dir, data, "items")[["item_idx", "item_id", "title"]])
    seen = seen_items(spark, data_dir, data, ("train", "valid"))
    todo = users.select("user_idx").join(seen, "user_idx", "left")
    top = top_n(spark, model_dir, todo, cfg.recommend.top_n, cfg.recommend.users_per_block)
    result = (top.join(F.broadcast(items), "item_idx").join(users, "user_idx")
              .select("user_id", "rank", "item_id", "score", "title"))
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
        storage.write_manifest(tmp, {
            "stage": "recommend", "model": model_dir, "data": data_dir, "top_n": cfg.recommend.top_n,
            "format": cfg.recommend.format, "path": "recommendations",
            "counts": {"users": stats.users, "rows": stats.rows, "items_covered": stats["items"],
                       "catalog": data["counts"]["items"]},
            "seconds": time.time() - started})
    return storage.read_manifest(out, "recommend")


def summary(manifest: dict, out: str) -> str:
    c = manifest["counts"]
    return (f"recommendations -> {out}/recommendations\n  top {manifest['top_n']} for {c['users']:,} users, "
            f"{c['rows']:,} rows, {c['items_covered']:,} of {c['catalog']:,} items recommended, "
            f"{manifest['seconds']:.0f} s")
