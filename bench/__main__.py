"""Benchmarks of the books service, driven by wrk against a real uvicorn process.

    uv run python -m bench speed     # every workload, SQLite and PostgreSQL, vs the bare reference
    uv run python -m bench cache     # PostgreSQL, cache off vs on
    uv run python -m bench scale     # every listing's latency at 10k and 1M books
    uv run python -m bench writes    # writes with and without the sort-order indexes
    uv run python -m bench import    # `app.py import` of 1M books vs the database's floor
    uv run python -m bench soak      # 10 minutes of mixed traffic: errors, p99, RSS over time
    uv run python -m bench pooler --seconds 60   # 2 workers, direct vs through PgBouncer
    uv run python -m bench replicas  # reads and writes without and with a streaming replica
    uv run python -m bench speed --smoke   # seconds: checks the script still works
    uv run python -m bench speed --baseline main   # and main's app as one more arm

Needs `wrk` (`apt-get install wrk`), the PostgreSQL of BENCH_DATABASE_URL and, for
the cache, the Redis of BENCH_REDIS_URL. Each run works in a database of its own
(dropped at the end) or a temporary SQLite file. The server (1 uvicorn worker,
uvloop, httptools, no access log) and wrk are pinned to different cores; the
arms of a comparison are interleaved round by round, each starting from the
same freshly seeded table, so that machine drift hits them alike; each figure
is the median of the rounds.
"""

import argparse
import asyncio
import contextlib
import csv
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import redis
from sqlalchemy.engine import make_url
from sqlalchemy.sql import operators
from stdnum import isbn as stdnum_isbn

from bulk import plausible_book
from models import SORT_ORDER_INDEXES
from tests.servers import PgBouncer, PostgresServer

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
SERVER_CPU, LOAD_CPU = "0", "1"
PORT = 5099
COLUMNS = ["title", "author", "year", "isbn", "created_at", "updated_at", "version"]
JSON = '{{["Content-Type"] = "application/json"}}'  # braces doubled for str.format
# wrk's Lua, one request generator per workload; {books} is the seeded count and
# {first_spare} the first id of the rows seeded for `delete` to remove, one each.
WORKLOADS = {
    "get_one": 'return wrk.format("GET", "/books/" .. math.random(1, {books}))',
    # The first 50 pages: the hot set a catalogue's readers mostly browse.
    "list_page": 'return wrk.format("GET", "/books?size=20&page=" .. math.random(1, 50))',
    "update": (
        'return wrk.format("PATCH", "/books/" .. math.random(1, {books}), '
        + JSON
        + ", '{{\"title\": \"Title ' .. math.random(1, 1000000) .. '\"}}')"
    ),
    "create": (
        'return wrk.format("POST", "/books", '
        + JSON
        + ', \'{{"title": "New", "author": "Someone", "year": 2000}}\')'
    ),
    "delete": 'spare = spare + 1\n  return wrk.format("DELETE", "/books/" .. spare)',
}
SERVERS = {
    "app": "app:api",
    "responder": "bench.responder_reference:api",  # the framework's own floor
    "reference": "bench.reference:app",  # bare Starlette on the raw driver
}


@dataclass
class Result:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    non_2xx: int
    socket_errors: int


# --- Databases ---------------------------------------------------------------


def book_rows(start: int, count: int, *, sqlite: bool) -> list[tuple[object, ...]]:
    """`count` plausible books, numbered from `start` (ISBNs unique across calls)."""
    now: object = datetime.now(UTC)
    if sqlite:  # SQLAlchemy's storage format for DateTime on SQLite: naive UTC text
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    return [
        (*plausible_book(number).values(), now, now, 1) for number in range(start, start + count)
    ]


@dataclass
class Database:
    """Where a benchmark runs: a SQLAlchemy URL (for the app) and a raw DSN or file."""

    url: str
    raw: str

    @property
    def sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def reset(self, books: int) -> None:
        """Empty the table, restart its ids, and seed `books` rows."""
        if self.sqlite:
            with sqlite3.connect(self.raw) as connection:
                connection.execute("DELETE FROM books")
                connection.execute("DELETE FROM sqlite_sequence WHERE name = 'books'")
        else:
            asyncio.run(execute(self.raw, "TRUNCATE books RESTART IDENTITY CASCADE"))
        self.add(0, books)

    def count(self) -> int:
        if self.sqlite:
            with sqlite3.connect(self.raw) as connection:
                return int(connection.execute("SELECT count(*) FROM books").fetchone()[0])
        return asyncio.run(fetch(self.raw, "SELECT count(*) FROM books"))

    def add(self, start: int, count: int) -> int:
        """Append `count` rows; returns the id before the first of them."""
        rows = book_rows(start, count, sqlite=self.sqlite)
        if self.sqlite:
            with sqlite3.connect(self.raw) as connection:
                last = connection.execute("SELECT coalesce(max(id), 0) FROM books").fetchone()[0]
                placeholders = ", ".join("?" * len(COLUMNS))
                connection.executemany(
                    f"INSERT INTO books ({', '.join(COLUMNS)}) VALUES ({placeholders})", rows
                )
            return int(last)
        return asyncio.run(self._copy(rows))

    def drop_indexes(self, names: list[str]) -> None:
        statements = [f"DROP INDEX {name}" for name in names]
        if self.sqlite:
            with sqlite3.connect(self.raw) as connection:
                for statement in statements:
                    connection.execute(statement)
        else:
            asyncio.run(execute(self.raw, "; ".join(statements)))

    async def _copy(self, rows: list[tuple[object, ...]]) -> int:
        connection = await asyncpg.connect(self.raw)
        try:
            last = await connection.fetchval("SELECT coalesce(max(id), 0) FROM books")
            await connection.copy_records_to_table("books", records=rows, columns=COLUMNS)
            # A table at rest, as autovacuum leaves it: statistics for the planner
            # and a visibility map, so counts can be answered from indexes alone.
            await connection.execute("VACUUM ANALYZE books")
            return int(last)
        finally:
            await connection.close()


async def fetch(dsn: str, sql: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return int(await connection.fetchval(sql))
    finally:
        await connection.close()


async def execute(dsn: str, sql: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextmanager
def database(kind: str, checkout: Path = ROOT) -> Iterator[Database]:
    """A database of this run's own, its schema created by the app of `checkout` (as on
    first start)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            path = f"{directory}/books.db"
            created = Database(f"sqlite+aiosqlite:///{path}", path)
            with server("app", {"DATABASE_URL": created.url}, checkout):
                pass
            yield created
        return
    name = f"books_bench_{uuid.uuid4().hex[:8]}"
    admin = make_url(DATABASE_URL).set(drivername="postgresql")
    admin_dsn = admin.render_as_string(hide_password=False)
    dsn = admin.set(database=name).render_as_string(hide_password=False)
    created = Database(dsn, dsn)
    asyncio.run(execute(admin_dsn, f'CREATE DATABASE "{name}"'))
    try:
        with server("app", {"DATABASE_URL": dsn}, checkout):
            pass
        yield created
    finally:
        asyncio.run(execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """The project as it is at git `ref` (say `main`), in a worktree of its own, run with
    this environment: another version of the app to measure beside this one."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkout"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), ref],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT)


# --- Servers and load --------------------------------------------------------


@contextmanager
def server(
    name: str, env: dict[str, str], checkout: Path = ROOT, workers: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    """`SERVERS[name]` of `checkout` under uvicorn (`workers` of them), pinned to
    SERVER_CPU, healthy before it is used."""
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, "-m", "uvicorn", SERVERS[name],
        "--port", str(PORT), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    probe = "/health" if name == "app" else "/books/1"
    # LOG_LEVEL=warning: no access line per request (a log file is not what is measured).
    environment = {**os.environ, "REDIS_URL": "", "LOG_LEVEL": "warning", **env}
    process = subprocess.Popen(command, cwd=checkout, env=environment)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{PORT}{probe}", timeout=1)
                break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {name} server did not start")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its children (uvicorn's workers
    under `--workers N` are children of a supervisor that itself does little)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def wrk(
    process: subprocess.Popen[bytes],
    script: str,
    seconds: int,
    connections: int,
    timeout: int = 2,
) -> Result:
    """Drive the server with wrk, pinned to LOAD_CPU, and read its figures.

    A request not answered within `timeout` seconds counts as a socket error.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        command = [
            "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "--latency", f"--timeout={timeout}s", "-s", lua.name, f"http://127.0.0.1:{PORT}",
        ]  # fmt: skip
        cpu_before = cpu_seconds(process.pid)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        cpu = cpu_seconds(process.pid) - cpu_before
    return parse_wrk(output, cpu)


def lua(workload: str, books: int, first_spare: int = 0) -> str:
    body = WORKLOADS[workload].format(books=books)
    return f"spare = {first_spare}\nrequest = function()\n  {body}\nend\n"


def parse_wrk(output: str, cpu_seconds: float) -> Result:
    """The figures of one wrk run (`--latency` output)."""

    def find(pattern: str) -> tuple[str, ...]:
        match = re.search(pattern, output)
        if match is None:
            raise SystemExit(f"unexpected wrk output:\n{output}")
        return match.groups()

    def latency_ms(percentile: str) -> float:
        value, unit = find(rf"{percentile}\s+([\d.]+)(us|ms|s)\b")
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(find(r"(\d+) requests in")[0])
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return Result(
        requests_per_second=float(find(r"Requests/sec:\s+([\d.]+)")[0]),
        p50_ms=latency_ms("50%"),
        p99_ms=latency_ms("99%"),
        cpu_us_per_request=cpu_seconds / max(requests, 1) * 1e6,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, errors.groups())) if errors else 0,
    )


def median(results: list[Result]) -> Result:
    return Result(
        requests_per_second=statistics.median(r.requests_per_second for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        cpu_us_per_request=statistics.median(r.cpu_us_per_request for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
    )


def run_workloads(
    name: str,
    env: dict[str, str],
    db: Database,
    workloads: list[str],
    args: argparse.Namespace,
    checkout: Path = ROOT,
) -> dict[str, Result]:
    """One arm of one round: a freshly seeded table, the server, each workload in turn."""
    db.reset(args.books)
    results = {}
    environment = {"DATABASE_URL": db.url, "REFERENCE_DATABASE": db.raw, **env}
    with server(name, environment, checkout) as process:
        for workload in workloads:
            first_spare = 0
            if workload == "delete":  # rows enough for every request to delete one
                first_spare = db.add(args.books, args.spare_per_second * args.seconds)
            script = lua(workload, args.books, first_spare)
            if args.warmup and workload != "delete":
                wrk(process, script, args.warmup, args.connections)
            results[workload] = wrk(process, script, args.seconds, args.connections)
    return results


# --- Reports -----------------------------------------------------------------


def report(
    title: str, results: dict[tuple[str, str], Result], reference: str
) -> dict[tuple[str, str], float]:
    """One line per workload and arm, then each arm's throughput as a ratio to `reference`.

    Exits non-zero if any run saw a non-2xx response or a socket error.
    """
    failed: list[str] = []
    ratios = {}
    print(f"\n{title}")
    print(f"{'workload':<10} {'arm':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU us/req':>10} {'non-2xx':>8} {'sock err':>8}")  # fmt: skip
    for (workload, arm), result in results.items():
        print(
            f"{workload:<10} {arm:<10} {result.requests_per_second:>9.0f} {result.p50_ms:>8.2f} "
            f"{result.p99_ms:>8.2f} {result.cpu_us_per_request:>10.0f} {result.non_2xx:>8} "
            f"{result.socket_errors:>8}"
        )
        if result.non_2xx or result.socket_errors:
            failed.append(f"{workload} ({arm})")
    for (workload, arm), result in results.items():
        if arm != reference:
            base = results[(workload, reference)].requests_per_second
            ratios[(workload, arm)] = result.requests_per_second / base
            print(f"{workload}: {arm} / {reference} = {ratios[(workload, arm)]:.2f}x")
    if failed:
        raise SystemExit(f"errors (non-2xx or socket) in: {', '.join(failed)}")
    return ratios


# Issue 17's targets: the app's throughput on every workload at least this share of the
# bare Responder app's, and (with --baseline) at least this multiple of the baseline's.
TARGET_OF_RESPONDER = 0.35
TARGET_OF_BASELINE = 2.0


@dataclass
class Arm:
    """One side of a comparison: a server of a checkout, on a database of its own schema."""

    server: str
    checkout: Path
    db: Database


def speed_benchmark(args: argparse.Namespace) -> None:
    """Every workload on each database, the app against the bare reference (and, with
    `--baseline REF`, against the app of REF), interleaved."""
    for kind in args.databases:
        runs: dict[tuple[str, str], list[Result]] = {}
        with contextlib.ExitStack() as stack:
            db = stack.enter_context(database(kind))
            arms = {name: Arm(name, ROOT, db) for name in SERVERS}
            if args.baseline:
                before = stack.enter_context(checkout(args.baseline))
                arms[args.baseline] = Arm(
                    "app", before, stack.enter_context(database(kind, before))
                )
            for _ in range(args.rounds):
                for name, arm in arms.items():
                    for workload, result in run_workloads(
                        arm.server, {}, arm.db, args.workloads, args, arm.checkout
                    ).items():
                        runs.setdefault((workload, name), []).append(result)
        medians = {key: median(results) for key, results in sorted(runs.items())}
        ratios = report(
            f"{kind}: {args.books} books, {args.connections} connections, "
            f"{args.seconds} s x {args.rounds} rounds (medians)",
            medians,
            reference="responder",
        )
        for workload in args.workloads:
            verdicts = [
                verdict(ratios[(workload, "app")], TARGET_OF_RESPONDER, "of bare Responder")
            ]
            if args.baseline:
                times = (
                    medians[(workload, "app")].requests_per_second
                    / medians[(workload, args.baseline)].requests_per_second
                )
                verdicts.append(verdict(times, TARGET_OF_BASELINE, f"of {args.baseline}"))
            print(f"  {workload}: " + "; ".join(verdicts))


def verdict(ratio: float, target: float, of: str) -> str:
    return f"{ratio:.2f}x {of} ({'meets' if ratio >= target else 'MISSES'} {target}x)"


# Issue 17's target for cache hits: at least this share of the bare Responder app's.
TARGET_CACHE_HITS = 0.6


def cache_benchmark(args: argparse.Namespace) -> None:
    """GET /books/{id} and GET /books on PostgreSQL, the cache off and on, and the bare
    Responder app, interleaved."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    arms = {
        "cache off": ("app", {}),
        "cache on": ("app", {"REDIS_URL": REDIS_URL, "CACHE_PREFIX": prefix}),
        "responder": ("responder", {}),
    }
    runs: dict[tuple[str, str], list[Result]] = {}
    with database("postgresql") as db:
        for _ in range(args.rounds):
            for arm, (name, env) in arms.items():
                results = run_workloads(name, env, db, ["get_one", "list_page"], args)
                for workload, result in results.items():
                    runs.setdefault((workload, arm), []).append(result)
    with redis.Redis.from_url(REDIS_URL) as client:  # this run's keys
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
    ratios = report(
        f"PostgreSQL, {args.books} books, {args.connections} connections, "
        f"{args.seconds} s x {args.rounds} rounds (medians)",
        {key: median(results) for key, results in sorted(runs.items())},
        reference="responder",
    )
    for workload in ("get_one", "list_page"):
        hits = ratios[(workload, "cache on")]
        print(f"  {workload} cache hits: {verdict(hits, TARGET_CACHE_HITS, 'of bare Responder')}")


# Every documented order, both directions, alone and after each filter: values that
# match some books, none, or most of them.
SCALE_ORDERS = [f"{d}{name}" for name in ("id", "title", "author", "year", "created_at",
                                           "updated_at") for d in ("", "-")]  # fmt: skip
SCALE_FILTERS = {
    "": "",
    "author": "author=grace%20novak",
    "author none": "author=nobody",
    "year": "year=1900",
    "year none": "year=9999",
    "q": "q=silent%20riv",
    "q most": "q=the",
    "q none": "q=zzzz",
}
SCALE_TARGET_MS, SCALE_CEILING_MS = 20, 100


def scale_requests(url: str, labels: list[str], smoke: bool) -> dict[str, str]:
    """Each listing of the filters `labels` (of SCALE_FILTERS) as a path: its first page,
    and the page its first page's cursor leads to. (`smoke`: a few of them.)"""
    requests = {}
    chosen = [(label, SCALE_FILTERS[label]) for label in labels]
    for label, filters in chosen[: 3 if smoke else None]:
        for order in SCALE_ORDERS[: 2 if smoke else None]:
            path = "/books?" + "&".join(filter(None, [filters, f"sort={order}"]))
            name = f"{label + ' ' if label else ''}sort={order}"
            requests[name] = path
            cursor = httpx.get(url + path, timeout=60).json()["next_cursor"]
            if cursor:
                requests[f"{name}, by cursor"] = f"{path}&cursor={cursor}"
    return requests


def scale_benchmark(args: argparse.Namespace) -> None:
    """p50 latency of every listing at 4 concurrent clients as the table grows, on each
    database (and, with `--baseline REF`, of REF's app on tables of its own schema)."""
    sizes = [1_000, 2_000] if args.smoke else args.sizes
    for kind in args.databases:
        table: dict[str, dict[tuple[str, int], float]] = {}
        arms = [("app", ROOT)]
        with contextlib.ExitStack() as stack:
            if args.baseline:
                arms.append((args.baseline, stack.enter_context(checkout(args.baseline))))
            for arm, source in arms:
                with database(kind, source) as db:
                    db.reset(0)
                    loaded = 0
                    for size in sizes:
                        started = time.monotonic()
                        db.add(loaded, size - loaded)
                        loaded = size
                        print(f"{kind} {arm}: {size:,} books loaded in "
                              f"{time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
                        measure_listings(db, source, size, arm, args, table)
        print_scale(kind, sizes, [arm for arm, _ in arms], table)


def measure_listings(
    db: Database,
    source: Path,
    size: int,
    arm: str,
    args: argparse.Namespace,
    table: dict[str, dict[tuple[str, int], float]],
) -> None:
    """Each request of `scale_requests`, warmed, then timed with 4 connections."""
    with server("app", {"DATABASE_URL": db.url}, source) as process:
        requests = scale_requests(f"http://127.0.0.1:{PORT}", args.filters, args.smoke)
        for name, path in requests.items():
            script = f'request = function()\n  return wrk.format("GET", "{path}")\nend\n'
            wrk(process, script, 1, 4)  # the plan, the caches
            settle()
            result = wrk(process, script, args.seconds, 4, timeout=10)
            settle()
            # An error, or no answer within the run, is shown as `inf`, never as a figure.
            failed = result.non_2xx or result.socket_errors or not result.requests_per_second
            table.setdefault(name, {})[(arm, size)] = float("inf") if failed else result.p50_ms


def settle(seconds: float = 60) -> None:
    """Wait for the requests wrk left running when it stopped (a slow listing outlives
    the run), so that they do not weigh on the next figure."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=60).text
        running = re.search(r"^responder_requests_in_flight (\S+)$", text, re.MULTILINE)
        if running is None or float(running[1]) <= 1:  # this scrape
            return
        time.sleep(0.1)


def print_scale(
    kind: str, sizes: list[int], arms: list[str], table: dict[str, dict[tuple[str, int], float]]
) -> None:
    columns = [(arm, size) for size in sizes for arm in arms]
    print(f"\n{kind}: p50 ms at 4 concurrent clients (target {SCALE_TARGET_MS} ms, "
          f"no request over {SCALE_CEILING_MS} ms; inf: an error, or no answer within "
          "the run)")  # fmt: skip
    print(
        f"{'request':<34}" + "".join(f"{arm[:9] + ' ' + f'{size:,}':>19}" for arm, size in columns)
    )
    misses = []
    for name, figures in table.items():
        print(
            f"{name:<34}"
            + "".join(f"{figures.get(column, float('nan')):>19.1f}" for column in columns)
        )
        largest = figures.get(("app", sizes[-1]), 0.0)
        if largest > SCALE_TARGET_MS:
            misses.append(f"{name} ({largest:.0f} ms)")
    print(f"over {SCALE_TARGET_MS} ms at {sizes[-1]:,} books: {len(misses)} of {len(table)}")
    for miss in misses:
        print(f"  {miss}")


WRITES = ["create", "update", "delete"]
TARGET_OF_UNINDEXED = 0.9  # issue 18: writes within 10% of their throughput before


def writes_benchmark(args: argparse.Namespace) -> None:
    """What the sort-order indexes cost writes: the same code on databases with all of
    SORT_ORDER_INDEXES, with the ascending ones only (what ties broken in each field's
    own direction would need), and with none of them (as before they were added)."""
    # Told apart by what they index (a column, or a column's DESC), not by their names.
    descending = [
        str(index.name)
        for index in SORT_ORDER_INDEXES
        if getattr(index.expressions[0], "modifier", None) is operators.desc_op
    ]
    dropped = {
        "indexed": [],
        "ascending": descending,
        "without": [str(index.name) for index in SORT_ORDER_INDEXES],
    }
    for kind in args.databases:
        runs: dict[tuple[str, str], list[Result]] = {}
        with contextlib.ExitStack() as stack:
            arms = {arm: stack.enter_context(database(kind)) for arm in dropped}
            for arm, db in arms.items():
                if dropped[arm]:
                    db.drop_indexes(dropped[arm])
            for _ in range(args.rounds):
                for arm, db in arms.items():
                    for workload, result in run_workloads("app", {}, db, WRITES, args).items():
                        runs.setdefault((workload, arm), []).append(result)
        ratios = report(
            f"{kind}: writes with the {len(SORT_ORDER_INDEXES)} sort-order indexes, with the "
            f"ascending ones only, and without them; {args.books} books, "
            f"{args.connections} connections, {args.seconds} s x {args.rounds} rounds (medians)",
            {key: median(results) for key, results in sorted(runs.items())},
            reference="without",
        )
        for workload in WRITES:
            times = ratios[(workload, "indexed")]
            print(f"  {workload}: {verdict(times, TARGET_OF_UNINDEXED, 'of the writes without')}")


# 70% single books, 15% list pages, 10% updates, 5% creates.
SOAK_REQUEST = """request = function()
  local r = math.random(100)
  if r <= 70 then return wrk.format("GET", "/books/" .. math.random(1, BOOKS)) end
  if r <= 85 then return wrk.format("GET", "/books?size=20&page=" .. math.random(1, 50)) end
  if r <= 95 then
    return wrk.format("PATCH", "/books/" .. math.random(1, BOOKS), HEADERS,
      '{"title": "Title ' .. math.random(1, 1000000) .. '"}')
  end
  return wrk.format("POST", "/books", HEADERS, '{"title": "New", "author": "A", "year": 2000}')
end
"""


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


def open_connections(db: Database, pid: int) -> int:
    """The server's database connections: PostgreSQL sessions, or SQLite file handles."""
    if db.sqlite:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed while we looked
                count += os.readlink(fd) == db.raw
        return count
    name = make_url(db.url).database
    sql = f"SELECT count(*) - 1 FROM pg_stat_activity WHERE datname = '{name}'"  # minus ours
    return asyncio.run(fetch(db.raw, sql))


def soak_benchmark(args: argparse.Namespace) -> None:
    """Mixed reads and writes for minutes on end: errors, p99 and memory over time."""
    slice_seconds = 2 if args.smoke else 30
    slices = 2 if args.smoke else args.minutes * 60 // slice_seconds
    script = SOAK_REQUEST.replace("BOOKS", str(args.books)).replace(
        "HEADERS", '{["Content-Type"] = "application/json"}'
    )
    failed = []
    for kind in args.databases:
        with database(kind) as db, server("app", {"DATABASE_URL": db.url}) as process:
            db.reset(args.books)
            print(f"\n{kind}: {args.soak_connections} connections, {slices} x {slice_seconds} s")
            print(f"{'t s':>6}{'req/s':>9}{'p99 ms':>9}{'non-2xx':>8}{'sock err':>9}"
                  f"{'RSS MiB':>9}{'db conns':>9}")  # fmt: skip
            rss = []
            for number in range(1, slices + 1):
                # 64 connections on one core queue: allow 10 s before calling it an error.
                result = wrk(process, script, slice_seconds, args.soak_connections, timeout=10)
                rss.append(resident_mib(process.pid))
                errors = result.non_2xx + result.socket_errors
                print(f"{number * slice_seconds:>6}{result.requests_per_second:>9.0f}"
                      f"{result.p99_ms:>9.1f}{result.non_2xx:>8}{result.socket_errors:>9}"
                      f"{rss[-1]:>9.1f}"
                      f"{open_connections(db, process.pid):>9}", flush=True)  # fmt: skip
                if errors:
                    failed.append(f"{kind} at {number * slice_seconds} s")
            half = len(rss) // 2
            print(f"RSS: first half max {max(rss[: half or 1]):.1f} MiB, "
                  f"second half max {max(rss[half:]):.1f} MiB")  # fmt: skip
    if failed:
        raise SystemExit(f"errors (non-2xx or socket) in: {', '.join(failed)}")


def pooler_benchmark(args: argparse.Namespace) -> None:
    """The soak's mixed workload with 2 workers, on direct connections and through
    PgBouncer in transaction mode (DATABASE_POOLER=transaction), interleaved; then the
    prepared statements left on the server connections behind the pooler."""
    seconds = 2 if args.smoke else args.seconds
    script = SOAK_REQUEST.replace("BOOKS", str(args.books)).replace(
        "HEADERS", '{["Content-Type"] = "application/json"}'
    )
    bouncer = PgBouncer(target_port=make_url(DATABASE_URL).port or 5432)
    bouncer.start()
    runs: dict[tuple[str, str], list[Result]] = {}
    try:
        with database("postgresql") as db:
            arms = {
                "direct": {"DATABASE_URL": db.url},
                "pooler": {"DATABASE_URL": bouncer.url(db.url), "DATABASE_POOLER": "transaction"},
            }
            for _ in range(args.rounds):
                for arm, env in arms.items():
                    db.reset(args.books)
                    with server("app", env, workers=2) as process:
                        result = wrk(process, script, seconds, args.connections, timeout=10)
                    runs.setdefault(("mixed", arm), []).append(result)
            left = asyncio.run(prepared_statements_left(bouncer.url(db.raw)))
    finally:
        bouncer.stop()
    report(
        f"PostgreSQL, 2 workers, mixed workload, {args.books} books, {args.connections} "
        f"connections, {seconds} s x {args.rounds} rounds (medians)",
        {key: median(results) for key, results in runs.items()},
        reference="direct",
    )
    print(f"prepared statements left on the server connections behind the pooler: {left}")
    if left:
        raise SystemExit("named prepared statements outlived their transactions")


async def prepared_statements_left(dsn: str, tries: int = 200) -> int:
    """The prepared statements on each server connection a pooler hands out, summed: asked
    many times at once (unnamed statements, as the service's pooler mode uses), so
    that every server connection is asked at least once."""
    connections = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(20)]
    try:
        found: dict[int, int] = {}
        for _ in range(tries // len(connections)):
            rows = await asyncio.gather(
                *(
                    connection.fetchrow(
                        "SELECT pg_backend_pid() AS pid, count(*) AS n FROM pg_prepared_statements"
                    )
                    for connection in connections
                )
            )
            for row in rows:
                found[row["pid"]] = max(found.get(row["pid"], 0), row["n"])
        return sum(found.values())
    finally:
        for connection in connections:
            await connection.close()


def replicas_benchmark(args: argparse.Namespace) -> None:
    """Reads and writes on PostgreSQL with the cache, without and with a streaming replica
    (a primary and a hot standby of the run's own), interleaved: p50/p99, the share of reads
    the replica served, and the stale reads a checker saw while the load ran."""
    seconds = 2 if args.smoke else args.seconds
    primary = PostgresServer()
    primary.start()
    standby = None
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    runs: dict[tuple[str, str], list[Result]] = {}
    served: dict[str, list[float]] = {}
    stale: dict[str, int] = {}
    try:
        asyncio.run(execute(primary.database_url("postgres").replace("+asyncpg", ""),
                            "CREATE DATABASE books"))  # fmt: skip
        standby = PostgresServer(standby_of=primary)
        standby.start()
        db = Database(primary.database_url("books"), primary.database_url("books").replace(
            "+asyncpg", ""))  # fmt: skip
        with server("app", {"DATABASE_URL": db.url}):
            pass  # the schema
        base = {"DATABASE_URL": db.url, "REDIS_URL": REDIS_URL, "CACHE_PREFIX": prefix}
        arms = {
            "primary only": base,
            "with replica": {**base, "DATABASE_REPLICA_URLS": standby.database_url("books")},
        }
        for _ in range(args.rounds):
            for arm, env in arms.items():
                db.reset(args.books)
                with server("app", env) as process:
                    before = replica_share(PORT)
                    for workload in ("list_page", "update"):
                        checker = CoherenceChecker(f"http://127.0.0.1:{PORT}")
                        with checker.running():
                            result = wrk(process, lua(workload, args.books), seconds, 16)
                        runs.setdefault((workload, arm), []).append(result)
                        stale[arm] = stale.get(arm, 0) + checker.stale
                    reads = [
                        now - then for now, then in zip(replica_share(PORT), before, strict=True)
                    ]
                    served.setdefault(arm, []).append(reads[0] / max(sum(reads), 1))
    finally:
        if standby is not None:
            standby.remove()
        primary.remove()
        with redis.Redis.from_url(REDIS_URL) as client:
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
    report(
        f"PostgreSQL with the cache, {args.books} books, 16 connections, {seconds} s x "
        f"{args.rounds} rounds (medians); list_page reads, update writes",
        {key: median(results) for key, results in runs.items()},
        reference="primary only",
    )
    for arm in arms:
        print(f"{arm}: share of database reads served by the replica "
              f"{statistics.median(served[arm]):.0%}; stale reads seen {stale[arm]}")  # fmt: skip
    if any(stale.values()):
        raise SystemExit("a read saw the state before an acknowledged write")


def replica_share(port: int) -> tuple[float, float]:
    """Reads served so far by replicas and by the primary (the app's /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return tuple(  # type: ignore[return-value]
        float(found[1]) if (found := re.search(
            rf'^books_reads_total{{served_by="{who}"}} (\S+)$', text, re.MULTILINE)) else 0.0
        for who in ("replica", "primary")
    )  # fmt: skip


class CoherenceChecker:
    """While the load runs: a book of its own (the load writes to the others) written, then
    read at once, again and again; counts the reads that saw the state before the write
    they followed."""

    def __init__(self, url: str) -> None:
        self.url, self.stale = url, 0
        self._stop = False

    @contextmanager
    def running(self) -> Iterator[None]:
        import threading

        worker = threading.Thread(target=self._check)
        worker.start()
        try:
            yield
        finally:
            self._stop = True
            worker.join()

    def _check(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            author = f"Checker {uuid.uuid4().hex[:8]}"
            book = {"title": "checked 0", "author": author, "year": 2000}
            url = http.post("/books", json=book).headers["Location"]
            number = 0
            while not self._stop:
                number += 1
                title = f"checked {number}"
                if http.patch(url, json={"title": title}).status_code != 200:
                    continue
                read = http.get(url)
                listed = http.get("/books", params={"author": author})
                titles = {item["title"] for item in listed.json()["items"]}
                if read.json().get("title") != title or titles != {title}:
                    self.stale += 1


IMPORT_TARGET_SECONDS = 60  # issue 6: a million rows on PostgreSQL


def books_csv(path: Path, count: int) -> None:
    """A CSV of `count` plausible books, their ISBNs written three ways as people do."""
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["title", "author", "year", "isbn"])
        writer.writeheader()
        for number in range(count):
            book = plausible_book(number)
            if number % 3 == 1:
                book["isbn"] = stdnum_isbn.format(book["isbn"])  # 978-0-00-000001-9
            elif number % 3 == 2:
                book["isbn"] = stdnum_isbn.to_isbn10(book["isbn"])
            writer.writerow(book)


async def reference_load(db: Database, path: Path) -> None:
    """The database's own floor: the same file, no validation, one COPY and one INSERT."""
    if db.sqlite:
        with sqlite3.connect(db.raw) as connection, path.open(newline="") as stream:
            now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
            rows = ((*row.values(), now, now, 1) for row in csv.DictReader(stream))
            connection.executemany(f"INSERT INTO books ({', '.join(COLUMNS)}) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
        return
    connection = await asyncpg.connect(db.raw)
    try:
        async with connection.transaction():
            await connection.execute(
                "CREATE TEMPORARY TABLE incoming (title text, author text, year int, isbn text)"
            )
            await connection.copy_to_table("incoming", source=path, format="csv", header=True)
            await connection.execute(
                "INSERT INTO books (title, author, year, isbn, created_at, updated_at, version) "
                "SELECT title, author, year, replace(isbn, '-', ''), now(), now(), 1 FROM incoming"
            )
    finally:
        await connection.close()


def import_benchmark(args: argparse.Namespace) -> None:
    """`app.py import` of a plausible CSV on each database, against the database's floor."""
    count = 2_000 if args.smoke else args.import_books
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "books.csv"
        books_csv(path, count)
        for kind in args.databases:
            with database(kind) as db:
                db.reset(0)
                started = time.monotonic()
                asyncio.run(reference_load(db, path))
                reference = time.monotonic() - started
                db.reset(0)
                started = time.monotonic()
                result = subprocess.run(
                    [sys.executable, "app.py", "import", str(path)],
                    cwd=ROOT, env={**os.environ, "DATABASE_URL": db.url},
                    capture_output=True, text=True,
                )  # fmt: skip
                seconds = time.monotonic() - started
                if result.returncode != 0 or db.count() != count:
                    raise SystemExit(f"import failed on {kind}:\n{result.stderr[-2000:]}")
                rows.append((kind, seconds, reference))
    print(f"\nimporting {count:,} books from CSV (a third each: 13 digits, hyphens, ISBN-10)")
    print(f"{'database':<12}{'app.py import':>15}{'books/s':>10}{'floor':>9}{'floor/app':>11}")
    for kind, seconds, reference in rows:
        verdict = ""
        if kind == "postgresql" and count >= 1_000_000:
            met = seconds < IMPORT_TARGET_SECONDS
            verdict = f"  {'meets' if met else 'MISSES'} < {IMPORT_TARGET_SECONDS} s"
        print(f"{kind:<12}{seconds:>14.1f}s{count / seconds:>10,.0f}{reference:>8.1f}s"
              f"{reference / seconds:>10.2f}x{verdict}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "mode",
        choices=["speed", "cache", "scale", "writes", "import", "soak", "pooler", "replicas"],
    )
    parser.add_argument("--minutes", type=int, default=10, help="soak: how long, per database")
    parser.add_argument("--soak-connections", type=int, default=64)
    parser.add_argument("--import-books", type=int, default=1_000_000)
    parser.add_argument("--books", type=int, default=10_000)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="scale: table sizes"
    )
    parser.add_argument(
        "--filters",
        nargs="+",
        default=list(SCALE_FILTERS),
        choices=SCALE_FILTERS,
        help="scale: the listings to time ('' is no filter)",
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--smoke", action="store_true", help="1 s runs, 1 round: the script works")
    parser.add_argument(
        "--baseline", metavar="REF", help="speed, scale: also measure the app as it is at git REF"
    )
    args = parser.parse_args()
    # Rows seeded for `delete`: more than the fastest server deletes in a second.
    args.spare_per_second = 20_000
    if args.smoke:
        args.books, args.seconds, args.warmup, args.rounds = 1000, 1, 0, 1
    modes = {
        "speed": speed_benchmark,
        "cache": cache_benchmark,
        "scale": scale_benchmark,
        "writes": writes_benchmark,
        "import": import_benchmark,
        "soak": soak_benchmark,
        "pooler": pooler_benchmark,
        "replicas": replicas_benchmark,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()
