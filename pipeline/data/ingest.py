"""Reads every MovieLens ratings format into one shape, each row keeping its file and line.

Formats are told apart by the files, not by directory names:
  ml-100k  u.data        tab separated, whole stars 1-5, u.item (latin-1, '|') beside it
  ml-1m    ratings.dat   '::' separated, whole stars 1-5, users.dat and movies.dat (latin-1) beside it
  ml-10m   ratings.dat   '::' separated, half stars 0.5-5, tags.dat and movies.dat beside it
  csv      ratings.csv   header userId,movieId,rating,timestamp, half stars (ml-20m, ml-25m, ml-latest)
  parquet  *.parquet     user_id,item_id,rating,timestamp (or userId,movieId,...)
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, replace
from urllib.parse import unquote

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.storage import StageError, filesystem, is_empty, respelled

WHOLE_STARS = (1.0, 5.0, 1.0)
HALF_STARS = (0.5, 5.0, 0.5)
RATINGS_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat",
                 "csv": "ratings.csv", "parquet": "ratings.parquet"}
MOVIES_FILES = {"ml-100k": "u.item", "ml-1m": "movies.dat", "ml-10m": "movies.dat",
                "csv": "movies.csv", "parquet": "movies.parquet"}
SEPARATORS = {"ml-100k": "\t", "ml-1m": "::", "ml-10m": "::", "csv": ","}
CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
PARQUET_COLUMNS = {"user_id": ("user_id", "userId"), "item_id": ("item_id", "movieId"),
                   "rating": ("rating",), "timestamp": ("timestamp",)}
# u.genre's order: the 19 flag columns at the end of each u.item line
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western"]


@dataclass
class Source:
    format: str
    ratings: str  # a file, or a directory of part files (Spark-written CSV, Parquet datasets)
    movies: str | None
    scale: tuple  # (min, max, step) of valid ratings


@contextlib.contextmanager
def unpacked(path: str):
    """(readable, shown): `path` itself, or for a .zip the directory it was unpacked into, which is removed on
    every way out; `shown(p)` spells a path under it as the place in the zip (for messages and manifests)."""
    if not path.rstrip("/").endswith(".zip"):
        yield path, lambda p: p
        return
    target = tempfile.mkdtemp(prefix="dmf-input-")
    try:
        _unzip(path, target)
        yield target, lambda p: p.replace(f"file://{target}", path).replace(target, path)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def detect(path: str, fmt: str = "auto") -> Source:
    """What `path` holds: a MovieLens directory (see `unpacked` for a .zip), or a single ratings file. The
    source's paths keep `path`'s scheme and authority (hdfs://nn:8020, s3a://bucket), for Spark."""
    fs, plain = filesystem(path)
    if not fs.exists(plain):
        raise StageError(f"input {path} does not exist")
    if plain.endswith(".zip"):
        raise StageError(f"internal error: {path} must be unpacked first (ingest.unpacked)")
    if fs.isdir(plain) and not _is_parquet_dataset(fs, plain):
        source = _detect_in_directory(fs, plain, fmt, path)
    else:
        if fmt == "auto":
            fmt = _format_of_file(fs, plain, os.path.basename(plain.rstrip("/")))
            if fmt is None:
                raise StageError(f"{path}: cannot tell the ratings format from the file name; name it "
                                 f"u.data, ratings.dat, ratings.csv or *.parquet, or pass --format")
        source = _source(fs, plain, fmt)
    return replace(source, ratings=respelled(path, source.ratings),
                   movies=source.movies and respelled(path, source.movies))


def _source(fs, plain: str, fmt: str) -> Source:
    folder = os.path.dirname(plain.rstrip("/"))
    if fmt == "ml-1m" and fs.exists(os.path.join(folder, "tags.dat")):
        fmt = "ml-10m"  # ml-10m ships ratings.dat too, with half stars, and tags.dat instead of users.dat
    movies = os.path.join(folder, MOVIES_FILES[fmt])
    scale = WHOLE_STARS if fmt in ("ml-100k", "ml-1m") else HALF_STARS
    return Source(fmt, plain, movies if fs.exists(movies) else None, scale)


def _detect_in_directory(fs, plain: str, fmt: str, shown: str) -> Source:
    children = fs.ls(plain, detail=False)
    names = {os.path.basename(c.rstrip("/")): c for c in children}
    candidates = [fmt] if fmt != "auto" else ["ml-100k", "ml-1m", "csv", "parquet"]
    found = [f for f in candidates if RATINGS_FILES[f] in names]
    if len(found) > 1:
        raise StageError(f"{shown} holds {' and '.join(RATINGS_FILES[f] for f in found)}: say which to read with "
                         f"--format ({', '.join(found)}), or point --input at the file")
    if found:
        return _source(fs, names[RATINGS_FILES[found[0]]], found[0])
    subdirs = [c for c in children if fs.isdir(c)]
    if len(subdirs) == 1:  # a release unpacked as published: ml-1m.zip holds ml-1m/
        return _detect_in_directory(fs, subdirs[0], fmt, shown)
    raise StageError(f"{shown}: found no ratings file (looked for {sorted(set(RATINGS_FILES.values()))})")


def _format_of_file(fs, plain: str, name: str) -> str | None:
    if name == "u.data":
        return "ml-100k"
    if name.endswith(".dat"):
        return "ml-1m"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".parquet") or _is_parquet_dataset(fs, plain):
        return "parquet"
    return None


def _is_parquet_dataset(fs, plain: str) -> bool:
    """A directory of Parquet part files, as Spark and pyarrow write them."""
    return fs.isdir(plain) and any(os.path.basename(p).startswith("part-") and p.endswith(".parquet")
                                   for p in fs.ls(plain, detail=False))


def _unzip(path: str, target: str) -> None:
    fs, plain = filesystem(path)
    try:
        with fs.open(plain, "rb") as f, zipfile.ZipFile(f) as z:
            z.extractall(target)
    except zipfile.BadZipFile as e:
        raise StageError(f"{path}: not a readable zip file ({e})") from e


def read_ratings(spark: SparkSession, source: Source) -> tuple[DataFrame, pd.DataFrame]:
    """All rows as strings: file_idx, block, row, raw, user_id, item_id, rating, timestamp, fields.

    (file_idx, block, row) says where a row was read: its file, the byte offset of the file split it
    came in (input_file_block_start) and its ordinal in the Spark partition, consecutive within the
    split. Sorted, it puts a file's rows in the order of its lines; `line_offsets` turns it into line
    numbers once the rows of each split are counted, which prepare does in a job it runs anyway, so
    that the files are read only once. A CSV file's first row is its header. Returns the rows and
    the table of files (file_idx -> path), so that the wide rows carry a small integer, not a path.
    """
    if source.format == "parquet":
        return _read_parquet(spark, source)
    if is_empty(source.ratings):
        raise StageError(f"{source.ratings} is empty: it holds no ratings")
    rows, files = _positioned(spark, spark.read.text(source.ratings))
    if source.format == "csv":
        _check_csv_headers(files)
    # A UTF-8 byte order mark before a file's first line is no part of its first field.
    value = F.when(F.col("value").startswith("\ufeff"), F.expr("substring(value, 2)")).otherwise(F.col("value"))
    parts = F.split(value, re.escape(SEPARATORS[source.format]))
    rows = rows.select(
        "file_idx", "block", "row", value.alias("raw"),
        F.trim(parts[0]).alias("user_id"), F.trim(parts[1]).alias("item_id"),
        F.trim(parts[2]).alias("rating"), F.trim(parts[3]).alias("timestamp"),
        F.size(parts).alias("fields"))
    return rows, files


def _positioned(spark: SparkSession, df: DataFrame) -> tuple[DataFrame, pd.DataFrame]:
    """Adds file_idx, block and row (see read_ratings) without running a job."""
    files = pd.DataFrame({"source": sorted(df.inputFiles())})  # the paths as input_file_name spells them
    files.insert(0, "file_idx", range(len(files)))
    lookup = spark.createDataFrame(files.rename(columns={"source": "_file"}))
    rows = (df.select("*", F.input_file_name().alias("_file"), F.input_file_block_start().alias("block"),
                      F.monotonically_increasing_id().alias("row"))
            .join(F.broadcast(lookup), "_file", "left").drop("_file"))
    return rows, files


def line_offsets(chunks: pd.DataFrame) -> pd.DataFrame:
    """The `offset` of each (file_idx, block) such that line = row + offset, and its `first_row`.

    `chunks` counts the rows `n` and gives the smallest `row` of each (file_idx, block), possibly in
    several parts (prepare counts by reason too).
    """
    if chunks.file_idx.isna().any():
        raise StageError("internal error: rows were read from a file that Spark did not list")
    chunks = (chunks.groupby(["file_idx", "block"], as_index=False)
              .agg(n=("n", "sum"), first_row=("row", "min")).sort_values(["file_idx", "block"]))
    before = chunks.groupby("file_idx").n.cumsum() - chunks.n
    return chunks.assign(offset=before + 1 - chunks.first_row)[["file_idx", "block", "first_row", "offset"]]


def _check_csv_headers(files: pd.DataFrame) -> None:
    """Each CSV file starts with exactly the header: a fifth column would make every row unparseable."""
    for path in files.source:
        fs, plain = filesystem(unquote(path))
        with fs.open(plain, "rb", compression="infer") as f:
            first = f.readline()
        if not first:  # an empty part file has no header, and no rows
            continue
        first = first.decode("utf-8-sig", "replace").rstrip("\r\n")  # a byte order mark is no part of the text
        columns = [c.strip() for c in first.split(",")]
        if columns != CSV_HEADER:
            missing = [c for c in CSV_HEADER if c not in columns]
            problem = (f"missing {', '.join(missing)}" if missing else
                       f"{len(columns)} columns where ratings.csv has {len(CSV_HEADER)}")
            raise StageError(f"{path}: line 1 must be the header {','.join(CSV_HEADER)}, found {first!r} ({problem})")


def field_problem(fmt: str, raw_lines: list[str]) -> str:
    """What is wrong with lines rejected as unparseable, when they all share one wrong field count."""
    separator = SEPARATORS.get(fmt)
    counts = {len(line.split(separator)) for line in raw_lines if line is not None} if separator else set()
    if len(counts) != 1 or counts == {4}:
        return ""
    what = {"\t": "tab", "::": "'::'", ",": "comma"}[separator]
    return (f" These lines have {counts.pop()} {what}-separated fields where {fmt} ratings have 4 "
            f"(user, item, rating, timestamp): is this the right file and --format?")


def _read_parquet(spark: SparkSession, source: Source) -> tuple[DataFrame, pd.DataFrame]:
    try:
        df = spark.read.parquet(source.ratings)
    except Exception as e:  # AnalysisException: unreadable or not Parquet
        raise StageError(f"{source.ratings}: cannot read as Parquet ({str(e).splitlines()[0]})") from e
    chosen = {}
    for column, names in PARQUET_COLUMNS.items():
        found = [n for n in names if n in df.columns]
        if not found:
            raise StageError(f"{source.ratings}: required column {column!r} is missing "
                             f"(accepted names: {', '.join(names)}; found: {', '.join(df.columns)})")
        chosen[column] = F.col(found[0]).cast("string")
    rows, files = _positioned(spark, df.select(*[c.alias(k) for k, c in chosen.items()]))
    rows = rows.select(
        "file_idx", "block", "row", F.concat_ws(",", *[F.coalesce(F.col(k), F.lit("")) for k in chosen]).alias("raw"),
        *chosen, F.lit(4).alias("fields"))
    return rows, files


def read_movies(source: Source) -> pd.DataFrame:
    """item_id, title, year, genres ('|'-joined names); small enough for the driver at any MovieLens size."""
    if source.movies is None:
        return pd.DataFrame({"item_id": pd.Series(dtype="int64"), "title": pd.Series(dtype="object"),
                             "year": pd.Series(dtype="float64"), "genres": pd.Series(dtype="object")})
    fs, plain = filesystem(source.movies)
    if source.format == "parquet":
        with fs.open(plain, "rb") as f:
            movies = pd.read_parquet(f).rename(columns={"movieId": "item_id"})
    else:
        text = _decode(fs, plain)
        try:
            movies = _parse_movies(source.format, text)
        except (ValueError, IndexError, csv.Error) as e:
            raise StageError(f"{source.movies}: cannot parse the movie list ({e})") from e
    missing = {"item_id", "title", "genres"} - set(movies.columns)
    if missing:
        raise StageError(f"{source.movies}: required column(s) {sorted(missing)} missing")
    movies = movies[["item_id", "title", "genres"]].copy()
    movies["item_id"] = movies["item_id"].astype("int64")
    movies["genres"] = movies["genres"].fillna("").replace("(no genres listed)", "")
    movies["year"] = movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).astype("float64")
    return movies


def _decode(fs, plain: str) -> str:
    paths = sorted(p for p in fs.find(plain) if not os.path.basename(p).startswith(("_", "."))) \
        if fs.isdir(plain) else [plain]
    texts = []
    for p in paths:
        with fs.open(p, "rb") as f:
            data = f.read()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:  # ml-100k and ml-1m are latin-1
            texts.append(data.decode("latin-1"))
    return "\n".join(texts)


def _parse_movies(fmt: str, text: str) -> pd.DataFrame:
    lines = [line for line in text.splitlines() if line.strip()]
    if fmt == "ml-100k":
        rows = [line.split("|") for line in lines]
        return pd.DataFrame({
            "item_id": [int(r[0]) for r in rows], "title": [r[1] for r in rows],
            "genres": ["|".join(g for g, flag in zip(ML100K_GENRES, r[5:]) if flag.strip() == "1") for r in rows]})
    if fmt in ("ml-1m", "ml-10m"):
        rows = [line.split("::", 2) for line in lines]
        return pd.DataFrame({"item_id": [int(r[0]) for r in rows], "title": [r[1] for r in rows],
                             "genres": [r[2] for r in rows]})
    rows = [r for r in csv.reader(io.StringIO("\n".join(lines))) if r and r[0] != "movieId"]
    return pd.DataFrame({"item_id": [int(r[0]) for r in rows], "title": [r[1] for r in rows],
                         "genres": [r[2] for r in rows]})
