"""This pipeline and Spark MLlib ALS side by side, on the same split of each data set.

    .venv/bin/python -m benchmarks.bench                      # ml-100k and ml-100k-temporal, every model
    .venv/bin/python -m benchmarks.bench --datasets synth-1m --models mf,two_tower
    .venv/bin/python -m benchmarks.bench --datasets synth-20m --models mf --set train.epochs=15 \\
        --set train.l2=0.05                                   # the commands behind the README's table
    .venv/bin/python -m benchmarks.bench --input ~/Downloads/ml-1m.zip --config conf/ml-1m.yaml

Each data set is prepared once (one split). ALS is searched over rank x regParam x maxIter on the
validation split and its best setting reported; mf, dmf, neumf and two_tower train with the tuned settings
of the config file (its `models:` section) through the real stages: `train.train` (Horovod ranks),
`evaluate.evaluate`, `recommend.recommend`. ALS's ranking metrics come from its own scores through the
same pipeline.metrics functions. Results are kept per data set in benchmarks/bench-results.json beside
the document, which is written from all of them: a later run of one data set replaces only its table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pyspark.ml.recommendation import ALS

from benchmarks.common import ROOT, WORK, command, machine, ml20m_sized, render
from benchmarks.prepare_bench import PeakMemory
from benchmarks.recommend_bench import timed
from pipeline import artifacts, config, evaluate, metrics, recommend, storage
from pipeline.config import TrainConfig
from pipeline.data import prepare
from pipeline.scoring import topk
from pipeline.spark import session
from pipeline.training import train

ML100K = ROOT.parent / "shared" / "data" / "movielens" / "ml-100k" / "raw"
CONF = str(ROOT / "conf" / "ml-100k.yaml")
# name -> (config file, overrides, source: a MovieLens path or a number of synthetic ratings)
# The synthetic sets have ML-20M's catalog: there the models take the plain mf settings tuned on ml-100k
# (L2 0.1; the item history, which the 0.2 goes with, is off on catalogs this big), ALS's rank, and the
# batch of the throughput benchmark, with sparse gradients and Adagrad (a dense allreduce of ML-20M-sized
# tables, 165K rows, ran at 6.5K samples/s on 2 ranks here against 150K sparse, with the same RMSE; dmf's
# tuned Adam cannot take sparse gradients). These overrides are all a model runs with beyond its config.
BIG_CATALOG = ["train.user_dim=32", "train.item_dim=32", "train.l2=0.1", "train.batch_size=32768",
               "train.optimizer=adagrad", "train.lr=0.05", "train.sparse_gradients=true", "train.item_history=false"]
DATASETS = {
    "ml-100k": (CONF, [], ML100K),
    "ml-100k-temporal": (CONF, ["prepare.split.method=user_temporal"], ML100K),
    "synth-1m": (CONF, BIG_CATALOG, 1_000_000),
    "synth-20m": (CONF, BIG_CATALOG, 20_000_000),
}
# The full grid reaches past the best setting found before (rank 64, regParam 0.1, 15 iterations on ml-100k).
ALS_GRIDS = {"full": list(itertools.product((32, 64, 128), (0.05, 0.1, 0.15), (10, 15, 20))),
             "small": list(itertools.product((32,), (0.05, 0.1, 0.2, 0.4), (10,)))}
BIG = 500_000  # training ratings from which --als-grid auto means small and --repeat defaults to 1
ANCHORS = [  # published, not measured here
    ("Surprise SVD", "ML-100K", "RMSE 0.934", "5-fold cross-validation (Surprise's benchmark table)"),
    ("GLocal-K", "ML-100K", "RMSE 0.889", "the u1.base / u1.test split (Han et al., CIKM 2021)"),
    ("NVIDIA NeuMF (DeepLearningExamples)", "ML-20M", "22-34M samples/s training throughput",
     "one A100 (TF32 to mixed precision), implicit-feedback NCF with negative sampling"),
]


def is_real(name: str) -> bool:
    return not name.startswith("synth-")


# ---------------------------------------------------------------- ALS


def als_fit(train_df, rank: int, reg: float, iters: int):
    # coldStartStrategy="nan": no validation row may silently disappear from the metric (checked below).
    als = ALS(rank=rank, regParam=reg, maxIter=iters, userCol="user_idx", itemCol="item_idx", ratingCol="rating",
              coldStartStrategy="nan", seed=42)
    started = time.time()
    model = als.fit(train_df)
    return model, time.time() - started


def als_errors(model, valid_df, n_valid: int, levels: list) -> dict:
    """RMSE and MAE of ALS's predictions clipped to the rating scale, over every validation row."""
    pdf = model.transform(valid_df).select("prediction", "rating").toPandas()
    missing = n_valid - int(pdf.prediction.notna().sum())
    if missing:
        raise RuntimeError(f"ALS has no prediction for {missing} of {n_valid} validation rows")
    pred = np.clip(pdf.prediction.to_numpy(np.float64), levels[0], levels[-1])
    return metrics.rating_errors(metrics.error_sums(pred, pdf.rating.to_numpy(np.float64)))


def _factors(frame, n: int) -> np.ndarray:
    pdf = frame.toPandas()
    out = np.zeros((n, len(pdf.features.iloc[0])), dtype=np.float32)
    out[pdf.id.to_numpy()] = np.stack(pdf.features.to_numpy())
    return out


def als_ranking(model, data_dir: str, data: dict, k: int, relevant_rating: float) -> dict:
    """Ranking metrics as evaluate.evaluate defines them (candidates: every item the user has no training
    rating for; relevant: validation rating >= relevant_rating), from ALS's unclipped scores u.v."""
    users = torch.from_numpy(_factors(model.userFactors, data["counts"]["users"]))
    items = torch.from_numpy(_factors(model.itemFactors, data["counts"]["items"]))
    seen = artifacts.seen_items(data_dir, data, ("train",))
    valid = artifacts.read_table(data_dir, data, "valid")
    truth = valid[valid.rating >= relevant_rating].groupby("user_idx").item_idx.apply(set)
    lists = topk.top_lists(lambda block: users[block] @ items.T, truth.index.to_numpy(), seen, k)
    return metrics.ranking_metrics(lists, list(truth), k)


def run_als(spark, cfg, data_dir: str, data: dict, grid: list, repeat: int, work: str) -> tuple[dict, list]:
    base = f"{data_dir.rstrip('/')}/"
    train_df = spark.read.parquet(base + data["paths"]["train"]).select("user_idx", "item_idx", "rating").persist()
    valid_df = spark.read.parquet(base + data["paths"]["valid"]).select("user_idx", "item_idx", "rating").persist()
    n_valid = valid_df.count()
    with PeakMemory() as memory:
        tried, model = [], None
        for rank, reg, iters in grid:
            fitted, seconds = als_fit(train_df, rank, reg, iters)
            row = {"rank": rank, "reg": reg, "iters": iters, "seconds": seconds,
                   **als_errors(fitted, valid_df, n_valid, data["rating_levels"])}
            if not tried or row["rmse"] < min(r["rmse"] for r in tried):
                model = fitted
            tried.append(row)
            print(f"ALS {row}", flush=True)
        best = min(tried, key=lambda r: r["rmse"])
        fits = [best["seconds"]] + [als_fit(train_df, best["rank"], best["reg"], best["iters"])[1]
                                    for _ in range(repeat - 1)]
        ranking = als_ranking(model, data_dir, data, cfg.evaluate.k, cfg.evaluate.relevant_rating)
        out = f"{work}/als-recommendations"

        def recommend_all():
            shutil.rmtree(out, ignore_errors=True)
            model.recommendForAllUsers(cfg.recommend.top_n).write.parquet(out)

        recommend_s = timed(recommend_all, repeat)
    train_df.unpersist()
    valid_df.unpersist()
    k = cfg.evaluate.k
    row = {"method": "ALS", "settings": f"rank {best['rank']}, regParam {best['reg']}, maxIter {best['iters']}",
           "rmse": best["rmse"], "mae": best["mae"], "ndcg": ranking[f"ndcg@{k}"], "recall": ranking[f"recall@{k}"],
           "train_s": fits, "recommend_s": recommend_s, "peak_gib": memory.peak / 2**30,
           "samples_per_s": data["counts"]["train"] * best["iters"] / statistics.median(fits),
           "curve": [[r["seconds"], r["rmse"]] for r in tried]}
    return row, tried


# ---------------------------------------------------------------- this pipeline


def settings_of(t: TrainConfig) -> str:
    default, skip = TrainConfig(), {"model", "epochs", "num_proc", "patience", "seed"}
    if not t.item_history:
        skip |= {"history_l2", "history_size"}
    return ", ".join(f"{k}={v}" for k, v in vars(t).items() if k not in skip and v != getattr(default, k))


def model_dir(work: str, model: str) -> str:
    return f"{work}/model-{model}"


def run_model(spark, cfg, data_dir: str, repeat: int, work: str) -> dict:
    name, k = cfg.train.model, cfg.evaluate.k
    directory = model_dir(work, name)
    with PeakMemory() as memory:
        train_s = []
        for _ in range(repeat):
            started = time.time()
            manifest = train.train(spark, cfg, data_dir, directory)
            train_s.append(time.time() - started)
        report = evaluate.evaluate(spark, cfg, directory, data_dir, f"{work}/report-{name}")
        recommend_s = timed(lambda: recommend.recommend(spark, cfg, directory, data_dir, f"{work}/recs-{name}"),
                            repeat)
    history = manifest["history"]
    # Elapsed time after each epoch, counting the start (Horovod ranks, reading shards) as the first run's.
    elapsed = np.cumsum([h["seconds"] for h in history]) + (train_s[-1] - sum(h["seconds"] for h in history))
    return {"method": name, "settings": settings_of(cfg.train), "model_dir": directory,
            "rmse": report["rating"]["rmse"], "mae": report["rating"]["mae"],
            "ndcg": report["ranking"][f"ndcg@{k}"], "recall": report["ranking"][f"recall@{k}"],
            "train_s": train_s, "recommend_s": recommend_s, "peak_gib": memory.peak / 2**30,
            "samples_per_s": statistics.median(h["samples_per_s"] for h in history),
            "epochs": f"{manifest['metrics']['best_epoch']} / {manifest['metrics']['epochs_run']}",
            "curve": [[float(s), h["valid_rmse"]] for s, h in zip(elapsed, history)]}


def model_config(conf: str | None, overrides: list[str], model: str, work: str):
    settings = [*overrides, f"train.model={model}"]
    if config.load(conf, settings).train.init_from:
        # The config's init_from is where a plain run leaves its mf; here it is the mf this bench trained.
        settings.append(f"train.init_from={model_dir(work, 'mf')}")
    return config.load(conf, settings)


def bench_dataset(spark, name: str, conf: str | None, overrides: list[str], data_dir: str, models: list[str],
                  grid: list, repeat: int, work: str) -> dict:
    """ALS (searched over `grid`) and each model on the prepared split in data_dir: one result row each."""
    data = storage.read_manifest(data_dir, "prepare")
    configs = [model_config(conf, overrides, model, f"{work}/{name}") for model in models]
    for n, (model, cfg_model) in enumerate(zip(models, configs)):  # before the minutes of the ALS search
        if cfg_model.train.init_from and "mf" not in models[:n]:
            raise SystemExit(f"{model} starts from this run's mf (train.init_from in {conf}): list mf before it "
                             f"in --models")
    als, tried = run_als(spark, config.load(conf, overrides), data_dir, data, grid, repeat, f"{work}/{name}")
    rows = [als]
    for cfg_model in configs:
        rows.append(run_model(spark, cfg_model, data_dir, repeat, f"{work}/{name}"))
        print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
    return {"name": name, "real": is_real(name), "data_dir": data_dir, "conf": conf, "overrides": overrides,
            "counts": data["counts"], "split": data.get("split", {}), "repeat": repeat, "rows": rows,
            "als_grid": tried}


def prepared(spark, name: str, source, cfg, work: str) -> str:
    if isinstance(source, int):
        return ml20m_sized(spark, source, work)
    out = f"{work}/prepared-{name}"
    if not storage.exists(f"{out}/manifest.json"):
        prepare.prepare(spark, cfg, str(source), out)
    return out


# ---------------------------------------------------------------- the document


def spread(seconds: list[float]) -> str:
    if len(seconds) == 1:
        return f"{seconds[0]:.1f}"
    return f"{statistics.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f})"


def time_to(curve: list, target: float) -> float | None:
    """Training seconds until the validation RMSE first reached target (None: never)."""
    return next((s for s, rmse in curve if rmse <= target + 1e-9), None)


def grid_edges(tried: list[dict]) -> list[str]:
    """The searched ALS parameters whose best value is the grid's smallest or largest: a wider search might do
    better."""
    best = min(tried, key=lambda g: g["rmse"])
    edges = []
    for key, name in (("rank", "rank"), ("reg", "regParam"), ("iters", "maxIter")):
        values = sorted({g[key] for g in tried})
        if len(values) > 1 and best[key] in (values[0], values[-1]):
            edges.append(f"{name} {best[key]} is the {'smallest' if best[key] == values[0] else 'largest'} tried")
    return edges


def table(result: dict) -> str:
    als = result["rows"][0]
    lines = ["| method | settings | valid RMSE | MAE | NDCG@10 | recall@10 | train s | s to ALS's RMSE | "
             "best epoch / run | train samples/s | recommend-all s | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        reach = "-" if r is als else ("not reached" if time_to(r["curve"], als["rmse"]) is None
                                      else f"{time_to(r['curve'], als['rmse']):.1f}")
        lines.append(f"| {r['method']} | {r['settings']} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['ndcg']:.4f} | "
                     f"{r['recall']:.4f} | {spread(r['train_s'])} | {reach} | {r.get('epochs', '-')} | "
                     f"{r['samples_per_s']:,.0f} | {spread(r['recommend_s'])} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


def claims(results: dict) -> list[str]:
    out = []
    real = [r for r in results.values() if r["real"]]
    verdicts = []
    for r in real:
        als, ours = r["rows"][0], r["rows"][1:]
        # A user picks one model for both jobs: it must beat ALS on rating error and on ranking at once.
        both = [x for x in ours if x["rmse"] < als["rmse"] and x["ndcg"] > als["ndcg"]]
        verdicts.append(bool(both))
        best = min(ours, key=lambda x: x["rmse"])
        out.append(f"  - {r['name']}: ALS RMSE {als['rmse']:.4f}, NDCG@10 {als['ndcg']:.4f}; ours better on both: "
                   + (", ".join(f"{x['method']} ({x['rmse']:.4f}, {x['ndcg']:.4f})" for x in both) or "none")
                   + f"; lowest RMSE of ours: {best['method']} {best['rmse']:.4f} (NDCG@10 {best['ndcg']:.4f}).")
    head = ("MET" if real and all(verdicts) else "NOT MET" if real else "NOT SHOWN (no real data set was run)")
    lines = [f"- A model of ours beats tuned ALS on RMSE and NDCG@10 on every real data set: **{head}**"
             + (f" on the real data sets run here ({', '.join(r['name'] for r in real)})." if real else ".")] + out
    big = results.get("synth-20m")
    if big is None:
        lines += ["- mf trains to ALS's RMSE faster than ALS on the 20M synthetic set: **NOT SHOWN**: synth-20m "
                  "was not run.",
                  "- mf recommend-for-all >= 3x faster than ALS recommendForAllUsers on 20M: **NOT SHOWN**: "
                  "synth-20m was not run."]
        return lines
    als = big["rows"][0]
    mf = next((r for r in big["rows"] if r["method"] == "mf"), None)
    if mf is None:
        return lines + ["- synth-20m was run without mf: the two 20M claims are **NOT SHOWN**."]
    reach, fit = time_to(mf["curve"], als["rmse"]), statistics.median(als["train_s"])
    lines.append(f"- mf trains to ALS's RMSE faster than ALS on the 20M synthetic set: **"
                 f"{'MET' if reach is not None and reach < fit else 'NOT MET'}**: ALS reaches {als['rmse']:.4f} "
                 f"in {fit:.0f} s (fit of its best setting); mf "
                 + ("never reaches it" if reach is None else f"reaches it after {reach:.0f} s") +
                 f" (best {mf['rmse']:.4f} after {statistics.median(mf['train_s']):.0f} s).")
    ratio = statistics.median(als["recommend_s"]) / statistics.median(mf["recommend_s"])
    lines.append(f"- mf recommend-for-all >= 3x faster than ALS recommendForAllUsers on 20M: **"
                 f"{'MET' if ratio >= 3 else 'NOT MET'}**: {statistics.median(mf['recommend_s']):.0f} s against "
                 f"{statistics.median(als['recommend_s']):.0f} s, {ratio:.2f}x.")
    return lines


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = []
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results.values()):
        for row in r["rows"]:
            x, y = zip(*row["curve"])
            if row["method"] == "ALS":
                ax.scatter(x, y, marker="x", color="black", label="ALS grid (one fit each)")
                ax.scatter(statistics.median(row["train_s"]), row["rmse"], marker="*", s=150, color="red",
                           label="ALS best", zorder=3)
            else:
                ax.plot(x, y, marker=".", label=f"{row['method']} (per epoch)")
        ax.set_xscale("log")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("validation RMSE")
        ax.set_title(r["name"])
        ax.legend(fontsize=7)
    fig.savefig(folder / "rmse_vs_time.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    throughput = folder / "train-throughput.md"
    rows = []
    if throughput.exists():  # rows: | model | optimizer | gradients | ranks | samples/s | x plain loop |
        for line in throughput.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 6 and cells[3].isdigit():
                rows.append((f"{cells[0]} {cells[1]} {cells[2]}", int(cells[3]), float(cells[4].replace(",", ""))))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r[0] for r in rows):
            points = sorted((ranks, rate) for name, ranks, rate in rows if name == label)
            ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("Horovod ranks")
        ax.set_ylabel("training samples/s")
        ax.legend(fontsize=7)
        fig.savefig(folder / "throughput_vs_ranks.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        notes.append("![training throughput against ranks](benchmarks/throughput_vs_ranks.png)\n\n"
                     "Throughput against Horovod ranks, from the numbers of docs/benchmarks/train-throughput.md.")
    else:
        notes.append("No throughput-against-ranks plot: docs/benchmarks/train-throughput.md "
                     "(benchmarks/train_bench.py) "
                     "has no numbers yet.")
    return notes


def document(results: dict, out: Path) -> str:
    notes = plots(results, out.parent / "benchmarks")
    sections = []
    for r in results.values():
        c, split = r["counts"], r["split"]
        sections += [f"## {r['name']}\n",
                     f"`{r['command']}`, {r['date']}. Machine: {r['machine']}.\n",
                     f"{c['users']:,} users x {c['items']:,} items, {c['train']:,} training and {c['valid']:,} "
                     f"validation ratings; split {split.get('method', '?')} (fraction {split.get('fraction', '?')}, "
                     f"seed {split.get('seed', '?')}); {'real' if r['real'] else 'synthetic'} data; "
                     f"{r['repeat']} repetition(s) of each timing; config "
                     f"{Path(r['conf']).name if r['conf'] else 'defaults'}"
                     + (f" with {' '.join(r['overrides'])}" if r["overrides"] else "") + ".\n",
                     table(r), "",
                     f"ALS grid ({len(r['als_grid'])} settings): "
                     + "; ".join(f"rank {g['rank']} / reg {g['reg']} / {g['iters']} it: {g['rmse']:.4f} "
                                 f"({g['seconds']:.0f} s)" for g in sorted(r["als_grid"], key=lambda g: g["rmse"]))
                     + (". On the edge of the grid: " + "; ".join(grid_edges(r["als_grid"]))
                        if grid_edges(r["als_grid"]) else "") + ".\n"]
    return render("BENCHMARKS.md", datasets="\n".join(sections), claims="\n".join(claims(results)),
                  anchors="\n".join(f"| {a} | {b} | {c} (published, not measured here) | {d} |"
                                     for a, b, c, d in ANCHORS),
                  notes="\n".join(notes))


def readme_summary(results: dict) -> str:
    """The README's results table: one row per data set and method, and the claims, from the results file."""
    lines = ["| data set | method | valid RMSE | NDCG@10 | recall@10 | train s | recommend-all s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results.values():
        for row in r["rows"]:
            lines.append(f"| {r['name']} | {row['method']} | {row['rmse']:.4f} | {row['ndcg']:.4f} | "
                         f"{row['recall']:.4f} | {spread(row['train_s'])} | {spread(row['recommend_s'])} |")
    return "\n".join([*lines, "", *claims(results)])


README_START, README_END = "<!-- written by benchmarks/bench.py -->", "<!-- end of benchmarks/bench.py -->"


def with_summary(readme: str, results: dict) -> str:
    """readme with the text between its two markers replaced by readme_summary(results)."""
    head, start, rest = readme.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not (start and end):
        raise ValueError(f"the README lacks the markers {README_START} ... {README_END}")
    return f"{head}{start}\n{readme_summary(results)}\n{end}{tail}"


def publish(result: dict, out: Path, readme: Path | None = None) -> None:
    """Merges one data set's result into the results file beside `out` and rewrites `out` (and the summary in
    `readme`) from all of them."""
    folder = out.parent / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "bench-results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    results[result["name"]] = result
    store.write_text(json.dumps(results, indent=1))
    out.write_text(document(results, out))
    if readme:
        readme.write_text(with_summary(readme.read_text(), results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} (default: the first two; "
                                           "none when --input is given)")
    parser.add_argument("--input", help="a MovieLens release (zip, directory or ratings file): one more data set")
    parser.add_argument("--name", help="name of the --input data set (default: from its file name)")
    parser.add_argument("--config", help="config file of the --input data set")
    parser.add_argument("--data-dir", action="append", default=[], metavar="NAME=PATH",
                        help="reuse a prepared directory for data set NAME")
    parser.add_argument("--models", default="mf,dmf,neumf,two_tower")
    parser.add_argument("--set", action="append", default=[], help="override for every model, e.g. train.epochs=30")
    parser.add_argument("--als-grid", choices=["auto", *ALS_GRIDS], default="auto",
                        help=f"auto: full below {BIG:,} training ratings, small above")
    parser.add_argument("--repeat", type=int,
                        help=f"timing repetitions (default 3 below {BIG:,} training ratings, else 1)")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"),
                        help="file whose results summary (between bench.py's markers) is rewritten; '' for none")
    args = parser.parse_args()
    todo = {n: DATASETS[n] for n in (args.datasets.split(",") if args.datasets else
                                     [] if args.input else list(DATASETS)[:2])}
    if args.input:
        if not args.config:
            parser.error("--input needs --config (e.g. conf/ml-1m.yaml)")
        todo[args.name or Path(args.input).name.removesuffix(".zip")] = (args.config, [], Path(args.input))
    data_dirs = dict(item.split("=", 1) for item in args.data_dir)
    first = next(iter(todo.values()))[0]
    spark = session(config.load(first, [f"spark.conf.spark.driver.memory={args.driver_memory}"]).spark)
    # ALS truncates its lineage every checkpointInterval (10) iterations only when a checkpoint directory is
    # set; without one, 20 iterations overflow the JVM stack when a task is serialized.
    spark.sparkContext.setCheckpointDir(f"{args.work}/als-checkpoints")
    ran = command("bench")
    for name, (conf, overrides, source) in todo.items():
        started = time.time()
        data_dir = data_dirs.get(name) or prepared(spark, name, source, config.load(conf, overrides), args.work)
        n_train = storage.read_manifest(data_dir, "prepare")["counts"]["train"]
        grid = ALS_GRIDS[args.als_grid if args.als_grid != "auto" else "small" if n_train >= BIG else "full"]
        repeat = args.repeat or (3 if n_train < BIG else 1)
        result = bench_dataset(spark, name, conf, [*overrides, *args.set], data_dir, args.models.split(","), grid,
                               repeat, args.work)
        result.update(command=ran, machine=machine(), date=str(dt.date.today()),
                      seconds=time.time() - started)
        publish(result, Path(args.out), Path(args.readme) if args.readme else None)
        print(f"{name}: {time.time() - started:.0f} s\n{table(result)}", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
