"""Recommend-for-all-users time: `dmf recommend` (mf and dmf) against MLlib ALS `recommendForAllUsers`
with the same rank, on the same ML-20M-sized synthetic set, in the same Spark session.

    .venv/bin/python -m benchmarks.recommend_bench --ratings 20000000

The models are trained briefly first (accuracy does not change scoring time); ALS is fitted with a few
iterations for the same reason. Both sides write their top-N to Parquet, which is what is timed. ALS
scores every item, rated or not; `dmf recommend` also removes each user's rated items and joins the
original ids and titles, so it does more work per user. Writes docs/benchmarks/recommend.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from pyspark.ml.recommendation import ALS

from benchmarks.common import ROOT, WORK, machine, ml20m_sized
from pipeline import config, recommend, storage
from pipeline.spark import session
from pipeline.training import train


def timed(fn, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.time()
        fn()
        seconds.append(time.time() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared set (default: synthesize --ratings ratings, 138K x 27K)")
    parser.add_argument("--ratings", type=int, default=20_000_000)
    parser.add_argument("--rank", type=int, default=32, help="embedding size of mf/dmf and ALS rank")
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--models", default="mf,dmf")
    parser.add_argument("--candidates", type=int, default=200,
                        help="two-stage candidates for the deep models, retrieved by the mf model (0: exact)")
    parser.add_argument("--als-iterations", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "recommend.md"))
    args = parser.parse_args()
    base = [f"spark.conf.spark.driver.memory={args.driver_memory}", "spark.conf.spark.sql.shuffle.partitions=16",
            f"train.user_dim={args.rank}", f"train.item_dim={args.rank}", "train.epochs=1",
            "train.batch_size=32768", f"recommend.top_n={args.top_n}"]
    spark = session(config.load(overrides=base).spark)
    data = args.data or ml20m_sized(spark, args.ratings, args.work)
    counts = storage.read_manifest(data, "prepare")["counts"]
    def trained(model: str) -> str:
        model_dir = f"{args.work}/rec-model-{model}-{args.rank}-{Path(data).name}"
        if not storage.exists(f"{model_dir}/manifest.json"):
            train.train(spark, config.load(overrides=[*base, f"train.model={model}"]), data, model_dir)
        return model_dir

    rows = []
    for model in args.models.split(","):
        two_stage = args.candidates and model not in recommend.RETRIEVAL_MODELS
        cfg = config.load(overrides=[*base, f"train.model={model}",
                                     f"recommend.candidates={args.candidates if two_stage else 0}"])
        model_dir, retrieval = trained(model), trained("mf") if two_stage else None
        out = f"{args.work}/rec-out-{model}"
        seconds = timed(lambda: recommend.recommend(spark, cfg, model_dir, data, out, retrieval), args.repeat)
        name = f"dmf recommend, {model}"
        if two_stage:
            recall = storage.read_manifest(out, "recommend")["two_stage"]["recall_vs_exact"]
            name += (f" (two-stage: {args.candidates} candidates from mf, recall {recall:.3f} of exact "
                     f"on {recommend.RECALL_USERS:,} users, the check included in the time)")
        rows.append((name, seconds))
        print(rows[-1], flush=True)

    ratings = spark.read.parquet(f"{data}/train")
    als = ALS(rank=args.rank, maxIter=args.als_iterations, regParam=0.1, userCol="user_idx", itemCol="item_idx",
              ratingCol="rating", seed=42)
    started = time.time()
    fitted = als.fit(ratings)
    fit_seconds = time.time() - started
    als_out = f"{args.work}/rec-out-als"

    def als_recommend():
        shutil.rmtree(als_out, ignore_errors=True)
        fitted.recommendForAllUsers(args.top_n).write.parquet(als_out)

    rows.append(("ALS recommendForAllUsers", timed(als_recommend, args.repeat)))
    print(rows[-1], flush=True)
    als_median = statistics.median(rows[-1][1])
    source = f"--data {args.data}" if args.data else f"--ratings {args.ratings}"
    lines = ["# recommend benchmark\n", f"Written by `python -m benchmarks.recommend_bench {source} --rank {args.rank} "
             f"--models {args.models} --candidates {args.candidates} --repeat {args.repeat}`. Machine: {machine()}.\n",
             f"Data: {counts['users']:,} users x {counts['items']:,} items, {counts['train']:,} training ratings; "
             f"top {args.top_n} for every user, rank {args.rank}, Spark local[2]; ALS fitted with "
             f"{args.als_iterations} iterations in {fit_seconds:.0f} s (not part of the timings).\n",
             "A method's first run includes starting Spark's Python workers (for this pipeline, with torch); the "
             "median is over all runs.\n",
             "| method | seconds (each run) | median | ALS time / this |", "| --- | --- | --- | --- |"]
    for name, seconds in rows:
        median = statistics.median(seconds)
        times = ", ".join(f"{s:.1f}" for s in seconds)
        lines.append(f"| {name} | {times} | {median:.1f} | {als_median / median:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
