"""A throwaway PostgreSQL server for the publish tests and benchmarks/publish_bench.py.

initdb and the server run as the unprivileged `postgres` user when we are root (initdb refuses root), in a
temporary directory, listening on 127.0.0.1 only. TCP logins need a password (scram-sha-256), so the tests
go through the same password path as production.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import storage


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"


def bindir() -> str | None:
    """Where initdb, pg_ctl and postgres are: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if os.path.isfile(f"{found}/initdb"):
            return found
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_server(user: str = "dmf", dbname: str = "dmf", settings: tuple[str, ...] = ()):
    """Yields a running Server with a password-authenticated role owning its database; stopped and removed after.
    `settings` are extra server settings (name=value)."""
    bin_dir = bindir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 "
                           "(apt-get install postgresql-15), or put pg_config on PATH")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="dmf-pg-")
    if as_postgres:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, sockets, port = f"{root}/data", f"{root}/sockets", _free_port()
    password = secrets.token_hex(16)

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_postgres, *cmd], capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")

    try:
        run("mkdir", "-m", "700", sockets)
        # The superuser has no password: it is reached only through the Unix socket in our own directory.
        run(f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--locale=C.UTF-8")
        options = " ".join([f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1",
                            *(f"-c {s}" for s in settings)])
        run(f"{bin_dir}/pg_ctl", "-D", data, "-l", f"{root}/server.log", "-w", "-o", options, "start")
        try:
            psql = [f"{bin_dir}/psql", "-h", sockets, "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-q", "-d", "postgres", "-c"]
            run(*psql, f"CREATE ROLE {user} LOGIN CREATEROLE PASSWORD '{password}'")  # CREATEROLE: tests of grants
            run(*psql, f"CREATE DATABASE {dbname} OWNER {user}")
            yield Server("127.0.0.1", port, user, password, dbname)
        finally:
            run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def synthetic_recommendations(out: str, users: int, top_n: int = 10, seed: int = 0, files: int = 8) -> str:
    """A `dmf recommend`-shaped output (Parquet and manifest) of `users` x `top_n` random rows, for sizes that
    training a model for would take too long."""
    rng = np.random.default_rng(seed)
    recs = pd.DataFrame({"user_id": np.repeat(np.arange(1, users + 1, dtype=np.int64), top_n),
                         "rank": np.tile(np.arange(1, top_n + 1, dtype=np.int32), users),
                         "item_id": rng.integers(1, 27_000, users * top_n),
                         "score": np.sort(rng.random((users, top_n), dtype=np.float32) * 5, axis=1)[:, ::-1].ravel()})
    recs["title"] = "Movie " + recs.item_id.astype(str)
    with storage.publish(out, "recommend") as tmp:
        os.makedirs(f"{tmp}/recommendations")
        for i, rows in enumerate(np.array_split(np.arange(len(recs)), files)):
            recs.iloc[rows].to_parquet(f"{tmp}/recommendations/part-{i:05d}.parquet", index=False)
        storage.write_manifest(tmp, {"stage": "recommend", "model": "synthetic", "data": f"{out}/no-prepared-data",
                                     "top_n": top_n, "format": "parquet", "path": "recommendations",
                                     "counts": {"users": users, "rows": len(recs)}})
    return out
