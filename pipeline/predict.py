"""The predict stage: the model's ratings of given (user, item) pairs in the original ids, every input row kept."""
from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.artifacts import load_model, model_and_data, spark_table
from pipeline.scoring.blocks import predict_pairs, ship
from pipeline.storage import StageError

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
    model, manifest = load_model(model_dir)
    result = (predict_pairs(ship(spark, model, manifest["spec"]), joined)
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
