"""Prepare throughput: `dmf prepare` on a synthetic set in local mode, with rows/s and peak memory.

    .venv/bin/python -m benchmarks.prepare_bench --ratings 20000000 --users 138000 --items 27000

Prints the figures and appends them to docs/benchmarks/prepare.md. The synthetic input
(WORK/synth-20m for 20M ratings) is generated once per size and reused, and the prepared output
is left in WORK/prepared-20m for other benchmarks; WORK is outside the checkout. Timings are of one
machine at one time, and other work on it slows them: the load average before and after the run and
the CPU seconds spent by this process and its children (the Spark JVM) are recorded with them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import command
from pipeline import config, storage
from pipeline.data import prepare, synth
from pipeline.spark import session

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak resident memory of this process and its children (the Spark JVM, Python workers), sampled."""

    def __init__(self, every: float = 0.5):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User and system CPU time of this process and its live children (the Spark JVM)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=138_000)
    parser.add_argument("--items", type=int, default=27_000)
    parser.add_argument("--work", default=str(ROOT.parent / "bench-data"), help="where the data sets go")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "prepare.md"))
    args = parser.parse_args()
    cfg = config.load(overrides=[
        f"synth.ratings={args.ratings}", f"synth.users={args.users}", f"synth.items={args.items}", "synth.rank=16",
        f"spark.master={args.master}", f"spark.conf.spark.driver.memory={args.driver_memory}",
        "spark.conf.spark.sql.shuffle.partitions=16", "prepare.max_ranks=8"])
    spark = session(cfg.spark)
    size = f"{args.ratings // 1_000_000}m" if args.ratings % 1_000_000 == 0 else str(args.ratings)
    raw = f"{args.work}/synth-{size}"
    if not storage.exists(f"{raw}/manifest.json"):
        t = time.time()
        synth.generate(spark, cfg.synth, raw)
        print(f"synth: {args.ratings:,} ratings in {time.time() - t:.1f} s")
    load_before = os.getloadavg()
    with PeakMemory() as memory:
        cpu, t = cpu_seconds(), time.time()
        manifest = prepare.prepare(spark, cfg, raw, f"{args.work}/prepared-{size}")
        seconds, cpu = time.time() - t, cpu_seconds() - cpu
    load_after = os.getloadavg()
    rows = manifest["counts"]["input_rows"]
    load = " / ".join(" ".join(f"{x:.1f}" for x in avg) for avg in (load_before, load_after))
    ran = command("prepare_bench")
    line = (f"| {dt.date.today()} | {rows:,} | {manifest['counts']['users']:,} | {manifest['counts']['items']:,} | "
            f"{args.master} | {seconds:.1f} | {rows / seconds:,.0f} | {cpu:.0f} | {memory.peak / 2**30:.2f} | "
            f"{load} | `{ran}` |")
    print(f"prepare: {rows:,} rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s, {cpu:.0f} CPU s, peak memory "
          f"{memory.peak / 2**30:.2f} GiB (driver, JVM and workers), load average (1, 5, 15 min) {load} before / after")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# prepare benchmark\n\nWritten by `python -m benchmarks.prepare_bench`. Machine: "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB.\n\n"
              "| date | input rows | users | items | master | seconds | rows/s | CPU s | peak memory GiB "
              "| load average before / after | command |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    existing = out.read_text() if out.exists() else header
    out.write_text(existing + line + "\n")
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
