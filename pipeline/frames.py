"""DataFrame helpers that scale: nothing here moves the whole data set into one partition."""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def consecutive_index(df: DataFrame, name: str, chunk_cols: list[str], restart_cols: list[str] = ()) -> DataFrame:
    """Adds `name`, the 0-based position of each row, counting again from 0 for each value of restart_cols.

    Rows are counted chunk by chunk in the order of chunk_cols, and within a chunk in the order the
    rows come. A chunk's rows must be contiguous within one partition, as a file split's lines are, or
    the rows of one partition of a sorted frame. Like RDD.zipWithIndex, but in the JVM: one pass to count
    each chunk, a small table of offsets on the driver, and a broadcast join.
    """
    keys = [*restart_cols, *chunk_cols]
    tagged = df.withColumn("_row", F.monotonically_increasing_id())
    chunks = (tagged.groupBy(*keys).agg(F.min("_row").alias("_first"), F.count(F.lit(1)).alias("_n"))
              .toPandas().sort_values(keys))
    ends = chunks.groupby(list(restart_cols))["_n"].cumsum() if restart_cols else chunks["_n"].cumsum()
    chunks["_offset"] = ends - chunks["_n"]
    offsets = df.sparkSession.createDataFrame(chunks[[*keys, "_first", "_offset"]])
    return (tagged.join(F.broadcast(offsets), keys)
            .withColumn(name, F.col("_offset") + F.col("_row") - F.col("_first"))
            .drop("_row", "_first", "_offset"))


def dense_ids(df: DataFrame, id_col: str, index_col: str) -> DataFrame:
    """Distinct values of id_col numbered 0..n-1 in ascending order (int32)."""
    ordered = df.select(id_col).distinct().orderBy(id_col).withColumn("_part", F.spark_partition_id()).persist()
    indexed = consecutive_index(ordered, index_col, chunk_cols=["_part"])
    return indexed.select(id_col, F.col(index_col).cast("int").alias(index_col))
