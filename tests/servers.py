"""Helpers for tests that run the app as a real process or cut its database off."""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def repository_copy(directory: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """The files of the repository in `directory`, as a clone has them (with the changes
    not committed yet), but for those under the folders `leave_out`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file() and not name.startswith(leave_out):
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60):
    """Run a command of the project (python from this venv) and capture its output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server(subprocess.Popen[str]):
    """A process of the project whose output goes to a file, read with `output()`.

    (A pipe that nobody reads while the server runs fills up with access-log
    lines, and then the server blocks on its next write.)
    """

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.url = ""  # where it serves, once `serving` knows
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
        super().__init__(
            [sys.executable, *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def start(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> Server:
    return Server(args, env, cwd)


def wait_until_healthy(port: int, process: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.output()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


@contextlib.contextmanager
def serving(env: dict[str, str], workers: int = 1) -> Iterator[Server]:
    """`app.py` as a real process with `env`, on a free port at `.url`, until the block ends;
    with `workers`, uvicorn's workers (sharing a directory for their metrics)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as metrics:
        if workers == 1:
            server = start(["app.py"], {**env, "PORT": str(port)})
        else:
            command = ["-m", "uvicorn", "app:api", "--port", str(port), "--workers", str(workers)]
            server = start(command, {**env, "PROMETHEUS_MULTIPROC_DIR": metrics})
        server.url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(port, server)
            yield server
        finally:
            server.terminate()
            server.wait(timeout=15)


class TcpProxy:
    """A TCP relay to the real database that a test can cut and restore.

    Cutting it closes the listener and every relayed connection, which is what
    clients see when a database server goes away.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


class ChildServer:
    """A server this test run started as a child process of its own."""

    _process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


class RedisServer(ChildServer):
    """A redis-server of the test's own, on a free port, that it can stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


class PostgresServer:
    """A PostgreSQL server of the test's own (initdb + pg_ctl), on a free port, that it
    can stop as abruptly as a crash and start again on the same port.

    The cluster belongs to the `postgres` system user (PostgreSQL refuses to run as
    root), in a directory of its own under /tmp, removed by `remove()`. With
    `standby_of`, a hot standby of that (running) server, copied by pg_basebackup and
    streaming from it.
    """

    def __init__(self, standby_of: "PostgresServer | None" = None, **settings: str) -> None:
        self.settings = settings  # server settings (`-c name=value`), e.g. max_connections
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        self.directory = Path(tempfile.mkdtemp(prefix="books-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        if standby_of is None:
            self._as_postgres(
                [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
            )
        else:  # -R: standby.signal and the primary's address, written for us
            self._as_postgres(
                [str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(standby_of.port),
                 "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast"]
            )  # fmt: skip

    def database_url(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{database}"

    def _as_postgres(self, command: list[str]) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            cwd=self.directory,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._as_postgres(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
             str(self.directory / "log"), "start"]
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is what clients see when the server crashes or the host dies."""
        self._as_postgres(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
        )

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def have_postgres_binaries() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))) and bool(
        shutil.which("runuser")
    )


class PgBouncer(ChildServer):
    """Debian's PgBouncer in transaction mode, on a free port, in front of the PostgreSQL
    at `target_port` (as the `postgres` system user: it refuses to run as root)."""

    def __init__(self, target_port: int, pool_size: int = 20) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="books-pgbouncer-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.port = free_port()
        (self.directory / "users.txt").write_text('"postgres" ""\n')
        self.config = self.directory / "pgbouncer.ini"
        self.config.write_text(
            f"[databases]\n* = host=127.0.0.1 port={target_port}\n\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = trust\nauth_file = {self.directory}/users.txt\n"
            f"pool_mode = transaction\nmax_client_conn = 1000\n"
            f"default_pool_size = {pool_size}\n"
            f"logfile = {self.directory}/pgbouncer.log\n"
            f"pidfile = {self.directory}/pgbouncer.pid\n"
        )

    def url(self, database_url: str) -> str:
        """`database_url` (a database of the PostgreSQL behind) reached through the pooler."""
        from sqlalchemy.engine import make_url

        through = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return through.render_as_string(hide_password=False)

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", "pgbouncer", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            assert self._process.poll() is None, (self.directory / "pgbouncer.log").read_text()
            assert time.monotonic() < deadline, "pgbouncer did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def have_pgbouncer() -> bool:
    return bool(shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()) and bool(
        shutil.which("runuser")
    )
