"""two_tower: global mean + b_u + b_i + <user tower(e_u), item tower(e_i)>; the towers end without activation."""
from __future__ import annotations

from pipeline.models.base import Side, bias, embedding
from pipeline.models.deep import mlp
from pipeline.models.mf import DotProduct
from pipeline.models.spec import KINDS


class TwoTower(DotProduct):
    kind = KINDS["two_tower"]

    def __init__(self, spec, item_genres=None, item_history=None):
        super().__init__(spec, item_genres, item_history)
        self.user_embedding = embedding(spec.n_users, spec.user_dim)
        self.item_embedding = embedding(spec.n_items, spec.item_dim)
        self.user_tower = mlp([spec.user_dim, *spec.hidden], spec.dropout, spec.batch_norm, last_activation=False)
        self.item_tower = mlp([spec.item_dim, *spec.hidden], spec.dropout, spec.batch_norm, last_activation=False)
        self.user_bias, self.item_bias = bias(spec.n_users), bias(spec.n_items)

    def _users(self, users):
        return Side(users, self.user_tower(self.user_embedding(users)))

    def _items(self, items, leave_out=None):
        return Side(items, self.item_tower(self.item_embedding_of(self.item_embedding, items, leave_out)))

    def user_vectors(self):
        return self.user_tower(self.user_embedding.weight)

    def item_vectors(self):
        return self.item_tower(super().item_vectors())
