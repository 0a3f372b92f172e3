"""The SparkSession every stage is handed: built from the config, or the one spark-submit made."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from pipeline.config import SparkConfig

DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
    # Python workers run PyTorch in mapInPandas; one BLAS thread each keeps cores from being oversubscribed.
    "spark.executorEnv.OMP_NUM_THREADS": "1",
}


def session(cfg: SparkConfig) -> SparkSession:
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master:
        builder = builder.master(cfg.master)
    # Python workers (mapInPandas, Horovod ranks) need the driver's environment unless told otherwise;
    # in local mode PySpark 3.5 reads only this variable for them, not spark.pyspark.python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in {**DEFAULTS, **cfg.conf}.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
