"""A Spark standalone cluster of three test hosts on this machine, for tests/test_cluster.py.

Each host is a network namespace with its own `eth0` on a bridge, so that Spark, Horovod and Gloo traffic
crosses an interface that is not loopback: dmf-h0 runs the master and the driver (spark-submit), dmf-h1 and
dmf-h2 one worker each, with 1 core and one fake GPU that a discovery script reports (as Horovod's own Spark
tests do). The hosts share this machine's file system, which stands in for a cluster's shared storage.
Needs root and iproute2; everything it starts is stopped, and the namespaces removed, on the way out.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark

BRIDGE = "dmf-br0"
SUBNET = "10.77.0"
HOSTS = ("dmf-h0", "dmf-h1", "dmf-h2")  # the master and driver, then the workers
INTERFACE = "eth0"  # every host's name for its link to the bridge
MASTER_PORT = 7077
MASTER_UI_PORT = 8080
SPARK_HOME = os.path.dirname(pyspark.__file__)
FAKE_GPUS = {1: "3", 2: "5"}  # the address each worker's discovery script reports: distinct, so a test can tell


def address(host: int) -> str:
    return f"{SUBNET}.{10 + host}"


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def host_pids(host: int) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", HOSTS[host]], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def usable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "iproute2's `ip netns` does not work here"
    if subprocess.run(["java", "-version"], capture_output=True).returncode != 0:
        return "the Spark master and workers need java on PATH"
    return None


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        # The driver copies and unpacks the archive, and executors fetch it, into temporary and local directories
        # that a killed JVM leaves behind: here, not /tmp, so that `stop` deletes them.
        self.scratch = base / "scratch"
        self.master_url = f"spark://{address(0)}:{MASTER_PORT}"
        self.daemons: dict[str, subprocess.Popen] = {}

    # --- hosts -------------------------------------------------------------------------------------------------
    def create_hosts(self) -> None:
        self.remove_hosts()  # what a killed earlier run left behind
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, host in enumerate(HOSTS):
            sh("ip", "netns", "add", host)
            sh("ip", "link", "add", f"{host}-v", "type", "veth", "peer", "name", INTERFACE, "netns", host)
            sh("ip", "link", "set", f"{host}-v", "master", BRIDGE, "up")
            sh("ip", "-n", host, "addr", "add", f"{address(i)}/24", "dev", INTERFACE)
            sh("ip", "-n", host, "link", "set", INTERFACE, "up")
            sh("ip", "-n", host, "link", "set", "lo", "up")
            # `ip netns exec` bind-mounts /etc/netns/HOST/hosts over /etc/hosts. Each host's name must resolve
            # to its cluster address: Horovod 0.28's Gloo binds its process-set context to that address, not to
            # HOROVOD_GLOO_IFACE, and this machine's /etc/hosts sends its name to 127.0.0.1.
            etc = Path("/etc/netns") / host
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{address(i)} {socket.gethostname()}\n")

    def remove_hosts(self) -> None:
        for i, host in enumerate(HOSTS):
            if Path(f"/run/netns/{host}").exists():
                self.kill_host(i)
                subprocess.run(["ip", "netns", "del", host], capture_output=True)
            # The kernel frees a deleted namespace's devices later; deleting the outer end frees both now.
            subprocess.run(["ip", "link", "del", f"{host}-v"], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)

    def kill_host(self, host: int) -> None:
        """Every process on the host, at once: what a lost machine looks like to the rest."""
        for pid in host_pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name, proc in list(self.daemons.items()):
            if name.endswith(str(host)):
                proc.wait()
                del self.daemons[name]

    def in_host(self, host: int, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", HOSTS[host], *argv], env=env, stdout=log.open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    # --- Spark daemons -----------------------------------------------------------------------------------------
    def daemon_env(self, host: int) -> dict:
        return {**os.environ, "SPARK_HOME": SPARK_HOME, "SPARK_LOCAL_IP": address(host),
                "SPARK_LOG_DIR": str(self.base / "logs"), "SPARK_NO_DAEMONIZE": "1"}

    def start_master(self) -> None:
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(exist_ok=True)
        self.daemons["master0"] = self.in_host(
            0, [f"{SPARK_HOME}/bin/spark-class", "org.apache.spark.deploy.master.Master", "--host", address(0),
                "--port", str(MASTER_PORT), "--webui-port", str(MASTER_UI_PORT)],
            self.daemon_env(0), self.base / "logs" / "master.log")
        self.wait_for(lambda s: s.get("status") == "ALIVE", "the master to start")

    def start_worker(self, host: int) -> None:
        script = self.base / "gpus.sh"
        script.write_text('#!/bin/sh\necho "{\\"name\\": \\"gpu\\", \\"addresses\\": [\\"$DMF_FAKE_GPU\\"]}"\n')
        script.chmod(0o755)
        env = {**self.daemon_env(host), "DMF_FAKE_GPU": FAKE_GPUS[host],
               "SPARK_WORKER_DIR": str(self.base / f"worker{host}"),
               "SPARK_LOCAL_DIRS": str(self.scratch),  # the executors' block managers
               # Each application unpacks the 520 MB archive to 1.7 GB in its work dir: the worker deletes it
               # once the application has ended, as a long-running cluster should, so a suite does not fill the disk.
               "SPARK_WORKER_OPTS": f"-Dspark.worker.resource.gpu.amount=1 "
                                    f"-Dspark.worker.resource.gpu.discoveryScript={script} "
                                    f"-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.interval=20 "
                                    f"-Dspark.worker.cleanup.appDataTtl=10"}
        self.daemons[f"worker{host}"] = self.in_host(
            host, [f"{SPARK_HOME}/bin/spark-class", "org.apache.spark.deploy.worker.Worker", "--host", address(host),
                   "--cores", "1", "--memory", "3g", self.master_url],
            env, self.base / "logs" / f"worker{host}.log")
        self.wait_for(lambda s: address(host) in self.alive_workers(s), f"worker {host} to register")

    def state(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"http://{address(0)}:{MASTER_UI_PORT}/json", timeout=2) as r:
                return json.load(r)
        return {}

    @staticmethod
    def alive_workers(state: dict) -> list[str]:
        return [w["host"] for w in state.get("workers", []) if w["state"] == "ALIVE"]

    def wait_for(self, ready, what: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready(self.state()):
                return
            dead = [name for name, p in self.daemons.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {self.base}/logs")
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}; see {self.base}/logs")

    # --- jobs --------------------------------------------------------------------------------------------------
    def submit(self, job: str, args: list[str], archive: Path, log: Path, conf: dict | None = None,
               wait: bool = True):
        """spark-submit jobs/<job>.py from the driver host, the environment shipped as users ship it."""
        conf = {"spark.pyspark.python": "./environment/bin/python", "spark.pyspark.driver.python": sys.executable,
                "spark.executor.memory": "1500m", "spark.ui.enabled": "false", "spark.local.dir": str(self.scratch),
                "spark.driver.extraJavaOptions": f"-Djava.io.tmpdir={self.scratch}",
                "spark.executor.extraJavaOptions": f"-Djava.io.tmpdir={self.scratch}", **(conf or {})}
        argv = [f"{SPARK_HOME}/bin/spark-submit", "--master", self.master_url, "--driver-memory", "1g",
                "--archives", f"{archive}#environment"]
        for key, value in conf.items():
            argv += ["--conf", f"{key}={value}"]
        repo = Path(__file__).resolve().parents[1]
        env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
        entry = job if job.endswith(".py") else str(repo / "jobs" / f"{job}.py")
        proc = self.in_host(0, [*argv, entry, *args], {**env, "SPARK_HOME": SPARK_HOME}, log)
        return proc.wait() if wait else proc

    def executor_pids(self, host: int) -> list[int]:
        found = []
        for pid in host_pids(host):
            with contextlib.suppress(OSError):
                if b"CoarseGrainedExecutorBackend" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def stop(self) -> None:
        for proc in self.daemons.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.daemons.clear()
        self.remove_hosts()
        # The unpacked environments (1.7 GB an application and host); the logs stay for a failure's reader.
        for unpacked in [self.scratch, *self.base.glob("worker*/app-*/*/environment")]:
            shutil.rmtree(unpacked, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(base: Path):
    cluster = Cluster(base)
    try:
        cluster.create_hosts()
        cluster.start_master()
        for host in (1, 2):
            cluster.start_worker(host)
        yield cluster
    finally:
        cluster.stop()
