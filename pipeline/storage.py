"""Outputs are published atomically and found through their manifests.

A stage writes into a temporary sibling of its output and renames it into place only when
everything, the manifest last, is written; a failed run removes its temporary and leaves the
previous good output where it was. Paths are local paths or fsspec URLs (hdfs://, s3a://...).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import uuid

import fsspec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class StageError(RuntimeError):
    """A stage cannot go on: bad input, a missing or incompatible upstream output."""


def filesystem(path: str):
    fs, _, (plain,) = fsspec.get_fs_token_paths(path)
    return fs, plain


def url(path: str) -> str:
    """A URL that Spark, petastorm and fsspec all read the same way (local paths become file://)."""
    return path if "://" in path else "file://" + os.path.abspath(path)


def exists(path: str) -> bool:
    fs, plain = filesystem(path)
    return fs.exists(plain)


@contextlib.contextmanager
def publish(final: str):
    """Yields a temporary path to write into; on success it replaces `final` in one rename."""
    fs, plain = filesystem(final)
    plain = plain.rstrip("/")
    tag = uuid.uuid4().hex[:8]
    tmp = f"{plain}.tmp-{tag}"
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield f"{final.rstrip('/')}.tmp-{tag}"  # the same place as `tmp`, spelled as the caller spelled `final`
        if not fs.exists(f"{tmp}/{MANIFEST}"):
            raise StageError(f"internal error: {tmp} was finished without a {MANIFEST}")
        old = None
        if fs.exists(plain):
            old = f"{plain}.old-{tag}"
            fs.mv(plain, old, recursive=True)
        fs.mv(tmp, plain, recursive=True)
        if old:
            fs.rm(old, recursive=True)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def write_manifest(directory: str, manifest: dict) -> dict:
    manifest = {"schema_version": SCHEMA_VERSION,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **manifest}
    fs, plain = filesystem(directory)
    with fs.open(f"{plain}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, default=str)
    return manifest


def read_manifest(directory: str, stage: str) -> dict:
    """The manifest of a finished `stage` output, or a StageError that says what is wrong."""
    fs, plain = filesystem(directory)
    path = f"{plain}/{MANIFEST}"
    if not fs.exists(path):
        raise StageError(f"{directory} has no {MANIFEST}: it is not a finished {stage} output "
                         f"(run `dmf {stage}` first, or check the path)")
    with fs.open(path) as f:
        manifest = json.load(f)
    if manifest.get("stage") != stage:
        raise StageError(f"{directory} holds a {manifest.get('stage')!r} output, not a {stage!r} output")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StageError(f"{directory} was written with schema version {manifest.get('schema_version')}, "
                         f"this version of dmf reads {SCHEMA_VERSION}: run `dmf {stage}` again")
    return manifest


def row_groups(path: str) -> int:
    """Row groups in a Parquet dataset: the units petastorm deals out to ranks."""
    import pyarrow.parquet as pq

    fs, plain = filesystem(path)
    parts = [p for p in fs.find(plain) if p.endswith(".parquet")]
    total = 0
    for part in parts:
        with fs.open(part, "rb") as f:
            total += pq.ParquetFile(f).num_row_groups
    return total


def checksum(paths: list[str]) -> str:
    """sha256 over the input files' bytes (in path order), so a manifest says exactly what it was made from."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        fs, plain = filesystem(path)
        for f in sorted(fs.find(plain)) if fs.isdir(plain) else [plain]:
            digest.update(os.path.basename(f).encode())
            with fs.open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()
