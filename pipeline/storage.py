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
import logging
import os
import posixpath
import socket
import uuid

import fsspec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
OWNER = "_dmf_owner.json"  # in a temporary output: the stage, host and process writing it
log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot go on: bad input, a missing or incompatible upstream output."""


def filesystem(path: str):
    fs, _, (plain,) = fsspec.get_fs_token_paths(path)
    return fs, plain


def respelled(original: str, plain: str) -> str:
    """`plain`, a path fsspec gave back for something under `original`, spelled with `original`'s scheme and
    authority, which fsspec strips (s3a://bucket/key is bucket/key, hdfs://nn:8020/data is /data): the
    spelling Spark needs to read the same place."""
    if "://" not in original:
        return plain
    protocol = original.split("://", 1)[0]
    root = fsspec.get_filesystem_class(protocol)._strip_protocol(original).rstrip("/")
    trimmed = original.rstrip("/")
    if not trimmed.endswith(root):
        raise StageError(f"internal error: cannot tell the scheme and authority of {original} (fsspec reads it as "
                         f"{root})")
    return trimmed[: len(trimmed) - len(root)] + plain


def url(path: str) -> str:
    """A URL that Spark, petastorm and fsspec all read the same way (local paths become file://)."""
    return path if "://" in path else "file://" + os.path.abspath(path)


def exists(path: str) -> bool:
    fs, plain = filesystem(path)
    return fs.exists(plain)


def check_output(final: str, stage: str, force: bool = False) -> None:
    """Refuses, before any work, an output path that holds anything but an earlier `stage` output.

    Nothing the user did not ask to replace is deleted: a plain file is never replaced, and a directory
    that is not this stage's output only with `force` (--force). An empty directory holds nothing to lose."""
    fs, plain = filesystem(final)
    plain = plain.rstrip("/")
    if not fs.exists(plain):
        return
    if not fs.isdir(plain):
        raise StageError(f"{final} is a file, not a {stage} output directory: refusing to replace it "
                         f"(--force does not replace files); choose another --out or move the file away")
    entries = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(plain, detail=False))
    if not entries:
        return
    found = _stage_of(fs, plain)
    if found == stage:
        return
    what = f"a {found!r} output" if found else f"{len(entries)} entries ({', '.join(entries[:5])}" \
        f"{', ...' if len(entries) > 5 else ''}) and no {MANIFEST} of a {stage} output"
    if force:
        log.warning("%s holds %s; replacing it as --force asks", final, what)
        return
    raise StageError(f"{final} holds {what}: refusing to replace it. Choose another --out, or pass --force "
                     f"to replace that directory")


def _stage_of(fs, plain: str) -> str | None:
    manifest = read_json(fs, f"{plain}/{MANIFEST}")
    return manifest.get("stage") if isinstance(manifest, dict) else None


def read_json(fs, plain: str):
    """The JSON in file `plain` of `fs`, or None when it is missing or not JSON."""
    try:
        with fs.open(plain) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


@contextlib.contextmanager
def publish(final: str, stage: str, force: bool = False):
    """Yields a temporary path to write into; on success it replaces `final` in one rename.

    The temporary carries an owner file (stage, host, process) until the output is in place, so that the
    next run of the stage can tell its own leftovers of a killed run from anything else, and remove them."""
    check_output(final, stage, force)
    fs, plain = filesystem(final)
    plain = plain.rstrip("/")
    clean_stale(fs, plain, stage)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{plain}.tmp-{tag}"
    fs.makedirs(tmp, exist_ok=True)
    with fs.open(f"{tmp}/{OWNER}", "w") as f:
        json.dump({"stage": stage, "host": socket.gethostname(), "pid": os.getpid()}, f)
    try:
        yield f"{final.rstrip('/')}.tmp-{tag}"  # the same place as `tmp`, spelled as the caller spelled `final`
        if not fs.exists(f"{tmp}/{MANIFEST}"):
            raise StageError(f"internal error: {tmp} was finished without a {MANIFEST}")
        check_output(final, stage, force)  # something may have appeared there while the stage ran
        old = None
        if fs.exists(plain):
            old = f"{plain}.old-{tag}"
            fs.mv(plain, old, recursive=True)
        fs.mv(tmp, plain, recursive=True)
        fs.rm(f"{plain}/{OWNER}")
        if old:
            fs.rm(old, recursive=True)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def _owner(fs, path: str) -> dict | None:
    return read_json(fs, f"{path}/{OWNER}")


def process_ended(owner: dict | None, stage: str) -> bool:
    """Whether `owner` names a process of `stage` on this host that has ended: only then is it provably stale."""
    if not owner or owner.get("stage") != stage or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, KeyError):
        return False
    return False


def clean_stale(fs, plain: str, stage: str) -> None:
    """Removes what a killed run of `stage` left beside its output `plain`, and puts back the previous output
    if the kill came between its two renames. Leftovers whose owner may still run, or that another host
    left, stay where they are (and are named in a warning)."""
    for path in sorted(fs.glob(f"{plain}.tmp-*") + fs.glob(f"{plain}.old-*")):
        tag = path.rsplit("-", 1)[-1]
        owner = _owner(fs, f"{plain}.tmp-{tag}") or _owner(fs, plain)
        if not process_ended(owner, stage):
            log.warning("%s is left from another run of %s output that may still be going: not removed", path, stage)
            continue
        if path.endswith(f".old-{tag}") and not fs.exists(plain):
            fs.mv(path, plain, recursive=True)
            log.warning("restored %s from %s, which a killed run had moved away", plain, path)
        elif fs.exists(path):
            fs.rm(path, recursive=True)
            log.info("removed %s, left by a killed run", path)
    if process_ended(_owner(fs, plain), stage):
        fs.rm(f"{plain}/{OWNER}")


PARTIAL = ".partial"  # the suffix of a file that replace_file has not finished


def replace_file(path: str, data: bytes) -> None:
    """Writes `data` to path through a temporary name beside it, then moves it into place: a kill never leaves
    half a file where a reader would take it for a whole one."""
    fs, plain = filesystem(path)
    fs.makedirs(posixpath.dirname(plain), exist_ok=True)
    with fs.open(plain + PARTIAL, "wb") as f:
        f.write(data)
    fs.mv(plain + PARTIAL, plain)


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


def data_files(path: str) -> list[str]:
    """The files a reader of `path` sees: the file itself, or those under the directory but for _ and . names."""
    fs, plain = filesystem(path)
    if not fs.isdir(plain):
        return [plain]
    return sorted(p for p in fs.find(plain) if not os.path.basename(p).startswith(("_", ".")))


def is_empty(path: str) -> bool:
    fs, _ = filesystem(path)
    return sum(fs.size(p) for p in data_files(path)) == 0


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
