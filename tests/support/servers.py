"""A private PostgreSQL cluster and a private Redis server, on ports of their own, for tests and soak runs that
stop and restart them (never the shared servers on 5432 / 6379)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.processes import free_port


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    return shutil.which(name) or name


def _as_postgres(command: list[str]) -> list[str]:
    """Postgres refuses to run as root: run it as the postgres system user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PrivatePostgres:
    """A throwaway cluster: trust auth for user postgres on 127.0.0.1:port, no Unix socket."""

    def __init__(self) -> None:
        self.port = free_port()
        # Directly under /tmp: the postgres user must be able to reach it (pytest's tmp dirs are root-only).
        self.root = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        subprocess.run(_as_postgres([_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                                     "--auth=trust", "--no-sync"]), check=True, capture_output=True)

    @property
    def url(self) -> str:
        """The server's URL without a database name (append /name)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        subprocess.run(_as_postgres([_postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-t", "60",
                                     "-l", str(self.root / "server.log"), *args]), check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as in a real restart."""
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def is_up(self) -> bool:
        return subprocess.run([_postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
                              ).returncode == 0

    def close(self) -> None:
        if self.is_up():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A Redis server on its own port, no persistence (a restart loses queued messages, as a real one may)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.is_up():
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # no graceful save: the harshest restart
            self.process.wait()
            self.process = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def is_up(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0

    def close(self) -> None:
        self.stop()
