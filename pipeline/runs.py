"""Dated runs: where `dmf run` writes, the CURRENT pointer and the gate in front of it, the lock, retention.

    <work_dir>/runs/ID/{synth,prepared,model,report,recommendations}/   each one stage's output (manifest.json)
    <work_dir>/runs/ID/gate.json                                        the gate's verdict on the run
    <work_dir>/runs/CURRENT                                             {"run_id": ...}: the last good run
    <work_dir>/runs/.lock                                               the run going on now (host, pid, start)

Consumers follow CURRENT, which moves last, after every stage is published and the gate has passed: on an
object store a rename is a copy, so a stage directory can be seen half copied; CURRENT is one small object
that only ever names a finished run.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid

from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from pipeline.config import Config
from pipeline.storage import StageError

STAGE_DIRS = {"synth": "synth", "prepare": "prepared", "train": "model", "evaluate": "report",
              "recommend": "recommendations"}
POINTER = "CURRENT"
LOCK = ".lock"
GATE = "gate.json"
log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def root(cfg: Config) -> str:
    return cfg.path("runs")


def run_id(cfg: Config) -> str:
    """The run `dmf run` makes: schedule.run_id (--run-id), else today's UTC date."""
    rid = cfg.schedule.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    if rid == POINTER:
        raise StageError(f"{POINTER} names the pointer file {root(cfg)}/{POINTER}, not a run: choose another run id")
    return rid


def run_dir(cfg: Config, rid: str) -> str:
    return f"{root(cfg)}/{rid}"


def stage_dir(cfg: Config, rid: str, stage: str) -> str:
    return f"{run_dir(cfg, rid)}/{STAGE_DIRS[stage]}"


def done(path: str, stage: str) -> bool:
    """Whether `path` holds a finished output of `stage` (its manifest, published last, says so)."""
    try:
        storage.read_manifest(path, stage)
        return True
    except (StageError, ValueError):
        return False


def _write_json(path: str, obj: dict) -> None:
    """Writes the whole file or nothing: a temporary beside it, then a rename over it."""
    fs, plain = storage.filesystem(path)
    tmp = f"{plain}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    fs.mv(tmp, plain)


def _read_json(path: str) -> dict | None:
    return storage.read_json(*storage.filesystem(path))


def current(cfg: Config) -> str | None:
    """The run id CURRENT names, or None before the first run that passed its gate."""
    pointer = _read_json(f"{root(cfg)}/{POINTER}")
    return pointer["run_id"] if pointer else None


def point_at(cfg: Config, rid: str, why: str) -> None:
    _write_json(f"{root(cfg)}/{POINTER}", {"run_id": rid, "set_at": _now(), "why": why})
    log.info("%s/%s -> %s (%s)", root(cfg), POINTER, rid, why)


def rollback(cfg: Config, rid: str) -> None:
    """`dmf current --to ID`: points CURRENT at an earlier run, which must be complete and have passed its gate."""
    missing = [STAGE_DIRS[s] for s in ("prepare", "train", "evaluate", "recommend")
               if not done(stage_dir(cfg, rid, s), s)]
    if missing:
        raise StageError(f"{run_dir(cfg, rid)} is not a complete run (no finished {', '.join(missing)}): "
                         f"CURRENT still points at {current(cfg)}")
    verdict = _read_json(f"{run_dir(cfg, rid)}/{GATE}")
    if not verdict or not verdict.get("passed"):
        why = "; ".join(verdict["reasons"]) if verdict else f"it has no {GATE}: the gate never checked it"
        raise StageError(f"run {rid} did not pass its gate ({why}): CURRENT still points at {current(cfg)}")
    point_at(cfg, rid, "dmf current --to")


def _metrics(cfg: Config, rid: str) -> dict:
    """Validation RMSE and NDCG@k from a run's evaluate report (metrics.json)."""
    out = stage_dir(cfg, rid, "evaluate")
    storage.read_manifest(out, "evaluate")  # a finished report, or an error naming what is missing
    report = _read_json(f"{out}/metrics.json")
    if report is None:
        raise StageError(f"{out}/metrics.json is missing or unreadable")
    k = report["k"]
    return {"rmse": report["rating"]["rmse"], "ndcg": report["ranking"][f"ndcg@{k}"], "k": k}


def gate(cfg: Config, rid: str) -> dict:
    """Checks a run's report against the schedule bounds and against CURRENT's run; writes runs/ID/gate.json.

    Returns the verdict: passed, reasons (why not), notes (checks that could not be made), the metrics."""
    s = cfg.schedule
    new = _metrics(cfg, rid)
    k = new["k"]
    reasons, notes, old = [], [], None
    if s.max_valid_rmse is not None and new["rmse"] > s.max_valid_rmse:
        reasons.append(f"validation RMSE {new['rmse']:.4f} is above schedule.max_valid_rmse {s.max_valid_rmse:g}")
    if new["ndcg"] < s.min_ndcg:
        reasons.append(f"NDCG@{k} {new['ndcg']:.4f} is below schedule.min_ndcg {s.min_ndcg:g}")
    against = current(cfg)
    if against and against != rid:
        try:
            old = _metrics(cfg, against)
        except (StageError, KeyError) as e:
            # Refusing here would stop every later run until someone repairs CURRENT by hand.
            notes.append(f"CURRENT's run {against} has no readable report ({e}): not compared with it")
            log.warning("gate: %s", notes[-1])
    if old:
        if new["rmse"] > old["rmse"] * (1 + s.max_regression):
            reasons.append(f"validation RMSE {new['rmse']:.4f} is worse than CURRENT's run {against} "
                           f"({old['rmse']:.4f}) by more than schedule.max_regression {s.max_regression:.0%}")
        if old["k"] != k:
            notes.append(f"CURRENT's run {against} reports NDCG@{old['k']}, not @{k}: NDCG not compared")
        elif new["ndcg"] < old["ndcg"] * (1 - s.max_regression):
            reasons.append(f"NDCG@{k} {new['ndcg']:.4f} is worse than CURRENT's run {against} "
                           f"({old['ndcg']:.4f}) by more than schedule.max_regression {s.max_regression:.0%}")
    verdict = {"run_id": rid, "passed": not reasons, "reasons": reasons, "notes": notes, "metrics": new,
               "current": against, "current_metrics": old, "checked_at": _now(),
               "bounds": {"max_valid_rmse": s.max_valid_rmse, "min_ndcg": s.min_ndcg,
                          "max_regression": s.max_regression}}
    _write_json(f"{run_dir(cfg, rid)}/{GATE}", verdict)
    return verdict


def summary(verdict: dict) -> str:
    m = verdict["metrics"]
    against = (f"compared with CURRENT's run {verdict['current']}" if verdict["current_metrics"]
               else "not compared: CURRENT names no other run")
    return (f"gate: {'passed' if verdict['passed'] else 'REFUSED'} (validation RMSE {m['rmse']:.4f}, "
            f"NDCG@{m['k']} {m['ndcg']:.4f}; {against})"
            + "".join(f"\n  {text}" for text in verdict["reasons"] + verdict["notes"]))


def _create(fs, plain: str, text: str) -> bool:
    """Creates `plain` holding `text` unless it exists. O_EXCL makes that one step on a local disk; fsspec has no
    such call for other stores, where it is a look and a write, safe only as long as the scheduler never starts
    two runs at once."""
    if isinstance(fs, LocalFileSystem):
        try:
            fd = os.open(plain, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if fs.exists(plain):
        return False
    with fs.open(plain, "w") as f:
        f.write(text)
    return True


@contextlib.contextmanager
def lock(cfg: Config, rid: str):
    """Holds runs/.lock while a run (or a change of CURRENT) goes on; a second one is refused, naming the holder.

    A lock whose process has ended on this host is stale and taken over; one from another host is never
    guessed stale (its process cannot be seen from here)."""
    path = f"{root(cfg)}/{LOCK}"
    fs, plain = storage.filesystem(path)
    fs.makedirs(plain.rsplit("/", 1)[0], exist_ok=True)
    # "stage" lets storage.process_ended (a finished process of a stage on this host) judge the holder.
    me = {"stage": "run", "run_id": rid, "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now()}
    if not _create(fs, plain, json.dumps(me)):
        holder = _read_json(path)
        if not storage.process_ended(holder, "run"):
            who = (f"run {holder.get('run_id')} on host {holder.get('host')}, pid {holder.get('pid')}, "
                   f"started {holder.get('started_at')}") if holder else "an unreadable holder"
            raise StageError(f"another dmf run holds {path}: {who}. Wait for it to finish; if that process is "
                             f"gone (a host that died), remove {path}")
        log.warning("%s was left by run %s (pid %s on this host, which has ended): taking it over",
                    path, holder.get("run_id"), holder.get("pid"))
        fs.rm(plain)
        if not _create(fs, plain, json.dumps(me)):
            raise StageError(f"another dmf run took {path} while this one was taking over a stale lock")
    # A scheduler stops a task with SIGTERM; exiting through Python's unwinding removes the lock then too.
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers are set there only
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if in_main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if _read_json(path) == me:
            fs.rm(plain)


def _started(cfg: Config, rid: str) -> str | None:
    """When a run began (its oldest stage manifest), or None when the directory holds no stage output."""
    times = []
    for stage in STAGE_DIRS:
        manifest = _read_json(f"{stage_dir(cfg, rid, stage)}/{storage.MANIFEST}")
        if manifest and manifest.get("stage") == stage:
            times.append(manifest["created_at"])
    return min(times) if times else None


def prune(cfg: Config) -> list[str]:
    """Removes the oldest runs beyond schedule.keep_runs (age: its first stage output); never the run CURRENT
    points at, nor a directory without a stage output (it is not a run). Returns the run ids removed."""
    fs, plain = storage.filesystem(root(cfg))
    found = []
    for path in fs.ls(plain, detail=False):
        name = os.path.basename(path.rstrip("/"))
        if not fs.isdir(path):
            continue
        started = _started(cfg, name)
        if started is None:
            log.info("retention: %s holds no stage output, so it is not a run: left alone", path)
            continue
        found.append((started, name))
    pointed = current(cfg)
    removed = []
    for _, name in sorted(found)[:max(len(found) - cfg.schedule.keep_runs, 0)]:
        if name != pointed:
            fs.rm(f"{plain}/{name}", recursive=True)
            removed.append(name)
    if removed:
        log.info("retention: removed %s (schedule.keep_runs=%d)", ", ".join(removed), cfg.schedule.keep_runs)
    return removed
