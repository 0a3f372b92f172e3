"""Training: the train stage on the driver (train), the loop every Horovod rank runs in named phases (loop), the
sparse gradient exchange (sparse) and the ranking objective (ranking)."""
