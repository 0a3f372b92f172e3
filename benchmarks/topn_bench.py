"""Top-N lists side by side on one split: the shipped config's model, most popular, EASE and Spark ALS with
implicit preferences, each searched on the validation split, judged by the same pipeline.metrics functions
(relevant: a validation rating >= evaluate.relevant_rating; candidates: every item without a training rating).

    .venv/bin/python -m benchmarks.topn_bench                         # ml-100k, uniform and per-user temporal
    .venv/bin/python -m benchmarks.topn_bench --input ~/Downloads/ml-1m.zip --config conf/ml-1m.yaml

Writes docs/benchmarks/topn.md. The model's and the peers' rows come from `evaluate.evaluate` (the report
`dmf evaluate` writes); the ALS rows from bench.py's ALS code with implicitPrefs=True.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import time
from pathlib import Path

import torch
from pyspark.ml.recommendation import ALS

from benchmarks.bench import ML100K, _factors, prepared
from benchmarks.common import ROOT, WORK, command, machine
from pipeline import artifacts, config, evaluate, peers, storage
from pipeline.scoring import topk
from pipeline.scoring.blocks import ship
from pipeline.spark import session
from pipeline.training import train

CONF = str(ROOT / "conf" / "ml-100k.yaml")
SPLITS = {"ml-100k": [], "ml-100k-temporal": ["prepare.split.method=user_temporal"]}
# rank x regParam x alpha; Spark's implicit ALS takes the rating as the confidence strength (1 + alpha r).
ALS_GRID = list(itertools.product((64, 128), (0.01, 0.1, 1.0), (0.03, 0.1, 1.0)))
ALS_ITERS = 15
# recommend.recent_items x recent_weight (the shipped 5 x 0.2 among them), and off
RECENT_GRID = [(0, 0.0)] + list(itertools.product((3, 5, 10), (0.1, 0.2, 0.3)))


def als_implicit(spark, data_dir: str, data: dict, counts, k: int, relevant_rating: float) -> dict:
    """The best NDCG@k of ALS implicitPrefs=True over ALS_GRID, judged on evaluate's users and items."""
    train_df = spark.read.parquet(f"{data_dir.rstrip('/')}/{data['paths']['train']}").persist()
    seen = artifacts.seen_items(data_dir, data, ("train",))
    valid = artifacts.read_table(data_dir, data, "valid")
    truth = valid[valid.rating >= relevant_rating].groupby("user_idx").item_idx.apply(set)
    users, relevant = truth.index.to_numpy(), list(truth)
    best, tried = None, []
    for rank, reg, alpha in ALS_GRID:
        started = time.time()
        model = ALS(rank=rank, regParam=reg, alpha=alpha, maxIter=ALS_ITERS, implicitPrefs=True, userCol="user_idx",
                    itemCol="item_idx", ratingCol="rating", seed=42).fit(train_df)
        seconds = time.time() - started
        u = torch.from_numpy(_factors(model.userFactors, data["counts"]["users"]))
        v = torch.from_numpy(_factors(model.itemFactors, data["counts"]["items"]))
        result = peers.judged(topk.top_lists(lambda block: u[block] @ v.T, users, seen, k), relevant, k, counts)
        row = {**result, "settings": f"rank {rank}, regParam {reg:g}, alpha {alpha:g}, maxIter {ALS_ITERS}",
               "seconds": seconds}
        tried.append(row)
        print(f"ALS implicit {row['settings']}: NDCG@{k} {row[f'ndcg@{k}']:.4f} ({seconds:.1f} s)", flush=True)
        if best is None or row[f"ndcg@{k}"] > best[f"ndcg@{k}"]:
            best = row
    train_df.unpersist()
    return {**best, "tried": len(tried)}


def recent_grid(spark, conf: str, overrides: list[str], model: str, data_dir: str, data: dict, counts) -> list[dict]:
    """NDCG@k and recall@k of the model's lists for each (recent_items, recent_weight) of RECENT_GRID."""
    built, manifest = artifacts.load_model(model)
    build = ship(spark, built, manifest["spec"])
    rows = []
    for items, weight in RECENT_GRID:
        cfg = config.load(conf, [*overrides, f"recommend.recent_items={items}", f"recommend.recent_weight={weight}"])
        judged = evaluate.ranking(spark, cfg, build, data_dir, data, "ranking", counts)["ranking"]
        rows.append({"items": items, "weight": weight, **judged})
        print(f"recent {items} x {weight}: NDCG@{cfg.evaluate.k} {judged[f'ndcg@{cfg.evaluate.k}']:.4f}", flush=True)
    return rows


def rows_for(spark, name: str, conf: str, overrides: list[str], source, work: str) -> list[dict]:
    cfg = config.load(conf, overrides)
    data_dir = prepared(spark, name, source, cfg, work)
    data = storage.read_manifest(data_dir, "prepare")
    model = f"{work}/{name}-topn-{cfg.train.model}"
    started = time.time()
    train.train(spark, cfg, data_dir, model, force=True)
    train_s = time.time() - started
    report = evaluate.evaluate(spark, cfg, model, data_dir, f"{work}/{name}-topn-report", force=True)
    k = cfg.evaluate.k
    ease = report["peers"]["ease"]
    rows = [{"method": f"`dmf recommend` ({cfg.train.model}, shipped config)", **report["ranking"],
             "settings": f"{Path(conf).name}, ordered by {report['order']}", "seconds": train_s,
             "rmse": report["rating"]["rmse"]},
            {"method": "most popular", **report["peers"]["most_popular"], "settings": "-"},
            {"method": "EASE", **ease, "settings": f"lambda {ease['lambda']:g} (of "
                                                   f"{', '.join(ease['ndcg_by_lambda'])})"}]
    counts = artifacts.read_table(data_dir, data, "items").sort_values("item_idx").train_count.to_numpy()
    als = als_implicit(spark, data_dir, data, counts, k, cfg.evaluate.relevant_rating)
    rows.append({"method": "Spark ALS implicitPrefs", **als, "settings": f"{als['settings']} (best of {als['tried']})"})
    recent = recent_grid(spark, conf, overrides, model, data_dir, data, counts) if report["order"] == "ranking" else []
    return [{**r, "dataset": name, "k": k} for r in rows], [{**r, "dataset": name} for r in recent]


def document(rows: list[dict], recent: list[dict], command: str) -> str:
    k = rows[0]["k"]
    lines = [f"# Top-{k} lists against their peers", "", f"`{command}`", "",
             f"{dt.date.today()}, {machine()}", "",
             f"| data | method | settings | NDCG@{k} | recall@{k} | catalog coverage | mean popularity | "
             "users given the most-popular list | valid RMSE |", "|" + " --- |" * 9]
    for r in rows:
        same, rmse = r.get("users_given_most_popular"), r.get("rmse")
        lines.append(f"| {r['dataset']} | {r['method']} | {r['settings']} | {r[f'ndcg@{k}']:.4f} | "
                     f"{r[f'recall@{k}']:.4f} | {r['catalog_coverage']:.3f} | {r['mean_popularity']:.1f} | "
                     f"{'-' if same is None else f'{same:.1%}'} | "
                     f"{'-' if rmse is None else f'{rmse:.4f}'} |")
    if recent:
        lines += ["", "## Leaning each user's query towards their last rated items", "",
                  "The same model's lists, ordered by the ranking score with the query x_u + w |x_u| v / |v| (v: the "
                  "sum of the ranking vectors of the user's last n training ratings by time; "
                  "`recommend.recent_items` n, `recommend.recent_weight` w; n = 0 is the plain ranking score):", "",
                  f"| data | n | w | NDCG@{k} | recall@{k} |", "|" + " --- |" * 5]
        lines += [f"| {r['dataset']} | {r['items']} | {r['weight']:g} | {r[f'ndcg@{k}']:.4f} | {r[f'recall@{k}']:.4f} |"
                  for r in recent]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a MovieLens release instead of ml-100k's two splits")
    parser.add_argument("--config", default=CONF)
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "topn.md"))
    args = parser.parse_args()
    todo = ({Path(args.input).name.removesuffix(".zip"): ([], Path(args.input))} if args.input else
            {name: (overrides, ML100K) for name, overrides in SPLITS.items()})
    spark = session(config.load(args.config).spark)
    spark.sparkContext.setCheckpointDir(f"{args.work}/als-checkpoints")
    rows, recent = [], []
    for name, (overrides, source) in todo.items():
        shipped, grid = rows_for(spark, name, args.config, overrides, source, args.work)
        rows, recent = rows + shipped, recent + grid
    ran = command("topn_bench")
    text = document(rows, recent, ran)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
