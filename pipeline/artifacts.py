"""What the stages hand each other, read and written in one place: a prepared data set's tables, a trained model
and its manifest, torch files through fsspec."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipeline import kernels, storage
from pipeline.models import registry
from pipeline.models.base import RatingModel
from pipeline.models.spec import ModelSpec
from pipeline.scoring.topk import by_user
from pipeline.storage import StageError

if TYPE_CHECKING:  # the ranks load and save through this module, and the training loop never imports Spark
    from pyspark.sql import DataFrame, SparkSession


def save(obj, path: str) -> None:
    """torch.save through fsspec (storage.replace_file: never half a file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.replace_file(path, buffer.getvalue())


def load(path: str):
    """torch.load (weights only) through fsspec; None where the file does not exist."""
    fs, plain = storage.filesystem(path)
    if not fs.exists(plain):
        return None
    with fs.open(plain, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def read_table(data_dir: str, data: dict, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One table of a prepared data set (train, valid, users, items), on the driver; `data` is its manifest."""
    fs, plain = storage.filesystem(f"{data_dir.rstrip('/')}/{data['paths'][name]}")
    return pd.read_parquet(plain, filesystem=fs, columns=columns)


def spark_table(spark: SparkSession, data_dir: str, data: dict, name: str) -> DataFrame:
    """One table of a prepared data set as a Spark DataFrame."""
    return spark.read.parquet(f"{data_dir.rstrip('/')}/{data['paths'][name]}")


def seen_items(data_dir: str, data: dict, splits: tuple[str, ...],
               in_order_rated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The item_idx each user rated in the given splits, as `topk.by_user` returns them; with `in_order_rated`,
    each user's by timestamp, then item, so that the last ones are the user's latest (topk.recent_queries).

    Read on the driver and broadcast to the scoring tasks (8 bytes a rating: 160 MB for ML-20M): a Spark
    groupBy into lists, shuffled to the tasks, took longer than the scoring itself."""
    columns = ["user_idx", "item_idx", *(["timestamp"] if in_order_rated else [])]
    frames = [read_table(data_dir, data, split, columns=columns) for split in splits]
    users, items, *times = (np.concatenate([f[c].to_numpy() for f in frames]) for c in columns)
    if not in_order_rated:
        return by_user(users, items, data["counts"]["users"])
    offsets, at = by_user(users, np.arange(len(users)), data["counts"]["users"])
    items = items[at].astype(np.int32)
    kernels.compiled().order_runs(offsets, times[0][at], items)
    return offsets, items


def load_model(model_dir: str) -> tuple[RatingModel, dict]:
    """The trained model in eval mode and its manifest."""
    manifest = storage.read_manifest(model_dir, "train")
    model = registry.build(ModelSpec.of(manifest["spec"]))
    model.load_state_dict(load(f"{model_dir.rstrip('/')}/model.pt"))
    return model.eval(), manifest


def model_and_data(model_dir: str, data_dir: str | None) -> tuple[str, dict]:
    """The prepared data a model was trained on (its own record unless data_dir is given), checked unchanged."""
    model_manifest = storage.read_manifest(model_dir, "train")
    data_dir = data_dir or model_manifest["data"]["path"]
    data = storage.read_manifest(data_dir, "prepare")
    trained_on = model_manifest["data"]
    if data["created_at"] != trained_on["created_at"]:
        if storage.url(data_dir) == storage.url(trained_on["path"]):
            raise StageError(f"{model_dir} was trained on the {data_dir} written at {trained_on['created_at']}, "
                             f"which has since been rewritten ({data['created_at']}): train again")
        raise StageError(f"{model_dir} was trained on {trained_on['path']} (written at {trained_on['created_at']}), "
                         f"not on {data_dir} (written at {data['created_at']}): give the data it was trained on, "
                         f"or train on {data_dir}")
    return data_dir, data
