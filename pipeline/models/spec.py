"""What a model is, without torch: the kinds of model (the one list of their names and of what each can do) and
the typed spec a trained model is rebuilt from, stored in its manifest. The config reads the kinds from here, so
that `dmf --help` and a config error need no torch."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    dot_product: bool  # its rating is mean + biases + a user vector . an item vector: it can retrieve candidates
    softmax_head: bool  # an MLP over the pair, which the softmax over rating levels needs
    needs_hidden: bool  # an MLP of train.hidden's sizes
    same_dims: bool  # user_dim must equal item_dim


KINDS = {kind.name: kind for kind in (
    Kind("mf", dot_product=True, softmax_head=False, needs_hidden=False, same_dims=True),
    Kind("dmf", dot_product=False, softmax_head=True, needs_hidden=True, same_dims=False),
    Kind("neumf", dot_product=False, softmax_head=True, needs_hidden=True, same_dims=False),
    Kind("two_tower", dot_product=True, softmax_head=False, needs_hidden=True, same_dims=False),
)}
ModelName = Literal[tuple(KINDS)]
Head = Literal["regression", "softmax"]


def check_settings(model: str, user_dim: int, item_dim: int, hidden: list[int], head: str) -> None:
    """The rules between a model's settings, named by their train.* keys; ValueError for the first one broken.
    Both the config (before anything runs) and the spec (whatever built it) apply them."""
    kind = KINDS[model]
    if head == "softmax" and not kind.softmax_head:
        raise ValueError(f"{model} cannot use the softmax head (train.head): the softmax head needs an MLP over the "
                         f"pair: use {' or '.join(k.name for k in KINDS.values() if k.softmax_head)}")
    if kind.same_dims and user_dim != item_dim:
        raise ValueError(f"{model} takes a dot product, so train.user_dim ({user_dim}) must equal train.item_dim "
                         f"({item_dim})")
    if kind.needs_hidden and not hidden:
        raise ValueError(f"{model} needs at least one hidden layer size in train.hidden")


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class ModelSpec:
    """Everything a model is built from: its kind and sizes (from train.*) and what the data says (users, items,
    rating levels, mean, genres, how many ratings its item history holds)."""
    model: ModelName
    n_users: Positive
    n_items: Positive
    user_dim: Positive
    item_dim: Positive
    hidden: list[Positive]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    batch_norm: bool
    head: Head
    rating_levels: Annotated[list[float], Field(min_length=1)]
    global_mean: float
    n_genres: NonNegative
    max_genres: NonNegative
    item_history: NonNegative = 0  # training ratings the item history holds (0: none)
    ranking_dim: NonNegative = 0  # the ranking score's tables (0: none)
    # How much the rating head adds to the ranking score that orders the lists (base.RatingModel.add_ranking); 0, as
    # in a model trained before it existed: the plain ranking score.
    ranking_rating_weight: Annotated[float, Field(ge=0)] = 0.0

    def __post_init__(self):
        check_settings(self.model, self.user_dim, self.item_dim, self.hidden, self.head)
        levels = self.rating_levels
        if any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"rating_levels must be an increasing list, got {levels}")
        if self.head == "softmax" and len(levels) < 2:
            raise ValueError("the softmax head needs at least two rating levels")
        if self.n_genres and not self.max_genres:
            raise ValueError(f"max_genres must be positive when there are genres, got n_genres={self.n_genres}, "
                             f"max_genres={self.max_genres}")

    @property
    def kind(self) -> Kind:
        return KINDS[self.model]

    @classmethod
    def of(cls, values: dict) -> "ModelSpec":
        """The spec of a manifest's dict (or any mapping); ValueError naming each problem."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise ValueError("; ".join(_problem(err) for err in e.errors())) from None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _problem(error: dict) -> str:
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
