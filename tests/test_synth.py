"""Synthetic MovieLens-shaped data: layout, exact counts, determinism, the oracle error and the planted genres."""
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import storage
from pipeline.config import SynthConfig
from pipeline.data import ingest, synth

SMALL = SynthConfig(users=300, items=120, ratings=6000, rank=4, noise=0.3, seed=3)


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.csv"))


def read_ratings(out) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in parts(Path(out) / "ratings.csv")], ignore_index=True)


def data_bytes(out) -> list[bytes]:
    """The part files' contents in part order (their names carry a per-job id)."""
    return [p.read_bytes() for name in ("ratings.csv", "movies.csv") for p in parts(Path(out) / name)]


@pytest.fixture(scope="module")
def small(spark, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "small"
    return out, synth.generate(spark, SMALL, str(out))


def test_files_are_movielens_csv_with_headers(small):
    out, manifest = small
    assert json.loads((out / "manifest.json").read_text())["stage"] == "synth"
    for p in parts(out / "ratings.csv"):
        lines = p.read_text().splitlines()
        assert lines[0] == "userId,movieId,rating,timestamp"
        assert all(re.fullmatch(r"\d+,\d+,\d\.\d,\d+", line) for line in lines[1:])
    movie_parts = parts(out / "movies.csv")
    assert len(movie_parts) == 1 and movie_parts[0].read_text().startswith("movieId,title,genres\n")
    source = ingest.detect(str(out))
    assert source.format == "csv" and source.movies
    films = ingest.read_movies(source)
    assert len(films) == SMALL.items and films.year.between(1900, 2030).all()
    assert films.title.str.fullmatch(r"Synthetic Movie \d+ \(\d{4}\)").all()
    assert set(films.genres.str.split("|").explode()) <= set(synth.GENRES)


def test_exact_count_no_duplicates_whole_stars_in_range(small):
    out, manifest = small
    r = read_ratings(out)
    assert len(r) == SMALL.ratings == manifest["counts"]["ratings"]
    assert not r.duplicated(["userId", "movieId"]).any()
    assert set(r.rating) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert r.userId.between(1, SMALL.users).all() and r.movieId.between(1, SMALL.items).all()
    assert r.timestamp.between(synth.FIRST_TIME, synth.END_TIME - 1).all()
    assert manifest["counts"]["users"] == r.userId.nunique() and manifest["counts"]["items"] == r.movieId.nunique()
    assert manifest["histogram"] == {str(v): int((r.rating == v).sum()) for v in (1.0, 2.0, 3.0, 4.0, 5.0)}
    # skew: the most popular tenth of the items holds far more than a tenth of the ratings
    per_item = r.movieId.value_counts()
    assert per_item.iloc[: SMALL.items // 10].sum() > 0.25 * len(r)


def test_oracle_error_is_the_planted_truth_against_the_written_ratings(small):
    out, manifest = small
    r = read_ratings(out)
    model = synth.planted(SMALL)
    score = model.score(r.userId.to_numpy() - 1, r.movieId.to_numpy() - 1)
    assert manifest["oracle_rmse"] == pytest.approx(np.sqrt(np.mean((score - r.rating) ** 2)), rel=1e-9)
    assert manifest["oracle_mae"] == pytest.approx(np.mean(np.abs(score - r.rating)), rel=1e-9)
    clipped = np.clip(score, 1, 5)
    assert manifest["oracle_clipped_rmse"] == pytest.approx(np.sqrt(np.mean((clipped - r.rating) ** 2)), rel=1e-9)
    # noise plus the rounding to whole stars; clipping at the ends moves it a little either way (down, mostly:
    # users choose items they like, so more scores pass 5 and lose their noise to the clip)
    expected = np.sqrt(SMALL.noise ** 2 + 1 / 12)
    assert SMALL.noise < manifest["oracle_clipped_rmse"] <= manifest["oracle_rmse"] < 1.1 * expected
    assert manifest["oracle_clipped_rmse"] == pytest.approx(expected, rel=0.1)
    # the true score explains the ratings: far better than the global mean
    assert manifest["oracle_rmse"] < 0.6 * r.rating.std()


def test_genres_follow_the_item_factors(small):
    out, _ = small
    films = ingest.read_movies(ingest.detect(str(out))).sort_values("item_id")
    model = synth.planted(SMALL)
    along = model.item_factors @ model.genre_directions.T
    assert (films.genres != "").all()
    for g, name in enumerate(synth.GENRES):
        has = films.genres.str.split("|").map(lambda gs: name in gs).to_numpy()
        assert has.any() and (~has).any()
        assert along[has, g].mean() > along[~has, g].mean() + 0.5 * along[:, g].std(), name


def test_half_stars(spark, tmp_path):
    cfg = replace(SMALL, ratings=2000, half_stars=True, noise=0.6)
    manifest = synth.generate(spark, cfg, str(tmp_path / "half"))
    r = read_ratings(tmp_path / "half")
    assert len(r) == 2000 and set(r.rating) <= set(np.arange(0.5, 5.01, 0.5))
    assert (r.rating % 1 == 0.5).any() and set(manifest["histogram"]) == {str(v) for v in np.arange(0.5, 5.01, 0.5)}


def test_same_seed_same_bytes_whatever_the_partitioning_other_seed_differs(spark, tmp_path, monkeypatch):
    # small blocks and files, so that partitions really split the work and the output has several parts
    monkeypatch.setattr(synth, "BLOCK", 1024)
    monkeypatch.setattr(synth, "ROWS_PER_FILE", 1500)
    cfg = replace(SMALL, ratings=4000)
    a = synth.generate(spark, replace(cfg, partitions=1), str(tmp_path / "a"))
    b = synth.generate(spark, replace(cfg, partitions=3), str(tmp_path / "b"))
    assert a["draws"] > 3 * 1024 and (a["partitions"], b["partitions"]) == (1, 3)
    assert len(parts(tmp_path / "a" / "ratings.csv")) > 1
    assert data_bytes(tmp_path / "a") == data_bytes(tmp_path / "b")
    assert a["oracle_rmse"] == b["oracle_rmse"]
    synth.generate(spark, replace(cfg, seed=cfg.seed + 1), str(tmp_path / "c"))
    ra, rc = read_ratings(tmp_path / "a"), read_ratings(tmp_path / "c")
    assert len(rc) == len(ra) and not ra.equals(rc)


def test_failed_run_leaves_the_published_output(spark, small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(small[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(directory, manifest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage, "write_manifest", fail)  # after both CSVs are written
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate(spark, replace(SMALL, ratings=1500, seed=9), str(out))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_choices_are_planted_and_recorded(spark, small, tmp_path):
    """With synth.choice users rate the items their planted factors favour, beyond popularity; with 0 only
    popularity decides which items a user rates."""
    out, manifest = small
    assert manifest["planted"] == {"rank": SMALL.rank, "noise": SMALL.noise, "choice": SMALL.choice,
                                   "choice_candidates": synth.CHOICE_CANDIDATES}
    plain = replace(SMALL, choice=0.0)
    synth.generate(spark, plain, str(tmp_path / "plain"))
    model = synth.planted(SMALL)

    def affinity(ratings):
        users, items = ratings.userId.to_numpy() - 1, ratings.movieId.to_numpy() - 1
        return np.einsum("ij,ij->i", model.user_factors[users], model.item_factors[items]).mean()

    chosen, by_popularity = affinity(read_ratings(out)), affinity(read_ratings(tmp_path / "plain"))
    # <p_u, q_i> has standard deviation INTERACTION_STD over random pairs, mean 0
    assert abs(by_popularity) < 0.05 and chosen > 0.3, (chosen, by_popularity)
