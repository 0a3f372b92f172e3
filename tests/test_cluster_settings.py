"""What a cluster run depends on, checked without a cluster: storage URLs kept whole for Spark, a config read
from any fsspec URL, --log-level where jobs/ put it, a rank's GPU and slot count from Spark's resources, and
rank output streamed to the driver as it is printed."""
import importlib
import logging
import queue
import threading
from types import SimpleNamespace

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import cli, config, storage
from pipeline.config import ConfigError, SparkConfig
from pipeline.data import ingest
from pipeline.spark import session
from pipeline.training import loop, train


class BucketStore(MemoryFileSystem):
    """An object store in memory under s3a://, stripped the way s3fs strips it (bucket/key)."""
    protocol = ("s3a",)
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        return path.split("://", 1)[-1].rstrip("/")


@pytest.fixture
def bucket(monkeypatch):
    # fsspec.registry, the attribute, is a read-only view of the module's _registry
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "s3a", BucketStore)
    fs = BucketStore()
    yield fs
    for path in fs.find("bucket"):
        fs.rm(path)


def test_storage_urls_keep_their_scheme_and_authority(bucket):
    bucket.pipe("bucket/ml/ratings.csv", b"userId,movieId,rating,timestamp\n1,2,4.0,5\n")
    bucket.pipe("bucket/ml/movies.csv", b"movieId,title,genres\n2,A (1999),Drama\n")
    source = ingest.detect("s3a://bucket/ml")
    assert (source.format, source.ratings, source.movies) == (
        "csv", "s3a://bucket/ml/ratings.csv", "s3a://bucket/ml/movies.csv")
    assert storage.respelled("hdfs://nn:8020/data/ml", "/data/ml/ratings.dat") == "hdfs://nn:8020/data/ml/ratings.dat"
    assert storage.respelled("file:///data/ml/", "/data/ml/u.data") == "file:///data/ml/u.data"
    assert storage.respelled("/data/ml", "/data/ml/u.data") == "/data/ml/u.data"


def test_a_config_file_is_read_from_any_fsspec_url(bucket):
    bucket.pipe("bucket/conf/run.yaml", b"train: {model: dmf, lr: 0.003}\n")
    cfg = config.load("s3a://bucket/conf/run.yaml")
    assert (cfg.train.model, cfg.train.lr) == ("dmf", 0.003)
    with pytest.raises(ConfigError, match="config file s3a://bucket/conf/missing.yaml does not exist"):
        config.load("s3a://bucket/conf/missing.yaml")
    with pytest.raises(ConfigError, match="config file nosuch://x.yaml cannot be read"):
        config.load("nosuch://x.yaml")


def test_log_level_is_taken_before_and_after_the_command_name():
    p = cli.parser()
    assert p.parse_args(["train"]).log_level == "INFO"
    assert p.parse_args(["--log-level", "warning", "train"]).log_level == "WARNING"
    assert p.parse_args(["train", "--set", "spark.master=null", "--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--log-level", "loud"])


def test_a_rank_uses_the_gpu_spark_assigned_to_its_task(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.rank_device(["5"], 0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert loop.rank_device(["5"], 0) == torch.device("cuda", 5)
    assert loop.rank_device([], 1) == torch.device("cuda", 1)  # no GPU scheduling: Horovod's local rank
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the cluster manager shows only this task's host's GPUs
    assert loop.rank_device(["5"], 0) == torch.device("cuda", 1)


def fake_spark(cores: int, executors: int, conf: dict):
    status = SimpleNamespace(size=lambda: executors + 1)  # the driver is listed too
    jsc = SimpleNamespace(sc=lambda: SimpleNamespace(getExecutorMemoryStatus=lambda: status))
    sc = SimpleNamespace(defaultParallelism=cores, _jsc=jsc,
                         getConf=lambda: SimpleNamespace(get=lambda key, default=None: conf.get(key, default)))
    return SimpleNamespace(sparkContext=sc, conf=SimpleNamespace(get=lambda key: "spark://m:7077"))


def test_the_slot_check_counts_gpus_where_tasks_ask_for_them():
    assert train.task_slots(fake_spark(16, 2, {})) == (16, "task slots")
    gpus = {"spark.task.resource.gpu.amount": "1", "spark.executor.resource.gpu.amount": "2"}
    assert train.task_slots(fake_spark(16, 2, gpus)) == (4, "GPU task slots")
    halves = {**gpus, "spark.task.resource.gpu.amount": "0.5"}
    assert train.task_slots(fake_spark(16, 2, halves)) == (8, "GPU task slots")
    with pytest.raises(storage.StageError, match="train.num_proc=5 ranks need as many Spark GPU task slots, and "
                                                 "this Spark has 4"):
        train.check_slots(fake_spark(16, 2, gpus), 5, wait_s=0)


def test_a_driver_memory_that_cannot_apply_is_named(spark, caplog):
    """The session exists (as spark-submit's does before the config is read): its heap is already fixed."""
    with caplog.at_level(logging.WARNING, logger="pipeline.spark"):
        session(SparkConfig(master="local[2]", app_name="dmf-tests", conf={"spark.driver.memory": "3g"}))
    assert "spark.driver.memory=3g in the config has no effect here (the driver runs with 2g)" in caplog.text
    assert "spark-submit --driver-memory 3g" in caplog.text


class StreamRequest:
    """Asks the service below for its stream, as Horovod's driver asks a task service for a rank's output."""


def test_rank_output_reaches_the_driver_as_it_is_printed(monkeypatch):
    """Horovod streams a rank's output through its services (deploy/patch_horovod.py, second change): unpatched,
    the executor buffered it and the driver read it in 64 KiB blocks, so a training run's epochs showed at its end."""
    from horovod.runner.common.util import network, secret
    from horovod.runner.util.streams import Pipe

    monkeypatch.setenv("DMF_BIND_INTERFACE", "lo")
    output = Pipe()

    class RankOutput(network.BasicService):
        def _handle(self, req, client_address):
            if isinstance(req, StreamRequest):
                return network.AckStreamResponse(), output
            return super()._handle(req, client_address)

    key = secret.make_secret_key()
    service = RankOutput("rank output", key, nics={"lo"})
    received = queue.Queue()
    try:
        client = network.BasicClient("rank output", service.addresses(), key, verbose=0)
        reader = threading.Thread(target=client._send, args=(StreamRequest(), SimpleNamespace(write=received.put)),
                                  daemon=True)
        reader.start()
        for epoch in (1, 2):
            output.write(f"epoch {epoch}\n")
            assert received.get(timeout=10) == f"epoch {epoch}\n"  # while the stream is still open
        output.close()
        reader.join(timeout=10)
        assert not reader.is_alive()
    finally:
        output.close()
        service.shutdown()
