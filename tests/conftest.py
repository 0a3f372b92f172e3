from pathlib import Path

import pytest

from pipeline.config import SparkConfig
from pipeline.spark import session

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k"


@pytest.fixture(scope="session")
def spark():
    spark = session(SparkConfig(master="local[2]", app_name="dmf-tests", conf={
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "2",
        "spark.driver.memory": "2g",
    }))
    yield spark
    spark.stop()


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (SHARED / "raw" / "u.data").is_file():
        pytest.fail(f"MovieLens 100K is expected at {SHARED} (the shared data folder beside the checkout)")
    return SHARED
