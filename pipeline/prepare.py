"""The prepare stage: ingest, validate, filter, split, remap ids to dense indices, write Parquet.

Every input row either reaches train/valid or lands in rejected/ with its reason; the manifest
counts both, so input rows = train + valid + rejected, always.
"""
from __future__ import annotations

import logging
import time

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline import ingest, storage
from pipeline.config import Config, SplitConfig
from pipeline.frames import dense_ids
from pipeline.storage import StageError

log = logging.getLogger(__name__)

# Checked in this order; a row is rejected for the first one it fails.
INVALID_REASONS = ("unparseable_line", "missing_id", "non_integer_id", "negative_id", "id_out_of_range",
                   "bad_rating", "rating_out_of_scale", "bad_timestamp", "duplicate_pair")
# Rows that were valid but are not used; they do not count against max_reject_fraction.
UNUSED_REASONS = ("below_min_ratings", "cold_start_validation")
RATING_COLUMNS = ["user_idx", "item_idx", "rating", "timestamp"]
INT32_MAX = 2**31 - 1


def prepare(spark: SparkSession, cfg: Config, input_path: str | None = None, out: str | None = None) -> dict:
    input_path = input_path or cfg.prepare.input
    if not input_path:
        raise StageError("prepare needs an input: --input PATH (or prepare.input in the config)")
    out = out or cfg.path("prepared", cfg.dataset)
    started = time.time()
    source = ingest.detect(input_path, cfg.prepare.format)
    log.info("prepare: reading %s ratings from %s", source.format, source.ratings)
    raw, files = ingest.read_ratings(spark, source)
    checked = mark_duplicates(validate(raw, source.scale)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {r.reason: r["count"] for r in checked.groupBy("reason").count().collect()}
        total = sum(counts.values())
        invalid = {k: v for k, v in counts.items() if k is not None}
        _check_rejections(source, files, checked, total, invalid, cfg.prepare.max_reject_fraction)

        valid = checked.where("reason IS NULL").drop("reason", "raw")
        kept, below_min = filter_min_ratings(valid, cfg.prepare.min_user_ratings, cfg.prepare.min_item_ratings)
        train, held_out = split(kept, cfg.prepare.split)
        train = train.persist(StorageLevel.MEMORY_AND_DISK)
        if train.limit(1).count() == 0:
            raise StageError(f"{input_path}: no rating is left for training after filtering and splitting "
                             f"({cfg.prepare.split.method} split)")
        users = dense_ids(train, "user_id", "user_idx").persist()
        items = dense_ids(train, "item_id", "item_idx").persist()
        valid_rows = held_out.join(users, "user_id").join(items, "item_id")
        cold = held_out.join(valid_rows.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
        manifest = _publish(spark, cfg, out, source, files, input_path, checked, below_min, cold,
                            train.join(users, "user_id").join(items, "item_id"), valid_rows, users, items, counts)
    finally:
        checked.unpersist()
    log.info("prepare: wrote %s in %.1f s", out, time.time() - started)
    return manifest


def validate(raw: DataFrame, scale: tuple) -> DataFrame:
    """Types the string columns and names the first problem of each row in `reason` (null when fine)."""
    low, high, step = scale
    rating = F.col("rating").cast("double")
    reason = F.when(F.col("fields") != 4, "unparseable_line")
    for column in ("user_id", "item_id"):
        value = F.col(column)
        reason = (reason.when(value.isNull() | (value == ""), "missing_id")
                  .when(~value.rlike(r"^-?[0-9]+$"), "non_integer_id")
                  .when(value.startswith("-"), "negative_id")
                  .when((F.length(value) > 10) | (value.cast("long") > INT32_MAX), "id_out_of_range"))
    reason = (reason.when(rating.isNull() | F.isnan(rating), "bad_rating")
              .when((rating < low) | (rating > high) | (F.abs(rating / step - F.round(rating / step)) > 1e-6),
                    "rating_out_of_scale")
              .when(~F.coalesce(F.col("timestamp"), F.lit("")).rlike(r"^[0-9]{1,18}$"), "bad_timestamp"))
    typed_ok = reason.isNull()
    return raw.select(
        "file_idx", "line", "raw", reason.alias("reason"),
        F.when(typed_ok, F.col("user_id").cast("int")).alias("user_id"),
        F.when(typed_ok, F.col("item_id").cast("int")).alias("item_id"),
        F.when(typed_ok, rating.cast("float")).alias("rating"),
        F.when(typed_ok, F.col("timestamp").cast("long")).alias("timestamp"))


def mark_duplicates(rows: DataFrame) -> DataFrame:
    """Of several ratings of one (user, item), keeps the latest (ties: the last in the file); rejects the rest."""
    order = Window.partitionBy("user_id", "item_id").orderBy(
        F.col("timestamp").desc(), F.col("file_idx").desc(), F.col("line").desc())
    seq = F.when(F.col("reason").isNull(), F.row_number().over(order))
    return rows.withColumn("reason", F.when(seq > 1, F.lit("duplicate_pair")).otherwise(F.col("reason")))


def _check_rejections(source, files, checked: DataFrame, total: int, invalid: dict, max_fraction: float) -> None:
    if total == 0 or total == sum(invalid.values()):
        raise StageError(f"{source.ratings}: yields no usable ratings ({total} rows read)")
    fraction = sum(invalid.values()) / total
    if fraction > max_fraction:
        examples = checked.where("reason IS NOT NULL").orderBy("file_idx", "line").limit(5).collect()
        shown = "\n".join(f"  {files.source[r.file_idx]} line {r.line}: {r.reason}: {r.raw!r}" for r in examples)
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(invalid.items(), key=lambda kv: -kv[1]))
        raise StageError(
            f"{source.ratings}: {fraction:.2%} of {total} rows were rejected ({by_reason}), more than "
            f"prepare.max_reject_fraction={max_fraction:.2%}; is this the right file and --format "
            f"({source.format})? Nothing was written. First rejected rows:\n{shown}")


def filter_min_ratings(rows: DataFrame, min_user: int, min_item: int) -> tuple[DataFrame, DataFrame]:
    """Drops users and items with too few ratings, again and again until none is left below the minimum."""
    if min_user <= 1 and min_item <= 1:
        return rows, rows.limit(0)
    kept = rows
    for _ in range(20):
        before = kept.count()
        for column, minimum in (("user_id", min_user), ("item_id", min_item)):
            if minimum > 1:
                enough = kept.groupBy(column).count().where(F.col("count") >= minimum).select(column)
                kept = kept.join(enough, column).localCheckpoint()
        if kept.count() == before:
            break
    dropped = rows.join(kept.select("user_id", "item_id"), ["user_id", "item_id"], "left_anti")
    return kept, dropped


def split(rows: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, DataFrame]:
    """(train, validation), each row's side decided by the seed and its own values, never by partitioning."""
    draw = (F.pmod(F.xxhash64(F.lit(cfg.seed), "user_id", "item_id"), F.lit(1_000_000_007)) / 1_000_000_007.0)
    if cfg.method == "random":
        to_valid = draw < cfg.fraction
    elif cfg.method == "global_time":
        to_valid = F.col("timestamp") >= cfg.cutoff
    else:
        # The user's rows in a seeded random order, or oldest first; the last n_valid go to validation,
        # and a user with two or more ratings always keeps one in train.
        order = ["_draw", "item_id"] if cfg.method == "user_fraction" else ["timestamp", "item_id"]
        user = Window.partitionBy("user_id")
        n = F.count(F.lit(1)).over(user)
        wanted = F.lit(cfg.last_k) if cfg.method == "user_temporal" and cfg.last_k else F.round(n * cfg.fraction)
        n_valid = F.least(wanted, n - 1)
        position = F.row_number().over(user.orderBy(*order))
        rows = rows.withColumn("_draw", draw).withColumn("_valid", position > n - n_valid)
        to_valid = F.col("_valid")
    marked = rows.withColumn("_valid", to_valid)
    drop = [c for c in ("_draw", "_valid") if c in marked.columns]
    return marked.where(~F.col("_valid")).drop(*drop), marked.where(F.col("_valid")).drop(*drop)


def _write_ratings(df: DataFrame, path: str, n_files: int) -> int:
    """Petastorm shards by row group: enough files (one row group each) for every rank, none empty."""
    out = (df.select(F.col("user_idx").cast("int"), F.col("item_idx").cast("int"),
                     F.col("rating").cast("float"), F.col("timestamp").cast("long"))
           .repartition(n_files, "user_idx", "item_idx").sortWithinPartitions("user_idx", "item_idx"))
    out.write.parquet(path)
    return storage.row_groups(path)


def _publish(spark, cfg: Config, out, source, files, input_path, checked, below_min, cold,
             train, valid, users, items, counts) -> dict:
    movies = ingest.read_movies(source)
    genre_names = sorted({g for gs in movies.genres for g in gs.split("|") if g})
    genre_of = {g: i for i, g in enumerate(genre_names)}
    movies["genre_idx"] = movies.genres.map(lambda gs: [genre_of[g] for g in gs.split("|") if g])
    train_counts = train.groupBy("item_idx").agg(F.count(F.lit(1)).alias("train_count"))
    items_out = (items.join(train_counts, "item_idx")
                 .join(_movies_frame(spark, movies), "item_id", "left"))
    user_counts = train.groupBy("user_idx").agg(F.count(F.lit(1)).alias("train_count"))
    users_out = users.join(user_counts, "user_idx")
    n_files = cfg.prepare.max_ranks * cfg.prepare.row_groups_per_rank
    file_names = spark.createDataFrame(files)
    unused = below_min.withColumn("reason", F.lit("below_min_ratings")).unionByName(
        cold.withColumn("reason", F.lit("cold_start_validation")))
    rejected = (checked.where("reason IS NOT NULL")
                .unionByName(unused.withColumn("raw", F.lit(None).cast("string")))
                .join(F.broadcast(file_names), "file_idx").drop("file_idx"))

    with storage.publish(out) as tmp:
        row_groups = {"train": _write_ratings(train, f"{tmp}/train", n_files),
                      "valid": _write_ratings(valid, f"{tmp}/valid", n_files)}
        users_out.orderBy("user_idx").coalesce(1).write.parquet(f"{tmp}/users")
        items_out.orderBy("item_idx").coalesce(1).write.parquet(f"{tmp}/items")
        rejected.orderBy("source", "line").write.parquet(f"{tmp}/rejected")
        written = spark.read.parquet(f"{tmp}/train")
        stats = written.agg(F.count(F.lit(1)).alias("n"), F.avg("rating").alias("mean")).first()
        levels = sorted(r.rating for r in written.select("rating").distinct().collect())
        by_reason = {r.reason: r["count"] for r in spark.read.parquet(f"{tmp}/rejected").groupBy("reason").count().collect()}
        n_valid = spark.read.parquet(f"{tmp}/valid").count()
        n_rejected = sum(by_reason.values())
        manifest = {
            "stage": "prepare",
            "dataset": cfg.dataset,
            "source": {"input": input_path, "format": source.format, "ratings": source.ratings,
                       "movies": source.movies, "checksum": storage.checksum([source.ratings])},
            "rating_scale": dict(zip(("min", "max", "step"), source.scale)),
            "rating_levels": levels,
            "global_mean": stats.mean,
            "counts": {"input_rows": sum(counts.values()), "train": stats.n, "valid": n_valid,
                       "rejected": n_rejected, "rejected_by_reason": by_reason,
                       "users": users.count(), "items": items.count()},
            "split": vars(cfg.prepare.split).copy(),
            "min_user_ratings": cfg.prepare.min_user_ratings,
            "min_item_ratings": cfg.prepare.min_item_ratings,
            "genres": genre_names,
            "max_genres": int(movies.genre_idx.map(len).max()) if len(movies) else 0,
            "row_groups": row_groups,
            "paths": {name: name for name in ("train", "valid", "users", "items", "rejected")},
            "columns": RATING_COLUMNS,
        }
        if manifest["counts"]["train"] + n_valid + n_rejected != manifest["counts"]["input_rows"]:
            raise StageError(f"internal error: rows were lost ({manifest['counts']})")
        storage.write_manifest(tmp, manifest)
    return storage.read_manifest(out, "prepare")


def _movies_frame(spark, movies):
    rows = [(int(r.item_id), r.title, r.genres, None if r.year != r.year else int(r.year), r.genre_idx)
            for r in movies.itertuples()]
    return spark.createDataFrame(rows, "item_id int, title string, genres string, year int, genre_idx array<int>")


def summary(manifest: dict, out: str) -> str:
    c = manifest["counts"]
    lines = [f"prepared {manifest['dataset']} -> {out}",
             f"  input rows {c['input_rows']:,}: train {c['train']:,}, valid {c['valid']:,}, rejected {c['rejected']:,}",
             f"  users {c['users']:,}, items {c['items']:,}, rating levels {manifest['rating_levels']}"]
    for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    rejected {reason}: {n:,}")
    return "\n".join(lines)
