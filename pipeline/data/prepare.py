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

from pipeline import storage
from pipeline.config import Config, SplitConfig
from pipeline.data import ingest
from pipeline.data.frames import dense_ids
from pipeline.storage import StageError

log = logging.getLogger(__name__)

RATING_COLUMNS = ["user_idx", "item_idx", "rating", "timestamp"]
INT32_MAX = 2**31 - 1


def prepare(spark: SparkSession, cfg: Config, input_path: str | None = None, out: str | None = None,
            force: bool = False) -> dict:
    input_path = input_path or cfg.prepare.input
    if not input_path:
        raise StageError("prepare needs an input: --input PATH (or prepare.input in the config)")
    out = out or cfg.path("prepared", cfg.dataset)
    storage.check_output(out, "prepare", force)
    with ingest.unpacked(input_path) as (readable, shown):
        return _prepare(spark, cfg, readable, shown, input_path, out, force)


def _prepare(spark: SparkSession, cfg: Config, readable: str, shown, input_path: str, out: str, force: bool) -> dict:
    started = time.time()
    source = ingest.detect(readable, cfg.prepare.format)
    log.info("prepare: reading %s ratings from %s", source.format, source.ratings)
    raw, files = ingest.read_ratings(spark, source)
    files["source"] = files.source.map(shown)
    # The one shuffle of the ratings: by user, into as many partitions as output files. The duplicate
    # window, the per-user split windows, the id joins (broadcast) and the writes all keep it.
    n_files = cfg.prepare.max_ranks * cfg.prepare.row_groups_per_rank
    cached = _persist_uncompressed(spark, mark_duplicates(validate(raw, source.scale).repartition(n_files, "user_id")))
    try:
        counts, lines, headers = _count_rows(spark, cached, source.format)
        checked = cached.where(~F.col("row").isin(headers)) if headers else cached
        total = sum(counts.values())
        invalid = {k: v for k, v in counts.items() if k is not None}
        _check_rejections(shown(source.ratings), source.format, files, lines, checked, total, invalid,
                          cfg.prepare.max_reject_fraction)

        valid = checked.where("reason IS NULL").drop("reason", "raw")
        kept, below_min = filter_min_ratings(valid, cfg.prepare.min_user_ratings, cfg.prepare.min_item_ratings)
        train, held_out = split(kept, cfg.prepare.split)
        users = F.broadcast(dense_ids(train, "user_id", "user_idx"))
        items = F.broadcast(dense_ids(train, "item_id", "item_idx"))
        if users.isEmpty():
            raise StageError(f"{input_path}: no rating is left for training after filtering and splitting "
                             f"({cfg.prepare.split.method} split)")
        held_out = held_out.join(users.drop("count"), "user_id", "left").join(items.drop("count"), "item_id", "left")
        known = F.col("user_idx").isNotNull() & F.col("item_idx").isNotNull()
        manifest = _publish(spark, cfg, out, source, shown, files, lines, input_path, counts, users, items,
                            train=train.join(users.drop("count"), "user_id").join(items.drop("count"), "item_id"),
                            valid=held_out.where(known),
                            rejected=[checked.where("reason IS NOT NULL"),
                                      below_min.withColumn("reason", F.lit("below_min_ratings")),
                                      held_out.where(~known).withColumn("reason", F.lit("cold_start_validation"))],
                            force=force)
    finally:
        cached.unpersist()
    log.info("prepare: wrote %s in %.1f s", out, time.time() - started)
    return manifest


def _count_rows(spark: SparkSession, checked: DataFrame, fmt: str) -> tuple[dict, DataFrame, list]:
    """Rows by reason (None: valid), the line offsets of the file splits, and the rows that are CSV headers.

    The job that fills the cache of `checked` counts its rows by reason and by file split. A CSV
    file's header, its first row, went through validation like any line, but it is no rating.
    """
    groups = (checked.groupBy("reason", "file_idx", "block")
              .agg(F.count(F.lit(1)).alias("n"), F.min("row").alias("row")).toPandas())
    offsets = ingest.line_offsets(groups)
    headers = sorted(int(r) for r in offsets.first_row[offsets.block == 0]) if fmt == "csv" else []
    counts = {}
    for g in groups.itertuples():
        counts[g.reason] = counts.get(g.reason, 0) + int(g.n) - (int(g.row) in headers)
    lines = F.broadcast(spark.createDataFrame(offsets[["file_idx", "block", "offset"]]))
    return {reason: n for reason, n in counts.items() if n}, lines, headers


def _persist_uncompressed(spark: SparkSession, df: DataFrame) -> DataFrame:
    """df.persist(), without the compression of the cache (the setting is read when persist is called).

    Choosing and applying an encoding for every column of tens of millions of rows costs more CPU
    than all the later scans of the cache together.
    """
    key = "spark.sql.inMemoryColumnarStorage.compressed"
    before = spark.conf.get(key)
    spark.conf.set(key, "false")
    try:
        return df.persist(StorageLevel.MEMORY_AND_DISK)
    finally:
        spark.conf.set(key, before)


def validate(raw: DataFrame, scale: tuple) -> DataFrame:
    """Types the string columns and names the first problem of each row in `reason` (null when fine)."""
    low, high, step = scale
    # Each cast once, in its own select: Spark does not share an expression between CASE branches.
    typed = raw.select("file_idx", "block", "row", "raw", "fields", "user_id", "item_id", "timestamp",
                       F.col("rating").cast("double").alias("_rating"),
                       *[F.col(c).cast("long").alias(f"_{c}") for c in ("user_id", "item_id", "timestamp")])
    rating = F.col("_rating")

    def plain(column: str, below: int):
        """Digits without sign, blanks or leading zeros, below a bound: cheaper to check than the regexes."""
        number = F.col(f"_{column}")
        return (number.cast("string") == F.col(column)) & (number >= 0) & (number < below)

    bad_rating = rating.isNull() | F.isnan(rating)
    off_scale = (rating < low) | (rating > high) | (F.abs(rating / step - F.round(rating / step)) > 1e-6)
    # The first branch passes the common, clean row; the others find the reason of any other row, which is the
    # first it fails in this order.
    reason = F.when((F.col("fields") == 4) & plain("user_id", INT32_MAX + 1) & plain("item_id", INT32_MAX + 1)
                    & ~bad_rating & ~off_scale & plain("timestamp", 10**18), F.lit(None))
    reason = reason.when(F.col("fields") != 4, "unparseable_line")
    for column in ("user_id", "item_id"):
        value = F.col(column)
        reason = (reason.when(value.isNull() | (value == ""), "missing_id")
                  .when(~value.rlike(r"^-?[0-9]+$"), "non_integer_id")
                  .when(value.startswith("-"), "negative_id")
                  .when((F.length(value) > 10) | (F.col(f"_{column}") > INT32_MAX), "id_out_of_range"))
    reason = (reason.when(bad_rating, "bad_rating")
              .when(off_scale, "rating_out_of_scale")
              .when(~F.coalesce(F.col("timestamp"), F.lit("")).rlike(r"^[0-9]{1,18}$"), "bad_timestamp"))
    ok = F.col("reason").isNull()
    return typed.withColumn("reason", reason).select(
        "file_idx", "block", "row", "raw", "reason",
        F.when(ok, F.col("_user_id").cast("int")).alias("user_id"),
        F.when(ok, F.col("_item_id").cast("int")).alias("item_id"),
        F.when(ok, rating.cast("float")).alias("rating"),
        F.when(ok, F.col("_timestamp")).alias("timestamp"))


def mark_duplicates(rows: DataFrame) -> DataFrame:
    """Of several ratings of one (user, item), keeps the latest (ties: the last in the file); rejects the rest.

    Only rejected rows keep their raw text.
    """
    order = Window.partitionBy("user_id", "item_id").orderBy(
        F.col("timestamp").desc(), F.col("file_idx").desc(), F.col("block").desc(), F.col("row").desc())
    seq = F.when(F.col("reason").isNull(), F.row_number().over(order))
    return (rows.withColumn("reason", F.when(seq > 1, F.lit("duplicate_pair")).otherwise(F.col("reason")))
            .withColumn("raw", F.when(F.col("reason").isNotNull(), F.col("raw"))))


def _check_rejections(ratings: str, fmt: str, files, lines: DataFrame, checked: DataFrame, total: int,
                      invalid: dict, max_fraction: float) -> None:
    if total == 0:
        raise StageError(f"{ratings}: yields no ratings (0 rows read)")
    fraction = sum(invalid.values()) / total
    if fraction > max_fraction or fraction == 1:
        examples = _with_line(checked.where("reason IS NOT NULL"), lines).orderBy("file_idx", "line").limit(5).collect()
        shown = "\n".join(f"  {files.source[r.file_idx]} line {r.line}: {r.reason}: {r.raw!r}" for r in examples)
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(invalid.items(), key=lambda kv: -kv[1]))
        unparseable = [r.raw for r in examples if r.reason == "unparseable_line"]
        why = (f"yields no usable ratings: all {total} rows were rejected ({by_reason})" if fraction == 1 else
               f"{fraction:.2%} of {total} rows were rejected ({by_reason}), more than "
               f"prepare.max_reject_fraction={max_fraction:.2%}")
        raise StageError(
            f"{ratings}: {why}; is this the right file and --format ({fmt})?"
            f"{ingest.field_problem(fmt, unparseable)} Nothing was written. First rejected rows:\n{shown}")


def filter_min_ratings(rows: DataFrame, min_user: int, min_item: int) -> tuple[DataFrame, DataFrame]:
    """Drops users and items with too few ratings, again and again until none is left below the minimum.

    The rounds run on the (user, item) pairs alone. A row survives them exactly when its user and its
    item do, so the rows are then split by two broadcast joins, which keep their partitioning.
    """
    if min_user <= 1 and min_item <= 1:
        return rows, rows.limit(0)
    pairs = rows.select("user_id", "item_id")
    n = pairs.count()
    for _ in range(20):
        for column, minimum in (("user_id", min_user), ("item_id", min_item)):
            if minimum > 1:
                enough = pairs.groupBy(column).count().where(F.col("count") >= minimum).select(column)
                pairs = pairs.join(enough, column, "left_semi").localCheckpoint()
        before, n = n, pairs.count()
        if n == before:
            break
    flagged = rows
    for column in ("user_id", "item_id"):
        flagged = flagged.join(F.broadcast(pairs.select(column).distinct().withColumn(f"_{column}", F.lit(True))),
                               column, "left")
    survives = F.col("_user_id").isNotNull() & F.col("_item_id").isNotNull()
    return flagged.where(survives).drop("_user_id", "_item_id"), flagged.where(~survives).drop("_user_id", "_item_id")


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


def _write_ratings(df: DataFrame, path: str) -> int:
    """One file of one row group per partition, so that petastorm can deal them out to the ranks.

    The partitions are those of the shuffle by user in prepare. After a random or global_time split the
    rows come sorted by user and item from the duplicate window, and Spark leaves this sort out.
    """
    (df.sortWithinPartitions("user_id", "item_id")
     .select(F.col("user_idx").cast("int"), F.col("item_idx").cast("int"),
             F.col("rating").cast("float"), F.col("timestamp").cast("long"))
     .write.parquet(path))
    return storage.row_groups(path)


def _with_line(df: DataFrame, lines: DataFrame) -> DataFrame:
    """Adds the 1-based line (for Parquet: row) of each row in its file, from the offsets of ingest.line_offsets."""
    return df.join(lines, ["file_idx", "block"]).withColumn("line", F.col("row") + F.col("offset"))


def _publish(spark, cfg: Config, out, source, shown, files, lines, input_path, counts, users, items, train, valid,
             rejected: list, force: bool) -> dict:
    movies = ingest.read_movies(source)
    genre_names = sorted({g for gs in movies.genres for g in gs.split("|") if g})
    genre_of = {g: i for i, g in enumerate(genre_names)}
    movies["genre_idx"] = movies.genres.map(lambda gs: [genre_of[g] for g in gs.split("|") if g])
    items_out = (items.withColumnRenamed("count", "train_count")
                 .join(_movies_frame(spark, movies), "item_id", "left"))
    users_out = users.select("user_idx", "user_id", F.col("count").alias("train_count"))
    columns = ["file_idx", "block", "row", "raw", "reason", "user_id", "item_id", "rating", "timestamp"]
    rejected_rows = rejected[0].select(columns)
    for part in rejected[1:]:
        rejected_rows = rejected_rows.unionByName(part.withColumn("raw", F.lit(None).cast("string")).select(columns))
    rejected_rows = (_with_line(rejected_rows, lines).join(F.broadcast(spark.createDataFrame(files)), "file_idx")
                     .select("line", "raw", "reason", "user_id", "item_id", "rating", "timestamp", "source"))

    with storage.publish(out, "prepare", force) as tmp:
        row_groups = {"train": _write_ratings(train, f"{tmp}/train"),
                      "valid": _write_ratings(valid, f"{tmp}/valid")}
        users_out.orderBy("user_idx").coalesce(1).write.parquet(f"{tmp}/users")
        items_out.orderBy("item_idx").coalesce(1).write.parquet(f"{tmp}/items")
        # Few rows: one sorted file, without the sampling pass over all rows that orderBy would make.
        rejected_rows.repartition(1).sortWithinPartitions("source", "line").write.parquet(f"{tmp}/rejected")
        # The counts of the manifest come from what was written.
        stats = (spark.read.parquet(f"{tmp}/train")
                 .agg(F.count(F.lit(1)).alias("n"), F.avg("rating").alias("mean"),
                      F.collect_set("rating").alias("levels")).first())
        rejected = spark.read.parquet(f"{tmp}/rejected").groupBy("reason").count().collect()
        by_reason = {r.reason: r["count"] for r in rejected}
        n_valid = spark.read.parquet(f"{tmp}/valid").count()
        n_rejected = sum(by_reason.values())
        manifest = {
            "stage": "prepare",
            "dataset": cfg.dataset,
            "source": {"input": input_path, "format": source.format, "ratings": shown(source.ratings),
                       "movies": source.movies and shown(source.movies),
                       "checksum": storage.checksum([source.ratings])},
            "rating_scale": dict(zip(("min", "max", "step"), source.scale)),
            "rating_levels": sorted(stats.levels),
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
             f"  input rows {c['input_rows']:,}: train {c['train']:,}, valid {c['valid']:,}, "
             f"rejected {c['rejected']:,}",
             f"  users {c['users']:,}, items {c['items']:,}, rating levels {manifest['rating_levels']}"]
    for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    rejected {reason}: {n:,}")
    return "\n".join(lines)
