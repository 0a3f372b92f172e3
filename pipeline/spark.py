"""The SparkSession every stage is handed: built from the config, or the one spark-submit made."""
from __future__ import annotations

import logging
import os
import sys

import psutil
from pyspark.sql import SparkSession

from pipeline.config import ConfigError, SparkConfig

DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
    # Python workers run PyTorch in mapInPandas; one BLAS thread each keeps cores from being oversubscribed.
    "spark.executorEnv.OMP_NUM_THREADS": "1",
    # pandas <-> Spark through Arrow (prepare's id maps, synth's tables, the benchmarks' frames).
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}
LOOPBACK = "lo"
log = logging.getLogger(__name__)
BIND_VARIABLE = "DMF_BIND_INTERFACE"  # read by Horovod's find_port, as deploy/patch_horovod.py patches it


def network_interface(cfg: SparkConfig) -> str | None:
    """The interface every server of a run binds to: spark.network_interface, or loopback in local mode.
    None (a cluster that names none) leaves Spark's and Horovod's defaults: every interface."""
    if cfg.network_interface:
        return cfg.network_interface
    return LOOPBACK if (cfg.master or "").startswith("local") else None


def interface_address(interface: str) -> str:
    for addr in psutil.net_if_addrs().get(interface, []):
        if addr.family.name == "AF_INET":
            return addr.address
    known = ", ".join(sorted(psutil.net_if_addrs()))
    raise ConfigError(f"spark.network_interface={interface} is not an interface with an IPv4 address here "
                      f"(this host has {known})")


def network_conf(cfg: SparkConfig) -> dict:
    """Spark settings that bind the driver to the run's interface, and the environment that binds the rest."""
    interface = network_interface(cfg)
    if interface is None:
        return {}
    address = interface_address(interface)
    # Set before the JVM starts, which inherits them: the web UI binds to SPARK_LOCAL_IP (it has no setting
    # of its own), and Horovod's driver-side servers run in this process.
    os.environ["SPARK_LOCAL_IP"] = address
    os.environ[BIND_VARIABLE] = interface
    return {"spark.driver.bindAddress": address, "spark.driver.host": address,
            f"spark.executorEnv.{BIND_VARIABLE}": interface}


def session(cfg: SparkConfig) -> SparkSession:
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master:
        builder = builder.master(cfg.master)
    # Python workers (mapInPandas, Horovod ranks) need the driver's environment unless told otherwise;
    # in local mode PySpark 3.5 reads only this variable for them, not spark.pyspark.python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in {**DEFAULTS, **network_conf(cfg), **cfg.conf}.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    asked, running = cfg.conf.get("spark.driver.memory"), spark.sparkContext.getConf().get("spark.driver.memory")
    if asked is not None and str(asked) != running:
        # Under spark-submit the driver's JVM is running before this code: its heap was fixed on the command line.
        log.warning("spark.driver.memory=%s in the config has no effect here (the driver runs with %s): pass "
                    "spark-submit --driver-memory %s", asked, running or "Spark's default, 1g", asked)
    return spark
