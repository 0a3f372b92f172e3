"""`dmf similar`: an item's nearest items by the cosine of the model's item vectors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import load_model, model_and_data, read_table
from pipeline.models.base import RatingModel
from pipeline.storage import StageError


def unit_item_vectors(model: RatingModel) -> torch.Tensor:
    """The model's item vectors scaled to length 1, in item_idx order: their dot products are cosines."""
    with torch.no_grad():
        return torch.nn.functional.normalize(model.item_vectors().float(), dim=1)


def similar(model_dir: str, item_id: int, n: int = 10, data_dir: str | None = None) -> pd.DataFrame:
    """The n items nearest to item_id by cosine similarity of the model's item vectors."""
    data_dir, data = model_and_data(model_dir, data_dir)
    items = read_table(data_dir, data, "items").sort_values("item_idx").reset_index(drop=True)
    match = items.index[items.item_id == item_id]
    if len(match) == 0:
        raise StageError(f"item {item_id} was not in training, so it has no embedding")
    vectors = unit_item_vectors(load_model(model_dir)[0])
    cosine = (vectors @ vectors[match[0]]).numpy()
    best = [j for j in np.argsort(-cosine, kind="stable") if j != match[0]][:n]
    return pd.DataFrame({"item_id": items.item_id[best].to_numpy(), "title": items.title[best].to_numpy(),
                         "cosine": cosine[best]})
