import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline import config, storage
from pipeline.data import ingest, prepare
from pipeline.data.frames import dense_ids
from pipeline.storage import StageError

ROOT = Path(__file__).resolve().parents[1]


def cfg(**prepare_values):
    split = prepare_values.pop("split", {})
    return config.load(overrides=[f"prepare.{k}={v}" for k, v in prepare_values.items()]
                       + [f"prepare.split.{k}={v}" for k, v in split.items()] + ["prepare.max_ranks=2"])


def read(out, name):
    return pd.read_parquet(Path(out) / name)


def write_ml1m(folder: Path, ratings: list[str], tags: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (folder / "movies.dat").write_bytes("1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action|Crime|Thriller\n"
                                        "3::Toy Story (1995)::Animation|Children's|Comedy\n".encode("latin-1"))
    (folder / ("tags.dat" if tags else "users.dat")).write_text("1::x\n")
    return folder


GOOD = [f"{u}::{i}::{(u + i) % 5 + 1}::97830{u}{i}" for u in range(1, 21) for i in (1, 2, 3)]


def test_validate_names_every_reason(spark, tmp_path):
    bad = ["1::1::5", "::2::3::978300000", "x::2::3::978300000", "1::1.5::3::978300000", "-4::2::3::978300000",
           "99999999999::2::3::978300000", "1::2::abc::978300000", "1::2::NaN::978300000", "1::2::6::978300000",
           "1::2::3.5::978300000", "1::2::3::", "1::2::3::-5", "1::2::3::later",
           # clean rows pass a quicker check than the one that names the reason: both must agree
           "007:: 2 ::3::0978300000", "+5::2::3::978300000", "-0::2::3::978300000", "2147483648::2::3::978300000",
           "5::2::3::1234567890123456789", "5::2::3::+978300000", "5::2.0::3::978300000"]
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(bad) + "\n")
    source = ingest.Source("ml-1m", str(path), None, ingest.WHOLE_STARS)
    raw, _ = ingest.read_ratings(spark, source)
    # one small file, read as one split in one partition: the row ordinals count its lines from 0
    rows = {r.row + 1: r for r in prepare.validate(raw, source.scale).collect()}
    assert {line: r.reason for line, r in rows.items()} == {
        1: "unparseable_line", 2: "missing_id", 3: "non_integer_id", 4: "non_integer_id", 5: "negative_id",
        6: "id_out_of_range", 7: "bad_rating", 8: "bad_rating", 9: "rating_out_of_scale", 10: "rating_out_of_scale",
        11: "bad_timestamp", 12: "bad_timestamp", 13: "bad_timestamp", 14: None, 15: "non_integer_id",
        16: "negative_id", 17: "id_out_of_range", 18: "bad_timestamp", 19: "bad_timestamp", 20: "non_integer_id"}
    assert (rows[14].user_id, rows[14].item_id, rows[14].rating, rows[14].timestamp) == (7, 2, 3.0, 978300000)


def test_every_rejected_row_is_kept_with_file_line_and_reason(spark, tmp_path):
    bad = ["1::1::9::978300000", "garbage line", "2::1::3::978300001", "2::1::4::978300999"]  # 2,1 twice
    src = write_ml1m(tmp_path / "ml-1m", GOOD + bad)
    out = tmp_path / "out"
    manifest = prepare.prepare(spark, cfg(max_reject_fraction=0.2), str(src), str(out))
    rejected = read(out, "rejected")
    by_line = {r.line: r.reason for r in rejected.itertuples()}
    n = len(GOOD)
    assert by_line[n + 1] == "rating_out_of_scale" and by_line[n + 2] == "unparseable_line"
    # The duplicate pair keeps its latest rating (line n+4); the older one is rejected, and so is
    # the original GOOD row for (2, 1), which is older still.
    assert by_line[n + 3] == "duplicate_pair"
    assert all(s.endswith("ratings.dat") for s in rejected.source)
    assert rejected[rejected.line == n + 2].raw.iloc[0] == "garbage line"
    c = manifest["counts"]
    assert c["input_rows"] == n + 4 == c["train"] + c["valid"] + c["rejected"]
    assert c["rejected_by_reason"]["duplicate_pair"] == 2
    kept = pd.concat([read(out, "train"), read(out, "valid")])
    users, items = read(out, "users"), read(out, "items")
    pair = kept.merge(users, on="user_idx").merge(items, on="item_idx")
    assert pair[(pair.user_id == 2) & (pair.item_id == 1)].rating.tolist() == [4.0]


def test_lines_are_counted_across_file_splits(spark, tmp_path):
    """Two CSV part files, each read in several splits: every rejected row keeps its file's line number."""
    folder = tmp_path / "release" / "ratings.csv"  # laid out as dmf synth writes it
    folder.mkdir(parents=True)
    for part in range(2):
        lines = ["userId,movieId,rating,timestamp"] + [f"{u},{part * 20 + i},{(u + i) % 5 + 1},{978300000 + u * i}"
                                                       for u in range(1, 31) for i in range(1, 21)]
        if part == 0:
            lines[99], lines[400] = "x,1,3,5", "1,2"  # lines 100 and 401
        else:
            lines[249] = "3,25,7,978300075"  # line 250
            lines[589] = lines[2].replace(",2,", ",4,")  # line 590 rates line 3's pair at the same time
        (folder / f"part-0000{part}.csv").write_text("\n".join(lines) + "\n")
    key = "spark.sql.files.maxPartitionBytes"
    before = spark.conf.get(key)
    spark.conf.set(key, "2048")  # about six splits per file
    try:
        m = prepare.prepare(spark, cfg(max_reject_fraction=0.1), str(folder.parent), str(tmp_path / "out"))
    finally:
        spark.conf.set(key, before)
    rejected = read(tmp_path / "out", "rejected")
    got = {(Path(r.source).name, r.line): r.reason for r in rejected.itertuples()
           if r.reason != "cold_start_validation"}
    assert got == {("part-00000.csv", 100): "non_integer_id", ("part-00000.csv", 401): "unparseable_line",
                   ("part-00001.csv", 250): "rating_out_of_scale", ("part-00001.csv", 3): "duplicate_pair"}
    assert rejected.raw[rejected.line == 401].tolist() == ["1,2"]
    assert m["counts"]["input_rows"] == 1200
    kept = pd.concat([read(tmp_path / "out", "train"), read(tmp_path / "out", "valid")])
    pair = kept.merge(read(tmp_path / "out", "users"), on="user_idx")
    pair = pair.merge(read(tmp_path / "out", "items"), on="item_idx")
    assert pair[(pair.user_id == 1) & (pair.item_id == 22)].rating.tolist() == [4.0]


def test_too_many_rejections_fail_and_publish_nothing(spark, tmp_path):
    src = write_ml1m(tmp_path / "ml-1m", GOOD + ["bad"] * 5)
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"(?s)ratings.dat.*more than prepare.max_reject_fraction.*line 61"):
        prepare.prepare(spark, cfg(), str(src), str(out))
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_schema_failure_names_file_and_column_and_keeps_previous_output(spark, tmp_path):
    src = write_ml1m(tmp_path / "ml-1m", GOOD)
    out = tmp_path / "out"
    prepare.prepare(spark, cfg(), str(src), str(out))
    before = json.loads((out / "manifest.json").read_text())
    broken = tmp_path / "broken.parquet"
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_parquet(broken)
    with pytest.raises(StageError, match=r"broken.parquet: required column 'rating' is missing"):
        prepare.prepare(spark, cfg(), str(broken), str(out))
    assert json.loads((out / "manifest.json").read_text()) == before
    assert not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises(StageError, match="does not exist"):
        prepare.prepare(spark, cfg(), str(tmp_path / "nowhere"), str(tmp_path / "o2"))


def test_formats_are_detected_from_files_and_decoded(spark, tmp_path):
    ml1m = write_ml1m(tmp_path / "release" / "ml-1m", GOOD)
    zipped = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in ml1m.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    with ingest.unpacked(str(zipped)) as (readable, _):
        source = ingest.detect(readable)
        assert (source.format, source.scale) == ("ml-1m", ingest.WHOLE_STARS)
        assert ingest.read_movies(source).title.iloc[0] == "Amélie (2001)"  # latin-1 decoded
    ml10m = write_ml1m(tmp_path / "ml-10m", [r.replace("::5::", "::4.5::") for r in GOOD], tags=True)
    assert ingest.detect(str(ml10m)).format == "ml-10m"
    csv_dir = tmp_path / "ml-25m"
    csv_dir.mkdir()
    (csv_dir / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.5,1\n2,3,0.5,2\n")
    (csv_dir / "movies.csv").write_text('movieId,title,genres\n'
                                        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
                                        "3,Toy Story (1995),(no genres listed)\n")
    source = ingest.detect(str(csv_dir))
    movies = ingest.read_movies(source)
    assert source.format == "csv" and movies.title[0] == "American President, The (1995)"
    assert movies.year.tolist() == [1995, 1995] and movies.genres.tolist() == ["Comedy|Drama|Romance", ""]
    parquet = tmp_path / "ml.parquet"
    pd.DataFrame({"userId": [1, 2], "movieId": [1, 3], "rating": [4.5, 1.0], "timestamp": [1, 2]}).to_parquet(parquet)
    assert ingest.detect(str(parquet)).format == "parquet"
    for path, n in ((zipped, len(GOOD)), (ml10m, len(GOOD)), (csv_dir, 2), (parquet, 2)):
        manifest = prepare.prepare(spark, cfg(split={"fraction": 0.3}), str(path), str(tmp_path / f"out-{path.name}"))
        assert manifest["counts"]["input_rows"] == n
        assert manifest["counts"]["rejected_by_reason"].keys() <= {"cold_start_validation"}
    bad_header = tmp_path / "ratings.csv"
    bad_header.write_text("user,item,score\n1,2,3\n")
    with pytest.raises(StageError, match="ratings.csv: line 1 must be the header"):
        prepare.prepare(spark, cfg(), str(bad_header), str(tmp_path / "o"))


@pytest.mark.parametrize("method,extra", [("random", {}), ("user_fraction", {}), ("user_temporal", {}),
                                          ("user_temporal", {"last_k": 2}), ("global_time", {"cutoff": 978300800})])
def test_splits(spark, tmp_path, method, extra):
    rows = [f"{u}::{i}::{(u * i) % 5 + 1}::{978300000 + (i + u) % 10 * 100 + u}" for u in range(1, 31)
            for i in range(1, 11)]
    src = write_ml1m(tmp_path / "ml-1m", rows)
    out = tmp_path / "out"
    m = prepare.prepare(spark, cfg(split={"method": method, "fraction": 0.2, **extra}), str(src), str(out))
    train, valid = read(out, "train"), read(out, "valid")
    assert len(train) + len(valid) + m["counts"]["rejected"] == 300 and len(valid) > 0
    if method in ("user_fraction", "user_temporal"):
        per_user = valid.groupby("user_idx").size()
        assert (per_user == (2 if extra else 2)).all() and per_user.size == 30
        assert set(train.user_idx) == set(range(30))  # every user keeps ratings in train
    if method == "user_temporal":
        last_train = train.groupby("user_idx").timestamp.max()
        first_valid = valid.groupby("user_idx").timestamp.min()
        assert (first_valid > last_train.loc[first_valid.index]).all()
    if method == "global_time":
        assert train.timestamp.max() < 978300800 <= valid.timestamp.min()
    again = tmp_path / "again"
    prepare.prepare(spark, cfg(split={"method": method, "fraction": 0.2, **extra}), str(src), str(again))
    pd.testing.assert_frame_equal(train.sort_values(["user_idx", "item_idx"]).reset_index(drop=True),
                                  read(again, "train").sort_values(["user_idx", "item_idx"]).reset_index(drop=True))


def test_min_ratings_filter_repeats_until_stable(spark, tmp_path):
    # user 9 rated only item 9 and item 1; item 9 has one rating; once item 9 goes, user 9 has one left.
    rows = [f"{u}::{i}::3::97830000{u}" for u in range(1, 6) for i in (1, 2, 3)] + ["9::9::4::978300009",
                                                                                    "9::1::4::978300009"]
    src = write_ml1m(tmp_path / "ml-1m", rows)
    m = prepare.prepare(spark, cfg(min_user_ratings=2, min_item_ratings=2, split={"fraction": 0.01}), str(src),
                        str(tmp_path / "out"))
    assert m["counts"]["rejected_by_reason"]["below_min_ratings"] == 2
    assert 9 not in set(read(tmp_path / "out", "users").user_id)


def test_dense_ids_are_contiguous_and_ordered(spark):
    df = spark.createDataFrame([(v,) for v in [50, 3, 7, 3, 1000, 8, 50, 1]], "user_id int").repartition(3)
    got = dense_ids(df, "user_id", "user_idx").orderBy("user_idx").toPandas()
    assert got.user_id.tolist() == [1, 3, 7, 8, 50, 1000] and got.user_idx.tolist() == list(range(6))


def test_ml100k_raw_and_parquet_give_the_same_split(spark, tmp_path, ml100k):
    raw = prepare.prepare(spark, cfg(max_ranks=8), str(ml100k / "raw"), str(tmp_path / "raw"))
    c = raw["counts"]
    assert c["input_rows"] == 100_000 and c["users"] == 943 and c["items"] <= 1682
    assert c["train"] + c["valid"] + c["rejected"] == 100_000
    assert abs(c["valid"] / 100_000 - 0.1) < 0.01
    assert raw["rating_levels"] == [1.0, 2.0, 3.0, 4.0, 5.0] and len(raw["genres"]) == 19
    assert raw["row_groups"]["train"] >= 2 * 2 and raw["row_groups"]["valid"] >= 2
    items = read(tmp_path / "raw", "items")
    assert items.title[items.item_id == 1].iloc[0] == "Toy Story (1995)"
    assert items.item_idx.tolist() == list(range(len(items)))
    pq = prepare.prepare(spark, cfg(max_ranks=8), str(ml100k / "ratings.parquet"), str(tmp_path / "pq"))
    assert pq["counts"] == raw["counts"]
    key = ["user_idx", "item_idx"]
    pd.testing.assert_frame_equal(read(tmp_path / "raw", "train").sort_values(key).reset_index(drop=True),
                                  read(tmp_path / "pq", "train").sort_values(key).reset_index(drop=True))


@pytest.mark.slow
def test_spark_submit_entry_point(tmp_path):
    src = write_ml1m(tmp_path / "ml-1m", GOOD)
    out = tmp_path / "out"
    spark_submit = Path(sys.executable).parent / "spark-submit"
    done = subprocess.run([str(spark_submit), "--master", "local[1]", str(ROOT / "jobs" / "prepare.py"),
                           "--input", str(src), "--out", str(out), "--set", "prepare.max_ranks=1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{spark_submit.parent}:{os.environ['PATH']}"})  # its python
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train" in done.stdout and storage.read_manifest(str(out), "prepare")["counts"]["input_rows"] == len(GOOD)
