"""The evaluate stage: rating error and full-catalog ranking quality on the validation split.

Every number goes through the pure functions of pipeline.metrics, the ones training validates with.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from pipeline import metrics, peers, storage
from pipeline.artifacts import load_model, model_and_data, read_table, seen_items, spark_table
from pipeline.config import Config
from pipeline.recommend import ORDERS, list_order, order_words, recent_items
from pipeline.scoring.blocks import predict_pairs, ship, top_n

log = logging.getLogger(__name__)
SAMPLE_FOR_PLOTS = 100_000


def evaluate(spark: SparkSession, cfg: Config, model_dir: str, data_dir: str | None, out: str,
             force: bool = False) -> dict:
    started = time.time()
    storage.check_output(out, "evaluate", force)
    data_dir, data = model_and_data(model_dir, data_dir)
    model, manifest = load_model(model_dir)
    build = ship(spark, model, manifest["spec"])
    valid = spark_table(spark, data_dir, data, "valid")
    # Read twice (error sums, plot sample): persisted so the model scores the validation set once.
    scored = predict_pairs(build, valid.select("user_idx", "item_idx", "rating")).persist()
    order = list_order(cfg, model_dir, model.ranking_factors() is not None)
    items = read_table(data_dir, data, "items").sort_values("item_idx")
    report = {"model": model_dir, "data": data_dir, "k": cfg.evaluate.k,
              "relevant_rating": cfg.evaluate.relevant_rating, "order": order,
              "recent": dict(zip(("items", "weight"), recent_items(cfg, order))),
              "rating": rating_errors(scored, data["rating_levels"]),
              **ranking(spark, cfg, build, data_dir, data, order, items.train_count.to_numpy())}
    sample = scored.select("prediction", "rating").limit(SAMPLE_FOR_PLOTS).toPandas()
    scored.unpersist()
    with storage.publish(out, "evaluate", force) as tmp:
        fs, plain = storage.filesystem(tmp)
        with fs.open(f"{plain}/metrics.json", "w") as f:
            json.dump(report, f, indent=2)
        _pictures(model, tmp, sample, items, data)
        _copy(f"{model_dir.rstrip('/')}/learning_curves.png", f"{tmp}/learning_curves.png")
        storage.write_manifest(tmp, {"stage": "evaluate", **report, "seconds": time.time() - started})
    return storage.read_manifest(out, "evaluate")


def rating_errors(scored, rating_levels: list[float]) -> dict:
    """RMSE and MAE of the scored validation pairs, and of their predictions rounded to the rating levels."""
    levels = np.asarray(rating_levels, dtype=np.float64)

    def error_sums(batches):
        for pdf in batches:
            pred, true = pdf.prediction.to_numpy(np.float64), pdf.rating.to_numpy(np.float64)
            rounded = metrics.round_to_levels(pred, levels)
            plain, snapped = metrics.error_sums(pred, true), metrics.error_sums(rounded, true)
            yield pd.DataFrame([{**plain, "sse_rounded": snapped["sse"], "sae_rounded": snapped["sae"],
                                 "exact": float(np.sum(np.isclose(rounded, true)))}])

    sums = scored.mapInPandas(error_sums, "sse double, sae double, n double, sse_rounded double, "
                                          "sae_rounded double, exact double").groupBy().sum().first()
    total = {k[4:-1]: v or 0.0 for k, v in sums.asDict().items()}
    rating = metrics.rating_errors(total)
    rounded = metrics.rating_errors({"sse": total["sse_rounded"], "sae": total["sae_rounded"], "n": total["n"]})
    return {"rmse": rating["rmse"], "mae": rating["mae"], "rmse_rounded": rounded["rmse"],
            "mae_rounded": rounded["mae"], "accuracy_rounded": total["exact"] / max(total["n"], 1),
            "n": int(total["n"])}


def ranking(spark: SparkSession, cfg: Config, build, data_dir: str, data: dict, order: str,
            item_counts: np.ndarray) -> dict:
    """{"ranking": the model's top-k lists judged, "peers": most popular's and EASE's on the same users}: the users
    with a relevant validation rating, every item without a training rating a candidate."""
    k = cfg.evaluate.k
    valid_rows = read_table(data_dir, data, "valid", columns=["user_idx", "item_idx", "rating"])
    truth = (valid_rows[valid_rows.rating >= cfg.evaluate.relevant_rating]
             .groupby("user_idx").item_idx.apply(set))
    recent = recent_items(cfg, order)
    seen = seen_items(data_dir, data, ("train",), in_order_rated=all(recent))
    ranked = top_n(spark, build, data["counts"]["items"], truth.index.to_numpy(), seen, k,
                   cfg.recommend.users_per_block, order=order, recent=recent).toPandas()
    lists = ranked.groupby("user_idx", sort=False).item_idx.apply(list)  # in rank order already
    judged_users = truth.index.intersection(lists.index)
    relevant = [truth[u] for u in judged_users]
    recommended = [lists[u] for u in judged_users]
    peer_report, popular = peers.evaluate_peers(seen, item_counts, judged_users.to_numpy(), relevant, k,
                                                cfg.evaluate.ease_max_items)
    return {"ranking": {**peers.judged(recommended, relevant, k, item_counts),
                        "users_given_most_popular": peers.same_lists(recommended, popular)},
            "peers": peer_report}


def _copy(source: str, target: str) -> None:
    """The learning curves train drew, beside the report's own pictures."""
    fs, plain = storage.filesystem(source)
    if fs.exists(plain):
        storage.replace_file(target, fs.cat_file(plain))


def _pictures(model, out: str, sample: pd.DataFrame, items: pd.DataFrame, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, plain = storage.filesystem(out)

    fig, ax = plt.subplots(figsize=(6, 4))
    levels = data["rating_levels"]
    groups = [sample.prediction[sample.rating == level] for level in levels]
    ax.boxplot(groups, labels=[f"{level:g}" for level in levels], showfliers=False)
    ax.set_xlabel("true rating")
    ax.set_ylabel("prediction")
    ax.set_title("predictions against true ratings (validation)")
    _save(fig, fs, f"{plain}/predictions.png")

    vectors = model.item_vectors().detach().numpy()
    centred = vectors - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ axes[:2].T
    first_genre = items.genres.fillna("").str.split("|").str[0].replace("", "none").to_numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    top = pd.Series(first_genre).value_counts().index[:8]
    for genre in top:
        mask = first_genre == genre
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.6, label=genre)
    ax.legend(markerscale=3, fontsize=8)
    ax.set_title("item embeddings, first two principal components, by first genre")
    _save(fig, fs, f"{plain}/item_embeddings.png")


def _save(fig, fs, path: str) -> None:
    import matplotlib.pyplot as plt

    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def table(manifest: dict) -> str:
    """The rating errors, then the model's ranking metrics beside the peers' on the same users."""
    r, k = manifest["rating"], manifest["k"]
    lines = [f"  {name:<20} {value:10.4f}" for name, value in (
        ("RMSE", r["rmse"]), ("MAE", r["mae"]), ("RMSE (rounded)", r["rmse_rounded"]),
        ("accuracy (rounded)", r["accuracy_rounded"]))]
    columns = {"model": manifest["ranking"], "most popular": manifest["peers"]["most_popular"]}
    ease = manifest["peers"].get("ease", {})
    if "skipped" not in ease:
        columns[f"EASE ({ease['lambda']:g})"] = ease
    by = f"by {ORDERS[manifest['order']]}"
    lines.append(f"  {by:<20}" + "".join(f"{name:>16}" for name in columns))
    for name, key in ((f"precision@{k}", f"precision@{k}"), (f"recall@{k}", f"recall@{k}"),
                      (f"NDCG@{k}", f"ndcg@{k}"), (f"MAP@{k}", f"map@{k}"), (f"hit rate@{k}", f"hit_rate@{k}"),
                      ("catalog coverage", "catalog_coverage"), ("mean popularity", "mean_popularity")):
        lines.append(f"  {name:<20}" + "".join(f"{column[key]:16.4f}" for column in columns.values()))
    lines.append(f"  lists ordered by the model's {order_words(manifest)}")
    popular = manifest["peers"]["most_popular"][f"ndcg@{k}"]
    lines.append(f"  NDCG@{k} against most popular: {manifest['ranking'][f'ndcg@{k}'] / popular:.2f}x; "
                 f"{manifest['ranking']['users_given_most_popular']:.1%} of users get the most-popular list"
                 + (f"; EASE skipped: {ease['skipped']}" if "skipped" in ease else ""))
    return "\n".join(lines)
