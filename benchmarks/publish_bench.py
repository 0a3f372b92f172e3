"""`dmf publish` time, and lookups against the published table from a pool of connections, on an ML-20M-sized
recommendations table (138,000 users x 10 rows, synthetic rows in Parquet).

    .venv/bin/python -m benchmarks.publish_bench

Without --db-url it starts a throwaway PostgreSQL server on 127.0.0.1 (tests/postgres.py; as root it runs as the
`postgres` user) with its default settings. Each publish is timed from the call to the swapped-in table, the
second one replacing the first's table. Lookups (`pipeline.publish.lookup`, one user's list by primary key) run
on --threads threads with a connection each, first alone and then while a third publish runs, to show what a
swap does to the login path. Writes docs/benchmarks/publish.md.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, WORK, machine
from pipeline import publish, storage
from pipeline.config import SparkConfig
from pipeline.spark import session
from tests.postgres import synthetic_recommendations, temporary_server


def lookups(url: str, table: str, users: int, threads: int, until) -> tuple[np.ndarray, int]:
    """(latencies in seconds, errors) of lookups of random users on `threads` connections until until() is true."""
    latencies, errors = [[] for _ in range(threads)], [0] * threads

    def run(i: int) -> None:
        rng = np.random.default_rng(i)
        with publish.connect(url) as conn:
            while not until():
                user = int(rng.integers(1, users + 1))
                started = time.perf_counter()
                try:
                    rows = publish.lookup(conn, table, user)
                    errors[i] += len(rows) == 0
                except Exception:  # noqa: BLE001 - counted and reported
                    errors[i] += 1
                latencies[i].append(time.perf_counter() - started)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return np.concatenate([np.asarray(x) for x in latencies]), sum(errors)


def row(name: str, latencies: np.ndarray, seconds: float, errors: int) -> str:
    ms = latencies * 1000
    return (f"| {name} | {len(latencies):,} in {seconds:.1f} s | {len(latencies) / seconds:,.0f} | "
            f"{np.percentile(ms, 50):.2f} | {np.percentile(ms, 99):.2f} | {ms.max():.1f} | {errors} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=138_000)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--db-url", help="an existing server, postgresql://USER@HOST:PORT/DB, password in "
                                         "PGPASSWORD or ~/.pgpass (default: a throwaway server)")
    parser.add_argument("--table", default="bench_recs")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "publish.md"))
    args = parser.parse_args()
    recs = f"{args.work}/publish-recs-{args.users}x{args.top_n}"
    if not storage.exists(f"{recs}/manifest.json"):
        synthetic_recommendations(recs, args.users, args.top_n)
    spark = session(SparkConfig(master="local[2]", conf={"spark.jars": publish.jdbc_jar() or "",
                                                         "spark.driver.memory": "4g"}))
    with nullcontext(None) if args.db_url else temporary_server() as server:
        url = args.db_url or server.url
        if server:
            os.environ["PGPASSWORD"] = server.password
        publishes = []
        for run in ("first", "second"):
            result = publish.publish(spark, recs, url, args.table, run_id=run)
            publishes.append(result)
            print(publish.summary(result), flush=True)
        rows = result["tables"][args.table]["rows"]

        started = time.time()
        alone, alone_errors = lookups(url, args.table, args.users, args.threads,
                                      lambda: time.time() - started > args.seconds)
        alone_seconds = time.time() - started

        done = threading.Event()
        during = {}

        def third():
            try:
                during.update(publish.publish(spark, recs, url, args.table, run_id="third"))
            finally:
                done.set()

        started = time.time()
        publisher = threading.Thread(target=third)
        publisher.start()
        busy, busy_errors = lookups(url, args.table, args.users, args.threads, done.is_set)
        busy_seconds = time.time() - started
        publisher.join()

    source = f"--db-url {args.db_url}" if args.db_url else "(a throwaway PostgreSQL server)"
    lines = ["# publish benchmark\n",
             (f"Written by `python -m benchmarks.publish_bench --users {args.users} --top-n {args.top_n} --threads "
              f"{args.threads} --seconds {args.seconds:g}` {source}. Machine: {machine()}.\n"),
             (f"Data: {args.users:,} users x {args.top_n} rows = {rows:,} rows of synthetic recommendations in "
              f"Parquet; Spark local[2] writes them through the JDBC writer (PostgreSQL JDBC "
              f"{Path(publish.jdbc_jar() or 'unknown').stem.removeprefix('postgresql-')}, batches of 10,000, "
              f"reWriteBatchedInserts) into a staging table, then one transaction adds the primary key and swaps "
              f"it in. PostgreSQL, Spark and the lookup threads share the machine's cores. \"swap s\" is that "
              f"transaction, of which only the renames hold the live table.\n"),
             "| publish | seconds | rows/s | swap s |", "| --- | --- | --- | --- |"]
    for name, result in zip(("first (no table yet)", "second (replaces the first)", "third (during lookups)"),
                            [*publishes, during]):
        lines.append(f"| {name} | {result['seconds']:.1f} | {rows / result['seconds']:,.0f} | "
                     f"{result['swap_seconds']:.2f} |")
    lines += ["", (f"Lookups: one user's {args.top_n} rows by primary key, random users, {args.threads} threads with a "
                  "connection each (psycopg 3, prepared statements after the first 5 runs); latency is the time of "
                  "`publish.lookup` in the calling thread, Python included. \"errors\" counts failed lookups "
                  "and empty lists.\n"),
              "| lookups | count | per s | p50 ms | p99 ms | max ms | errors |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              row("alone", alone, alone_seconds, alone_errors),
              row("during the third publish and its swap", busy, busy_seconds, busy_errors)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    spark.stop()


if __name__ == "__main__":
    main()
