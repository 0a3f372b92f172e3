"""The dot-product models' shared scoring, and mf: global mean + b_u + b_i + <p_u, q_i>."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline import kernels
from pipeline.models.base import RatingModel, Side, bias, embedding
from pipeline.models.spec import KINDS


class DotProduct(RatingModel):
    """A model whose rating is global mean + b_u + b_i + <user vector, item vector>: a block of users is scored
    against the catalog by one matrix product, which is also what retrieves two-stage candidates."""

    def _pair(self, u: Side, i: Side) -> torch.Tensor:
        return self.biases(u.ids, i.ids) + (u.vectors * i.vectors).sum(-1)

    def _grid(self, u: Side, i: Side) -> torch.Tensor:
        return self.biases(u.ids[:, None], i.ids[None, :]) + u.vectors @ i.vectors.T

    def rating_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user factors [U, k + 2], item factors [I, k + 2]): [u, 1, b_u] . [v, b_i, 1] = b_u + b_i + <u, v>, the
        unclipped rating less the global mean."""
        with torch.no_grad():
            user_vectors, item_vectors = self.user_vectors(), self.item_vectors()
            users = torch.cat([user_vectors, torch.ones(len(user_vectors), 1, device=user_vectors.device),
                               self.user_bias.weight], dim=1)
            items = torch.cat([item_vectors, self.item_bias.weight,
                               torch.ones(len(item_vectors), 1, device=item_vectors.device)], dim=1)
            return users, items

    def dot_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user factors, item factors transposed) whose products are the unclipped ratings, mean included, so that
        one matrix product scores a block."""
        users, items = self.rating_factors()
        users[:, -1] += self.global_mean
        return users.detach().contiguous(), items.T.detach().contiguous()


class MF(DotProduct):
    kind = KINDS["mf"]

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        # std 0.1 keeps the initial dot products near 0 while leaving Adam a gradient to grow them from.
        self.user_embedding = embedding(spec.n_users, spec.user_dim)
        self.item_embedding = embedding(spec.n_items, spec.item_dim)
        self.user_bias, self.item_bias = bias(spec.n_users), bias(spec.n_items)

    def _users(self, users):
        return Side(users, self.user_embedding(users))

    def _items(self, items, leave_out=None):
        return Side(items, self.item_embedding_of(self.item_embedding, items, leave_out))

    def loss(self, users, items, ratings, in_history=None, l2=0.0, bias_l2=0.0):
        """RatingModel.loss; with sparse gradients on the CPU and no item side features, computed by the compiled
        kernels of MFPairs: the same loss and gradients in two passes over the batch."""
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
