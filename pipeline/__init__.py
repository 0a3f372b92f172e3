"""Batch recommender pipeline: Spark prepare, Horovod training, Spark top-N."""
