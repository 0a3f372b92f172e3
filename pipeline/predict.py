"""`dmf predict` scores given (user, item) pairs in original ids; `dmf similar` finds an item's neighbours."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.recommend import model_and_data, predict_pairs
from pipeline.storage import StageError
from pipeline.train import load_model, read_table

ID_COLUMNS = {"user_id": ("user_id", "userId"), "item_id": ("item_id", "movieId")}


def read_pairs(spark: SparkSession, path: str):
    if not storage.exists(path):
        raise StageError(f"pairs file {path} does not exist")
    if path.rstrip("/").endswith(".parquet"):
        df = spark.read.parquet(path)
    else:
        df = spark.read.option("header", True).csv(path)
    chosen = {}
    for column, names in ID_COLUMNS.items():
        found = [n for n in names if n in df.columns]
        if not found:
            raise StageError(f"{path}: needs a column {' or '.join(names)}; found {', '.join(df.columns)}")
        chosen[column] = found[0]
    return df, chosen


def predict(spark: SparkSession, model_dir: str, pairs_path: str, out: str, data_dir: str | None = None) -> dict:
    """Every input row comes out, with `prediction`, `known`, and `problem` (null unless the row is malformed).

    Pairs whose user or item was not in training are `known = false` and get the fallback: the global
    mean plus the bias of whichever side is known.
    """
    data_dir, data = model_and_data(model_dir, data_dir)
    model, manifest = load_model(model_dir)
    df, cols = read_pairs(spark, pairs_path)
    users = spark.createDataFrame(read_table(data_dir, data, "users")[["user_id", "user_idx"]])
    items = spark.createDataFrame(read_table(data_dir, data, "items")[["item_id", "item_idx"]])
    numbered = df.withColumn("_row", F.monotonically_increasing_id())
    checks = [F.when(~F.coalesce(F.trim(F.col(source).cast("string")), F.lit("")).rlike(r"^[0-9]+$"),
                     F.lit(f"{source} is not an id")) for source in cols.values()]
    problem = F.coalesce(*checks)
    typed = (numbered.withColumn("problem", problem)
             .withColumn("_user", F.when(F.col("problem").isNull(), F.col(cols["user_id"]).cast("int")))
             .withColumn("_item", F.when(F.col("problem").isNull(), F.col(cols["item_id"]).cast("int"))))
    joined = (typed.join(F.broadcast(users.withColumnRenamed("user_id", "_user")), "_user", "left")
              .join(F.broadcast(items.withColumnRenamed("item_id", "_item")), "_item", "left"))
    known = joined.where(F.col("user_idx").isNotNull() & F.col("item_idx").isNotNull())
    scored = predict_pairs(spark, model_dir, known.select("_row", "user_idx", "item_idx"))
    fallback = bias_fallback(model, manifest["spec"])
    user_bias = spark.createDataFrame(pd.DataFrame({"user_idx": np.arange(len(fallback["user"]), dtype=np.int32),
                                                    "_ub": fallback["user"]}))
    item_bias = spark.createDataFrame(pd.DataFrame({"item_idx": np.arange(len(fallback["item"]), dtype=np.int32),
                                                    "_ib": fallback["item"]}))
    result = (joined.join(scored.select("_row", "prediction"), "_row", "left")
              .join(F.broadcast(user_bias), "user_idx", "left").join(F.broadcast(item_bias), "item_idx", "left")
              .withColumn("known", F.col("prediction").isNotNull())
              .withColumn("prediction", F.when(F.col("problem").isNotNull(), F.lit(None)).otherwise(
                  F.coalesce(F.col("prediction"),
                             F.lit(fallback["mean"]) + F.coalesce("_ub", F.lit(0.0)) + F.coalesce("_ib", F.lit(0.0)))))
              .orderBy("_row").select(*df.columns, F.col("prediction").cast("float"), "known", "problem"))
    with storage.publish(out) as tmp:
        if out.rstrip("/").endswith(".csv"):
            result.write.option("header", True).csv(f"{tmp}/predictions")
        else:
            result.write.parquet(f"{tmp}/predictions")
        storage.write_manifest(tmp, {"stage": "predict", "model": model_dir, "pairs": pairs_path,
                                     "path": "predictions", "counts": _counts(result)})
    return storage.read_manifest(out, "predict")


def _counts(result) -> dict:
    row = result.agg(F.count(F.lit(1)).alias("rows"),
                     F.sum(F.col("known").cast("int")).alias("known"),
                     F.sum(F.col("problem").isNotNull().cast("int")).alias("malformed")).first()
    return {"rows": row.rows, "known": row.known or 0, "malformed": row.malformed or 0,
            "fallback": row.rows - (row.known or 0) - (row.malformed or 0)}


def bias_fallback(model, spec: dict) -> dict:
    """Global mean and per-side biases for pairs outside training (zeros where a model has no biases)."""
    user = getattr(model, "user_bias", None)
    item = getattr(model, "item_bias", None)

    def as_array(table, n):
        return np.zeros(n) if table is None else table.weight.detach().numpy().reshape(-1).astype(np.float64)

    return {"mean": float(spec["global_mean"]), "user": as_array(user, spec["n_users"]),
            "item": as_array(item, spec["n_items"])}


def similar(model_dir: str, item_id: int, n: int = 10, data_dir: str | None = None) -> pd.DataFrame:
    """The n items nearest to item_id by cosine similarity of the model's item vectors."""
    data_dir, data = model_and_data(model_dir, data_dir)
    model, _ = load_model(model_dir)
    items = read_table(data_dir, data, "items").sort_values("item_idx").reset_index(drop=True)
    match = items.index[items.item_id == item_id]
    if len(match) == 0:
        raise StageError(f"item {item_id} was not in training, so it has no embedding")
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(model.item_vectors().float(), dim=1)
    cosine = (vectors @ vectors[match[0]]).numpy()
    cosine[match[0]] = -np.inf
    best = np.argsort(-cosine)[:n]
    return pd.DataFrame({"item_id": items.item_id[best].to_numpy(), "title": items.title[best].to_numpy(),
                         "cosine": cosine[best]})
