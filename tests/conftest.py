from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import SparkConfig
from pipeline.data import prepare, synth
from pipeline.publish import jdbc_jar
from pipeline.spark import session
from pipeline.training import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k"
# Tests that start servers or processes without the spark fixture; `pytest -m "not slow"` leaves them out too.
SLOW_FIXTURES = {"spark", "postgres_server"}


def pytest_collection_modifyitems(items):
    """Every test that needs Spark (and so Horovod ranks or a database) is in the slow tier."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def spark():
    spark = session(SparkConfig(master="local[2]", app_name="dmf-tests", conf={
        "spark.sql.shuffle.partitions": "4",
        "spark.default.parallelism": "2",
        "spark.driver.memory": "2g",
        **({"spark.jars": jdbc_jar()} if jdbc_jar() else {}),  # for tests/test_publish.py
    }))
    yield spark
    spark.stop()


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (SHARED / "raw" / "u.data").is_file():
        pytest.skip(f"MovieLens 100K is not at {SHARED} (the shared data folder beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def small_mf(spark, tmp_path_factory):
    """(cfg, base): a 2-rank mf model trained on a small synthetic set, for the stages that use a model."""
    base = tmp_path_factory.mktemp("small")
    cfg = config.load(overrides=["synth.users=200", "synth.items=60", "synth.ratings=6000", "synth.seed=3",
                                 "prepare.max_ranks=2", "train.epochs=3", "train.user_dim=8", "train.item_dim=8",
                                 "recommend.top_n=5", "recommend.users_per_block=37"])
    synth.generate(spark, cfg.synth, str(base / "raw"))
    prepare.prepare(spark, cfg, str(base / "raw"), str(base / "data"))
    train.train(spark, cfg, str(base / "data"), str(base / "model"))
    return cfg, base


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1 with a password-authenticated role (tests/postgres.py)."""
    from postgres import temporary_server

    with temporary_server() as server:
        yield server
