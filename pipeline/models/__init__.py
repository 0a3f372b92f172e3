"""The models: `spec` (the kinds and the typed spec, no torch), `registry` (build a model from its spec), the
shared plumbing and item side features (`base`, `history`), and the kinds themselves (`mf`, `deep`, `two_tower`).

A model answers two questions: its rating head predicts a user's rating of an item, and, when its spec has a
ranking_dim, its ranking score (x_u . y_i from tables of its own, trained by pipeline.training.ranking) orders
the top-N.
"""
