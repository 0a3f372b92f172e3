"""README's "Reliability and security" promises: nothing the user did not ask to replace is deleted, prepared
data cannot run code, a local run listens on loopback only, and leftovers of a killed run are cleaned."""
import ipaddress
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline import cli, evaluate, predict, recommend, storage
from pipeline.data import prepare, synth
from pipeline.storage import StageError
from pipeline.training import loop, train

STAGES = {  # each stage, called with inputs that do not exist and keyword arguments such as force
    "synth": lambda spark, cfg, missing, out, **kw: synth.generate(spark, cfg.synth, out, **kw),
    "prepare": lambda spark, cfg, missing, out, **kw: prepare.prepare(spark, cfg, missing, out, **kw),
    "train": lambda spark, cfg, missing, out, **kw: train.train(spark, cfg, missing, out, **kw),
    "evaluate": lambda spark, cfg, missing, out, **kw: evaluate.evaluate(spark, cfg, missing, missing, out, **kw),
    "recommend": lambda spark, cfg, missing, out, **kw: recommend.recommend(spark, cfg, missing, None, out, **kw),
    "predict": lambda spark, cfg, missing, out, **kw: predict.predict(spark, missing, missing, out, **kw),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_output_path_that_is_not_the_stages_is_refused_before_any_work(spark, small_mf, tmp_path, stage):
    cfg, _ = small_mf
    run = STAGES[stage]
    missing = str(tmp_path / "no-such-input")  # had the stage started work, it would fail on this first
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match=r"mine holds 1 entries \(notes.txt\) and no manifest.json .* --force"):
        run(spark, cfg, missing, str(foreign))
    other = tmp_path / "other-stage"
    other.mkdir()
    storage.write_manifest(str(other), {"stage": "something-else"})
    with pytest.raises(StageError, match="holds a 'something-else' output: refusing to replace it"):
        run(spark, cfg, missing, str(other))
    plain = tmp_path / "a-file"
    plain.write_text("keep me too")
    for force in ({}, {"force": True}):
        with pytest.raises(StageError, match="a-file is a file.*--force does not replace files"):
            run(spark, cfg, missing, str(plain), **force)
    assert (foreign / "notes.txt").read_text() == "keep me" and plain.read_text() == "keep me too"
    assert json.loads((other / "manifest.json").read_text())["stage"] == "something-else"


def test_force_replaces_a_directory_and_an_earlier_output_needs_no_force(spark, small_mf, tmp_path):
    cfg, _ = small_mf
    out = tmp_path / "raw"
    out.mkdir()
    (out / "notes.txt").write_text("replace me")
    synth.generate(spark, cfg.synth, str(out), force=True)
    assert not (out / "notes.txt").exists() and json.loads((out / "manifest.json").read_text())["stage"] == "synth"
    synth.generate(spark, cfg.synth, str(out))  # its own earlier output
    assert not (out / storage.OWNER).exists() and not list(tmp_path.glob("raw.*"))
    args = cli.parser().parse_args(["synth", "--out", str(out), "--force"])
    assert args.force


def plant_pickle(directory: Path, marker: Path) -> Path:
    """A _common_metadata whose petastorm Unischema key holds a pickle that writes `marker` when loaded."""
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    path = directory / "_common_metadata"
    schema = pq.read_schema(next(directory.glob("*.parquet")))
    pq.write_metadata(schema.with_metadata({b"dataset-toolkit.unischema.v1": pickle.dumps(Payload())}), path)
    return path


def test_a_pickle_planted_in_prepared_data_never_runs(spark, small_mf, tmp_path):
    cfg, base = small_mf
    data = tmp_path / "data"
    shutil.copytree(base / "data", data)
    marker = tmp_path / "pwned"
    planted = plant_pickle(data / "train", marker)
    # A rank that opened it anyway would not load the stored schema (petastorm then fails on the file).
    with pytest.raises(Exception) as failure:
        loop.read_shard(f"file://{data / 'train'}", 0, 1)
    assert not marker.exists()
    assert "_common_metadata" in str(failure.value)
    # The driver refuses such a directory before any rank starts, naming the file.
    with pytest.raises(StageError, match=f"{planted}.* is not a file that prepare writes"):
        train.train(spark, cfg, str(data), str(tmp_path / "model"))
    assert not marker.exists() and not (tmp_path / "model").exists()


def listening(pids: set[int]) -> set[tuple[str, int, int]]:
    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # the JVM's ::ffff:127.0.0.1 is IPv4 loopback


def test_a_local_two_rank_run_listens_on_loopback_only(spark, small_mf, tmp_path):
    cfg, base = small_mf
    seen: set = set()
    done = threading.Event()

    def watch():
        me = psutil.Process()
        while not done.is_set():
            try:
                pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
                seen.update(listening(pids))
            except psutil.Error:
                pass  # a process ended between the two calls
            done.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train.train(spark, cfg, str(base / "data"), str(tmp_path / "model"))
    finally:
        done.set()
        watcher.join()
    # Spark's driver and block manager, Horovod's driver and task services and the Gloo rendezvous, in the
    # JVM, this process and the Python workers: several processes listen, on loopback every one.
    assert len({pid for _, _, pid in seen}) >= 3, seen
    exposed = sorted(s for s in seen if not loopback(s[0]))
    assert not exposed, f"listening beyond loopback (address, port, pid): {exposed}"


def test_horovods_find_port_binds_the_named_interface(monkeypatch):
    """The patch deploy/install.sh applies (deploy/patch_horovod.py); without it find_port binds every interface."""
    from horovod.runner.util.network import find_port

    def server(addr):
        s = socket.socket()
        s.bind(addr)
        return s

    monkeypatch.setenv("DMF_BIND_INTERFACE", "lo")
    server, port = find_port(server)
    assert server.getsockname() == ("127.0.0.1", port)
    server.close()


def test_stale_temporaries_of_a_killed_run_are_removed_and_no_others(spark, small_mf, tmp_path):
    cfg, _ = small_mf
    out = tmp_path / "raw"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    owners = {"dead": {"stage": "synth", "host": host, "pid": ended.pid},
              "live": {"stage": "synth", "host": host, "pid": os.getpid()},
              "elsewhere": {"stage": "synth", "host": host + "-other", "pid": ended.pid},
              "other-stage": {"stage": "prepare", "host": host, "pid": ended.pid}}
    for tag, owner in owners.items():
        (tmp_path / f"raw.tmp-{tag}").mkdir()
        (tmp_path / f"raw.tmp-{tag}" / storage.OWNER).write_text(json.dumps(owner))
    (tmp_path / "raw.tmp-nobody").mkdir()  # no owner file: nothing proves it is ours
    synth.generate(spark, cfg.synth, str(out))
    assert sorted(p.name for p in tmp_path.glob("raw.*")) == ["raw.tmp-elsewhere", "raw.tmp-live", "raw.tmp-nobody",
                                                               "raw.tmp-other-stage"]
    # Killed between its two renames: the previous output had been moved to .old-, the new one not yet in place.
    shutil.move(out, tmp_path / "raw.old-dead")
    (tmp_path / "raw.tmp-dead").mkdir()
    (tmp_path / "raw.tmp-dead" / storage.OWNER).write_text(json.dumps(owners["dead"]))
    fs, plain = storage.filesystem(str(out))
    storage.clean_stale(fs, plain, "synth")
    assert json.loads((out / "manifest.json").read_text())["stage"] == "synth"
    assert not (tmp_path / "raw.old-dead").exists() and not (tmp_path / "raw.tmp-dead").exists()


def test_a_zip_input_leaves_no_unpacked_copy_and_the_manifest_names_the_zip(spark, tmp_path, ml100k):
    def unpacked_copies():
        return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("dmf-input-*"))

    before = unpacked_copies()
    good, bad = tmp_path / "ml-100k.zip", tmp_path / "broken.zip"
    lines = (ml100k / "raw" / "u.data").read_text().splitlines()[:3000]
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("ml-100k/u.data", "\n".join(lines) + "\n")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("ml-100k/u.data", "\n".join(line.replace("\t", ",") for line in lines) + "\n")
    cfg = prepare_cfg()
    manifest = prepare.prepare(spark, cfg, str(good), str(tmp_path / "out"))
    assert manifest["counts"]["input_rows"] == 3000 and manifest["source"]["ratings"] == f"{good}/ml-100k/u.data"
    with pytest.raises(StageError, match=r"broken.zip/ml-100k/u.data.* 1 tab-separated fields where ml-100k"):
        prepare.prepare(spark, cfg, str(bad), str(tmp_path / "out2"))
    assert unpacked_copies() == before


def prepare_cfg():
    from pipeline import config
    return config.load(overrides=["prepare.max_ranks=2"])


def test_a_checkpoint_directory_with_other_files_is_never_removed(tmp_path):
    work = tmp_path / "model.checkpoint"
    work.mkdir()
    (work / "checkpoint.pt").write_text("old")
    assert train.checkpoint_dir(str(tmp_path / "model"), resume=True) == str(work)
    assert (work / "checkpoint.pt").exists()  # kept for --resume
    train.checkpoint_dir(str(tmp_path / "model"), resume=False)
    assert list(work.iterdir()) == []  # a fresh run starts afresh
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match="holds files that are not training checkpoints"):
        train.checkpoint_dir(str(tmp_path / "model"), resume=False)
    assert (work / "notes.txt").exists()


@pytest.mark.parametrize("name,text,message", [
    ("u.data", "", r"u.data is empty: it holds no ratings"),
    ("ratings.csv", "", r"ratings.csv is empty: it holds no ratings"),
    ("ratings.csv", "userId,movieId,rating,timestamp,extra\n1,2,3,4,5\n", r"5 columns where ratings.csv has 4"),
    ("u.data", "1\t2\t3\n2\t3\t4\n", r"These lines have 3 tab-separated fields where ml-100k ratings have 4"),
    ("u.data", "1,2,3,4\n2,3,4,5\n", r"These lines have 1 tab-separated fields where ml-100k ratings have 4"),
])
def test_bad_input_files_are_named_with_what_is_wrong(spark, tmp_path, name, text, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_text(text)
    with pytest.raises(StageError, match=message):
        prepare.prepare(spark, prepare_cfg(), str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_accepted_and_two_ratings_files_need_a_format(spark, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [f"{u},{i},{(u * i) % 5 + 1},{u * 100 + i}" for u in range(1, 31) for i in range(1, 6)]
    (folder / "ratings.csv").write_bytes("\ufeffuserId,movieId,rating,timestamp\n".encode() +
                                         ("\n".join(rows) + "\n").encode())
    manifest = prepare.prepare(spark, prepare_cfg(), str(folder), str(tmp_path / "out"))
    assert manifest["counts"]["input_rows"] == len(rows) and not manifest["counts"]["rejected_by_reason"].get(
        "unparseable_line")
    (folder / "u.data").write_text("1\t1\t5\t1\n")
    with pytest.raises(StageError, match=r"holds u.data and ratings.csv: say which to read with --format"):
        prepare.prepare(spark, prepare_cfg(), str(folder), str(tmp_path / "out2"))


def test_an_empty_pairs_file_is_named(spark, small_mf, tmp_path):
    _, base = small_mf
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("")
    with pytest.raises(StageError, match="pairs.csv is empty"):
        predict.predict(spark, str(base / "model"), str(pairs), str(tmp_path / "out"))


def test_a_recommend_run_that_would_publish_no_rows_fails_and_keeps_the_previous_output(spark, small_mf, tmp_path,
                                                                                          monkeypatch):
    cfg, base = small_mf
    out = tmp_path / "recs"
    before = recommend.recommend(spark, cfg, str(base / "model"), None, str(out))
    assert before["counts"]["rows"] > 0
    schema = "user_idx int, rank int, item_idx int, score float"
    monkeypatch.setattr(recommend, "top_n", lambda spark, *a, **k: spark.createDataFrame([], schema))
    with pytest.raises(StageError, match="no recommendation was written.*unchanged"):
        recommend.recommend(spark, cfg, str(base / "model"), None, str(out))
    assert storage.read_manifest(str(out), "recommend") == before
