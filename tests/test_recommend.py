"""Recommend and evaluate on a small prepared synthetic set with a trained 2-rank mf model."""
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import config, evaluate, metrics, prepare, recommend, synth, train


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("rec")
    cfg = config.load(overrides=["synth.users=200", "synth.items=60", "synth.ratings=6000", "synth.seed=3",
                                 "prepare.max_ranks=2", "train.epochs=3", "train.user_dim=8", "train.item_dim=8",
                                 "recommend.top_n=5", "recommend.users_per_block=37"])
    synth.generate(spark, cfg.synth, str(base / "raw"))
    prepare.prepare(spark, cfg, str(base / "raw"), str(base / "data"))
    train.train(spark, cfg, str(base / "data"), str(base / "model"))
    return cfg, base


def test_top_n_for_every_user_unseen_ordered_and_equal_to_brute_force(spark, trained):
    cfg, base = trained
    m = recommend.recommend(spark, cfg, str(base / "model"), None, str(base / "recs"))
    recs = pd.read_parquet(base / "recs" / "recommendations")
    users = pd.read_parquet(base / "data" / "users")
    items = pd.read_parquet(base / "data" / "items")
    seen = pd.concat([pd.read_parquet(base / "data" / s) for s in ("train", "valid")])
    # every user with an unseen item gets recommendations (on a 60-item catalogue some have rated them all)
    n_seen = seen.groupby("user_idx").item_idx.nunique()
    assert m["counts"]["users"] == recs.user_id.nunique() == int((n_seen < len(items)).sum())
    assert not recs.duplicated(["user_id", "item_id"]).any()
    model, _ = train.load_model(str(base / "model"))
    with torch.no_grad():
        grid = model.score_all(torch.arange(len(users)), torch.arange(len(items))).numpy()
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
        np.testing.assert_allclose(np.sort(got.score.to_numpy()), np.sort(scores[np.isfinite(scores)])[::-1][:len(want)][::-1],
                                   rtol=1e-5)


def test_evaluate_matches_the_training_metrics(spark, trained):
    cfg, base = trained
    m = evaluate.evaluate(spark, cfg, str(base / "model"), None, str(base / "report"))
    trained_manifest = train.load_model(str(base / "model"))[1]
    assert m["rating"]["rmse"] == pytest.approx(trained_manifest["metrics"]["valid_rmse"], abs=1e-5)
    assert 0 <= m["ranking"]["ndcg@10"] <= 1 and m["ranking"]["users"] > 0
    for png in ("learning_curves.png", "predictions.png", "item_embeddings.png"):
        assert (base / "report" / png).stat().st_size > 1000
