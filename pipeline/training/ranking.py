"""The ranking objective: which unseen items a user would pick, learnt by the same ranks beside the ratings.

A model built with `ranking_dim` > 0 has a second pair of tables, x_u and y_i, whose dot product s_ui is its
ranking score (recommend orders the top-N by it). They are trained with the implicit-ALS loss over every
user x item pair (Hu, Koren and Volinsky 2008; Rendle et al. 2022, "Revisiting the performance of iALS"):

    sum over picks c_ui (s_ui - 1)^2  +  sum over every other pair w_i s_ui^2  +  l2 sum over rows n^e |row|^2

A pick's weight c_ui is 1 + confidence x its rating / the top of the scale (Hu et al.'s confidence; Spark's
implicitPrefs takes alpha x rating); an unpicked pair's w_i is a0, or a0 on average growing or shrinking with
the item's popularity (eALS); a row's L2 grows with its n training ratings for e = 1 (Spark ALS's
regularization) and is the same for every row for e = 0. No negative is sampled: the sum over every pair is
sum_u x_u^T (Y^T W Y) x_u = sum_i w_i y_i^T (X^T X) y_i, which the Gram matrices of the two tables
give in O(d^2) a row. A batch row (u, i) charges x_u and y_i their all-pairs and
L2 terms divided by how many training ratings they have (n_u, n_i), so that an epoch's gradient is the whole
objective's (so the loss printed counts the all-pairs term twice; its gradient is the objective's). The Grams
are held fixed between refreshes (every step or two on small catalogs, every few dozen
on large ones); at a refresh each rank computes those of the rows it owns, and the ranks sum them, so every
rank uses the same Grams. A positive (a pick) is any training rating (`positives: all`) or one above the
training mean (`above_mean`); docs/benchmarks/search-ml-100k-ranking.md has what each setting gives.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import kernels, metrics
from pipeline.scoring import topk

VALID_USERS = 10_000  # per rank: validation NDCG is computed on a seeded sample of at most this many users


def objective(model, train: tuple[torch.Tensor, ...], hvd, t, spec, exchange) -> "RowPenalty":
    """The ranking loss train.ranking_loss names, with its train.ranking_* settings (t, a TrainConfig), for a model
    of this spec; `exchange` (sparse.Exchange) tells which rows only this rank updates."""
    positive_above = spec.global_mean if t.ranking_positives == "above_mean" else None
    if t.ranking_loss == "softmax":
        return Softmax(model, train, hvd, l2=t.ranking_l2, l2_exponent=t.ranking_l2_exponent,
                       positive_above=positive_above)
    owned = tuple(owned_rows(table.num_embeddings, hvd.rank(), hvd.size(), *exchange.local_of(table))
                  for table in (model.ranking_user, model.ranking_item))
    return Objective(model, train, hvd, unobserved=t.ranking_unobserved, l2=t.ranking_l2,
                     l2_exponent=t.ranking_l2_exponent, popularity_exponent=t.ranking_popularity_exponent,
                     confidence=t.ranking_confidence, top_rating=max(spec.rating_levels),
                     positive_above=positive_above, batch=t.batch_size, owned=owned)


class RowPenalty:
    """What both losses share: which ratings are picks, and the L2 on the ranking tables' rows, charged per
    appearance in a batch."""

    def __init__(self, model, train: tuple[torch.Tensor, ...], hvd, l2: float, l2_exponent: float,
                 positive_above: float | None):
        self.users, self.items, self.hvd = model.ranking_user, model.ranking_item, hvd
        self.positive_above = positive_above
        self.user_counts = count_rows(hvd, train[0], self.users.num_embeddings, "ranking.user_counts")
        self.item_counts = count_rows(hvd, train[1], self.items.num_embeddings, "ranking.item_counts")
        with torch.no_grad():  # rows no batch reaches would keep their random start: zero is what the loss wants
            for table, counts in ((self.users, self.user_counts), (self.items, self.item_counts)):
                table.weight[counts == 0] = 0.0
        self.user_counts, self.item_counts = self.user_counts.clamp(min=1), self.item_counts.clamp(min=1)
        self.per_user, self.per_item = 1 / self.user_counts, 1 / self.item_counts  # a row's share per appearance
        # A row's L2 over an epoch is l2 n^l2_exponent for its n training ratings (1: the frequency-scaled
        # regularization of Spark's ALS, Zhou et al. 2008; 0: the same for every row), charged 1/n per appearance.
        self.user_l2, self.item_l2 = (l2 * counts ** l2_exponent / counts for counts in (self.user_counts,
                                                                                        self.item_counts))

    def positive(self, ratings: torch.Tensor) -> torch.Tensor:
        """1.0 for the ratings that are picks, 0.0 for the others."""
        if self.positive_above is None:
            return torch.ones_like(ratings)
        return (ratings > self.positive_above).to(ratings.dtype)

    def penalty(self, users, items, x, y) -> torch.Tensor:
        return x.pow(2).sum(1) * self.user_l2[users] + y.pow(2).sum(1) * self.item_l2[items]


class Softmax(RowPenalty):
    """The other candidate: -log of the picked item's probability under a softmax of x_u . y_j over the whole
    catalog, for each positive pair of a batch. Every step touches every item row (B x items x d), so it fits
    catalogs of thousands of items, not ML-20M's 27,000 on a CPU."""

    def __init__(self, model, train, hvd, *, l2: float, l2_exponent: float = 0.0, positive_above: float | None):
        super().__init__(model, train, hvd, l2, l2_exponent, positive_above)

    def loss(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, step: int) -> torch.Tensor:
        x, y = self.users(users), self.items.weight[items]
        logits = x @ self.items.weight.T
        picked = torch.nn.functional.cross_entropy(logits, items, reduction="none") * self.positive(ratings)
        return (picked + self.penalty(users, items, x, y)).mean()


class Objective(RowPenalty):
    """The ranking loss of one rank's batches (see the module docstring)."""

    compiled = True  # on the CPU by CompiledAllPairs; False: AllPairsRows (the GPU's path, the tests' reference)

    def __init__(self, model, train: tuple[torch.Tensor, ...], hvd, *, unobserved: float, l2: float,
                 l2_exponent: float = 0.0, popularity_exponent: float = 0.0, confidence: float = 0.0,
                 top_rating: float = 1.0, positive_above: float | None, batch: int,
                 owned: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(model, train, hvd, l2, l2_exponent, positive_above)
        self.confidence = confidence / top_rating  # per rating point, so that a top rating weighs 1 + confidence
        n_items = self.items.num_embeddings
        # An unpicked pair's weight: a0 for every item, or with popularity_exponent b > 0 in proportion to the item's
        # ratings^b, a0 on average (eALS, He et al. 2016): a popular item the user passed over says more.
        popularity = self.item_counts ** popularity_exponent
        self.item_weight = unobserved * popularity * n_items / popularity.sum()
        self.item_share = self.item_weight * self.per_item  # an item row's all-pairs share per appearance
        # Scratch for kernels.distinct_rows (zeros between steps), made on first use on the CPU.
        self.marks = None
        self.owned = owned
        size = hvd.size()
        # A refresh costs 2 (users + items) d^2 / size, a step's products with the Grams 2 batch d^2: refreshed
        # once every (users + items) / (size x batch) steps, the refreshes cost what those products do.
        self.refresh_every = max(1, math.ceil((self.users.num_embeddings + self.items.num_embeddings)
                                              / (size * batch)))
        self.user_gram = self.item_gram = None

    def refresh(self) -> None:
        """Both Grams of the rows this rank owns, summed over the ranks in one allreduce."""
        with torch.no_grad():
            users, items = (table.weight.index_select(0, rows) for table, rows in zip((self.users, self.items),
                                                                                     self.owned))
            weighted = items * self.item_weight[self.owned[1], None]
            grams = self.hvd.allreduce(torch.stack([users.T @ users, weighted.T @ items]), op=self.hvd.Sum,
                                       name="ranking.grams")
            self.user_gram, self.item_gram = grams[0], grams[1]

    def loss(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, step: int) -> torch.Tensor:
        if step % self.refresh_every == 0:
            self.refresh()
        if self.compiled and self.users.weight.device.type == "cpu":
            return CompiledAllPairs.apply(self.users.weight, self.items.weight, users, items, ratings, self)
        x, y = self.users(users), self.items(items)
        positive = self.positive(ratings)
        # A pick's weight grows with its rating, to 1 + confidence at the top of the scale (Hu et al.'s confidence,
        # as Spark's implicitPrefs takes alpha x rating), target 1.
        picks = positive * (1 + self.confidence * ratings)
        rows = AllPairsRows.apply(x, y, picks, positive, self.item_weight[items], self.per_user[users],
                                  self.per_item[items], self.user_l2[users], self.item_l2[items], self.item_gram,
                                  self.user_gram)
        return rows.mean()


class AllPairsRows(torch.autograd.Function):
    """Each batch row's charge of the all-pairs loss, with its gradients written out: autograd's version made a
    dozen passes over [batch, d] temporaries, a third of them for products it had computed already (x G_Y, y G_X).

    Row (u, i): p c (s - 1)^2 - p w s^2 + x^T G_Y x / n_u + w y^T G_X y / n_i + l2_u |x|^2 + l2_i |y|^2, for s = x.y,
    p whether it is a pick, c its weight, w the item's unpicked weight (the pick's own pair is counted by the
    all-pairs term at w, so it is taken off), and l2 the rows' L2 already divided by n."""

    @staticmethod
    def forward(ctx, x, y, picks, positive, weight, per_user, per_item, user_l2, item_l2, item_gram, user_gram):
        s = (x * y).sum(1)
        gx, gy = x @ item_gram, y @ user_gram
        rows = (picks * (s - 1) ** 2 - positive * weight * s ** 2 + (gx * x).sum(1) * per_user
                + (gy * y).sum(1) * per_item * weight + user_l2 * (x * x).sum(1) + item_l2 * (y * y).sum(1))
        ctx.save_for_backward(x, y, gx, gy, s, picks, positive, weight, per_user, per_item, user_l2, item_l2)
        return rows

    @staticmethod
    def backward(ctx, grad):
        x, y, gx, gy, s, picks, positive, weight, per_user, per_item, user_l2, item_l2 = ctx.saved_tensors
        d_s = (2 * grad * (picks * (s - 1) - positive * weight * s))[:, None]
        d_x = torch.addcmul(torch.addcmul(y * d_s, gx, (2 * grad * per_user)[:, None]), x,
                            (2 * grad * user_l2)[:, None])
        d_y = torch.addcmul(torch.addcmul(x * d_s, gy, (2 * grad * per_item * weight)[:, None]), y,
                            (2 * grad * item_l2)[:, None])
        return d_x, d_y, *([None] * 9)


class CompiledAllPairs(torch.autograd.Function):
    """The batch's mean of AllPairsRows on the CPU, by compiled kernels (pipeline.kernels), with the tables'
    gradients computed in the same passes and given by distinct row. A row that comes k times in a batch is charged
    its all-pairs and L2 terms k times at once: one product with a Gram matrix for each distinct row instead of one
    for each pair (a 65,536-pair batch at 138K x 27K holds 44K users and 16K items), the same sum. The gradients
    come out as sparse tensors of distinct rows in ascending order, marked coalesced, which sparse.Rows.distinct
    takes as they are; or dense, for dense tables."""

    @staticmethod
    def forward(ctx, user_weight, item_weight, users, items, ratings, objective):
        compiled = kernels.compiled()
        if objective.marks is None:
            objective.marks = np.zeros(len(user_weight), np.int64), np.zeros(len(item_weight), np.int64)
        scale = user_weight.detach().numpy().dtype.type(1 / len(users))
        grads, vectors, places, total = [], [], [], 0.0
        for weight, rows, marks, gram, share, l2 in (
                (user_weight, users, objective.marks[0], objective.item_gram, objective.per_user, objective.user_l2),
                (item_weight, items, objective.marks[1], objective.user_gram, objective.item_share, objective.item_l2)):
            distinct, multiplicity, place = (np.empty(len(rows), np.int64) for _ in range(3))
            m = compiled.distinct_rows(rows.contiguous().numpy(), marks, distinct, multiplicity, place)
            distinct = torch.from_numpy(distinct[:m])
            # The rows once each, side by side: the kernels below read them in order, not scattered over the table.
            rows_of = weight.detach().index_select(0, distinct)
            grad = torch.empty_like(rows_of)
            total += compiled.gram_rows(rows_of.numpy(), distinct.numpy(), multiplicity[:m], (rows_of @ gram).numpy(),
                                        share.numpy(), l2.numpy(), scale, grad.numpy())
            grads.append((distinct, grad))
            vectors.append(rows_of.numpy())
            places.append(place)
        above = objective.positive_above
        total += compiled.pick_rows(items.contiguous().numpy(), *vectors, *places, ratings.contiguous().numpy(),
                                    above is None, scale.dtype.type(0 if above is None else above),
                                    scale.dtype.type(objective.confidence), objective.item_weight.numpy(), scale,
                                    grads[0][1].numpy(), grads[1][1].numpy())
        ctx.grads, ctx.sparse = grads, (objective.users.sparse, objective.items.sparse)
        ctx.shapes = user_weight.shape, item_weight.shape
        return user_weight.new_tensor(total * scale)

    @staticmethod
    def backward(ctx, grad):
        out = []
        for (rows, values), sparse, shape in zip(ctx.grads, ctx.sparse, ctx.shapes):
            if grad.item() != 1:
                values = values * grad
            if sparse:
                out.append(torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=False,
                                                   is_coalesced=True))
            else:
                out.append(values.new_zeros(shape).index_copy_(0, rows, values))
        ctx.grads = None
        return *out, None, None, None, None


def count_rows(hvd, column: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Training ratings of each row over all ranks."""
    counts = torch.bincount(column.cpu(), minlength=n).to(torch.float32)
    return hvd.allreduce(counts, op=hvd.Sum, name=name).to(column.device)


def owned_rows(n: int, rank: int, size: int, local: np.ndarray | None, everyones: torch.Tensor | None) -> torch.Tensor:
    """The rows whose Gram share this rank computes: its local rows (which only it updates), and of the rows
    local to no rank every size-th one."""
    rows = torch.arange(n)
    mine = rows % size == rank
    if local is not None:
        anyones = torch.zeros(n, dtype=torch.bool)
        anyones[everyones] = True
        mine = torch.from_numpy(local) | (mine & ~anyones)
    return rows[mine]


class Validation:
    """NDCG@k of the ranking score on a seeded sample of this rank's validation users (their relevant items: a
    validation rating >= relevant_rating; their training items masked), summed over the ranks: the figure that
    keeps the best ranking epoch. Evaluate reports the same metric on every user, its lists' queries leaning
    towards each user's latest ratings (recommend.recent_items), which need the timestamps the ranks do not read."""

    def __init__(self, hvd, train: tuple[torch.Tensor, ...], valid: tuple[torch.Tensor, ...], n_users: int,
                 relevant_rating: float, k: int, seed: int):
        self.hvd, self.k = hvd, k
        users, items, ratings = (c.cpu().numpy() for c in valid)
        hit = ratings >= relevant_rating
        candidates = np.unique(users[hit])
        rng = np.random.default_rng([seed, hvd.rank()])
        self.users = np.sort(rng.permutation(candidates)[:VALID_USERS])
        relevant = topk.by_user(users[hit], items[hit], n_users)
        self.relevant = [set(relevant[1][relevant[0][u]:relevant[0][u + 1]].tolist()) for u in self.users]
        # A user's training ratings may lie in another rank's shard: every rank's, for every sampled user.
        sampled = torch.zeros(n_users, dtype=torch.int32)
        sampled[torch.from_numpy(self.users)] = 1
        sampled = hvd.allreduce(sampled, op=hvd.Sum, name="ranking.valid_users") > 0
        train_users, train_items = train[0].cpu(), train[1].cpu()
        keep = sampled[train_users]
        seen_users = hvd.allgather(train_users[keep], name="ranking.seen_users").numpy()
        seen_items = hvd.allgather(train_items[keep], name="ranking.seen_items").numpy()
        self.seen = topk.by_user(seen_users, seen_items, n_users)

    def ndcg(self, model) -> float:
        users, items = (factors.cpu() for factors in model.ranking_factors())

        def scores(block: np.ndarray) -> torch.Tensor:  # the ranking score recommend orders by
            block = torch.from_numpy(block)
            rating_term = model.ranking_rating_term(block.to(model.levels.device))
            return users[block] @ items + (0 if rating_term is None else rating_term.cpu())

        lists = topk.top_lists(scores, self.users, self.seen, self.k)
        result = metrics.ranking_metrics(lists, self.relevant, self.k)
        total = 0.0 if not result["users"] else result[f"ndcg@{self.k}"] * result["users"]
        summed = self.hvd.allreduce(torch.tensor([total, float(result["users"])], dtype=torch.float64),
                                    op=self.hvd.Sum, name="ranking.ndcg")
        return float(summed[0] / summed[1]) if summed[1] > 0 else math.nan
