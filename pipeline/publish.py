"""`dmf publish`: a recommend output, a model's similar items and a most-popular fallback into PostgreSQL.

Spark's JDBC writer fills a staging table `<table>_staging_<hex>` beside each live table; one transaction then
adds the primary key, renames the live table away, renames the staging table into its name and drops the old
one. A reader sees the previous lists or the new ones, never a mix, and a publish that fails or is killed
leaves the previous tables serving; the next publish drops the staging tables a killed one left behind.

The password comes only from libpq's conventions, PGPASSWORD or the password file (PGPASSFILE, else
~/.pgpass): libpq reads them itself for this process's connections, and `password()` reads them the same way
for Spark's JDBC connections, which take it as a property. A URL carrying a password is refused.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.artifacts import load_model, model_and_data, read_table
from pipeline.similar import unit_item_vectors
from pipeline.storage import StageError

log = logging.getLogger(__name__)
DRIVER = "org.postgresql.Driver"
JAR_PATHS = ("/root/.m2/repository/org/postgresql/postgresql/42.7.13/postgresql-42.7.13.jar",
             "/usr/share/java/postgresql.jar")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
MAX_IDENTIFIER = 63  # PostgreSQL cuts longer names short (NAMEDATALEN - 1)
STAGING = "_staging_"
LOCK_TIMEOUT = "5s"  # a swap waits this long for readers' locks; queued behind a long query it would block logins
SIMILAR_BLOCK = 512  # items whose cosines against the catalog are computed at once

# Each kind of table: its data columns (name, PostgreSQL type) and primary key. Every table also gets
# run_id, model and generated_at: the same for every row, so they are column defaults, not sent row by row.
KINDS = {
    "recommendations": ([("user_id", "bigint"), ("rank", "integer"), ("item_id", "bigint"), ("score", "real"),
                         ("title", "text")], ("user_id", "rank")),
    "similar": ([("item_id", "bigint"), ("rank", "integer"), ("similar_item_id", "bigint"), ("score", "real")],
                ("item_id", "rank")),
    "popular": ([("rank", "integer"), ("item_id", "bigint"), ("title", "text"), ("ratings", "bigint")], ("rank",)),
}
PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"}
SPARK_TYPES = {"bigint": "long", "integer": "int", "real": "float", "text": "string"}


def jdbc_jar() -> str | None:
    """The PostgreSQL JDBC driver jar: $DMF_JDBC_JAR, else a known path, else the newest in ~/.m2; None if none."""
    given = os.environ.get("DMF_JDBC_JAR")
    if given:
        return given
    found = [p for p in JAR_PATHS if os.path.isfile(p)]
    found += sorted(glob.glob(os.path.expanduser("~/.m2/repository/org/postgresql/postgresql/*/postgresql-*.jar")))[-1:]
    return found[0] if found else None


@dataclass(frozen=True)
class Database:
    host: str
    port: int
    dbname: str
    user: str

    def __str__(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def jdbc_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"jdbc:postgresql://{host}:{self.port}/{self.dbname}"


def parse_url(url: str) -> Database:
    """postgresql://USER@HOST[:PORT]/DB; a password in it is refused (it would show in logs and `ps`)."""
    parts = urlsplit(url)
    if parts.password is not None:
        raise StageError("the database URL carries a password: remove it from the URL and set PGPASSWORD or add a "
                         "line to ~/.pgpass (or the file PGPASSFILE names) instead")
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.username \
            or not parts.path.strip("/") or parts.query or parts.fragment:
        shown = f"{parts.scheme}://{parts.username or ''}@{parts.hostname or ''}{parts.path}"
        raise StageError(f"database URL {shown!r} is not of the form postgresql://USER@HOST:PORT/DB "
                         f"(no query parameters; the password comes from PGPASSWORD or ~/.pgpass)")
    try:
        port = parts.port or 5432
    except ValueError as e:
        raise StageError(f"database URL postgresql://{parts.username}@{parts.hostname}/...: bad port ({e})") from None
    return Database(parts.hostname, port, parts.path.strip("/"), parts.username)


def password(db: Database) -> str | None:
    """The password libpq would use for `db`: PGPASSWORD, else the first matching line of the password file."""
    if os.environ.get("PGPASSWORD"):
        return os.environ["PGPASSWORD"]
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        # libpq ignores a password file that others may read, with a warning on stderr; so does this.
        if not path.is_file() or path.stat().st_mode & 0o077:
            return None
        lines = path.read_text().splitlines()
    except OSError:
        return None
    wanted = (db.host, str(db.port), db.dbname, db.user)
    for line in lines:
        fields = _pgpass_fields(line)
        if not line.startswith("#") and len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields, wanted)):
            return fields[4]
    return None


def _pgpass_fields(line: str) -> list[str]:
    """host:port:db:user:password with `\\` escaping `:` and `\\`, as libpq reads it."""
    fields, field, chars = [], [], iter(line)
    for c in chars:
        if c == "\\":
            field.append(next(chars, ""))
        elif c == ":" and len(fields) < 4:
            fields.append("".join(field))
            field = []
        else:
            field.append(c)
    return [*fields, "".join(field)]


def connect(db: str | Database) -> psycopg.Connection:
    """An autocommit connection, checked with `select 1`, or a StageError naming the server and the reason."""
    db = parse_url(db) if isinstance(db, str) else db
    try:
        conn = psycopg.connect(host=db.host, port=db.port, dbname=db.dbname, user=db.user, connect_timeout=10,
                               autocommit=True, application_name="dmf")
        conn.execute("select 1")
        return conn
    except psycopg.Error as e:
        raise StageError(f"cannot connect to {db}: {_reason(e, db)} (the password comes from PGPASSWORD or "
                         f"~/.pgpass)") from None


def _reason(e: BaseException, db: Database) -> str:
    """An error's message on one line, the password (should a message ever carry it) starred out."""
    text, secret = " ".join(str(e).split()), password(db)
    return text.replace(secret, "***") if secret else text


def table_name(name: str) -> tuple[str | None, str]:
    """(schema or None, table) of a plain, optionally schema-qualified identifier; anything else is refused."""
    parts = name.split(".")
    if len(parts) > 2 or not all(IDENTIFIER.fullmatch(p) for p in parts):
        raise StageError(f"table name {name!r} is not a plain identifier: use letters, digits and _ (not first), "
                         f"at most 51 characters, optionally schema-qualified as schema.table")
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def check_driver(spark: SparkSession) -> None:
    """The JDBC driver class must load in the Spark driver's JVM: checked before any Spark job starts."""
    jvm = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName(DRIVER, False, jvm.java.lang.Thread.currentThread().getContextClassLoader())
    except Py4JJavaError:  # ClassNotFoundException
        jar = jdbc_jar() or "/path/to/postgresql-42.7.13.jar"
        raise StageError(f"the PostgreSQL JDBC driver ({DRIVER}) is not on Spark's classpath; pass --jars {jar} "
                         f"(or --packages org.postgresql:postgresql:42.7.13) to spark-submit, or set spark.jars "
                         f"before the SparkSession starts") from None


def similar_items(model_dir: str, k: int) -> pd.DataFrame:
    """(item_id, rank, similar_item_id, score): each item's k nearest items by the cosine of the model's item
    vectors, ranked as `dmf similar` (pipeline.similar) ranks them, for the whole catalog in blocks."""
    data_dir, data = model_and_data(model_dir, None)
    ids = read_table(data_dir, data, "items", columns=["item_idx", "item_id"]).sort_values("item_idx")
    ids = ids.item_id.to_numpy()
    vectors = unit_item_vectors(load_model(model_dir)[0])
    k = min(k, len(ids) - 1)
    frames = []
    for start in range(0, len(ids), SIMILAR_BLOCK):
        cosine = (vectors[start:start + SIMILAR_BLOCK] @ vectors.T).numpy()
        rows = np.arange(len(cosine))
        cosine[rows, rows + start] = -np.inf  # an item is not its own neighbour
        best = np.argpartition(-cosine, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(cosine, best, axis=1)
        order = np.lexsort((best, -scores), axis=1)  # best first, ties in item order like predict.similar
        best, scores = np.take_along_axis(best, order, axis=1), np.take_along_axis(scores, order, axis=1)
        frames.append(pd.DataFrame({"item_id": np.repeat(ids[start:start + len(cosine)], k),
                                    "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(cosine)),
                                    "similar_item_id": ids[best].ravel(), "score": scores.ravel().astype(np.float32)}))
    return pd.concat(frames, ignore_index=True)


def popular_items(data_dir: str, n: int) -> pd.DataFrame:
    """(rank, item_id, title, ratings): the n items with the most training ratings, for users with no list."""
    data = storage.read_manifest(data_dir, "prepare")
    items = read_table(data_dir, data, "items", columns=["item_id", "title", "train_count"])
    top = items.sort_values(["train_count", "item_id"], ascending=[False, True]).head(n)
    return pd.DataFrame({"rank": np.arange(1, len(top) + 1, dtype=np.int32), "item_id": top.item_id.to_numpy(),
                         "title": top.title.to_numpy(), "ratings": top.train_count.to_numpy()})


def live_tables(schema: str | None, name: str, similar: bool, similar_table: str | None, tag: str) -> dict:
    """{kind: live table name} for what a publish writes, checked to be distinct and short enough for their
    staging names (`<live>_staging_<tag>`) to fit PostgreSQL's limit."""
    names = {"recommendations": name, "popular": f"{name}_popular"}
    if similar:
        similar_schema, names["similar"] = table_name(f"{name}_similar" if similar_table is None else similar_table)
        if similar_schema not in (None, schema):
            raise StageError(f"similar table {similar_table} must be in the schema of {schema}.{name}")
    if len(set(names.values())) < len(names):
        raise StageError(f"the tables to publish must differ, got {', '.join(names.values())}")
    longest = MAX_IDENTIFIER - len(STAGING) - len(tag)  # of a live table's name, so that its staging name fits
    for live in names.values():
        if len(live) > longest:
            raise StageError(f"table name {live} is too long: its staging table {live}{STAGING}{tag} would pass "
                             f"PostgreSQL's {MAX_IDENTIFIER}-character limit on names; use at most {longest} "
                             f"characters ({longest - len('_popular')} for a table, as {name}_popular and "
                             f"{name}_similar are published beside it)")
    return names


def publish(spark: SparkSession, recs_dir: str, db_url: str, table: str, model_dir: str | None = None,
            similar_table: str | None = None, similar_k: int = 10, run_id: str | None = None,
            writers: int = 8) -> dict:
    """Publishes recs_dir (a `dmf recommend` output) to `table`, the most popular items of its prepared data to
    `<table>_popular`, and with model_dir each item's similar_k nearest items to similar_table (default
    `<table>_similar`), all swapped in by one transaction. run_id (default: recs_dir's name) and the model and
    time of the recommendations are on every row. `writers` caps Spark's concurrent JDBC connections.
    Settings, the database and the JDBC driver are checked before any Spark work."""
    started = time.time()
    schema, name = table_name(table)
    tag = uuid.uuid4().hex[:8]
    names = live_tables(schema, name, model_dir is not None, similar_table, tag)
    db = parse_url(db_url)
    manifest = storage.read_manifest(recs_dir, "recommend")
    provenance = {"run_id": run_id or Path(recs_dir.rstrip("/")).name, "model": manifest["model"],
                  "generated_at": manifest["created_at"]}
    conn = connect(db)
    try:
        check_driver(spark)
        schema = schema or conn.execute("select current_schema()").fetchone()[0]
        locked = conn.execute("select pg_try_advisory_lock(hashtext(%s))", (f"dmf publish {schema}.{name}",))
        if not locked.fetchone()[0]:
            raise StageError(f"another publish of {schema}.{name} to {db} is in progress; try again when it ends")
        conn.execute(sql.SQL("set lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        for live in names.values():
            _drop_stale(conn, schema, live)
        sources, skipped = _sources(spark, recs_dir, manifest, model_dir, similar_k)
        staged = [(kind, f"{names[kind]}{STAGING}{tag}", names[kind]) for kind in sources]
        published_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        try:
            for kind, staging, _ in staged:
                _stage(conn, db, schema, kind, staging, *sources[kind], provenance, writers)
            swap_started = time.time()
            _swap(conn, schema, staged, {**provenance, "source": recs_dir, "published_at": published_at}, tag)
            swap_seconds = time.time() - swap_started
        except BaseException:
            for _, staging, _ in staged:  # best effort: the next publish drops what is left
                _drop(conn, schema, staging)
            raise
    except psycopg.Error as e:
        hint = (f" within lock_timeout={LOCK_TIMEOUT}: a long query or an open transaction holds one of the live "
                f"tables (see pg_stat_activity)") if isinstance(e, psycopg.errors.LockNotAvailable) else ""
        raise StageError(f"publishing to {db} failed: {_reason(e, db)}{hint}; the live tables are unchanged") from None
    finally:
        conn.close()
    result = {"database": str(db), "schema": schema, **provenance, "published_at": published_at,
              "tables": {live: {"kind": kind, "rows": sources[kind][1]} for kind, _, live in staged},
              "skipped": skipped, "seconds": time.time() - started, "swap_seconds": swap_seconds}
    log.info("published %s", json.dumps(result))
    return result


def _sources(spark: SparkSession, recs_dir: str, manifest: dict, model_dir: str | None, similar_k: int):
    """({kind: (Spark DataFrame, rows)}, {kind: why it is skipped}) of the tables to publish."""
    sources = {"recommendations": (_read_recommendations(spark, recs_dir, manifest), manifest["counts"]["rows"])}
    skipped = {}
    try:
        popular = popular_items(manifest["data"], manifest["top_n"])
        sources["popular"] = (_frame(spark, "popular", popular), len(popular))
    except (StageError, OSError) as e:
        skipped["popular"] = f"no most-popular fallback: {e}"
        log.warning("publish: %s", skipped["popular"])
    if model_dir:
        similar = similar_items(model_dir, similar_k)
        sources["similar"] = (_frame(spark, "similar", similar), len(similar))
    return sources, skipped


def _read_recommendations(spark: SparkSession, recs_dir: str, manifest: dict):
    path = f"{recs_dir.rstrip('/')}/{manifest['path']}"
    columns = KINDS["recommendations"][0]
    if manifest["format"] == "csv":
        schema = ", ".join(f"{c} {SPARK_TYPES[t]}" for c, t in columns)
        return spark.read.option("header", True).schema(schema).csv(storage.url(path))
    df = spark.read.parquet(storage.url(path))
    return df.select(*[F.col(c).cast(SPARK_TYPES[t]) for c, t in columns])


def _frame(spark: SparkSession, kind: str, pdf: pd.DataFrame):
    columns = KINDS[kind][0]
    return spark.createDataFrame(pdf[[c for c, _ in columns]], ", ".join(f"{c} {SPARK_TYPES[t]}" for c, t in columns))


def _qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def _stage(conn, db: Database, schema: str, kind: str, staging: str, df, expected: int, provenance: dict,
           writers: int) -> None:
    """Creates `staging`, fills it through Spark's JDBC writer and checks its row count."""
    columns, _ = KINDS[kind]
    defaults = [sql.SQL("run_id text NOT NULL DEFAULT {}").format(sql.Literal(provenance["run_id"])),
                sql.SQL("model text DEFAULT {}").format(sql.Literal(provenance["model"])),
                sql.SQL("generated_at timestamptz NOT NULL DEFAULT {}").format(
                    sql.Literal(dt.datetime.fromisoformat(provenance["generated_at"])))]
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(_qualified(schema, staging), sql.SQL(", ").join(
        [sql.SQL("{} {} NOT NULL" if c != "title" else "{} {}").format(sql.Identifier(c), sql.SQL(t))
         for c, t in columns] + defaults)))
    log.info("publish: writing %s rows into %s.%s", f"{expected:,}", schema, staging)
    secret = password(db)
    options = {"url": db.jdbc_url(), "dbtable": f'"{schema}"."{staging}"', "user": db.user, "driver": DRIVER,
               "numPartitions": str(writers), "batchsize": "10000", "reWriteBatchedInserts": "true",
               **({"password": secret} if secret else {})}
    try:
        with _quiet_py4j():
            writer = df.write.format("jdbc").options(**options)
        writer.mode("append").save()
    except (Py4JJavaError, PySparkException) as e:
        raise StageError(f"writing {schema}.{staging} through Spark's JDBC writer to {db} failed: "
                         f"{_reason(_root_cause(e), db)}; the live tables are unchanged") from None
    written = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_qualified(schema, staging))).fetchone()[0]
    if written != expected:
        raise StageError(f"{schema}.{staging} holds {written:,} rows after the JDBC write, the source {expected:,}: "
                         f"not published, the live tables are unchanged")
    conn.execute(sql.SQL("ALTER TABLE {} ALTER run_id DROP DEFAULT, ALTER model DROP DEFAULT, "
                         "ALTER generated_at DROP DEFAULT").format(_qualified(schema, staging)))
    conn.execute(sql.SQL("ANALYZE {}").format(_qualified(schema, staging)))


@contextlib.contextmanager
def _quiet_py4j():
    """py4j logs every command it sends to the JVM at DEBUG, a JDBC password among them."""
    logger = logging.getLogger("py4j")
    level = logger.level
    logger.setLevel(max(level, logging.INFO))
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(e: Exception) -> str | Exception:
    """The innermost Java exception of a py4j error (the JDBC driver's own message), else the error."""
    java = getattr(e, "java_exception", None)
    while java is not None and java.getCause() is not None:
        java = java.getCause()
    return java.toString()[:2000] if java is not None else e


def _swap(conn, schema: str, tables: list[tuple[str, str, str]], comment: dict, tag: str) -> None:
    """One transaction: primary keys on the staging tables, then for each (kind, staging, live) the live table
    renamed away and dropped and the staging table renamed into its name."""
    with conn.transaction():
        for kind, staging, _ in tables:
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                _qualified(schema, staging), sql.SQL(", ").join(map(sql.Identifier, KINDS[kind][1]))))
        for _, staging, live in tables:
            if _exists(conn, schema, live):
                _copy_grants(conn, schema, live, staging)
                old = f"{live}_old_{tag}"
                conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(_qualified(schema, live),
                                                                          sql.Identifier(old)))
                conn.execute(sql.SQL("DROP TABLE {}").format(_qualified(schema, old)))
            conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(_qualified(schema, staging),
                                                                      sql.Identifier(live)))
            conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
                _qualified(schema, live), sql.Literal(json.dumps(comment))))


def _copy_grants(conn, schema: str, live: str, staging: str) -> None:
    """The privileges others hold on the live table, granted on its replacement: a reader keeps its SELECT."""
    grants = conn.execute("SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type FROM pg_class c "
                          "CROSS JOIN aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee "
                          "WHERE c.oid = %s::regclass AND a.grantee <> c.relowner",
                          (_qualified(schema, live).as_string(conn),)).fetchall()
    for role, privilege in grants:
        if privilege not in PRIVILEGES:
            raise StageError(f"{schema}.{live} carries a privilege {privilege!r} that publish cannot carry over")
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            sql.SQL(privilege), _qualified(schema, staging),
            sql.SQL("PUBLIC") if role == "PUBLIC" else sql.Identifier(role)))


def _exists(conn, schema: str, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", (schema, name)).fetchone() \
        is not None


def _drop(conn, schema: str, name: str) -> None:
    try:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_qualified(schema, name)))
    except psycopg.Error as e:
        log.warning("publish: could not drop %s.%s (%s); the next publish will", schema, name, " ".join(str(e).split()))


def _drop_stale(conn, schema: str, live: str) -> None:
    """Drops staging tables of `live` that earlier publishes left: none can still be running, as this one holds
    the publish lock, which a killed publish's connection gave up when it closed."""
    stale = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename ~ %s",
                         (schema, f"^{live}{STAGING}[0-9a-f]{{8}}$")).fetchall()
    for (staging,) in stale:
        log.warning("publish: dropping %s.%s, left by an earlier publish that did not finish", schema, staging)
        _drop(conn, schema, staging)


def lookup(db: str | psycopg.Connection, table: str, user_id: int) -> list[dict]:
    """That user's published list, best first (rank, item_id, score, title, run_id, model, generated_at); [] when
    the user has none. `db` is a URL or an open connection (a server answering logins keeps one)."""
    return _rows(db, table, "", "WHERE user_id = %s ORDER BY rank", (user_id,))


def popular(db: str | psycopg.Connection, table: str) -> list[dict]:
    """The most-popular fallback published beside `table` (`<table>_popular`), best first; [] when there is none."""
    return _rows(db, table, "_popular", "ORDER BY rank", (), missing_ok=True)


def _rows(db, table: str, suffix: str, where: str, params: tuple, missing_ok: bool = False) -> list[dict]:
    schema, name = table_name(table)
    target = sql.Identifier(*([schema] if schema else []), name + suffix)
    columns = [c for c, _ in KINDS["popular" if suffix else "recommendations"][0] if c != "user_id"]
    query = sql.SQL("SELECT {}, run_id, model, generated_at FROM {} " + where).format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), target)
    conn = connect(db) if isinstance(db, str) else db
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, params).fetchall()
    except psycopg.errors.UndefinedTable:
        if missing_ok:
            return []
        raise StageError(f"table {table}{suffix} does not exist in {_described(conn)}: publish to it first "
                         f"(dmf publish --table {table})") from None
    finally:
        if isinstance(db, str):
            conn.close()


def _described(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


def show(db: str, table: str, user_id: int) -> str:
    """`dmf lookup`: the user's list as a table, or, for a user with none, a message and the fallback list."""
    with connect(db) as conn:
        rows = lookup(conn, table, user_id)
        if rows:
            head = f"user {user_id}: top {len(rows)} of run {rows[0]['run_id']} (generated {rows[0]['generated_at']})"
            return head + "\n" + _table(rows, ["rank", "item_id", "score", "title"])
        text = f"user {user_id} has no recommendations in {table} (not a user of the published run)"
        fallback = popular(conn, table)
        if not fallback:
            return text + f"; no most-popular fallback is published ({table}_popular does not exist)"
        return text + "; the most popular items instead:\n" + _table(fallback, ["rank", "item_id", "title", "ratings"])


def _table(rows: list[dict], columns: list[str]) -> str:
    return pd.DataFrame(rows)[columns].to_string(index=False)


def summary(result: dict) -> str:
    """What `dmf publish` prints."""
    lines = [(f"published run {result['run_id']} (generated {result['generated_at']}) -> {result['database']}, "
              f"schema {result['schema']}, in {result['seconds']:.1f} s")]
    lines += [f"  {name}: {t['rows']:,} rows ({t['kind']})" for name, t in result["tables"].items()]
    lines += [f"  {kind}: skipped, {why}" for kind, why in result["skipped"].items()]
    return "\n".join(lines)
