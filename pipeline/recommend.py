"""Top-N for every user, scored in blocks: never a row-level users x items cross join.

The model's weights and each user's rated items are broadcast once; each task rebuilds the model, scores
blocks of users against every item (one matrix product for mf and two_tower, `score_all`'s split first
layer for dmf and neumf), masks what each user has already rated, and keeps the N best. Items are ranked
by the unclipped predicted rating: clipped to the scale, every item above it would tie at the top. Tasks
take contiguous runs of users, so the output comes out in user order with no shuffle or sort.

Two-stage mode (`recommend.candidates` > 0): a block is first scored by the dot product of an mf or
two_tower retrieval model, which is cheap for any catalog, and only each user's best `candidates`
unseen items are scored by the model. Its recall against exact scoring is measured on a sample of users.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Iterator, Tuple

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType

from pipeline import storage
from pipeline.config import Config
from pipeline.scoring import TOPK_CHUNK, best_rows, by_user, dot_scores, mask_seen, top_k
from pipeline.storage import StageError
from pipeline.training.train import load_model, model_and_data, read_table

log = logging.getLogger(__name__)
TOP_SCHEMA = "user_idx int, rank int, item_idx int, score float"
RETRIEVAL_MODELS = ("mf", "two_tower")
ORDERS = {"ranking": "ranking score", "rating": "predicted rating"}  # what orders the lists, in words
RECALL_USERS = 1000  # users whose two-stage top-N is compared with exact scoring


def spark_table(spark: SparkSession, data_dir: str, data: dict, name: str) -> DataFrame:
    """One table of a prepared data set (train, valid, users, items) as a Spark DataFrame."""
    return spark.read.parquet(f"{data_dir.rstrip('/')}/{data['paths'][name]}")


def seen_items(data_dir: str, data: dict, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The item_idx each user rated in the given splits, as `by_user` returns them.

    Read on the driver and broadcast to the scoring tasks (8 bytes a rating: 160 MB for ML-20M): a Spark
    groupBy into lists, shuffled to the tasks, took five times as long as the scoring itself."""
    frames = [read_table(data_dir, data, split, columns=["user_idx", "item_idx"]) for split in splits]
    return by_user(np.concatenate([f.user_idx.to_numpy() for f in frames]),
                   np.concatenate([f.item_idx.to_numpy() for f in frames]), data["counts"]["users"])


def shipped_model(spark: SparkSession, model_dir: str):
    """(build, manifest): weights broadcast once; `build()` rebuilds the model inside a task."""
    model, manifest = load_model(model_dir)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    shipped = spark.sparkContext.broadcast((manifest["spec"], buffer.getvalue()))

    def build():
        from pipeline import models

        torch.set_num_threads(1)  # Spark runs one task per core already
        spec, weights = shipped.value
        m = models.build(spec)
        m.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
        return m.eval()

    return build, manifest


def top_n(spark: SparkSession, model_dir: str, users: np.ndarray, seen: tuple[np.ndarray, np.ndarray], n: int,
          block: int, retrieval_dir: str | None = None, candidates: int = 0, order: str = "rating") -> DataFrame:
    """(user_idx, rank, item_idx, score) for the given users, best first, in the order of `users`; the items
    of `seen` (from `seen_items`) are left out.

    Spark runs one task per range of blocks of `block` users; the users and the seen items are broadcast
    with the model, so nothing is shuffled. With `candidates` > 0 the model scores only each user's best
    `candidates` unseen items by the retrieval model (`retrieval_dir`, an mf or two_tower model trained on
    the same data). `order` is what ranks the items (see `list_order`): the model's ranking score, or its
    unclipped predicted rating."""
    build, manifest = shipped_model(spark, model_dir)
    build_retrieval = shipped_model(spark, retrieval_dir)[0] if candidates else None
    n_items = manifest["spec"]["n_items"]
    shipped = spark.sparkContext.broadcast((np.asarray(users, dtype=np.int64), *seen))

    def score(batches):
        model = build()
        if order == "ranking":
            dot = model.ranking_factors()
        elif candidates or manifest["spec"]["model"] in RETRIEVAL_MODELS:
            dot = dot_factors(build_retrieval() if candidates else model)
        else:
            dot = None
        all_users, seen_offsets, seen_items = shipped.value
        # One buffer per task, its width padded for top_k; the padding stays -inf.
        grid = torch.full((block, -(-n_items // TOPK_CHUNK) * TOPK_CHUNK), -torch.inf)
        for pdf in batches:
            for b in pdf.id:
                users = torch.from_numpy(all_users[b * block:(b + 1) * block])
                scores = grid[:len(users)]
                with torch.no_grad():
                    if dot is None:
                        scores[:, :n_items] = model.score_all(users, torch.arange(n_items), clip=False)
                    else:
                        dot_scores(dot, users, scores[:, :n_items])
                    mask_seen(scores, users.numpy(), seen_offsets, seen_items)
                    yield (best_rows(users, *top_k(scores, n)) if not candidates
                           else _rerank(model, users, *top_k(scores, candidates), n))

    blocks = -(-len(users) // block)
    # spark.range hands each task a contiguous run of blocks: the output comes out in the order of `users`.
    parts = max(1, min(blocks, spark.sparkContext.defaultParallelism * 2))
    return spark.range(0, blocks, 1, parts).mapInPandas(score, TOP_SCHEMA)


def predict_pairs(spark: SparkSession, model_dir: str, pairs: DataFrame) -> DataFrame:
    """`pairs` (user_idx, item_idx, ...) with a `prediction` column added (see `_ratings` for null indices)."""
    build, _ = shipped_model(spark, model_dir)

    # An iterator UDF rebuilds the model once per task, and leaves the other columns to Spark untouched.
    @F.pandas_udf(FloatType())
    def rating(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
        model = build()
        for users, items in batches:
            yield pd.Series(_ratings(model, users.to_numpy(np.float64), items.to_numpy(np.float64)))

    return pairs.withColumn("prediction", rating("user_idx", "item_idx"))


def _ratings(model, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The model's ratings of (user_idx, item_idx) pairs. A NaN index (a user or item outside training)
    gets the fallback: global mean + the bias of whichever side is known, clipped to the rating scale."""
    user_known, item_known = ~np.isnan(users), ~np.isnan(items)
    u = torch.as_tensor(np.where(user_known, users, 0), dtype=torch.long)
    i = torch.as_tensor(np.where(item_known, items, 0), dtype=torch.long)
    with torch.no_grad():
        out = model.global_mean.expand(len(u)).clone()
        for table, idx, known in ((model.user_bias, u, user_known), (model.item_bias, i, item_known)):
            if table is not None:  # dmf and neumf with the softmax head have no biases
                out += table(idx)[:, 0] * torch.as_tensor(known)
        out = out.clamp(model.levels[0], model.levels[-1])
        both = torch.as_tensor(user_known & item_known)
        if both.any():
            out[both] = model.predict(u[both], i[both])
    return out.numpy().astype(np.float32)


def dot_factors(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(user factors, item factors) of an mf or two_tower model whose products are its unclipped ratings:
    [u, 1, mean + b_u] . [v, b_i, 1] = mean + b_u + b_i + <u, v>, so one matrix product scores a block."""
    with torch.no_grad():
        user_vectors, item_vectors = model.user_vectors(), model.item_vectors()
        ones = torch.ones(len(user_vectors), 1)
        users = torch.cat([user_vectors, ones, model.global_mean + model.user_bias.weight], dim=1)
        items = torch.cat([item_vectors, model.item_bias.weight, torch.ones(len(item_vectors), 1)], dim=1)
        return users.detach().contiguous(), items.T.detach().contiguous()


def _rerank(model, users: torch.Tensor, reach: torch.Tensor, cand: torch.Tensor, n: int) -> pd.DataFrame:
    """The model's n best of each user's retrieved candidates (reach: their retrieval scores)."""
    # Unreached candidates (seen items, or padding when candidates reach past the unseen items) may carry
    # any index: point them at item 0 and drop them below.
    cand = torch.where(torch.isfinite(reach), cand, 0)
    # In item order, so that with every item a candidate the ranking (ties included) is the exact one.
    cand, order = cand.sort(dim=1)
    reach = reach.gather(1, order)
    fine = model.expected(model(users[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))).reshape(cand.shape)
    fine[~torch.isfinite(reach)] = -torch.inf
    best, at = torch.topk(fine, min(n, fine.shape[1]), dim=1)
    return best_rows(users, best, cand.gather(1, at))


def list_order(cfg: Config, model_dir: str) -> str:
    """What orders a model's lists: "ranking" (its ranking score) or "rating" (its predicted rating), from
    recommend.order, whose auto is the ranking score when the model has one and two-stage mode is off."""
    has_ranking = int(storage.read_manifest(model_dir, "train")["spec"].get("ranking_dim", 0)) > 0
    wanted = cfg.recommend.order
    if wanted == "ranking" and not has_ranking:
        raise StageError(f"recommend.order is ranking, and {model_dir} has no ranking score (it was trained with "
                         f"train.ranking_dim=0): train it with a ranking_dim, or set recommend.order to rating")
    if wanted == "auto":
        return "ranking" if has_ranking and not cfg.recommend.candidates else "rating"
    return wanted


def retrieval_model(cfg: Config, model_dir: str, data_dir: str, retrieval_model_dir: str | None) -> str | None:
    """The model that retrieves two-stage candidates (None when recommend.candidates is 0), checked before any
    Spark work: an mf or two_tower model trained on the same prepared data as the model."""
    candidates = cfg.recommend.candidates
    if candidates == 0:
        if retrieval_model_dir:
            raise StageError(f"a retrieval model ({retrieval_model_dir}) was given but recommend.candidates is 0: "
                             f"set it to the number of candidates to retrieve per user")
        return None
    retrieval = retrieval_model_dir or model_dir
    kind = storage.read_manifest(retrieval, "train")["spec"]["model"]
    if kind not in RETRIEVAL_MODELS:
        raise StageError(f"two-stage recommend (recommend.candidates={candidates}) retrieves candidates by a dot "
                         f"product, and {retrieval} is a {kind} model: give a retrieval model trained as "
                         f"{' or '.join(RETRIEVAL_MODELS)} on the same data")
    model_and_data(retrieval, data_dir)
    return retrieval


def recommend(spark: SparkSession, cfg: Config, model_dir: str, data_dir: str | None, out: str,
              retrieval_model_dir: str | None = None, force: bool = False) -> dict:
    started = time.time()
    storage.check_output(out, "recommend", force)
    data_dir, data = model_and_data(model_dir, data_dir)
    retrieval = retrieval_model(cfg, model_dir, data_dir, retrieval_model_dir)
    order = list_order(cfg, model_dir)
    n, block, candidates = cfg.recommend.top_n, cfg.recommend.users_per_block, cfg.recommend.candidates
    users = spark_table(spark, data_dir, data, "users").select("user_idx", "user_id")
    items = spark_table(spark, data_dir, data, "items").select("item_idx", "item_id", "title")
    seen = seen_items(data_dir, data, ("train", "valid"))
    every_user = np.arange(data["counts"]["users"])

    def with_ids(top):
        # Broadcast joins: the id tables are small beside the output, and the output keeps its user order
        # (user_idx numbers the user ids in ascending order).
        return top.join(F.broadcast(items), "item_idx").join(F.broadcast(users), "user_idx")

    top = top_n(spark, model_dir, every_user, seen, n, block, retrieval, candidates, order)
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
            exact = with_ids(top_n(spark, model_dir, sample, seen, n, block)).select("user_id", "item_id").toPandas()
            hits = len(exact.merge(written, on=["user_id", "item_id"]))
            two_stage = {"candidates": candidates, "retrieval_model": retrieval,
                         "recall_vs_exact": hits / len(exact) if len(exact) else None,
                         "users_checked": int(exact.user_id.nunique())}
        storage.write_manifest(tmp, {
            "stage": "recommend", "model": model_dir, "data": data_dir, "top_n": n, "order": order,
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


def summary(manifest: dict, out: str) -> str:
    c, two = manifest["counts"], manifest.get("two_stage")
    text = (f"recommendations -> {out}/recommendations\n  top {manifest['top_n']} for {c['users']:,} users, "
            f"{c['rows']:,} rows, {c['items_covered']:,} of {c['catalog']:,} items recommended, "
            f"{manifest['seconds']:.0f} s\n  ordered by the model's {ORDERS[manifest['order']]}")
    if two:
        recall = "n/a" if two["recall_vs_exact"] is None else f"{two['recall_vs_exact']:.3f}"
        text += (f"\n  two-stage: {two['candidates']:,} candidates per user from {two['retrieval_model']}, "
                 f"recall {recall} of the exact top {manifest['top_n']} on {two['users_checked']:,} users")
    return text
