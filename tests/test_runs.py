"""Dated runs (pipeline/runs.py, `dmf run`, `dmf current`): the gate in front of CURRENT, idempotent reruns,
the lock, retention and rollback. Two real runs are shared by the module; the rest uses small fake runs."""
import contextlib
import hashlib
import io
import json
import logging
import socket
import subprocess
import sys

import pytest

from pipeline import cli, config, runs, storage
from pipeline.storage import StageError

SMALL = ["synth.users=200", "synth.items=60", "synth.ratings=6000", "synth.seed=3", "prepare.max_ranks=2",
         "train.epochs=3", "train.user_dim=8", "train.item_dim=8", "train.num_proc=2",
         "spark.conf.spark.sql.shuffle.partitions=4"]
GOOD, WORSE = "2024-01-01", "2024-01-02"


def dmf(work, *argv) -> tuple[int, str, str]:
    """`dmf ARGV --work-dir WORK` in this process (the session's Spark); `run` gets SMALL first, so ARGV wins."""
    out, err = io.StringIO(), io.StringIO()
    small = [x for key in SMALL for x in ("--set", key)] if argv[0] == "run" else []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([argv[0], *small, *argv[1:], "--work-dir", str(work)])
    return rc, out.getvalue(), err.getvalue()


def cfg_for(work, *overrides):
    return config.load(overrides=[f"work_dir={work}", *overrides])


def tree(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(spark, tmp_path_factory):
    """A work directory where run GOOD passed its gate, then run WORSE (1 epoch at a tiny learning rate: 2% worse
    validation RMSE on this little data, against a 1% schedule.max_regression), and what `dmf run` said of WORSE."""
    work = tmp_path_factory.mktemp("runs")
    rc, out, err = dmf(work, "run", "--run-id", GOOD)
    assert rc == 0, err
    assert f"run {GOOD} -> {work}/runs/{GOOD}" in out and f"CURRENT -> {GOOD}" in out
    return work, dmf(work, "run", "--run-id", WORSE, "--set", "train.epochs=1", "--set", "train.lr=0.00001",
                     "--set", "schedule.max_regression=0.01")


@pytest.fixture
def work(two_runs):
    return two_runs[0]


def test_gate_refuses_a_worse_run_and_current_stays(two_runs):
    work, (rc, out, err) = two_runs
    assert rc == 1
    assert f"the gate refused run {WORSE}: validation RMSE" in err and "worse than CURRENT's run 2024-01-01" in err
    assert f"CURRENT still points at {GOOD}" in err
    assert "gate: REFUSED" in out and f"CURRENT -> {GOOD}" in out
    assert runs.current(cfg_for(work)) == GOOD
    verdict = json.loads((work / "runs" / WORSE / "gate.json").read_text())
    assert verdict["passed"] is False and verdict["current"] == GOOD
    assert verdict["metrics"]["rmse"] > verdict["current_metrics"]["rmse"] * 1.01
    for stage, name in runs.STAGE_DIRS.items():  # the refused run is kept, complete, for a look
        assert runs.done(str(work / "runs" / WORSE / name), stage)


def test_rerun_of_an_id_skips_complete_stages(work):
    before = tree(work / "runs" / GOOD)
    pointer = (work / "runs" / "CURRENT").read_bytes()
    rc, out, err = dmf(work, "run", "--run-id", GOOD)
    assert rc == 0, err
    for stage in ("prepare", "train", "evaluate", "recommend"):
        assert f"{stage}: {work}/runs/{GOOD}/{runs.STAGE_DIRS[stage]} is complete, skipped" in out
    assert "synth" not in out  # only prepare reads the synthetic ratings
    after = tree(work / "runs" / GOOD)
    before.pop("gate.json"), after.pop("gate.json")  # checked again: only its time differs
    assert after == before
    assert (work / "runs" / "CURRENT").read_bytes() == pointer


def test_redo_of_the_current_run_is_refused(work):
    rc, _, err = dmf(work, "run", "--run-id", GOOD, "--redo")
    assert rc == 1 and "is the one CURRENT points at" in err and "dmf current --to" in err


def test_accept_then_roll_back(work):
    rc, _, err = dmf(work, "current", "--to", WORSE)
    assert rc == 1 and f"run {WORSE} did not pass its gate (validation RMSE" in err
    # Looser bounds on a rerun accept the run: nothing is trained again, the gate is checked again.
    rc, out, err = dmf(work, "run", "--run-id", WORSE, "--set", "schedule.max_regression=10")
    assert rc == 0, err
    assert "gate: passed" in out and f"CURRENT -> {WORSE}" in out
    rc, out, err = dmf(work, "current", "--to", GOOD)
    assert rc == 0, err
    assert out.strip() == f"CURRENT -> {GOOD} ({work}/runs/{GOOD})"
    assert dmf(work, "current")[1] == out
    assert json.loads((work / "runs" / "CURRENT").read_text())["why"] == "dmf current --to"


def test_a_second_run_is_refused_while_one_holds_the_lock(work):
    with runs.lock(cfg_for(work), "2024-01-03"):
        rc, _, err = dmf(work, "run", "--run-id", "2024-01-04")
        holder = json.loads((work / "runs" / ".lock").read_text())
    assert rc == 1
    assert (f"another dmf run holds {work}/runs/.lock: run 2024-01-03 on host {socket.gethostname()}, "
            f"pid {holder['pid']}") in err
    assert not (work / "runs" / "2024-01-04").exists()
    assert not (work / "runs" / ".lock").exists()  # removed on exit


# Fake runs: what the gate, the lock and retention read, without training.

def fake_run(root, rid, rmse=0.9, ndcg=0.1, k=10, created="2024-01-01T00:00:00+00:00"):
    report = root / "runs" / rid / "report"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text(json.dumps({"k": k, "rating": {"rmse": rmse},
                                                     "ranking": {f"ndcg@{k}": ndcg}}))
    storage.write_manifest(str(report), {"stage": "evaluate", "created_at": created})


def test_rollback_refuses_a_run_that_is_incomplete_or_never_gated(tmp_path):
    cfg = cfg_for(tmp_path)
    fake_run(tmp_path, "partial")
    with pytest.raises(StageError, match=r"partial is not a complete run \(no finished prepared, model, recomm"):
        runs.rollback(cfg, "partial")
    for stage in ("prepare", "train", "recommend"):
        path = tmp_path / "runs" / "partial" / runs.STAGE_DIRS[stage]
        path.mkdir()
        storage.write_manifest(str(path), {"stage": stage})
    with pytest.raises(StageError, match="has no gate.json: the gate never checked it"):
        runs.rollback(cfg, "partial")
    assert runs.current(cfg) is None


def test_gate_bounds(tmp_path):
    fake_run(tmp_path, "a", rmse=0.95, ndcg=0.02)
    verdict = runs.gate(cfg_for(tmp_path, "schedule.max_valid_rmse=0.9", "schedule.min_ndcg=0.05"), "a")
    assert not verdict["passed"]
    assert verdict["reasons"] == ["validation RMSE 0.9500 is above schedule.max_valid_rmse 0.9",
                                  "NDCG@10 0.0200 is below schedule.min_ndcg 0.05"]
    assert json.loads((tmp_path / "runs" / "a" / "gate.json").read_text()) == verdict
    assert runs.gate(cfg_for(tmp_path), "a")["passed"]  # no bounds, no CURRENT: nothing to refuse


def test_gate_compares_with_current(tmp_path):
    cfg = cfg_for(tmp_path, "schedule.max_regression=0.05")
    fake_run(tmp_path, "base", rmse=0.90, ndcg=0.10)
    runs.point_at(cfg, "base", "test")
    fake_run(tmp_path, "close", rmse=0.94, ndcg=0.096)  # 4.4% and 4% worse: within 5%
    fake_run(tmp_path, "rmse", rmse=0.95, ndcg=0.12)
    fake_run(tmp_path, "ndcg", rmse=0.85, ndcg=0.09)
    fake_run(tmp_path, "other_k", rmse=0.90, ndcg=0.01, k=20)
    assert runs.gate(cfg, "close")["passed"]
    assert runs.gate(cfg, "rmse")["reasons"] == [
        "validation RMSE 0.9500 is worse than CURRENT's run base (0.9000) by more than schedule.max_regression 5%"]
    assert runs.gate(cfg, "ndcg")["reasons"] == [
        "NDCG@10 0.0900 is worse than CURRENT's run base (0.1000) by more than schedule.max_regression 5%"]
    verdict = runs.gate(cfg, "other_k")
    assert verdict["passed"] and verdict["notes"] == ["CURRENT's run base reports NDCG@10, not @20: NDCG not compared"]
    (tmp_path / "runs" / "base" / "report" / "manifest.json").unlink()  # CURRENT's report removed by hand
    verdict = runs.gate(cfg, "rmse")
    assert verdict["passed"] and "CURRENT's run base has no readable report" in verdict["notes"][0]


def test_retention_keeps_current_and_what_is_not_a_run(tmp_path):
    cfg = cfg_for(tmp_path, "schedule.keep_runs=2")
    for day in range(1, 6):
        fake_run(tmp_path, f"2024-01-0{day}", created=f"2024-01-0{day}T03:00:00+00:00")
    runs.point_at(cfg, "2024-01-01", "test")
    notes = tmp_path / "runs" / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a run")
    (tmp_path / "runs" / "empty").mkdir()
    assert runs.prune(cfg) == ["2024-01-02", "2024-01-03"]
    left = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert left == ["2024-01-01", "2024-01-04", "2024-01-05", "CURRENT", "empty", "notes"]
    assert runs.prune(cfg) == []


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    cfg = cfg_for(tmp_path)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "runs" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"stage": "run", "run_id": "old", "host": socket.gethostname(),
                                "pid": int(ended.stdout), "started_at": "2024-01-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="pipeline.runs"), runs.lock(cfg, "new"):
        holder = json.loads(lock.read_text())
        assert holder["run_id"] == "new" and holder["pid"] != int(ended.stdout)
    assert "left by run old" in caplog.text and "taking it over" in caplog.text
    assert not lock.exists()


def test_a_lock_from_another_host_is_never_guessed_stale(tmp_path):
    lock = tmp_path / "runs" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"stage": "run", "run_id": "x", "host": "elsewhere", "pid": 1,
                                "started_at": "2024-01-01T00:00:00+00:00"}))
    with pytest.raises(StageError, match="run x on host elsewhere, pid 1"):
        with runs.lock(cfg_for(tmp_path), "y"):
            pass
    assert lock.exists()


def test_run_id_must_name_a_directory():
    with pytest.raises(config.ConfigError, match="schedule.run_id"):
        config.load(overrides=["schedule.run_id=../elsewhere"])
    assert config.load(overrides=["schedule.run_id=2024-06-01"]).schedule.run_id == "2024-06-01"  # not a date
