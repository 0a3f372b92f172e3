"""The model of each kind, and building one from its spec."""
from __future__ import annotations

import torch

from pipeline.models.base import RatingModel
from pipeline.models.deep import DMF, NeuMF
from pipeline.models.mf import MF
from pipeline.models.spec import KINDS, ModelSpec
from pipeline.models.two_tower import TwoTower

CLASSES: dict[str, type[RatingModel]] = {cls.kind.name: cls for cls in (MF, DMF, NeuMF, TwoTower)}
assert CLASSES.keys() == KINDS.keys(), "every kind in pipeline.models.spec.KINDS needs its class here"


def build(spec: ModelSpec, item_genres: torch.Tensor | None = None,
          item_history: tuple[torch.Tensor, ...] | None = None) -> RatingModel:
    """The model a spec describes, freshly initialised (from the torch RNG). `item_history` is (offsets, raters) of
    history.rating_history for the training ratings; without it, load_state_dict fills it."""
    model = CLASSES[spec.model](spec, item_genres, item_history)
    # After the rating tables, so that those start as they would in a model without a ranking score.
    model.add_ranking(spec)
    return model
