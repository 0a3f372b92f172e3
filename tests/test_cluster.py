"""The pipeline through spark-submit on a Spark standalone cluster of three test hosts (tests/cluster.py), with the
environment packed by deploy/pack.sh, against the same stages in local mode; then lost workers and executors.

`make test-cluster` runs this module alone. The packed environment is built once into work/pack/ and reused
while the checkout's package is unchanged (deploy/pack.sh reinstalls it every time)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import cluster as cluster_mod
import pandas as pd
import pytest
import yaml

from pipeline import config, evaluate, recommend, storage
from pipeline.data import prepare, synth
from pipeline.training import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(cluster_mod.usable() is not None,
                                                   reason=str(cluster_mod.usable()))]
SETTINGS = {
    "spark": {"master": None, "network_interface": cluster_mod.INTERFACE,
              "conf": {"spark.sql.shuffle.partitions": 4}},
    "synth": {"users": 300, "items": 120, "ratings": 12000, "seed": 5},
    "prepare": {"max_ranks": 2},
    # One thread per rank in both modes: the sums of a step then add up in the same order.
    "train": {"model": "mf", "num_proc": 2, "epochs": 4, "user_dim": 8, "item_dim": 8, "threads_per_rank": 1,
              "patience": 20},
    "recommend": {"top_n": 10},
}
# What a GPU cluster's train submit asks for: a GPU per task; each worker offers one (a fake one, tests/cluster.py).
GPU_TASKS = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"}
LOCAL = ["spark.master=local[2]", "spark.network_interface=null"]
LONGER = "train.epochs=40"  # the run a lost worker interrupts (about 10 s of epochs), and its uninterrupted twin


@pytest.fixture(scope="module")
def archive() -> Path:
    out = REPO / "work" / "pack" / "dmf-env.tar.gz"
    subprocess.run([str(REPO / "deploy" / "pack.sh"), str(out)], check=True, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with cluster_mod.running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def runs(spark, hosts, archive, tmp_path_factory):
    """The same pipeline on the cluster (spark-submit, stage by stage) and in local mode, on one synthetic set."""
    base = tmp_path_factory.mktemp("runs")
    conf_file = base / "cluster.yaml"
    conf_file.write_text(yaml.safe_dump({"work_dir": str(base / "work"), **SETTINGS}))
    local = config.load(str(conf_file), LOCAL)
    synth.generate(spark, local.synth, str(base / "raw"))
    on, off = base / "cluster", base / "local"
    common = ["--config", str(conf_file)]
    stages = [("prepare", ["--input", str(base / "raw"), "--out", str(on / "data")]),
              ("train", ["--data", str(on / "data"), "--out", str(on / "model")]),
              ("evaluate", ["--model-dir", str(on / "model"), "--out", str(on / "report")]),
              ("recommend", ["--model-dir", str(on / "model"), "--out", str(on / "recs")])]
    seconds = {}
    for job, args in stages:
        started = time.time()
        log = base / f"{job}.log"
        conf = GPU_TASKS if job == "train" else {}
        assert hosts.submit(job, [*common, *args], archive, log, conf) == 0, log.read_text()[-4000:]
        seconds[job] = time.time() - started
    prepare.prepare(spark, local, str(base / "raw"), str(off / "data"))
    train.train(spark, local, str(off / "data"), str(off / "model"))
    evaluate.evaluate(spark, local, str(off / "model"), None, str(off / "report"))
    recommend.recommend(spark, local, str(off / "model"), None, str(off / "recs"))
    print("spark-submit seconds per stage:", {k: round(v) for k, v in seconds.items()})
    return {"base": base, "conf": conf_file, "common": common, "on": on, "off": off}


def table(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    for column in df.select_dtypes("object").columns:  # lists (genres) do not sort; their text does
        df[column] = df[column].astype(str)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def content(path: Path) -> tuple[int, str]:
    """Row count and a checksum of a Parquet table's rows, whatever its part files."""
    df = table(path)
    return len(df), hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()


def test_spark_submit_runs_every_stage_as_local_mode_does(runs):
    on, off = runs["on"], runs["off"]
    for name in ("train", "valid", "users", "items"):
        assert content(on / "data" / name) == content(off / "data" / name), name
    a, b = (storage.read_manifest(str(d / "model"), "train") for d in (on, off))
    assert abs(a["metrics"]["valid_rmse"] - b["metrics"]["valid_rmse"]) < 1e-4
    # One rank on each worker, each with the GPU address its worker's discovery script reported.
    assert sorted(tuple(r["gpus"]) for r in a["ranks"]) == [(g,) for g in sorted(cluster_mod.FAKE_GPUS.values())]
    ea, eb = (json.loads((d / "report" / "metrics.json").read_text()) for d in (on, off))
    assert abs(ea["rating"]["rmse"] - eb["rating"]["rmse"]) < 1e-4
    ra, rb = (table(d / "recs" / "recommendations")[["user_id", "rank", "item_id"]] for d in (on, off))
    assert len(ra) == 300 * 10
    pd.testing.assert_frame_equal(ra, rb)


def forwarded(log: Path, text: str, proc, timeout: float = 300) -> None:
    """Waits until the driver's log shows `text` (rank output reaches it, prefixed), while `proc` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.3)
    pytest.fail(f"{text!r} never reached {log} while the job ran: {log.read_text()[-3000:] if log.exists() else ''}")


def test_a_lost_worker_fails_training_and_resume_reaches_the_uninterrupted_model(spark, runs, hosts, archive):
    on, base = runs["on"], runs["base"]
    model = base / "model-faults"  # a copy: the other tests use the first model
    shutil.copytree(on / "model", model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    log = base / "train-killed.log"
    args = [*runs["common"], "--data", str(on / "data"), "--out", str(model), "--set", LONGER]
    proc = hosts.submit("train", args, archive, log, GPU_TASKS, wait=False)
    forwarded(log, f"epoch {3:3d}/40", proc)  # rank 0's line, forwarded to the driver
    hosts.kill_host(2)
    assert proc.wait(timeout=300) != 0
    assert "training failed" in log.read_text() and "is unchanged" in log.read_text()
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    hosts.start_worker(2)
    log = base / "train-resumed.log"
    assert hosts.submit("train", [*args, "--resume"], archive, log, GPU_TASKS) == 0, log.read_text()[-4000:]
    uninterrupted = config.load(str(runs["conf"]), [*LOCAL, LONGER])
    train.train(spark, uninterrupted, str(runs["off"] / "data"), str(base / "uninterrupted"))
    a, b = (storage.read_manifest(str(d), "train") for d in (model, base / "uninterrupted"))
    assert [h["valid_rmse"] for h in a["history"]] == pytest.approx([h["valid_rmse"] for h in b["history"]], abs=1e-4)
    assert abs(a["metrics"]["valid_rmse"] - b["metrics"]["valid_rmse"]) < 1e-4


def executor_started_tasks(hosts, host: int) -> bool:
    """Whether an executor on `host` has started a task of the running application (its stderr says so)."""
    return any("Running task" in p.read_text(errors="replace")
               for p in (hosts.base / f"worker{host}").glob("app-*/*/stderr"))


def clear_executor_logs(hosts, host: int) -> None:
    for p in (hosts.base / f"worker{host}").glob("app-*/*/stderr"):
        p.unlink()


@pytest.mark.parametrize("job", ["prepare", "recommend"])
def test_an_executor_killed_mid_job_is_retried_and_the_output_is_the_same(runs, hosts, archive, job):
    on, base = runs["on"], runs["base"]
    out = base / f"{job}-retried"
    args = {"prepare": ["--input", str(base / "raw"), "--out", str(out)],
            "recommend": ["--model-dir", str(on / "model"), "--data", str(on / "data"), "--out", str(out)]}[job]
    clear_executor_logs(hosts, 1)
    log = base / f"{job}-retried.log"
    proc = hosts.submit(job, [*runs["common"], *args], archive, log, wait=False)
    deadline = time.time() + 300
    while not executor_started_tasks(hosts, 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    victims = hosts.executor_pids(1)
    assert proc.poll() is None and victims, "the job ended before an executor could be killed"
    for pid in victims:
        subprocess.run(["kill", "-9", str(pid)], check=True)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert "lost" in log.read_text().lower()  # the driver saw the executor go
    if job == "prepare":
        for name in ("train", "valid", "users", "items"):
            assert content(out / name) == content(on / "data" / name), name
    else:
        assert content(out / "recommendations") == content(on / "recs" / "recommendations")
