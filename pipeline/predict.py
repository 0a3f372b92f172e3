"""`dmf predict` scores given (user, item) pairs in original ids; `dmf similar` finds an item's neighbours."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.recommend import predict_pairs, spark_table
from pipeline.storage import StageError
from pipeline.training.train import load_model, model_and_data, read_table

ID_COLUMNS = {"user_id": ("user_id", "userId"), "item_id": ("item_id", "movieId")}


def read_pairs(spark: SparkSession, path: str):
    if not storage.exists(path):
        raise StageError(f"pairs file {path} does not exist")
    if storage.is_empty(path):
        raise StageError(f"pairs file {path} is empty: it needs a header (userId,movieId) and one pair a line")
    if any(f.endswith(".parquet") for f in storage.data_files(path)):  # a file or a Spark output
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


def predict(spark: SparkSession, model_dir: str, pairs_path: str, out: str, data_dir: str | None = None,
            force: bool = False) -> dict:
    """Every input row comes out, in input order, with `prediction`, `known`, and `problem` (null unless the
    row is malformed: an id that is empty or not a non-negative integer; such rows get no prediction).

    Pairs whose user or item was not in training are `known = false` and get the fallback: the global
    mean plus the bias of whichever side is known, clipped to the rating scale.
    """
    storage.check_output(out, "predict", force)
    data_dir, data = model_and_data(model_dir, data_dir)
    df, cols = read_pairs(spark, pairs_path)
    users = spark_table(spark, data_dir, data, "users").select("user_id", "user_idx")
    items = spark_table(spark, data_dir, data, "items").select("item_id", "item_idx")
    checks = [F.when(~F.coalesce(F.trim(F.col(source).cast("string")), F.lit("")).rlike(r"^[0-9]{1,18}$"),
                     F.lit(f"{source} is not an id")) for source in cols.values()]
    typed = (df.withColumn("_row", F.monotonically_increasing_id()).withColumn("problem", F.coalesce(*checks))
             .withColumn("_user", F.when(F.col("problem").isNull(), F.trim(F.col(cols["user_id"]).cast("string"))
                                         .cast("long")))
             .withColumn("_item", F.when(F.col("problem").isNull(), F.trim(F.col(cols["item_id"]).cast("string"))
                                         .cast("long"))))
    joined = (typed.join(F.broadcast(users.withColumnRenamed("user_id", "_user")), "_user", "left")
              .join(F.broadcast(items.withColumnRenamed("item_id", "_item")), "_item", "left"))
    result = (predict_pairs(spark, model_dir, joined)
              .withColumn("known", F.col("user_idx").isNotNull() & F.col("item_idx").isNotNull())
              .withColumn("prediction", F.when(F.col("problem").isNull(), F.col("prediction")))
              .orderBy("_row").select(*df.columns, "prediction", "known", "problem"))
    csv = out.rstrip("/").endswith(".csv")
    with storage.publish(out, "predict", force) as tmp:
        if csv:
            result.write.option("header", True).csv(f"{tmp}/predictions")
            written = spark.read.option("header", True).csv(f"{tmp}/predictions")
        else:
            result.write.parquet(f"{tmp}/predictions")
            written = spark.read.parquet(f"{tmp}/predictions")
        counts = _counts(written)
        if counts["rows"] != df.count():
            raise StageError(f"internal error: {pairs_path} has {df.count():,} rows, the predictions "
                             f"{counts['rows']:,}")
        storage.write_manifest(tmp, {"stage": "predict", "model": model_dir, "data": data_dir, "pairs": pairs_path,
                                     "format": "csv" if csv else "parquet", "path": "predictions", "counts": counts})
    return storage.read_manifest(out, "predict")


def _counts(written) -> dict:
    row = written.agg(F.count(F.lit(1)).alias("rows"),
                      F.sum(F.col("known").cast("boolean").cast("int")).alias("known"),
                      F.sum(F.col("problem").isNotNull().cast("int")).alias("malformed")).first()
    known, malformed = row.known or 0, row.malformed or 0
    return {"rows": row.rows, "known": known, "malformed": malformed, "fallback": row.rows - known - malformed}


def unit_item_vectors(model_dir: str) -> torch.Tensor:
    """The model's item vectors scaled to length 1, in item_idx order: their dot products are cosines."""
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.item_vectors().float(), dim=1)


def similar(model_dir: str, item_id: int, n: int = 10, data_dir: str | None = None) -> pd.DataFrame:
    """The n items nearest to item_id by cosine similarity of the model's item vectors."""
    data_dir, data = model_and_data(model_dir, data_dir)
    items = read_table(data_dir, data, "items").sort_values("item_idx").reset_index(drop=True)
    match = items.index[items.item_id == item_id]
    if len(match) == 0:
        raise StageError(f"item {item_id} was not in training, so it has no embedding")
    vectors = unit_item_vectors(model_dir)
    cosine = (vectors @ vectors[match[0]]).numpy()
    best = [j for j in np.argsort(-cosine, kind="stable") if j != match[0]][:n]
    return pd.DataFrame({"item_id": items.item_id[best].to_numpy(), "title": items.title[best].to_numpy(),
                         "cosine": cosine[best]})
