"""A throwaway PgBouncer (Debian's `pgbouncer`) in transaction mode, in front of a test
database: its own port, config, auth file and log in a folder of its own.

Transaction mode hands each transaction to whichever server connection is free, so anything
a client leaves on the server between transactions (a prepared statement, a temp table, a
session advisory lock, LISTEN) is lost or lands on another client. A small pool makes that
happen at once rather than by chance: a handful of server connections serve every client.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

INSTALL = "apt-get install pgbouncer"
START_SECONDS = 10.0


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)


def require() -> str:
    """pgbouncer's path; without it the test skips, saying how to install it (fails instead
    under TRACKER_REQUIRE_TOOLS=1, as in CI)."""
    found = binary()
    if found is None:
        reason = f"pgbouncer is not installed ({INSTALL})"
        if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
            pytest.fail(f"TRACKER_REQUIRE_TOOLS=1 but: {reason}")
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgBouncer:
    def __init__(self, database_url: str, folder: Path, *, pool_size: int = 4) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        # The embedded PostgreSQL listens on a Unix socket (?host=/folder), others on TCP.
        self._server_host = query.get("host") or parts.hostname or "127.0.0.1"
        self._server_port = parts.port or int(query.get("port", 5432))
        self.user = parts.username or "postgres"
        self._password = parts.password or ""
        self.folder = folder
        self.pool_size = pool_size
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """A DATABASE_URL through this PgBouncer, saying so (the service turns asyncpg's
        statement cache off for it)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}?pgbouncer=true"

    def _run_as(self) -> str | None:
        """PgBouncer refuses to run as root: then it runs as whoever owns the server's socket
        folder (pgserver's PostgreSQL runs as a user of its own), or nobody."""
        if os.geteuid() != 0:
            return None
        if self._server_host.startswith("/"):
            owner = pwd.getpwuid(os.stat(self._server_host).st_uid).pw_name
            if owner != "root":
                return owner
        return "nobody"

    def start(self, executable: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        password = f" password={self._password}" if self._password else ""
        (self.folder / "users.txt").write_text(f'"{self.user}" ""\n')
        config = self.folder / "pgbouncer.ini"
        config.write_text(f"""\
[databases]
* = host={self._server_host} port={self._server_port} user={self.user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / "users.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 1000
logfile = {self.folder / "pgbouncer.log"}
pidfile = {self.folder / "pgbouncer.pid"}
""")
        command = [executable]
        user = self._run_as()
        if user is not None:
            shutil.chown(self.folder, user)
            for path in self.folder.iterdir():
                shutil.chown(path, user)
            command += ["-u", user]
        self.process = subprocess.Popen(command + [str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pgbouncer did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text()[-4000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
