"""Rating models: mf, dmf, neumf and two_tower behind one interface.

A model is rebuilt from its `spec` (a plain dict stored in the model manifest) and then loaded from a
state_dict.

Item side features, for every model: genres (the mean of the item's genre embeddings) and the item's
rating history (`spec["item_history"]`: the number of training ratings it holds, 0 for none). The history
adds to item i's vector the sum over the users u who rated it (up to a seeded sample of train.history_size)
of a learned vector for (u, the level u gave), divided by the square root of their number: GC-MC's
per-rating-level encoder, the item side of an asymmetric factor model. So an item is also described by who
rated it and how. Training leaves the rating being predicted out of its item's sum, so that the model learns
what it will see at prediction time, when the rating to predict is not among the training ratings.

A model built with spec["ranking_dim"] > 0 also carries a ranking score, x_u . y_i from tables of its own
(pipeline.ranking trains them), that orders the top-N; the rating head above still predicts ratings.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import kernels

MODELS = ("mf", "dmf", "neumf", "two_tower")
HEADS = ("regression", "softmax")
SPEC_KEYS = ("model", "n_users", "n_items", "user_dim", "item_dim", "hidden", "dropout", "batch_norm", "head",
             "rating_levels", "global_mean", "n_genres", "max_genres")


def check_spec(spec: dict) -> None:
    """Raise ValueError naming the first problem with a model spec."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}")
    model, head, hidden = spec["model"], spec["head"], list(spec["hidden"])
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: expected one of {', '.join(HEADS)}")
    for key in ("n_users", "n_items", "user_dim", "item_dim"):
        if int(spec[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {spec[key]}")
    if any(int(h) <= 0 for h in hidden):
        raise ValueError(f"hidden layer sizes must be positive, got {hidden}")
    if not 0 <= float(spec["dropout"]) < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {spec['dropout']}")
    levels = [float(x) for x in spec["rating_levels"]]
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"rating_levels must be a non-empty increasing list, got {levels}")
    if int(spec.get("ranking_dim", 0)) < 0:
        raise ValueError(f"ranking_dim must be >= 0, got {spec['ranking_dim']}")
    if int(spec.get("item_history", 0)) < 0:
        raise ValueError(f"item_history must be >= 0, got {spec['item_history']}")
    if int(spec["n_genres"]) < 0 or (int(spec["n_genres"]) > 0 and int(spec["max_genres"]) <= 0):
        raise ValueError(f"n_genres must be >= 0 and max_genres positive when there are genres, "
                         f"got n_genres={spec['n_genres']}, max_genres={spec['max_genres']}")
    if head == "softmax" and model in ("mf", "two_tower"):
        raise ValueError(f"{model} cannot use the softmax head: softmax head needs an MLP over the pair: "
                         f"use dmf or neumf")
    if head == "softmax" and len(levels) < 2:
        raise ValueError("the softmax head needs at least two rating levels")
    if model == "mf" and int(spec["user_dim"]) != int(spec["item_dim"]):
        raise ValueError(f"mf takes a dot product, so user_dim ({spec['user_dim']}) must equal "
                         f"item_dim ({spec['item_dim']})")
    if model != "mf" and not hidden:
        raise ValueError(f"{model} needs at least one hidden layer size in hidden")


def build(spec: dict, item_genres: torch.Tensor | None = None,
          item_history: tuple[torch.Tensor, ...] | None = None) -> "RatingModel":
    """The model a spec describes, freshly initialised (from the torch RNG). `item_history` is what
    `rating_history` returns for the training ratings; without it, load_state_dict fills it."""
    check_spec(spec)
    cls = {"mf": MF, "dmf": DMF, "neumf": NeuMF, "two_tower": TwoTower}[spec["model"]]
    model = cls(spec, item_genres, item_history)
    # After the rating tables, so that those start as they would in a model without a ranking score.
    model.add_ranking(int(spec.get("ranking_dim", 0)), int(spec["n_users"]), int(spec["n_items"]))
    return model


def level_index(ratings: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest rating level (a tie goes to the lower level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(ratings.to(levels.dtype), midpoints)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash to 31 bits (the xor-shift-multiply rounds of a finalizer), in int64 without overflow."""
    x = x & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    return x ^ (x >> 15)


def rating_history(users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, n_items: int,
                   levels: list[float], limit: int = 0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets [n_items + 1], raters, kept): item i's raters are raters[offsets[i]:offsets[i + 1]], each user
    u who gave level l written as u * len(levels) + l; kept[row] tells whether input row `row` is among them.
    With `limit` > 0 an item keeps at most that many raters, a sample drawn by a seeded hash of (user, item):
    the same ratings in any order, on any number of ranks, give the same history."""
    users, items = users.long().cpu(), items.long().cpu()
    raters = users * len(levels) + level_index(ratings.cpu(), torch.tensor([float(x) for x in levels]))
    draw = _mix(_mix(items + _mix(torch.tensor(seed))) + users)
    order = torch.arange(len(items))
    for key in (raters, draw, items):  # by item, then draw, then rater: a stable sort per key, last key first
        order = order[torch.argsort(key[order], stable=True)]
    counts = torch.bincount(items, minlength=n_items)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.empty_like(order)
    place[order] = torch.arange(len(order))
    kept = (place - starts[items] < limit) if limit > 0 else torch.ones(len(items), dtype=torch.bool)
    kept_counts = counts.clamp(max=limit) if limit > 0 else counts
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(kept_counts, 0)])
    chosen = order[kept[order]]
    return offsets, raters[chosen], kept


def mlp(sizes: list[int], dropout: float, batch_norm: bool, last_activation: bool = True) -> nn.Sequential:
    """Linear -> (BatchNorm1d) -> ReLU -> Dropout for each size after the first."""
    layers = []
    for n, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or n < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def embedding(n: int, dim: int, std: float = 0.1) -> nn.Embedding:
    table = nn.Embedding(n, dim)
    nn.init.normal_(table.weight, std=std)
    return table


def bias(n: int) -> nn.Embedding:
    table = nn.Embedding(n, 1)
    nn.init.zeros_(table.weight)
    return table


class RatingModel(nn.Module):
    """Shared plumbing. Subclasses define the user side, the item side, and how they meet per pair and
    on a grid: `_users(u)` and `_items(i)` return tuples, `_pair` gives [B] or [B, L], `_grid` [B, M] or
    [B, M, L] (L the number of rating levels, for the softmax head)."""

    def __init__(self, spec: dict, item_genres: torch.Tensor | None, item_history: tuple | None):
        super().__init__()
        self.softmax = spec["head"] == "softmax"
        self.register_buffer("levels", torch.tensor([float(x) for x in spec["rating_levels"]]))
        self.register_buffer("global_mean", torch.tensor(float(spec["global_mean"])))
        n_items, n_genres, max_genres = int(spec["n_items"]), int(spec["n_genres"]), int(spec["max_genres"])
        self.genre_bag = None
        if n_genres > 0:
            if item_genres is None:  # load_state_dict fills it
                item_genres = torch.full((n_items, max_genres), n_genres, dtype=torch.long)
            item_genres = torch.as_tensor(item_genres, dtype=torch.long)
            if item_genres.shape != (n_items, max_genres):
                raise ValueError(f"item_genres has shape {tuple(item_genres.shape)}, the spec says "
                                 f"({n_items}, {max_genres})")
            self.register_buffer("item_genres", item_genres.clone())
            self.genre_bag = nn.EmbeddingBag(n_genres + 1, int(spec["item_dim"]), mode="mean",
                                             padding_idx=n_genres)
            nn.init.normal_(self.genre_bag.weight, std=0.1)
            with torch.no_grad():
                self.genre_bag.weight[n_genres].zero_()
        elif item_genres is not None:
            raise ValueError("item_genres given, but the spec has n_genres = 0")
        self.rater_bag = None
        n_history = int(spec.get("item_history", 0))
        if n_history:
            if item_history is None:  # load_state_dict fills it
                item_history = (torch.zeros(n_items + 1, dtype=torch.long), torch.zeros(n_history, dtype=torch.long))
            offsets, raters = item_history
            if offsets.shape != (n_items + 1,) or raters.shape != (n_history,):
                raise ValueError(f"item_history holds {len(raters)} ratings of {len(offsets) - 1} items, the spec "
                                 f"says {n_history} of {n_items}")
            self.register_buffer("history_offsets", offsets.clone())
            self.register_buffer("history_raters", raters.clone())
            # Zero at first: the model starts as the plain one and grows the history term as it helps.
            self.rater_bag = nn.EmbeddingBag(int(spec["n_users"]) * len(self.levels), int(spec["item_dim"]),
                                             mode="sum")
            nn.init.zeros_(self.rater_bag.weight)
        elif item_history is not None:
            raise ValueError("item_history given, but the spec has item_history = 0")
        self.user_bias = self.item_bias = None
        self.ranking_user = self.ranking_item = None

    def add_ranking(self, dim: int, n_users: int, n_items: int) -> None:
        """The ranking score's own tables (none for dim 0): pipeline.ranking trains x_u . y_i to say which unseen
        items a user picks, apart from the rating head, which keeps predicting ratings."""
        if dim:
            self.ranking_user, self.ranking_item = embedding(n_users, dim), embedding(n_items, dim)

    def ranking_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(user vectors, item vectors transposed) whose product is the ranking score; None without one."""
        if self.ranking_user is None:
            return None
        return self.ranking_user.weight.detach().contiguous(), self.ranking_item.weight.detach().T.contiguous()

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


class MF(RatingModel):
    """global mean + b_u + b_i + <p_u, q_i>."""

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        dim = int(spec["user_dim"])
        # std 0.1 keeps the initial dot products near 0 while leaving Adam a gradient to grow them from.
        self.user_embedding = embedding(int(spec["n_users"]), dim)
        self.item_embedding = embedding(int(spec["n_items"]), dim)
        self.user_bias, self.item_bias = bias(int(spec["n_users"])), bias(int(spec["n_items"]))

    def _users(self, users):
        return self.user_embedding(users), users

    def _items(self, items, leave_out=None):
        return self.item_embedding_of(self.item_embedding, items, leave_out), items

    def _pair(self, u, i):
        return self.biases(u[1], i[1]) + (u[0] * i[0]).sum(-1)

    def _grid(self, u, i):
        return self.biases(u[1][:, None], i[1][None, :]) + u[0] @ i[0].T

    def loss(self, users, items, ratings, in_history=None, l2=0.0, bias_l2=0.0):
        """RatingModel.loss; with sparse gradients on the CPU and no item side features, computed by the compiled
        kernels of MFPairs: the same loss and gradients, in a third of the time at 138K x 27K."""
        tables = (self.user_embedding, self.item_embedding)
        if not (all(t.sparse and t.weight.device.type == "cpu" for t in tables)
                and self.genre_bag is None and self.rater_bag is None):
            return super().loss(users, items, ratings, in_history, l2, bias_l2)
        scores, row_norms, bias_norms = MFPairs.apply(self.user_embedding.weight, self.item_embedding.weight,
                                                      self.user_bias.weight, self.item_bias.weight, users, items)
        fit = F.mse_loss(self.global_mean + scores, ratings.to(scores.dtype))
        return fit + (l2 * row_norms + bias_l2 * bias_norms).mean() if l2 or bias_l2 else fit


class MFPairs(torch.autograd.Function):
    """(<p_u, q_i> + b_u + b_i, |p_u|^2 + |q_i|^2, b_u^2 + b_i^2) for each pair, from the whole tables, in one
    compiled pass forward and one backward. The tables' gradients come out as torch's sparse embedding backward
    gives them (a row per pair), the biases' dense. torch took a dozen passes over [batch, dim] temporaries."""

    @staticmethod
    def forward(ctx, user_rows, item_rows, user_bias, item_bias, users, items):
        outputs = [user_rows.new_empty(len(users)) for _ in range(3)]
        kernels.compiled().mf_scores(*(t.detach().numpy() for t in (user_rows, item_rows, user_bias, item_bias,
                                                                    users, items, *outputs)))
        ctx.save_for_backward(user_rows, item_rows, user_bias, item_bias, users, items)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, d_scores, d_row_norms, d_bias_norms):
        user_rows, item_rows, user_bias, item_bias, users, items = ctx.saved_tensors
        d_user_rows = user_rows.new_empty(len(users), user_rows.shape[1])
        d_item_rows = item_rows.new_empty(len(items), item_rows.shape[1])
        d_user_bias, d_item_bias = torch.zeros_like(user_bias), torch.zeros_like(item_bias)
        kernels.compiled().mf_gradients(*(t.detach().contiguous().numpy() for t in (
            user_rows, item_rows, user_bias, item_bias, users, items, d_scores, d_row_norms, d_bias_norms,
            d_user_rows, d_item_rows, d_user_bias, d_item_bias)))
        return (torch.sparse_coo_tensor(users[None], d_user_rows, user_rows.shape, check_invariants=False),
                torch.sparse_coo_tensor(items[None], d_item_rows, item_rows.shape, check_invariants=False),
                d_user_bias, d_item_bias, None, None)


class DMF(RatingModel):
    """An MLP over [e_u, e_i]; regression predicts a residual around global mean + b_u + b_i."""

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        n_users, n_items = int(spec["n_users"]), int(spec["n_items"])
        self.user_embedding = embedding(n_users, int(spec["user_dim"]))
        self.item_embedding = embedding(n_items, int(spec["item_dim"]))
        hidden = [int(h) for h in spec["hidden"]]
        self.mlp = mlp([int(spec["user_dim"]) + int(spec["item_dim"]), *hidden], float(spec["dropout"]),
                       bool(spec["batch_norm"]))
        self.head = nn.Linear(hidden[-1], len(self.levels) if self.softmax else 1)
        if not self.softmax:
            self.user_bias, self.item_bias = bias(n_users), bias(n_items)

    def _users(self, users):
        return self.user_embedding(users), users

    def _items(self, items, leave_out=None):
        return self.item_embedding_of(self.item_embedding, items, leave_out), items

    def _output(self, h, users, items):
        out = self.head(h)
        return out if self.softmax else out.squeeze(-1) + self.biases(users, items)

    def _pair(self, u, i):
        return self._output(self.mlp(torch.cat([u[0], i[0]], dim=-1)), u[1], i[1])

    def _grid(self, u, i):
        h = split_first_layer(self.mlp, u[0], i[0])
        return self._output(h, u[1][:, None], i[1][None, :])


def split_first_layer(net: nn.Sequential, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """net(cat(user, item)) for every user x item, [B, M, H]: the first Linear is W_u e_u + W_i e_i + b,
    each half computed once per user or item, and only the rest of the net runs per pair."""
    first = net[0]
    d = user.shape[-1]
    a = F.linear(user, first.weight[:, :d], first.bias)
    c = F.linear(item, first.weight[:, d:])
    z = (a[:, None, :] + c[None, :, :]).reshape(-1, a.shape[-1])
    h = net[1:](z)  # batch norm in eval mode is per feature, so it is fine on the flattened grid
    return h.reshape(len(user), len(item), -1)


class NeuMF(RatingModel):
    """He et al. (2017): GMF (e_u * e_i, own embeddings of item_dim) beside an MLP over [e_u, e_i],
    one output layer over both."""

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        n_users, n_items = int(spec["n_users"]), int(spec["n_items"])
        user_dim, item_dim = int(spec["user_dim"]), int(spec["item_dim"])
        self.gmf_user = embedding(n_users, item_dim)
        self.gmf_item = embedding(n_items, item_dim)
        self.user_embedding = embedding(n_users, user_dim)
        self.item_embedding = embedding(n_items, item_dim)
        hidden = [int(h) for h in spec["hidden"]]
        self.mlp = mlp([user_dim + item_dim, *hidden], float(spec["dropout"]), bool(spec["batch_norm"]))
        self.head = nn.Linear(item_dim + hidden[-1], len(self.levels) if self.softmax else 1)
        if not self.softmax:
            self.user_bias, self.item_bias = bias(n_users), bias(n_items)

    def _users(self, users):
        return self.gmf_user(users), self.user_embedding(users), users

    def _items(self, items, leave_out=None):
        return (self.item_embedding_of(self.gmf_item, items, leave_out),
                self.item_embedding_of(self.item_embedding, items, leave_out), items)

    def _pair(self, u, i):
        out = self.head(torch.cat([u[0] * i[0], self.mlp(torch.cat([u[1], i[1]], dim=-1))], dim=-1))
        return out if self.softmax else out.squeeze(-1) + self.biases(u[2], i[2])

    def _grid(self, u, i):
        g = u[0].shape[-1]
        w_gmf, w_mlp = self.head.weight[:, :g], self.head.weight[:, g:]
        # W_gmf (e_u * e_i) for every pair and output: (e_u * w) . e_i, a matrix product per output.
        gmf = torch.einsum("bd,ld,md->bml", u[0], w_gmf, i[0])
        out = gmf + F.linear(split_first_layer(self.mlp, u[1], i[1]), w_mlp, self.head.bias)
        return out if self.softmax else out.squeeze(-1) + self.biases(u[2][:, None], i[2][None, :])

    def tables(self):
        user, item = super().tables()
        return [self.gmf_user, *user], [self.gmf_item, *item]

    def user_vectors(self):
        return torch.cat([self.gmf_user.weight, self.user_embedding.weight], dim=1)

    def item_vectors(self):
        items = torch.arange(self.item_embedding.num_embeddings, device=self.levels.device)
        return torch.cat([self.item_embedding_of(self.gmf_item, items),
                          self.item_embedding_of(self.item_embedding, items)], dim=1)


class TwoTower(RatingModel):
    """global mean + b_u + b_i + <user tower(e_u), item tower(e_i)>; the towers end without activation."""

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        n_users, n_items = int(spec["n_users"]), int(spec["n_items"])
        user_dim, item_dim = int(spec["user_dim"]), int(spec["item_dim"])
        hidden, dropout, bn = [int(h) for h in spec["hidden"]], float(spec["dropout"]), bool(spec["batch_norm"])
        self.user_embedding = embedding(n_users, user_dim)
        self.item_embedding = embedding(n_items, item_dim)
        self.user_tower = mlp([user_dim, *hidden], dropout, bn, last_activation=False)
        self.item_tower = mlp([item_dim, *hidden], dropout, bn, last_activation=False)
        self.user_bias, self.item_bias = bias(n_users), bias(n_items)

    def _users(self, users):
        return self.user_tower(self.user_embedding(users)), users

    def _items(self, items, leave_out=None):
        return self.item_tower(self.item_embedding_of(self.item_embedding, items, leave_out)), items

    def _pair(self, u, i):
        return self.biases(u[1], i[1]) + (u[0] * i[0]).sum(-1)

    def _grid(self, u, i):
        return self.biases(u[1][:, None], i[1][None, :]) + u[0] @ i[0].T

    def user_vectors(self):
        return self.user_tower(self.user_embedding.weight)

    def item_vectors(self):
        return self.item_tower(super().item_vectors())
