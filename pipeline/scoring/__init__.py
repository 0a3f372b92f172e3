"""Scoring: `topk` cuts a block of users' scores into lists (rated items masked, the k best kept) with no Spark,
for training's validation, the peers and the benchmarks too; `blocks` scores with a trained model inside Spark
tasks, every user against the catalog or given pairs."""
