"""DataFrame helpers that scale: nothing here moves the whole data set into one partition."""
from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql.types import IntegerType, LongType, StructField, StructType


def dense_ids(df: DataFrame, id_col: str, index_col: str) -> DataFrame:
    """Distinct values of id_col numbered 0..n-1 in ascending order (int32), with their rows in `count`.

    Only the distinct values (users, items: few next to the ratings) reach the driver, where they are
    sorted and numbered; the small frame that comes back is meant to be broadcast.
    """
    ids = df.groupBy(id_col).count().toPandas().sort_values(id_col, ignore_index=True)
    ids[index_col] = np.arange(len(ids), dtype=np.int32)
    schema = StructType([df.schema[id_col], StructField(index_col, IntegerType(), False),
                         StructField("count", LongType(), False)])
    return df.sparkSession.createDataFrame(ids[[id_col, index_col, "count"]], schema)
