"""The recommend stage: the top N unseen items of every user, in the original ids, written as Parquet or CSV.

The lists are ordered by the model's ranking score when it has one, else by its predicted rating
(recommend.order); pipeline.scoring.blocks scores them. Two-stage mode (recommend.candidates > 0) retrieves each
user's candidates by a dot-product model and re-ranks them by the model's rating; its recall against exact
scoring is measured on a sample of users.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipeline import storage
from pipeline.artifacts import load_model, model_and_data, seen_items, spark_table
from pipeline.config import Config
from pipeline.models.spec import KINDS
from pipeline.scoring.blocks import ship, top_n
from pipeline.storage import StageError

log = logging.getLogger(__name__)
ORDERS = {"ranking": "ranking score", "rating": "predicted rating"}  # what orders the lists, in words
RECALL_USERS = 1000  # users whose two-stage top-N is compared with exact scoring
DOT_PRODUCT = [kind.name for kind in KINDS.values() if kind.dot_product]


def list_order(cfg: Config, model_dir: str, has_ranking: bool) -> str:
    """What orders a model's lists: "ranking" (its ranking score) or "rating" (its predicted rating), from
    recommend.order, whose auto is the ranking score when the model has one and two-stage mode is off."""
    wanted = cfg.recommend.order
    if wanted == "ranking" and not has_ranking:
        raise StageError(f"recommend.order is ranking, and {model_dir} has no ranking score (it was trained with "
                         f"train.ranking_dim=0): train it with a ranking_dim, or set recommend.order to rating")
    if wanted == "auto":
        return "ranking" if has_ranking and not cfg.recommend.candidates else "rating"
    return wanted


def recent_items(cfg: Config, order: str) -> tuple[int, float]:
    """(items, weight): how far each user's ranking query leans towards their latest items (topk.recent_queries);
    (0, 0.0), off, unless the lists are ordered by the ranking score."""
    if order != "ranking":
        return 0, 0.0
    return cfg.recommend.recent_items, cfg.recommend.recent_weight


def retrieval_model(cfg: Config, model_dir: str, data_dir: str, retrieval_model_dir: str | None) -> str | None:
    """The model that retrieves two-stage candidates (None when recommend.candidates is 0), checked before any
    Spark work: a dot-product model trained on the same prepared data as the model."""
    candidates = cfg.recommend.candidates
    if candidates == 0:
        if retrieval_model_dir:
            raise StageError(f"a retrieval model ({retrieval_model_dir}) was given but recommend.candidates is 0: "
                             f"set it to the number of candidates to retrieve per user")
        return None
    retrieval = retrieval_model_dir or model_dir
    kind = storage.read_manifest(retrieval, "train")["spec"]["model"]
    if not KINDS[kind].dot_product:
        raise StageError(f"two-stage recommend (recommend.candidates={candidates}) retrieves candidates by a dot "
                         f"product, and {retrieval} is a {kind} model: give a retrieval model trained as "
                         f"{' or '.join(DOT_PRODUCT)} on the same data")
    model_and_data(retrieval, data_dir)
    return retrieval


def recommend(spark: SparkSession, cfg: Config, model_dir: str, data_dir: str | None, out: str,
              retrieval_model_dir: str | None = None, force: bool = False) -> dict:
    started = time.time()
    storage.check_output(out, "recommend", force)
    data_dir, data = model_and_data(model_dir, data_dir)
    retrieval = retrieval_model(cfg, model_dir, data_dir, retrieval_model_dir)
    model, manifest = load_model(model_dir)
    build = ship(spark, model, manifest["spec"])
    build_retrieval = build if retrieval == model_dir else None
    if retrieval and retrieval != model_dir:
        retriever, retriever_manifest = load_model(retrieval)
        build_retrieval = ship(spark, retriever, retriever_manifest["spec"])
    order = list_order(cfg, model_dir, model.ranking_factors() is not None)
    n, block, candidates = cfg.recommend.top_n, cfg.recommend.users_per_block, cfg.recommend.candidates
    users = spark_table(spark, data_dir, data, "users").select("user_idx", "user_id")
    items = spark_table(spark, data_dir, data, "items").select("item_idx", "item_id", "title")
    recent = recent_items(cfg, order)
    seen = seen_items(data_dir, data, ("train", "valid"), in_order_rated=all(recent))
    every_user = np.arange(data["counts"]["users"])

    def with_ids(top):
        # Broadcast joins: the id tables are small beside the output, and the output keeps its user order
        # (user_idx numbers the user ids in ascending order).
        return top.join(F.broadcast(items), "item_idx").join(F.broadcast(users), "user_idx")

    n_items = data["counts"]["items"]
    top = top_n(spark, build, n_items, every_user, seen, n, block, order, build_retrieval, candidates, recent)
    with storage.publish(out, "recommend", force) as tmp:
        writer = with_ids(top).select("user_id", "rank", "item_id", "score", "title").write
        if cfg.recommend.format == "csv":
            writer.option("header", True).csv(f"{tmp}/recommendations")
        else:
            writer.parquet(f"{tmp}/recommendations")
        # Read back on the driver (two id columns): cheaper than keeping the output cached for a Spark summary.
        written = _written_ids(f"{tmp}/recommendations", cfg.recommend.format)
        if written.empty:
            raise StageError(f"internal error: no recommendation was written for {len(every_user):,} users; "
                             f"nothing was published and {out} is unchanged")
        two_stage = None
        if retrieval:
            sample = np.sort(np.random.default_rng(0).permutation(every_user)[:RECALL_USERS])
            exact = with_ids(top_n(spark, build, n_items, sample, seen, n, block)).select("user_id", "item_id")
            exact = exact.toPandas()
            hits = len(exact.merge(written, on=["user_id", "item_id"]))
            two_stage = {"candidates": candidates, "retrieval_model": retrieval,
                         "recall_vs_exact": hits / len(exact) if len(exact) else None,
                         "users_checked": int(exact.user_id.nunique())}
        storage.write_manifest(tmp, {
            "stage": "recommend", "model": model_dir, "data": data_dir, "top_n": n, "order": order,
            "recent": {"items": recent[0], "weight": recent[1]},
            "format": cfg.recommend.format, "path": "recommendations",
            "counts": {"users": int(written.user_id.nunique()), "rows": len(written),
                       "items_covered": int(written.item_id.nunique()), "catalog": data["counts"]["items"]},
            "two_stage": two_stage, "seconds": time.time() - started})
    return storage.read_manifest(out, "recommend")


def _written_ids(path: str, fmt: str) -> pd.DataFrame:
    """user_id and item_id of a written recommendations directory."""
    fs, plain = storage.filesystem(path)
    parts = sorted(f for f in fs.find(plain) if f.rsplit("/", 1)[-1].startswith("part-"))
    columns = ["user_id", "item_id"]
    frames = []
    for part in parts:
        with fs.open(part, "rb") as f:
            frames.append(pd.read_csv(f, usecols=columns) if fmt == "csv" else pd.read_parquet(f, columns=columns))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns, dtype="int64")


def order_words(manifest: dict) -> str:
    """What ordered a recommend or evaluate manifest's lists, in words."""
    words, recent = ORDERS[manifest["order"]], manifest.get("recent") or {}
    if recent.get("items") and recent.get("weight"):
        words += (f", each user's query leaning towards their last {recent['items']} ratings "
                  f"(weight {recent['weight']:g})")
    return words


def summary(manifest: dict, out: str) -> str:
    c, two = manifest["counts"], manifest.get("two_stage")
    text = (f"recommendations -> {out}/recommendations\n  top {manifest['top_n']} for {c['users']:,} users, "
            f"{c['rows']:,} rows, {c['items_covered']:,} of {c['catalog']:,} items recommended, "
            f"{manifest['seconds']:.0f} s\n  ordered by the model's {order_words(manifest)}")
    if two:
        recall = "n/a" if two["recall_vs_exact"] is None else f"{two['recall_vs_exact']:.3f}"
        text += (f"\n  two-stage: {two['candidates']:,} candidates per user from {two['retrieval_model']}, "
                 f"recall {recall} of the exact top {manifest['top_n']} on {two['users_checked']:,} users")
    return text
