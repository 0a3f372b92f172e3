"""Recommend (exact and two-stage) and evaluate on a small prepared synthetic set with 2-rank mf and dmf models."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, config, evaluate, peers, recommend, storage
from pipeline.config import ConfigError
from pipeline.scoring import blocks, topk
from pipeline.storage import StageError
from pipeline.training import train


@pytest.fixture(scope="module")
def trained(small_mf):
    return small_mf


@pytest.fixture(scope="module")
def exact(spark, trained):
    """The mf model's exact (one-stage) recommendations in Parquet."""
    cfg, base = trained
    manifest = recommend.recommend(spark, cfg, str(base / "model"), None, str(base / "recs"))
    return manifest, pd.read_parquet(base / "recs" / "recommendations")


@pytest.fixture(scope="module")
def dmf(spark, trained):
    """A dmf model on the same prepared data, and its exact recommendations."""
    cfg, base = trained
    cfg = config.load(overrides=["train.model=dmf", "train.hidden=[16]", "train.epochs=3", "train.user_dim=8",
                                 "train.item_dim=8", "recommend.top_n=5", "recommend.users_per_block=37",
                                 "recommend.order=rating"])  # what two-stage mode re-ranks by
    train.train(spark, cfg, str(base / "data"), str(base / "dmf"))
    recommend.recommend(spark, cfg, str(base / "dmf"), None, str(base / "dmf_recs"))
    return cfg, pd.read_parquet(base / "dmf_recs" / "recommendations")


def two_stage(cfg, candidates):
    return config.load(overrides=["recommend.top_n=5", "recommend.users_per_block=37",
                                  f"recommend.candidates={candidates}"])


def by_user(recs):
    return recs.sort_values(["user_id", "rank"]).reset_index(drop=True)


def test_top_n_for_every_user_unseen_ordered_and_equal_to_brute_force(spark, trained, exact):
    cfg, base = trained
    m, recs = exact
    users = pd.read_parquet(base / "data" / "users")
    items = pd.read_parquet(base / "data" / "items")
    seen = pd.concat([pd.read_parquet(base / "data" / s) for s in ("train", "valid")])
    # every user with an unseen item gets recommendations (on a 60-item catalogue some have rated them all)
    n_seen = seen.groupby("user_idx").item_idx.nunique()
    assert m["counts"]["users"] == recs.user_id.nunique() == int((n_seen < len(items)).sum())
    assert not recs.duplicated(["user_id", "item_id"]).any()
    model, _ = artifacts.load_model(str(base / "model"))
    assert m["order"] == "ranking" and "ordered by the model's ranking score" in recommend.summary(m, "out")
    assert m["recent"] == {"items": cfg.recommend.recent_items, "weight": cfg.recommend.recent_weight} == {
        "items": 5, "weight": 0.2}
    user_vectors, item_vectors = model.ranking_factors()
    dim = model.ranking_user.embedding_dim
    for u, last in seen.sort_values(["timestamp", "item_idx"]).groupby("user_idx").item_idx:
        v = item_vectors[:dim, last.to_numpy()[-5:]].sum(dim=1)  # each user's query leans to their last 5 items
        user_vectors[u, :dim] += 0.2 * user_vectors[u, :dim].norm() * v / v.norm()
    grid = (user_vectors @ item_vectors).numpy()
    id_of_user = dict(zip(users.user_idx, users.user_id))
    id_of_item = dict(zip(items.item_idx, items.item_id))
    for u, rated in seen.groupby("user_idx").item_idx:
        got = recs[recs.user_id == id_of_user[u]].sort_values("rank")
        scores = grid[u].copy()
        scores[rated.to_numpy()] = -np.inf
        want = [id_of_item[i] for i in np.argsort(-scores, kind="stable")[:min(5, len(items) - len(rated))]]
        assert got["rank"].tolist() == list(range(1, len(want) + 1))
        assert not set(got.item_id) & {id_of_item[i] for i in rated}
        assert np.all(np.diff(got.score.to_numpy()) <= 1e-6)
        best = np.sort(scores[np.isfinite(scores)])[::-1][:len(want)][::-1]
        np.testing.assert_allclose(np.sort(got.score.to_numpy()), best, rtol=1e-5, atol=1e-6)


def test_the_order_is_the_ranking_score_when_the_model_has_one(tmp_path):
    auto, rating = (config.load(overrides=[f"recommend.order={o}"]) for o in ("auto", "rating"))
    assert recommend.list_order(auto, "m", False) == recommend.list_order(rating, "m", True) == "rating"
    assert recommend.list_order(auto, "m", True) == "ranking"
    with pytest.raises(StageError, match="m has no ranking score"):
        recommend.list_order(config.load(overrides=["recommend.order=ranking"]), "m", False)
    with pytest.raises(ConfigError, match="recommend.candidates re-ranks the retrieved items by predicted rating"):
        config.load(overrides=["recommend.order=ranking", "recommend.candidates=20"])


def test_evaluate_matches_the_training_metrics(spark, trained):
    cfg, base = trained
    m = evaluate.evaluate(spark, cfg, str(base / "model"), None, str(base / "report"))
    trained_manifest = artifacts.load_model(str(base / "model"))[1]
    assert m["rating"]["rmse"] == pytest.approx(trained_manifest["metrics"]["valid_rmse"], abs=1e-5)
    assert 0 <= m["ranking"]["ndcg@10"] <= 1 and m["ranking"]["users"] > 0
    # The peers are judged on the same users with the same metric functions.
    assert m["peers"]["most_popular"]["users"] == m["peers"]["ease"]["users"] == m["ranking"]["users"]
    assert m["peers"]["ease"]["lambda"] in peers.EASE_LAMBDAS and 0 <= m["ranking"]["users_given_most_popular"] <= 1
    assert "most popular" in evaluate.table(m) and "EASE" in evaluate.table(m)
    for png in ("learning_curves.png", "predictions.png", "item_embeddings.png"):
        assert (base / "report" / png).stat().st_size > 1000


def test_a_user_who_rated_all_but_three_items_gets_those_three(spark, trained):
    cfg, base = trained
    model, manifest = artifacts.load_model(str(base / "model"))
    n_items = manifest["spec"]["n_items"]
    left = [5, 17, 42]
    rated = [i for i in range(n_items) if i not in left]  # user 0 rated all but 3, user 1 nothing, user 2 all
    seen = topk.by_user(np.array([0] * len(rated) + [2] * n_items), np.array(rated + list(range(n_items))),
                             manifest["spec"]["n_users"])
    with torch.no_grad():
        scores = model.score_all(torch.tensor([0]), torch.tensor(left), clip=False)[0].numpy()
    for candidates in (0, 10):  # exact, and two-stage with the model as its own retriever
        build = blocks.ship(spark, model, manifest["spec"])
        got = blocks.top_n(spark, build, n_items, np.array([0, 1, 2]), seen, 5, 2, retrieval=build,
                           candidates=candidates).toPandas()
        got = got.sort_values(["user_idx", "rank"])
        user0 = got[got.user_idx == 0]
        assert user0["rank"].tolist() == [1, 2, 3]
        assert user0.item_idx.tolist() == [left[i] for i in np.argsort(-scores, kind="stable")]
        assert (got.user_idx == 1).sum() == 5 and (got.user_idx == 2).sum() == 0


def test_csv_output_has_the_same_rows_as_parquet(spark, trained, exact):
    cfg, base = trained
    csv_cfg = config.load(overrides=["recommend.top_n=5", "recommend.users_per_block=37", "recommend.format=csv"])
    m = recommend.recommend(spark, csv_cfg, str(base / "model"), None, str(base / "recs_csv"))
    parts = sorted((base / "recs_csv" / "recommendations").glob("part-*.csv"))
    got, want = by_user(pd.concat(pd.read_csv(p) for p in parts)), by_user(exact[1])
    assert m["format"] == "csv" and m["counts"] == exact[0]["counts"] and len(got) == len(want) > 0
    assert list(got.columns) == list(want.columns)
    for column in ("user_id", "rank", "item_id", "title"):
        assert got[column].tolist() == want[column].tolist()
    np.testing.assert_allclose(got.score, want.score, rtol=1e-6)


def test_two_stage_with_every_item_a_candidate_is_exact(spark, trained, dmf):
    _, base = trained
    cfg, want = dmf
    m = recommend.recommend(spark, two_stage(cfg, 1000), str(base / "dmf"), None, str(base / "two_full"),
                            retrieval_model_dir=str(base / "model"))
    got = pd.read_parquet(base / "two_full" / "recommendations")
    got, want = by_user(got), by_user(want)
    assert got[["user_id", "rank", "item_id"]].equals(want[["user_id", "rank", "item_id"]])
    np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    assert m["two_stage"] == {"candidates": 1000, "retrieval_model": str(base / "model"), "recall_vs_exact": 1.0,
                              "users_checked": want.user_id.nunique()}
    assert "recall 1.000" in recommend.summary(m, str(base / "two_full"))


def test_two_stage_with_few_candidates_keeps_n_unseen_items_and_reports_recall(spark, trained, dmf):
    _, base = trained
    cfg, exact_recs = dmf
    m = recommend.recommend(spark, two_stage(cfg, 6), str(base / "dmf"), None, str(base / "two_small"),
                            retrieval_model_dir=str(base / "model"))
    got = pd.read_parquet(base / "two_small" / "recommendations")
    users = pd.read_parquet(base / "data" / "users")
    items = pd.read_parquet(base / "data" / "items")
    seen = pd.concat([pd.read_parquet(base / "data" / s) for s in ("train", "valid")])
    seen = seen.merge(users, on="user_idx").merge(items, on="item_idx")
    assert not got.merge(seen, on=["user_id", "item_id"]).shape[0]
    unseen = len(items) - seen.groupby("user_id").item_id.nunique()
    per_user = got.groupby("user_id").size()
    assert (per_user == np.minimum(5, unseen[per_user.index])).all()
    assert set(per_user.index) == set(unseen[unseen > 0].index)
    assert not got.duplicated(["user_id", "item_id"]).any()
    # every user is in the sample (200 < 1000), so the recall is the overlap with the whole exact output
    overlap = len(got.merge(exact_recs, on=["user_id", "item_id"]))
    two = m["two_stage"]
    assert two["users_checked"] == exact_recs.user_id.nunique()
    assert two["recall_vs_exact"] == pytest.approx(overlap / len(exact_recs))
    assert 0 <= two["recall_vs_exact"] <= 1


def test_two_stage_needs_a_dot_product_retriever_trained_on_the_same_data(trained, dmf, tmp_path):
    _, base = trained
    cfg, _ = dmf
    # spark=None: each of these must fail before any Spark work
    with pytest.raises(StageError, match=r"is a dmf model: give a retrieval model trained as mf or two_tower"):
        recommend.recommend(None, two_stage(cfg, 10), str(base / "dmf"), None, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"recommend.candidates must be 0 \(score every item\) or at least"):
        two_stage(cfg, 3)
    with pytest.raises(StageError, match=r"recommend.candidates is 0"):
        recommend.recommend(None, cfg, str(base / "dmf"), None, str(tmp_path / "out"),
                            retrieval_model_dir=str(base / "model"))
    stale = tmp_path / "stale"
    shutil.copytree(base / "model", stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["data"]["created_at"] = "2000-01-01T00:00:00+00:00"
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=r"has since been rewritten"):
        recommend.recommend(None, two_stage(cfg, 10), str(base / "dmf"), None, str(tmp_path / "out"),
                            retrieval_model_dir=str(stale))
    other = tmp_path / "other_data"
    shutil.copytree(base / "data", other)
    data_manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**data_manifest, "created_at": "2001-01-01T00:00:00+00:00"}))
    with pytest.raises(StageError, match=r"was trained on .*data \(written at .*\), not on .*other_data"):
        recommend.recommend(None, cfg, str(base / "model"), str(other), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_top_k_in_two_passes_equals_torch_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 40 * topk.TOPK_CHUNK, generator=g).round(decimals=1)  # many ties
    scores[3] = -torch.inf  # a user with nothing left
    scores[4, 5:] = -torch.inf  # and one with 5 items left
    for k in (1, 10, 39):
        values, items = topk.top_k(scores, k)
        assert torch.equal(values, torch.topk(scores, k, dim=1).values)
        assert torch.equal(scores.gather(1, items), values)
        finite = torch.isfinite(values)
        assert all(len(set(row[keep].tolist())) == int(keep.sum()) for row, keep in zip(items, finite))


def test_mask_seen_masks_each_rows_user_from_the_by_user_lists():
    seen = topk.by_user(np.array([3, 0, 3, 2]), np.array([1, 4, 3, 0]), 5)  # user 1 and 4 rated nothing
    assert seen[0].tolist() == [0, 1, 1, 2, 4, 4] and seen[1].tolist() == [4, 0, 1, 3]
    scores = topk.mask_seen(torch.zeros(4, 5), np.array([3, 1, 0, 3]), *seen)
    assert torch.isinf(scores).nonzero().tolist() == [[0, 1], [0, 3], [2, 4], [3, 1], [3, 3]]


def test_recent_queries_lean_each_users_ranking_columns_towards_their_last_items():
    torch.manual_seed(0)
    user_factors, item_factors = torch.randn(4, 5), torch.randn(5, 6)  # columns 0-2 ranking, 3-4 rating head
    seen = topk.by_user(np.array([0, 0, 0, 2, 3]), np.array([5, 1, 4, 2, 0]), 4)  # in the order rated; 1 none
    users = np.array([3, 0, 1, 0])
    got = topk.recent_queries((user_factors, item_factors), users, *seen, recent=2, weight=0.5, dim=3)
    for row, user in enumerate(users):
        want = user_factors[user].clone()
        last = {0: [1, 4], 1: [], 3: [0]}[int(user)]  # user 0's last two, not item 5
        if last:
            v = item_factors[:3, last].sum(dim=1)
            want[:3] += 0.5 * want[:3].norm() * v / v.norm()
        torch.testing.assert_close(got[row], want)
    plain = topk.recent_queries((user_factors, item_factors), users, *seen, recent=0, weight=0.5, dim=3)
    assert torch.equal(plain, user_factors[users])


def test_seen_items_lists_each_users_items_in_the_order_rated(trained):
    cfg, base = trained
    data_dir = str(base / "data")
    data = storage.read_manifest(data_dir, "prepare")
    offsets, items = artifacts.seen_items(data_dir, data, ("train",), in_order_rated=True)
    unordered = artifacts.seen_items(data_dir, data, ("train",))
    assert np.array_equal(unordered[0], offsets) and all(  # the same items, as by_user lists them
        sorted(items[a:b]) == sorted(unordered[1][a:b]) for a, b in zip(offsets[:-1], offsets[1:]))
    train_rows = artifacts.read_table(data_dir, data, "train", columns=["user_idx", "item_idx", "timestamp"])
    when = dict(zip(zip(train_rows.user_idx, train_rows.item_idx), train_rows.timestamp))
    for user in range(0, len(offsets) - 1, 7):
        row = items[offsets[user]:offsets[user + 1]]
        times = [when[(user, int(item))] for item in row]
        assert times == sorted(times) and sorted(row.tolist()) == sorted(
            train_rows.item_idx[train_rows.user_idx == user].tolist())
