"""What every model shares: the rating head's plumbing (loss, predictions, scores over the catalog, the fallback for
unknown users and items), the item side features, and the ranking score's tables.

Item side features, for every model: genres (the mean of the item's genre embeddings) and the item's rating
history (`spec.item_history`: the number of training ratings it holds, 0 for none). The history adds to item
i's vector the sum over the users u who rated it (up to a seeded sample of train.history_size) of a learned
vector for (u, the level u gave), divided by the square root of their number: GC-MC's per-rating-level encoder,
the item side of an asymmetric factor model. So an item is also described by who rated it and how. Training
leaves the rating being predicted out of its item's sum, so that the model learns what it will see at
prediction time, when the rating to predict is not among the training ratings.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.history import level_index
from pipeline.models.spec import ModelSpec

RANKING_TABLES = ("ranking_user", "ranking_item")


class Side(NamedTuple):
    """One side of a batch of pairs as a model's layers meet it: the indices, their vectors, and (NeuMF) the
    vectors of the generalized matrix factorization branch."""
    ids: torch.Tensor
    vectors: torch.Tensor
    gmf: torch.Tensor | None = None


def embedding(n: int, dim: int, std: float = 0.1) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=std)
    return table


def bias(n: int) -> nn.Embedding:
    table = nn.Embedding(n, 1)
    nn.init.zeros_(table.weight)
    return table


class RatingModel(nn.Module):
    """Shared plumbing. A kind defines its sides and how they meet: `_users(users)` and `_items(items)` give a
    Side, `_pair(u, i)` [B] or [B, L] for pairs, `_grid(u, i)` [B, M] or [B, M, L] for every user x item (L the
    rating levels, for the softmax head)."""

    def __init__(self, spec: ModelSpec, item_genres: torch.Tensor | None, item_history: tuple | None):
        super().__init__()
        self.softmax = spec.head == "softmax"
        self.register_buffer("levels", torch.tensor([float(x) for x in spec.rating_levels]))
        self.register_buffer("global_mean", torch.tensor(float(spec.global_mean)))
        self.genre_bag = self._genres(spec, item_genres)
        self.rater_bag = self._history(spec, item_history)
        self.user_bias = self.item_bias = None
        self.ranking_user = self.ranking_item = None

    def _genres(self, spec: ModelSpec, item_genres: torch.Tensor | None) -> nn.EmbeddingBag | None:
        if not spec.n_genres:
            if item_genres is not None:
                raise ValueError("item_genres given, but the spec has n_genres = 0")
            return None
        if item_genres is None:  # load_state_dict fills it
            item_genres = torch.full((spec.n_items, spec.max_genres), spec.n_genres, dtype=torch.long)
        item_genres = torch.as_tensor(item_genres, dtype=torch.long)
        if item_genres.shape != (spec.n_items, spec.max_genres):
            raise ValueError(f"item_genres has shape {tuple(item_genres.shape)}, the spec says "
                             f"({spec.n_items}, {spec.max_genres})")
        self.register_buffer("item_genres", item_genres.clone())
        bag = nn.EmbeddingBag(spec.n_genres + 1, spec.item_dim, mode="mean", padding_idx=spec.n_genres)
        nn.init.normal_(bag.weight, std=0.1)
        with torch.no_grad():
            bag.weight[spec.n_genres].zero_()
        return bag

    def _history(self, spec: ModelSpec, item_history: tuple | None) -> nn.EmbeddingBag | None:
        if not spec.item_history:
            if item_history is not None:
                raise ValueError("item_history given, but the spec has item_history = 0")
            return None
        if item_history is None:  # load_state_dict fills it
            item_history = (torch.zeros(spec.n_items + 1, dtype=torch.long),
                            torch.zeros(spec.item_history, dtype=torch.long))
        offsets, raters = item_history
        if offsets.shape != (spec.n_items + 1,) or raters.shape != (spec.item_history,):
            raise ValueError(f"item_history holds {len(raters)} ratings of {len(offsets) - 1} items, the spec "
                             f"says {spec.item_history} of {spec.n_items}")
        self.register_buffer("history_offsets", offsets.clone())
        self.register_buffer("history_raters", raters.clone())
        # Zero at first: the model starts as the plain one and grows the history term as it helps.
        bag = nn.EmbeddingBag(spec.n_users * len(self.levels), spec.item_dim, mode="sum")
        nn.init.zeros_(bag.weight)
        return bag

    def add_ranking(self, spec: ModelSpec) -> None:
        """The ranking score's own tables (none for dim 0): pipeline.training.ranking trains x_u . y_i to say which
        unseen items a user picks, apart from the rating head, which keeps predicting ratings. The lists are ordered
        by x_u . y_i + rating_weight x (unclipped predicted rating - global mean) / (top - bottom of the scale): of
        the items a user would pick, those they would rate higher come first."""
        self.ranking_rating_weight = 0.0
        if spec.ranking_dim:
            dim = spec.ranking_dim
            self.ranking_user, self.ranking_item = embedding(spec.n_users, dim), embedding(spec.n_items, dim)
            # From the spec, not the levels buffer, which has no values when the model is built on the meta device.
            levels = spec.rating_levels
            scale = levels[-1] - levels[0] if len(levels) > 1 else 1.0
            self.ranking_rating_weight = spec.ranking_rating_weight / scale  # per rating point

    def ranking_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(user vectors, item vectors transposed) whose product is the ranking score; None without one. The rating
        head of a dot-product model rides along as extra columns; for the others `ranking_rating_term` adds it."""
        if self.ranking_user is None:
            return None
        with torch.no_grad():
            users, items = self.ranking_user.weight, self.ranking_item.weight
            if self.ranking_rating_weight and self.kind.dot_product:
                rating_users, rating_items = self.rating_factors()
                users = torch.cat([users, self.ranking_rating_weight * rating_users], dim=1)
                items = torch.cat([items, rating_items], dim=1)
            return users.detach().contiguous(), items.T.detach().contiguous()

    def ranking_rating_term(self, users: torch.Tensor) -> torch.Tensor | None:
        """[B, n_items]: what `ranking_factors` leave out of the users' ranking scores, the weighted rating head of a
        model whose rating is no dot product; None where the factors hold the whole score."""
        if self.ranking_user is None or not self.ranking_rating_weight or self.kind.dot_product:
            return None
        with torch.no_grad():
            items = torch.arange(self.ranking_item.num_embeddings, device=users.device)
            return self.ranking_rating_weight * (self.score_all(users, items, clip=False) - self.global_mean)

    def ranking_state(self) -> dict[str, torch.Tensor]:
        """A copy of the ranking score's tables, as state_dict entries ({} without one)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.split(".")[0] in RANKING_TABLES}

    def item_embedding_of(self, table: nn.Embedding, items: torch.Tensor, leave_out=None) -> torch.Tensor:
        """Rows of an item table, plus the mean of the items' genre embeddings and their rating history when
        the model has them. `leave_out` = (users, ratings, in_history) of the pairs being trained on: their
        own ratings, where their items' histories hold them, are taken out."""
        e = table(items)
        if self.genre_bag is not None:
            e = e + self.genre_bag(self.item_genres[items])
        if self.rater_bag is not None:
            e = e + self.history_of(items, leave_out)
        return e

    def history_of(self, items: torch.Tensor, leave_out=None) -> torch.Tensor:
        """The items' rater vectors summed and divided by sqrt(n_i), computed once per distinct item."""
        distinct, inverse = torch.unique(items, return_inverse=True)
        starts = self.history_offsets[distinct]
        lengths = self.history_offsets[distinct + 1] - starts
        bag_starts = torch.cumsum(lengths, 0) - lengths
        at = torch.repeat_interleave(starts - bag_starts, lengths) + torch.arange(int(lengths.sum()),
                                                                                  device=items.device)
        history = self.rater_bag(self.history_raters[at], bag_starts)[inverse]
        if leave_out is not None:
            users, ratings, in_history = leave_out
            own = F.embedding(users * len(self.levels) + self.level_index(ratings), self.rater_bag.weight)
            history = history - own * in_history[:, None].to(own.dtype)
        return history / lengths[inverse].clamp(min=1).to(history.dtype).sqrt()[:, None]

    def biases(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """global mean + b_u + b_i, [B] for pairs; [B, M] when users is [B, 1] and items [1, M]."""
        return self.global_mean + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1)

    def tables(self) -> tuple[list[nn.Embedding], list[nn.Embedding]]:
        """(user-side tables, item-side tables) that the batch-wise L2 applies to, biases apart."""
        return [self.user_embedding], [self.item_embedding]

    def indexed_tables(self) -> tuple[list[nn.Embedding], list[nn.Embedding]]:
        """(every table looked up by user index, every table looked up by item index): the rating tables, their
        biases and the ranking score's."""
        users, items = self.tables()
        for side, table in ((users, self.user_bias), (items, self.item_bias), (users, self.ranking_user),
                            (items, self.ranking_item)):
            if table is not None:
                side.append(table)
        return users, items

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Unclipped ratings [B] (regression) or logits over the rating levels [B, L] (softmax)."""
        return self._pair(self._users(users), self._items(items))

    def loss(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
             in_history: torch.Tensor | None = None, l2: float = 0.0, bias_l2: float = 0.0) -> torch.Tensor:
        """Training loss on (user, item, rating) triples; `in_history` tells which of them the item history
        holds (by default all, as when every training rating is in it). Plus the mean over the batch of l2 x
        the squared norms of the embedding rows the batch uses and bias_l2 x their squared biases: rows are
        penalised as often as they are used, as in SGD on MF."""
        if in_history is None:
            in_history = torch.ones_like(users, dtype=torch.bool)
        tables = [table for side in self.tables() for table in side]
        biases = [self.user_bias, self.item_bias] if self.user_bias is not None else []
        # The penalty reuses the rows the forward pass looked up: a second lookup would cost its own backward
        # and, under sparse gradients, double the rows that the ranks exchange and the optimizer applies.
        rows = {}

        def keep(table, args, out):
            rows.setdefault(table, out)  # returns None, so the output stays the table's own

        hooks = [t.register_forward_hook(keep) for t in [*tables, *biases]] if l2 or bias_l2 else []
        try:
            out = self._pair(self._users(users), self._items(items, leave_out=(users, ratings, in_history)))
        finally:
            for hook in hooks:
                hook.remove()
        if self.softmax:
            fit = F.cross_entropy(out, self.level_index(ratings))
        else:
            fit = F.mse_loss(out, ratings.to(out.dtype))
        if not (l2 or bias_l2):
            return fit
        penalty = l2 * sum(rows[t].pow(2).sum(-1) for t in tables)
        if biases:
            penalty = penalty + bias_l2 * sum(rows[t].squeeze(-1).pow(2) for t in biases)
        return fit + penalty.mean()

    def level_index(self, ratings: torch.Tensor) -> torch.Tensor:
        return level_index(ratings, self.levels)

    def expected(self, out: torch.Tensor) -> torch.Tensor:
        """Model output -> expected rating, unclipped: the score to rank by, since clipping ties the top."""
        return torch.softmax(out, dim=-1) @ self.levels if self.softmax else out

    def rating(self, out: torch.Tensor) -> torch.Tensor:
        """Model output -> expected rating, clipped to the level range."""
        return self.expected(out).clamp(self.levels[0], self.levels[-1])

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.rating(self(users, items))

    def predict_or_fallback(self, users: torch.Tensor, items: torch.Tensor, user_known: torch.Tensor,
                            item_known: torch.Tensor) -> torch.Tensor:
        """The predicted rating of each pair whose user and item are both known; the others get the fallback:
        global mean + the bias of whichever side is known (a model without biases: the mean), clipped to the
        scale. The indices of an unknown side are not read."""
        u, i = torch.where(user_known, users, 0), torch.where(item_known, items, 0)
        out = self.global_mean.expand(len(u)).clone()
        for table, idx, known in ((self.user_bias, u, user_known), (self.item_bias, i, item_known)):
            if table is not None:  # dmf and neumf with the softmax head have no biases
                out += table(idx)[:, 0] * known
        out = out.clamp(self.levels[0], self.levels[-1])
        both = user_known & item_known
        if both.any():
            out[both] = self.predict(u[both], i[both])
        return out

    def score_all(self, users: torch.Tensor, items: torch.Tensor, item_chunk: int = 2048,
                  clip: bool = True) -> torch.Tensor:
        """Predicted ratings [B, M] for every user x item (unclipped with clip=False, to rank by); peak memory
        grows with B x item_chunk x width."""
        u = self._users(users)
        to_rating = self.rating if clip else self.expected
        scores = [to_rating(self._grid(u, self._items(items[s:s + item_chunk])))
                  for s in range(0, len(items), item_chunk)]
        return torch.cat(scores, dim=1) if scores else self.levels.new_zeros((len(users), 0))

    def user_vectors(self) -> torch.Tensor:
        return self.user_embedding.weight

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding_of(self.item_embedding, torch.arange(self.item_embedding.num_embeddings,
                                                                        device=self.levels.device))
