"""Benchmarks of the pipeline against its peers: run each as `.venv/bin/python -m benchmarks.NAME` from the checkout."""
