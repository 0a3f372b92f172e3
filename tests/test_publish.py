"""dmf publish against a real PostgreSQL server (tests/postgres.py, password authentication on 127.0.0.1): the
rows exactly, swaps that a reader and a kill cannot split, settings refused before any Spark work, and a
password that stays out of logs and files."""
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from postgres import _free_port, synthetic_recommendations
from pyspark import SparkFiles

from pipeline import config, publish, recommend, similar, storage
from pipeline.storage import StageError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["user_id", "rank", "item_id", "score", "title"]


@pytest.fixture
def pg(postgres_server, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    return postgres_server


@pytest.fixture(scope="module")
def recs(spark, small_mf):
    """A real `dmf recommend` output (Parquet) of the small mf model."""
    cfg, base = small_mf
    out = str(base / "publish-recs")
    recommend.recommend(spark, cfg, str(base / "model"), None, out)
    return out


def table(conn, name: str) -> pd.DataFrame:
    cur = conn.execute(f'SELECT * FROM "{name}"')
    return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


def tables(conn, like: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (like,))]


def same_rows(got: pd.DataFrame, expected: pd.DataFrame, columns: list[str]) -> None:
    key = columns[:2]
    got = got[columns].astype(expected[columns].dtypes.to_dict()).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected[columns].sort_values(key).reset_index(drop=True))


def test_published_rows_equal_the_recommendations_exactly(spark, small_mf, recs, pg):
    cfg, base = small_mf
    model = str(base / "model")
    result = publish.publish(spark, recs, pg.url, "recs", model_dir=model, similar_k=4, run_id="r1")
    manifest = storage.read_manifest(recs, "recommend")
    expected = pd.read_parquet(f"{recs}/recommendations")
    assert result["tables"]["recs"]["rows"] == len(expected) == manifest["counts"]["rows"]
    with publish.connect(pg.url) as conn:
        got = table(conn, "recs")
        same_rows(got, expected, COLUMNS)
        assert set(got.run_id) == {"r1"} and set(got.model) == {manifest["model"]}
        assert set(got.generated_at) == {dt.datetime.fromisoformat(manifest["created_at"])}
        key = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'recs'::regclass "
                           "AND contype = 'p'").fetchone()[0]
        assert key == "PRIMARY KEY (user_id, rank)"
        assert tables(conn, "%staging%") == []

        neighbours = table(conn, "recs_similar")
        same_rows(neighbours, publish.similar_items(model, 4), ["item_id", "rank", "similar_item_id", "score"])
        for item in neighbours.item_id.unique()[:5]:  # the ranking `dmf similar` prints
            mine = neighbours[neighbours.item_id == item].sort_values("rank")
            theirs = similar.similar(model, int(item), 4)
            assert mine.similar_item_id.tolist() == theirs.item_id.tolist()
            assert mine.score.to_numpy() == pytest.approx(theirs.cosine.to_numpy(), abs=1e-6)

        items = pd.read_parquet(base / "data" / "items")
        popular = table(conn, "recs_popular").sort_values("rank")
        top = items.sort_values(["train_count", "item_id"], ascending=[False, True]).head(cfg.recommend.top_n)
        assert popular.item_id.tolist() == top.item_id.tolist()
        assert popular.ratings.tolist() == top.train_count.tolist()

    user = int(expected.user_id.iloc[0])
    rows = publish.lookup(pg.url, "recs", user)
    mine = expected[expected.user_id == user].sort_values("rank")
    assert [r["rank"] for r in rows] == mine["rank"].tolist()
    assert [r["item_id"] for r in rows] == mine.item_id.tolist()
    assert publish.show(pg.url, "recs", user).startswith(f"user {user}: top {len(rows)} of run r1")
    text = publish.show(pg.url, "recs", -1)
    assert "user -1 has no recommendations in recs" in text and "most popular items instead" in text
    assert str(top.title.iloc[0]) in text
    with pytest.raises(StageError, match="table nothing does not exist"):
        publish.lookup(pg.url, "nothing", user)


def test_a_csv_recommend_output_publishes_the_same_rows(spark, small_mf, pg):
    base = small_mf[1]
    out = str(base / "publish-recs-csv")
    csv = config.load(overrides=["recommend.top_n=5", "recommend.users_per_block=37", "recommend.format=csv"])
    recommend.recommend(spark, csv, str(base / "model"), None, out)
    publish.publish(spark, out, pg.url, "recs_csv")
    with publish.connect(pg.url) as conn:
        got = table(conn, "recs_csv")
    expected = pd.concat([pd.read_csv(p) for p in sorted(Path(out, "recommendations").glob("part-*"))])
    expected["score"] = expected.score.astype("float32")
    same_rows(got, expected, COLUMNS)
    assert set(got.run_id) == {"publish-recs-csv"}  # the directory's name unless run_id is given


def test_a_reader_sees_one_whole_list_while_publishes_swap(spark, recs, pg):
    publish.publish(spark, recs, pg.url, "live", run_id="run-0")
    sizes = pd.read_parquet(f"{recs}/recommendations").groupby("user_id").size()
    users = [int(u) for u in sizes.index[:25]]
    seen, bad, stop = [], [], threading.Event()

    def read():
        try:
            with publish.connect(pg.url) as conn:
                while not stop.is_set():
                    for user in users:
                        rows = publish.lookup(conn, "live", user)
                        runs = {r["run_id"] for r in rows}
                        if len(rows) != sizes[user] or len(runs) != 1 or \
                                [r["rank"] for r in rows] != list(range(1, len(rows) + 1)):
                            bad.append((user, len(rows), runs))
                        seen.append(min(runs, default=None))
        except Exception as e:  # noqa: BLE001 - reported below
            bad.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in (1, 2, 3):
            publish.publish(spark, recs, pg.url, "live", run_id=f"run-{i}")
        deadline = time.time() + 10
        while (not seen or seen[-1] != "run-3") and time.time() < deadline and reader.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert len(seen) > 100 and seen[-1] == "run-3"
    assert {"run-0", "run-3"} <= set(seen)


def test_privileges_on_the_live_table_carry_over_to_its_replacement(spark, recs, pg):
    publish.publish(spark, recs, pg.url, "granted", run_id="a")
    with publish.connect(pg.url) as conn:
        conn.execute("CREATE ROLE login_service")
        conn.execute('GRANT SELECT ON "granted" TO login_service')
        conn.execute('GRANT SELECT ON "granted_popular" TO PUBLIC')
        publish.publish(spark, recs, pg.url, "granted", run_id="b")
        assert set(table(conn, "granted").run_id) == {"b"}
        assert conn.execute("SELECT has_table_privilege('login_service', 'granted', 'SELECT'), "
                            "has_table_privilege('login_service', 'granted', 'INSERT'), "
                            "has_table_privilege('login_service', 'granted_popular', 'SELECT')").fetchone() == \
            (True, False, True)


KILLED = """
import sys
from pipeline import publish
from pipeline.config import SparkConfig
from pipeline.spark import session

spark = session(SparkConfig(master="local[2]", conf={"spark.jars": publish.jdbc_jar()}))
publish.publish(spark, sys.argv[1], sys.argv[2], "killed", run_id="killed")
"""


def test_a_publish_killed_mid_write_leaves_the_previous_table_serving(spark, recs, pg, tmp_path):
    publish.publish(spark, recs, pg.url, "killed", run_id="before")
    expected = pd.read_parquet(f"{recs}/recommendations")
    big = synthetic_recommendations(str(tmp_path / "big"), users=50_000)
    # In a process group of its own: the kill takes the Spark JVM and its Python workers with it.
    proc = subprocess.Popen([sys.executable, "-c", KILLED, big, pg.url], cwd=ROOT, start_new_session=True)
    with publish.connect(pg.url) as conn:
        try:
            deadline = time.time() + 180
            # Spark's JDBC tasks inserting into the staging table: the write is under way.
            while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                                   ('INSERT INTO "public"."killed_staging_%',)).fetchone()[0]:
                assert proc.poll() is None and time.time() < deadline, "the publish never started writing"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        got = table(conn, "killed")
        same_rows(got, expected, COLUMNS)
        assert set(got.run_id) == {"before"}
        (staging,) = tables(conn, "killed_staging_%")  # the killed publish's, left behind
        # The server notices the killed connections when it next reads from them.
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                           (f'%{staging}%',)).fetchone()[0]:
            assert time.time() < deadline + 60, "the killed publish's JDBC connections stay open"
            time.sleep(0.2)
        assert conn.execute(f'SELECT count(*) FROM "{staging}"').fetchone()[0] < 500_000

        publish.publish(spark, recs, pg.url, "killed", run_id="after")
        assert tables(conn, "killed_staging_%") == []
        assert set(table(conn, "killed").run_id) == {"after"}


def test_a_publish_failing_after_the_staging_write_changes_nothing(spark, recs, pg, tmp_path):
    publish.publish(spark, recs, pg.url, "failed", run_id="before")
    expected = pd.read_parquet(f"{recs}/recommendations")
    short = synthetic_recommendations(str(tmp_path / "short"), users=300)
    manifest = json.loads(Path(short, "manifest.json").read_text())
    manifest["counts"]["rows"] += 1  # as if a write had lost a row: found after the write, before the swap
    Path(short, "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=r"holds 3,000 rows after the JDBC write, the source 3,001: not published"):
        publish.publish(spark, short, pg.url, "failed", run_id="short")
    with publish.connect(pg.url) as conn:
        assert tables(conn, "failed_staging_%") == []
        same_rows(got := table(conn, "failed"), expected, COLUMNS)
        assert set(got.run_id) == {"before"}


def test_a_swap_that_cannot_take_the_table_from_a_long_reader_gives_up(spark, recs, pg):
    publish.publish(spark, recs, pg.url, "busy", run_id="before")
    with publish.connect(pg.url) as reader:
        reader.autocommit = False
        reader.execute('SELECT count(*) FROM "busy"')  # its transaction holds the table until it ends
        started = time.time()
        with pytest.raises(StageError, match=r"lock timeout.*within lock_timeout=5s.*the live tables are unchanged"):
            publish.publish(spark, recs, pg.url, "busy", run_id="after")
        assert time.time() - started < 60
        reader.rollback()
        assert set(table(reader, "busy").run_id) == {"before"}
        assert tables(reader, "busy_staging_%") == []


def spark_jobs(spark) -> list:
    return sorted(spark.sparkContext.statusTracker().getJobIdsForGroup())


def test_bad_connection_settings_fail_before_any_spark_work(spark, recs, pg, monkeypatch, tmp_path):
    jobs = spark_jobs(spark)
    at = f"{pg.host}:{pg.port}/{pg.dbname}"
    wrong_port = _free_port()
    cases = {
        f"postgresql://{pg.user}@{pg.host}:{wrong_port}/{pg.dbname}":
            f"cannot connect to postgresql://{pg.user}@{pg.host}:{wrong_port}/{pg.dbname}: .*refused",
        f"postgresql://{pg.user}:{pg.password}@{at}": "carries a password.*PGPASSWORD.*pgpass",
        f"postgresql://{pg.user}@{at}?password={pg.password}": "not of the form postgresql://USER@HOST:PORT/DB",
        f"mysql://{pg.user}@{at}": "not of the form",
        f"{pg.host}:{pg.port}": "not of the form",
        f"postgresql://{at}": "not of the form",
    }
    for url, message in cases.items():
        with pytest.raises(StageError, match=message) as e:
            publish.publish(spark, recs, url, "bad_settings")
        assert pg.password not in str(e.value)
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    with pytest.raises(StageError, match=f"cannot connect to {pg.url}: .*password authentication failed") as e:
        publish.publish(spark, recs, pg.url, "bad_settings")
    assert "not-the-password" not in str(e.value)
    monkeypatch.delenv("PGPASSWORD")
    readable = tmp_path / "pgpass"
    readable.write_text(f"{pg.host}:{pg.port}:{pg.dbname}:{pg.user}:{pg.password}\n")
    readable.chmod(0o644)  # libpq ignores a password file that others can read, and so does publish
    monkeypatch.setenv("PGPASSFILE", str(readable))
    assert publish.password(publish.parse_url(pg.url)) is None
    with pytest.raises(StageError, match="cannot connect to .*no password supplied"):
        publish.publish(spark, recs, pg.url, "bad_settings")
    assert spark_jobs(spark) == jobs
    monkeypatch.setenv("PGPASSWORD", pg.password)
    with publish.connect(pg.url) as conn:
        assert tables(conn, "bad_settings%") == []


MISSING_DRIVER = """
import json, sys
from pipeline import publish
from pipeline.config import SparkConfig
from pipeline.spark import session
from pipeline.storage import StageError

spark = session(SparkConfig(master="local[1]"))  # no spark.jars
try:
    publish.publish(spark, sys.argv[1], sys.argv[2], "no_driver")
except StageError as e:
    print(json.dumps({"error": str(e), "jobs": spark.sparkContext.statusTracker().getJobIdsForGroup()}))
"""


def test_a_missing_jdbc_driver_fails_before_any_spark_work(recs, pg):
    done = subprocess.run([sys.executable, "-c", MISSING_DRIVER, recs, pg.url], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "PostgreSQL JDBC driver (org.postgresql.Driver) is not on Spark's classpath" in result["error"]
    assert "--jars" in result["error"] and "spark.jars" in result["error"]
    assert result["jobs"] == []
    with publish.connect(pg.url) as conn:
        assert tables(conn, "no_driver%") == []


@pytest.mark.parametrize("name", ["recs; drop table x", "recs;", "1recs", "recs-x", '"recs"', "a.b.c", "recs.",
                                  ".recs", "", "r" * 52, "récs", "recs x"])
def test_a_table_name_that_is_not_a_plain_identifier_is_refused(spark, recs, pg, name):
    with pytest.raises(StageError, match="is not a plain identifier"):
        publish.publish(spark, recs, pg.url, name)
    with pytest.raises(StageError, match="is not a plain identifier"):
        publish.lookup(pg.url, name, 1)
    with pytest.raises(StageError, match="is not a plain identifier"):
        publish.publish(spark, recs, pg.url, "fine", model_dir="model", similar_table=name)


@pytest.mark.parametrize("name", ["r" * 51, "r" * 39])
def test_a_table_name_too_long_for_its_staging_table_is_refused(spark, recs, pg, name):
    with pytest.raises(StageError, match="is too long.*at most 46 characters .38 for a table"):
        publish.publish(spark, recs, pg.url, name)
    publish.publish(spark, recs, pg.url, "r" * 38)


def test_a_schema_qualified_table(spark, recs, pg):
    with publish.connect(pg.url) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS serving")
    result = publish.publish(spark, recs, pg.url, "serving.recs", run_id="q")
    assert result["schema"] == "serving" and set(result["tables"]) == {"recs", "recs_popular"}
    assert len(publish.lookup(pg.url, "serving.recs", int(pd.read_parquet(f"{recs}/recommendations").user_id[0])))


def test_the_password_stays_out_of_logs_and_files(spark, small_mf, recs, pg, caplog, capfd, tmp_path, monkeypatch):
    base = small_mf[1]
    caplog.set_level(logging.DEBUG)  # py4j logs every command it sends at DEBUG
    # This time the password comes from a password file, for libpq and for Spark's JDBC connections.
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"# the tests' server\nother:*:*:*:no\n{pg.host}:{pg.port}:{pg.dbname}:{pg.user}:{pg.password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    result = publish.publish(spark, recs, pg.url, "secret", model_dir=str(base / "model"), run_id="s")
    printed = publish.summary(result) + publish.show(pg.url, "secret", -1)
    print(printed)
    with pytest.raises(StageError) as e:
        publish.publish(spark, recs, pg.url.replace(str(pg.port), str(pg.port + 1)), "secret")
    with publish.connect(pg.url) as conn:
        comments = conn.execute("SELECT obj_description(c.oid) FROM pg_class c WHERE relname LIKE 'secret%' "
                                "AND relkind = 'r'").fetchall()
    assert len(comments) == 3 and json.loads(comments[0][0])["run_id"] == "s"
    out, err = capfd.readouterr()
    assert any(r.name.startswith("py4j") for r in caplog.records)  # DEBUG logging was on
    everything = caplog.text + out + err + json.dumps(result) + printed + str(e.value) + json.dumps(comments)
    assert pg.password not in everything
    secret = pg.password.encode()
    for folder in (base, Path(SparkFiles.getRootDirectory()).parent, ROOT / "spark-warehouse"):
        for path in (p for p in folder.rglob("*") if p.is_file()) if folder.exists() else ():
            assert secret not in path.read_bytes(), path


def test_jdbc_jar(monkeypatch):
    monkeypatch.delenv("DMF_JDBC_JAR", raising=False)
    found = publish.jdbc_jar()
    assert found is None or (found.endswith(".jar") and os.path.isfile(found))
    monkeypatch.setenv("DMF_JDBC_JAR", "/opt/jars/postgresql.jar")
    assert publish.jdbc_jar() == "/opt/jars/postgresql.jar"
