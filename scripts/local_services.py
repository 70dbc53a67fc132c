"""Start the real external parts smoa's distributed backends talk to, on this machine, for tests and benchmarks.

* :class:`LocalPostgres` — a throw-away PostgreSQL cluster from the Debian package (``initdb`` + ``pg_ctl`` in a
  temporary directory, on a free 127.0.0.1 port, trust auth for one user ``smoa``). The server refuses to run as
  root, so when this process is root the cluster belongs to the unprivileged ``postgres`` user (``runuser``).
* :class:`LocalS3` — an S3-compatible HTTP endpoint from ``moto``'s server mode (``ThreadedMotoServer``) on
  127.0.0.1 — a real HTTP S3 API that boto3 reaches through ``AWS_ENDPOINT_URL``.

Run it by hand to get a PostgreSQL URL and an S3 endpoint for a shell session (Ctrl-C stops both)::

    .venv/bin/python scripts/local_services.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class ServiceUnavailable(RuntimeError):
    """The service could not be installed or started here (the message says why)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary (``initdb``, ``pg_ctl``); raises :class:`ServiceUnavailable`."""
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    raise ServiceUnavailable(f"PostgreSQL's `{name}` is not installed (apt-get install -y postgresql)")


def ensure_postgres_installed(timeout_s: float = 600.0) -> None:
    """Install Debian's ``postgresql`` package when its server binaries are missing (root + apt-get only)."""
    try:
        pg_bin("initdb")
        return
    except ServiceUnavailable:
        pass
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceUnavailable("PostgreSQL is not installed and this process cannot apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceUnavailable(f"{' '.join(cmd)} failed: {exc}") from exc
        if done.returncode != 0:
            raise ServiceUnavailable(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-1500:]}")
    global PG_BIN_DIRS
    PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    pg_bin("initdb")


class LocalPostgres:
    """One PostgreSQL cluster in a temporary directory; ``url(db)`` gives a psycopg connection URL."""

    user = "smoa"

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="smoa-pg-", dir="/tmp"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._as_root = os.geteuid() == 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> LocalPostgres:
        ensure_postgres_installed()
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)
        self._run([initdb, "-D", str(self.datadir), "-U", self.user, "--auth=trust", "-E", "UTF8",
                   "--no-sync", "--locale=C"], timeout=120)  # fmt: skip
        conf = (
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
            "fsync = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 64MB\n"
        )  # fsync off: test clusters are thrown away; a killed *client* or a restarted server loses nothing
        self._run(["sh", "-c", f"cat >> '{self.datadir}/postgresql.conf' <<'EOF'\n{conf}EOF"])
        self._run([pg_ctl, "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start"], timeout=90)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run([pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"], timeout=60, check=False)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every client connection is cut, the data stays."""
        self._run([pg_bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-m", mode, "-w", "-t", "60",
                   "restart"], timeout=90)  # fmt: skip

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def _run(self, cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceUnavailable(f"PostgreSQL: {' '.join(cmd[:4])} failed: {exc}") from exc
        if check and done.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise ServiceUnavailable(f"PostgreSQL: {' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}{log}")
        return done


class LocalS3:
    """moto's S3 server on 127.0.0.1 (in this process, a thread); ``stop()``/``start()`` keep the stored objects."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - moto[server] is a dev dependency
            raise ServiceUnavailable(f"moto[server] is not installed: {exc}") from exc
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 at this endpoint (dummy credentials moto accepts)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or "smoa-" + uuid.uuid4().hex[:12]
        env = self.env()
        boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)  # fmt: skip
        return name


def main() -> None:
    pg = LocalPostgres().start()
    s3 = LocalS3().start()
    print(f"PostgreSQL: {pg.url()}  (data in {pg.datadir})")
    print(f"S3:         {s3.endpoint}")
    for k, v in s3.env().items():
        print(f"export {k}={v}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
        pg.cleanup()


if __name__ == "__main__":
    main()
