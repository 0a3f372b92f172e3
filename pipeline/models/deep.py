"""The models with an MLP over the pair: dmf (concatenated embeddings) and neumf (GMF beside the MLP)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.base import RatingModel, Side, bias, embedding
from pipeline.models.spec import KINDS


def mlp(sizes: list[int], dropout: float, batch_norm: bool, last_activation: bool = True) -> nn.Sequential:
    """Linear -> (BatchNorm1d) -> ReLU -> Dropout for each size after the first."""
    layers = []
    for n, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or n < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


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


class DMF(RatingModel):
    """An MLP over [e_u, e_i]; regression predicts a residual around global mean + b_u + b_i."""
    kind = KINDS["dmf"]

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        self.user_embedding = embedding(spec.n_users, spec.user_dim)
        self.item_embedding = embedding(spec.n_items, spec.item_dim)
        self.mlp = mlp([spec.user_dim + spec.item_dim, *spec.hidden], spec.dropout, spec.batch_norm)
        self.head = nn.Linear(spec.hidden[-1], len(self.levels) if self.softmax else 1)
        if not self.softmax:
            self.user_bias, self.item_bias = bias(spec.n_users), bias(spec.n_items)

    def _users(self, users):
        return Side(users, self.user_embedding(users))

    def _items(self, items, leave_out=None):
        return Side(items, self.item_embedding_of(self.item_embedding, items, leave_out))

    def _output(self, h, users, items):
        out = self.head(h)
        return out if self.softmax else out.squeeze(-1) + self.biases(users, items)

    def _pair(self, u, i):
        return self._output(self.mlp(torch.cat([u.vectors, i.vectors], dim=-1)), u.ids, i.ids)

    def _grid(self, u, i):
        h = split_first_layer(self.mlp, u.vectors, i.vectors)
        return self._output(h, u.ids[:, None], i.ids[None, :])


class NeuMF(RatingModel):
    """He et al. (2017): GMF (e_u * e_i, own embeddings of item_dim) beside an MLP over [e_u, e_i],
    one output layer over both."""
    kind = KINDS["neumf"]

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        self.gmf_user = embedding(spec.n_users, spec.item_dim)
        self.gmf_item = embedding(spec.n_items, spec.item_dim)
        self.user_embedding = embedding(spec.n_users, spec.user_dim)
        self.item_embedding = embedding(spec.n_items, spec.item_dim)
        self.mlp = mlp([spec.user_dim + spec.item_dim, *spec.hidden], spec.dropout, spec.batch_norm)
        self.head = nn.Linear(spec.item_dim + spec.hidden[-1], len(self.levels) if self.softmax else 1)
        if not self.softmax:
            self.user_bias, self.item_bias = bias(spec.n_users), bias(spec.n_items)

    def _users(self, users):
        return Side(users, self.user_embedding(users), self.gmf_user(users))

    def _items(self, items, leave_out=None):
        gmf = self.item_embedding_of(self.gmf_item, items, leave_out)  # first, as the gradients were measured
        return Side(items, self.item_embedding_of(self.item_embedding, items, leave_out), gmf)

    def _pair(self, u, i):
        out = self.head(torch.cat([u.gmf * i.gmf, self.mlp(torch.cat([u.vectors, i.vectors], dim=-1))], dim=-1))
        return out if self.softmax else out.squeeze(-1) + self.biases(u.ids, i.ids)

    def _grid(self, u, i):
        g = u.gmf.shape[-1]
        w_gmf, w_mlp = self.head.weight[:, :g], self.head.weight[:, g:]
        # W_gmf (e_u * e_i) for every pair and output: (e_u * w) . e_i, a matrix product per output.
        gmf = torch.einsum("bd,ld,md->bml", u.gmf, w_gmf, i.gmf)
        out = gmf + F.linear(split_first_layer(self.mlp, u.vectors, i.vectors), w_mlp, self.head.bias)
        return out if self.softmax else out.squeeze(-1) + self.biases(u.ids[:, None], i.ids[None, :])

    def tables(self):
        user, item = super().tables()
        return [self.gmf_user, *user], [self.gmf_item, *item]

    def user_vectors(self):
        return torch.cat([self.gmf_user.weight, self.user_embedding.weight], dim=1)

    def item_vectors(self):
        items = torch.arange(self.item_embedding.num_embeddings, device=self.levels.device)
        return torch.cat([self.item_embedding_of(self.gmf_item, items),
                          self.item_embedding_of(self.item_embedding, items)], dim=1)
