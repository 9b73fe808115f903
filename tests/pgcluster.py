"""A throwaway PostgreSQL 15 cluster for the tests: real server, real sockets on 127.0.0.1.

``initdb`` refuses root, so the cluster runs as the ``postgres`` user (when the tests run as
root) in a temporary directory it owns, listening on 127.0.0.1 only, with password
authentication (SCRAM) as a production server has it: the broker's URLs carry the password, so
the tests can check it never shows, and that a wrong one is refused. One cluster per
test session (~1 s to start), a fresh database per test (``CREATE DATABASE`` from template0,
a few tens of milliseconds), stopped with ``-m fast`` at the end.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from proxyproc import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> bool:
    return (PG_BIN / "initdb").exists()


class PgCluster:
    """``initdb`` + ``pg_ctl start`` in a temp dir; :meth:`new_database` gives a fresh URL."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="consolegate-pg-"))
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._names = itertools.count(1)
        self.password = "pw-" + secrets.token_hex(8)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            PG_BIN / "initdb",
            "-D",
            str(self.root / "data"),
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        )
        pwfile.unlink()
        self._options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self.start()

    def _run(self, *command: object) -> None:
        argv = [str(c) for c in command]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """The URL of ``database`` with the password in it (``password``: another one)."""
        return f"postgresql://postgres:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``; ``mode="immediate"`` is a crash (no checkpoint, clients cut off)."""
        self._run(PG_BIN / "pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def start(self) -> None:
        """Start it again after :meth:`stop`, on the same port (a test's outage ends)."""
        self._run(
            PG_BIN / "pg_ctl",
            "-D",
            str(self.root / "data"),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            self._options,
            "start",
        )

    def destroy(self) -> None:
        try:
            if (self.root / "data" / "postmaster.pid").exists():  # a test may have stopped it
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
