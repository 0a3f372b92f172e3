"""`predict` on pairs files and `similar` on item vectors, with a small trained 2-rank mf model."""
import re

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, predict, similar
from pipeline.models import registry
from pipeline.models.spec import ModelSpec
from pipeline.scoring import blocks
from pipeline.storage import StageError

UNKNOWN = 10_000  # neither a user nor an item id of the synthetic set


@pytest.fixture(scope="module")
def trained(small_mf):
    _, base = small_mf
    model, _ = artifacts.load_model(str(base / "model"))
    return base, model, pd.read_parquet(base / "data" / "users"), pd.read_parquet(base / "data" / "items")


def pairs_and_expected(trained):
    """(user, item) pairs as strings, and per pair: prediction (None when malformed), known, malformed."""
    _, model, users, items = trained
    rng = np.random.default_rng(0)
    u, i = rng.choice(users.user_idx, 8), rng.choice(items.item_idx, 8)
    with torch.no_grad():
        known = model.predict(torch.as_tensor(u, dtype=torch.long), torch.as_tensor(i, dtype=torch.long)).numpy()
    user_id, item_id = dict(zip(users.user_idx, users.user_id)), dict(zip(items.item_idx, items.item_id))
    bias_u, bias_i = model.user_bias.weight[:, 0].detach().numpy(), model.item_bias.weight[:, 0].detach().numpy()
    mean, lo, hi = float(model.global_mean), float(model.levels[0]), float(model.levels[-1])
    rows = [(str(user_id[a]), str(item_id[b]), float(p), True, False) for a, b, p in zip(u, i, known)]
    rows += [(str(UNKNOWN), str(item_id[i[0]]), np.clip(mean + bias_i[i[0]], lo, hi), False, False),
             (str(user_id[u[0]]), str(UNKNOWN), np.clip(mean + bias_u[u[0]], lo, hi), False, False),
             (str(UNKNOWN), str(UNKNOWN), np.clip(mean, lo, hi), False, False),
             ("abc", str(item_id[i[0]]), None, False, True), ("", str(item_id[i[0]]), None, False, True),
             (str(user_id[u[0]]), "", None, False, True), ("1.5", "2", None, False, True),
             ("-3", "2", None, False, True)]
    return pd.DataFrame(rows, columns=["user", "item", "prediction", "known", "malformed"])


def check(got: pd.DataFrame, want: pd.DataFrame, manifest: dict, user_column: str):
    assert len(got) == len(want)  # nothing dropped, and in input order:
    assert got[user_column].fillna("").astype(str).tolist() == want.user.tolist()
    assert got.known.astype(bool).tolist() == want.known.tolist()
    assert got.problem.notna().tolist() == want.malformed.tolist()
    scored = ~want.malformed
    assert got.prediction[~scored].isna().all()
    np.testing.assert_allclose(got.prediction[scored].astype(float), want.prediction[scored].astype(float), atol=1e-5)
    assert manifest["counts"] == {"rows": len(want), "known": int(want.known.sum()),
                                  "malformed": int(want.malformed.sum()),
                                  "fallback": int((~want.known & ~want.malformed).sum())}


def test_predict_csv_pairs(spark, trained, tmp_path):
    base = trained[0]
    want = pairs_and_expected(trained)
    path = tmp_path / "pairs.csv"
    want.assign(rating=4).rename(columns={"user": "userId", "item": "movieId"})[["userId", "movieId", "rating"]] \
        .to_csv(path, index=False)
    m = predict.predict(spark, str(base / "model"), str(path), str(tmp_path / "out"))
    got = pd.read_parquet(tmp_path / "out" / "predictions")
    assert list(got.columns) == ["userId", "movieId", "rating", "prediction", "known", "problem"]
    check(got, want, m, "userId")
    assert got.problem[want.malformed.to_numpy()].str.contains("is not an id").all()


def test_predict_parquet_pairs_to_csv(spark, trained, tmp_path):
    base = trained[0]
    want = pairs_and_expected(trained)
    well_formed = ~want.malformed  # Parquet ids are numbers: malformed here means missing
    pairs = pd.DataFrame({"user_id": pd.array([int(x) if ok else None for x, ok in zip(want.user, well_formed)],
                                              dtype="Int64"),
                          "item_id": pd.array([int(x) if ok else None for x, ok in zip(want.item, well_formed)],
                                              dtype="Int64")})
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    want.loc[want.malformed, "user"] = ""
    m = predict.predict(spark, str(base / "model"), str(tmp_path / "pairs.parquet"), str(tmp_path / "out.csv"))
    parts = sorted((tmp_path / "out.csv" / "predictions").glob("part-*.csv"))
    got = pd.concat(pd.read_csv(p, dtype={"user_id": str}) for p in parts)
    assert m["format"] == "csv" and list(got.columns) == ["user_id", "item_id", "prediction", "known", "problem"]
    check(got, want, m, "user_id")


def test_pairs_without_an_id_column_fail_naming_the_file(spark, trained, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user,movieId\n1,2\n")
    with pytest.raises(StageError, match=re.escape(f"{path}: needs a column user_id or userId")):
        predict.predict(spark, str(trained[0] / "model"), str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fallback_of_a_model_without_biases_is_the_global_mean():
    spec = ModelSpec(model="dmf", n_users=3, n_items=4, user_dim=2, item_dim=2, hidden=[4], dropout=0.0,
                     batch_norm=False, head="softmax", rating_levels=[1, 2, 3, 4, 5], global_mean=3.6, n_genres=0,
                     max_genres=0)
    model = registry.build(spec).eval()
    got = blocks.ratings(model, np.array([np.nan, 1, np.nan, 2]), np.array([0, np.nan, np.nan, 3]))
    np.testing.assert_allclose(got[:3], 3.6, rtol=1e-6)
    with torch.no_grad():
        assert got[3] == pytest.approx(float(model.predict(torch.tensor([2]), torch.tensor([3]))[0]), abs=1e-6)


def test_similar_items_by_cosine(trained):
    base, model, _, items = trained
    items = items.sort_values("item_idx").reset_index(drop=True)
    query = int(items.item_id[7])
    got = similar.similar(str(base / "model"), query, n=6)
    with torch.no_grad():
        vectors = model.item_vectors().numpy()
    by_hand = vectors @ vectors[7] / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(vectors[7]))
    assert len(got) == 6 and query not in set(got.item_id)
    assert np.all(np.diff(got.cosine) <= 0)
    idx = items.set_index("item_id").loc[got.item_id, "item_idx"].to_numpy()
    np.testing.assert_allclose(got.cosine, by_hand[idx], atol=1e-5)
    assert got.cosine.iloc[0] == pytest.approx(np.delete(by_hand, 7).max(), abs=1e-5)
    assert got.title.tolist() == items.set_index("item_id").loc[got.item_id, "title"].tolist()
    assert got.title.str.len().gt(0).all()
    assert len(similar.similar(str(base / "model"), query, n=1000)) == len(items) - 1


def test_similar_to_an_unknown_item_fails(trained):
    with pytest.raises(StageError, match=rf"item {UNKNOWN} was not in training"):
        similar.similar(str(trained[0] / "model"), UNKNOWN)
