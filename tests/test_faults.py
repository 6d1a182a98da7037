"""Faults of the real thing: a PostgreSQL server stopped under traffic and started again;
SQLite on a disk that fills up."""

import asyncio
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from responder.testing import AsyncTestClient

from app import api
from settings import Settings
from tests.conftest import BOOK, TEST_DATABASE_URL, app_client
from tests.servers import PostgresServer, free_port, have_postgres_binaries, run, serving

needs_postgres_binaries = pytest.mark.skipif(
    not (TEST_DATABASE_URL and have_postgres_binaries()),
    reason="needs TEST_DATABASE_URL (PostgreSQL here), its initdb and pg_ctl, and runuser",
)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


def assert_unavailable(response: httpx.Response, server: PostgresServer) -> None:
    """A 503 problem that says nothing about the database's internals."""
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.headers.get("Retry-After"), (response.text, dict(response.headers))
    for internal in (str(server.port), "asyncpg", "postgres", "Traceback", "connection"):
        assert internal not in response.json()["detail"], response.text


async def traffic(client: AsyncTestClient, seconds: float) -> list[tuple[str, httpx.Response]]:
    """Writers and readers for `seconds`; each result with the title it tried to store."""
    results: list[tuple[str, httpx.Response]] = []
    deadline = time.monotonic() + seconds

    async def writer(number: int) -> None:
        count = 0
        while time.monotonic() < deadline:
            title = f"w{number}-{count}"
            count += 1
            started = time.monotonic()
            response = await client.post("/books", json={**BOOK, "title": title, "isbn": None})
            assert time.monotonic() - started < 5, "a request hung"
            results.append((title, response))

    async def reader() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await client.get("/books", params={"size": 5})
            assert time.monotonic() - started < 5, "a request hung"
            results.append(("", response))

    await asyncio.gather(*(writer(n) for n in range(3)), reader())
    return results


@needs_postgres_binaries
@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgresql_stopped_under_traffic_comes_back_with_every_acknowledged_write(
    own_postgres: PostgresServer, mode: str
):
    """`immediate` is a crash (connections drop); `fast` is an operator's shutdown
    (sessions are told "terminating connection due to administrator command")."""
    settings = Settings(database_url=own_postgres.url, pool_timeout=2, connect_timeout=2)
    async with app_client(settings) as client:
        running = asyncio.create_task(traffic(client, seconds=3))
        await asyncio.sleep(1)
        await asyncio.to_thread(own_postgres.stop, mode)
        results = await running
        for _, response in results:
            if response.status_code >= 400:
                assert_unavailable(response, own_postgres)
        acknowledged = {title for title, r in results if r.status_code == 201}
        assert acknowledged, "nothing was written before the stop"
        assert any(r.status_code == 503 for _, r in results), "the stop was never noticed"

        health = await client.get("/health")
        assert (
            health.status_code == 503 and health.json()["checks"]["database"]["status"] == "error"
        )
        refused = await client.post("/books", json={**BOOK, "title": "during", "isbn": None})
        assert_unavailable(refused, own_postgres)

        await asyncio.to_thread(own_postgres.start)
        deadline = time.monotonic() + 15
        while (await client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "not back within 15 s of the database"
            await asyncio.sleep(0.2)
        listing = await client.get("/books", params={"size": 100})
        stored = [book["title"] for book in listing.json()["items"]]
        while listing.json()["next_cursor"]:
            listing = await client.get(
                "/books", params={"size": 100, "cursor": listing.json()["next_cursor"]}
            )
            stored += [book["title"] for book in listing.json()["items"]]
        assert acknowledged <= set(stored), "an acknowledged write was lost"
        attempted = {title for title, _ in results if title} | {"during"}
        assert set(stored) <= attempted - {"during"}  # nothing half-made, nothing refused
        assert len(stored) == len(set(stored)) == listing.json()["total"]
        assert (await client.post("/books", json={**BOOK, "isbn": None})).status_code == 201


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 512 KiB file system of the test's own (tmpfs), so that it can fill up."""
    directory = Path(tempfile.mkdtemp(prefix="books-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip("cannot mount a small file system here (needs root)")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)
    directory.rmdir()


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


async def test_sqlite_disk_full_is_a_507_and_recovers_when_space_is_freed(small_disk: Path):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{small_disk / 'books.db'}")
    async with app_client(settings) as client:
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * 200_000)  # something the operator can delete later
        stored = []
        for number in range(2000):
            response = await client.post(
                "/books", json={**BOOK, "title": f"{number} " + "x" * 280, "isbn": None}
            )
            if response.status_code != 201:
                break
            stored.append(response.json()["id"])
        else:
            raise AssertionError("the disk never filled up")
        assert response.status_code == 507, response.text
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert "sqlite" not in response.text.lower()
        assert (await client.get(f"/books/{stored[-1]}")).status_code == 200  # reads go on
        assert (await client.get("/books")).json()["total"] == len(stored)

        ballast.unlink()
        created = await client.post("/books", json={**BOOK, "isbn": None})
        assert created.status_code == 201, created.text
        assert (await client.get("/books")).json()["total"] == len(stored) + 1
    assert integrity(small_disk / "books.db") == "ok"


def make_immutable(paths: list[Path], immutable: bool) -> None:
    """The file system's immutable flag: unlike permissions it binds for root too, and
    on files already open, as a read-only mount does (`chattr` on tmpfs, Linux 6.0+)."""
    flag = "+i" if immutable else "-i"
    changed = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    if changed.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here: {changed.stderr.strip()}")


async def test_sqlite_read_only_database_refuses_writes_with_503_and_recovers_when_fixed(
    small_disk: Path,
):
    """The database's directory and files turn read-only under a running app (an
    operator's chmod or chown). Like a permission, the flag binds when a file is
    opened: connections opened before may still write, connections opened during
    the fault are read-only. Reads go on; a write is stored and acknowledged or is a
    503 problem that changes nothing; once the files are writable, writes succeed."""
    database = small_disk / "books.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{database}")

    async def create(title: str) -> httpx.Response:
        return await client.post("/books", json={**BOOK, "title": title, "isbn": None})

    def assert_refused(response: httpx.Response) -> None:
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert response.headers.get("Retry-After")
        assert "sqlite" not in response.text.lower() and "readonly" not in response.text

    async with app_client(settings) as client:
        results = {f"before {n}": await create(f"before {n}") for n in range(3)}
        assert {response.status_code for response in results.values()} == {201}
        files = [small_disk, database, *(small_disk / f"books.db-{end}" for end in ("wal", "shm"))]
        make_immutable(files, True)
        try:
            # Readers at once, so that the pool opens connections while read-only.
            reads = await asyncio.gather(*(client.get("/books") for _ in range(20)))
            assert {response.status_code for response in reads} == {200}
            during = {f"during {n}": await create(f"during {n}") for n in range(10)}
            for response in during.values():
                if response.status_code != 201:
                    assert_refused(response)
            assert any(response.status_code == 503 for response in during.values())
            reads = await asyncio.gather(*(client.get("/books") for _ in range(20)))
            assert {response.status_code for response in reads} == {200}
        finally:
            make_immutable(files, False)

        after = {f"after {n}": await create(f"after {n}") for n in range(10)}
        assert [response.status_code for response in after.values()] == [201] * 10
        results |= during | after
        acknowledged = {title for title, response in results.items() if response.status_code == 201}
        listing = (await client.get("/books", params={"size": 100})).json()
        print("LISTING", listing)
        assert {book["title"] for book in listing["items"]} == acknowledged
        assert listing["total"] == len(acknowledged)
    assert integrity(database) == "ok"


def test_sqlite_app_started_on_a_read_only_directory_says_so_and_starts_once_fixed(
    small_disk: Path,
):
    """A database closed cleanly has no -wal/-shm files, and SQLite must create them
    to open it: in a read-only directory the app cannot start. It says why in a line
    of its own and exits; once the directory is writable it starts with every book."""
    database = small_disk / "books.db"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{database}", "PORT": str(free_port())}
    assert run(["app.py", "seed", "3"], env).returncode == 0
    make_immutable([small_disk, database], True)
    try:
        refused = run(["app.py"], env)
    finally:
        make_immutable([small_disk, database], False)
    assert refused.returncode == 3, refused.stderr  # uvicorn's "startup failed"
    lines = refused.stderr.splitlines()
    assert (
        f"database.DatabaseUnavailableError: cannot open the database sqlite+aiosqlite:///"
        f"{database}: unable to open database file (does its directory exist, and may this "
        "process write there and to the file?)"
    ) in lines

    with serving(env) as server:
        assert httpx.get(f"{server.url}/books").json()["total"] == 3
    assert integrity(database) == "ok"


class Ext4Volume:
    """An ext4 file system in a file of its own, on a loop device, mounted with
    `errors=remount-ro`: on an error the kernel turns it read-only at once, open
    files included, as it does when a real disk fails."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="books-volume-"))
        self.image = self.directory.with_suffix(".img")
        self.device = ""

    def create(self) -> None:
        with self.image.open("wb") as image:
            image.truncate(32 * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        attached = subprocess.run(
            ["losetup", "--find", "--show", str(self.image)], capture_output=True, text=True
        )
        if attached.returncode != 0:
            pytest.skip(f"no loop device here: {attached.stderr.strip()}")
        self.device = attached.stdout.strip()
        self.mount()

    def mount(self) -> None:
        options = ["-o", "errors=remount-ro"]
        subprocess.run(["mount", *options, self.device, str(self.directory)], check=True)

    def fail(self) -> None:
        """An ext4 error, as a failing disk would cause one (ext4's own test hook)."""
        name = Path(self.device).name
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("test: the disk failed\n")

    def repair(self) -> None:
        """What the operator does: unmount, check, mount again."""
        subprocess.run(["umount", str(self.directory)], check=True)
        subprocess.run(["e2fsck", "-f", "-y", self.device], capture_output=True, check=False)
        self.mount()

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.directory)], check=False)
        if self.device:
            subprocess.run(["losetup", "--detach", self.device], check=False)
        self.image.unlink(missing_ok=True)
        self.directory.rmdir()


@pytest.fixture
def ext4_volume() -> Iterator[Ext4Volume]:
    volume = Ext4Volume()
    if subprocess.run(["losetup", "--find"], capture_output=True).returncode != 0:
        volume.directory.rmdir()
        pytest.skip("no loop devices here (needs root)")
    try:
        volume.create()
        yield volume
    finally:
        volume.remove()


async def test_sqlite_volume_turned_read_only_by_a_disk_error_loses_no_acknowledged_write(
    ext4_volume: Ext4Volume,
):
    """The kernel turns the volume read-only under the running app. Reads go on,
    writes are 503 problems; the operator repairs the volume and restarts the app
    (the kernel allows nothing less), and every acknowledged write is there."""
    database = ext4_volume.directory / "books.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{database}")
    async with app_client(settings) as client:
        acknowledged = set()
        for number in range(5):
            created = await client.post("/books", json={**BOOK, "title": f"{number}", "isbn": None})
            assert created.status_code == 201, created.text
            acknowledged.add(created.json()["title"])
        ext4_volume.fail()
        reads = await asyncio.gather(*(client.get("/books") for _ in range(20)))
        assert {response.status_code for response in reads} == {200}
        for _ in range(5):
            refused = await client.post("/books", json={**BOOK, "title": "lost", "isbn": None})
            assert refused.status_code == 503, refused.text
            assert refused.headers.get("Retry-After")
            assert "sqlite" not in refused.text.lower() and "disk" not in refused.text
        assert (await client.get("/books")).json()["total"] == len(acknowledged)

    ext4_volume.repair()
    assert integrity(database) == "ok"
    api.state.settings = settings  # app_client would empty the table: start the app as is
    async with AsyncTestClient(api, base_url="http://testserver") as client:
        listing = (await client.get("/books", params={"size": 100})).json()
        assert {book["title"] for book in listing["items"]} == acknowledged
        assert (await client.post("/books", json={**BOOK, "isbn": None})).status_code == 201
