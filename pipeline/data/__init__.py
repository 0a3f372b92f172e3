"""Ratings in: reading MovieLens files (ingest), validating, remapping and splitting them (prepare), and the
synthetic generator with planted structure (synth)."""
