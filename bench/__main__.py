"""Benchmarks of the books service, driven by wrk against a real uvicorn process.

    uv run python -m bench cache            # PostgreSQL, cache off vs on, as ratios
    uv run python -m bench cache --smoke    # a few seconds: checks the script still works

Needs `wrk` (`apt-get install wrk`), the PostgreSQL of BENCH_DATABASE_URL and, for
the cache, the Redis of BENCH_REDIS_URL. Each run seeds a database of its own and
drops it at the end. The server (1 uvicorn worker, uvloop, httptools, no access
log) and wrk are pinned to different cores; the arms of a comparison are
interleaved, round by round, so that machine drift hits them alike, and each
figure is the median of the rounds.
"""

import argparse
import asyncio
import os
import re
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
from stdnum import ean

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
SERVER_CPU, LOAD_CPU = "0", "1"
PORT = 5099
AUTHORS = [f"Author {number}" for number in range(500)]
# wrk's Lua: each workload is one request generator over the seeded ids and pages.
WORKLOADS = {
    "get_one": 'return wrk.format("GET", "/books/" .. math.random(1, {books}))',
    # The first 50 pages: the hot set a catalogue's readers mostly browse.
    "list_page": 'return wrk.format("GET", "/books?size=20&page=" .. math.random(1, 50))',
}


@dataclass
class Result:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    non_2xx: int
    socket_errors: int


def isbn13(number: int) -> str:
    digits = f"978{number:09d}"
    return digits + ean.calc_check_digit(digits)


async def seed(url: str, books: int) -> None:
    """`books` plausible rows, copied straight into the table the app created."""
    connection = await asyncpg.connect(url)
    try:
        now = datetime.now(UTC)
        rows = [
            (
                f"Book {number}",
                AUTHORS[number % len(AUTHORS)],
                1800 + number % 226,
                isbn13(number),
                now,
                now,
                1,
            )
            for number in range(books)
        ]
        columns = ["title", "author", "year", "isbn", "created_at", "updated_at", "version"]
        await connection.copy_records_to_table("books", records=rows, columns=columns)
        await connection.execute("ANALYZE books")
    finally:
        await connection.close()


@contextmanager
def database() -> Iterator[str]:
    """A database of this run's own on the benchmark server; its SQLAlchemy URL."""
    name = f"books_bench_{uuid.uuid4().hex[:8]}"
    admin = make_url(DATABASE_URL).set(drivername="postgresql")
    admin_dsn = admin.render_as_string(hide_password=False)

    async def run(sql: str) -> None:
        connection = await asyncpg.connect(admin_dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def server(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """The service under uvicorn, pinned to SERVER_CPU, healthy before it is used."""
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, "-m", "uvicorn", "app:api",
        "--port", str(PORT), "--workers", "1", "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(process: subprocess.Popen[bytes], script: str, seconds: int, connections: int) -> Result:
    """Drive the server with wrk, pinned to LOAD_CPU, and read its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(f"request = function()\n  {script}\nend\n")
        lua.flush()
        command = [
            "taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "--latency", "-s", lua.name, f"http://127.0.0.1:{PORT}",
        ]  # fmt: skip
        cpu_before = cpu_seconds(process.pid)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        cpu = cpu_seconds(process.pid) - cpu_before
    return parse_wrk(output, cpu)


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


def report(title: str, results: dict[tuple[str, str], Result], reference: str) -> None:
    """One line per workload and arm, then each arm's throughput as a ratio to `reference`.

    Exits non-zero if any run saw a non-2xx response or a socket error.
    """
    failed: list[str] = []
    print(f"\n{title}")
    print(f"{'workload':<10} {'arm':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU us/req':>10} {'non-2xx':>8} {'sock err':>8}")  # fmt: skip
    for (workload, arm), result in results.items():
        print(
            f"{workload:<10} {arm:<10} {result.requests_per_second:>9.0f} {result.p50_ms:>8.2f} "
            f"{result.p99_ms:>8.2f} {result.cpu_us_per_request:>10.0f} {result.non_2xx:>8} "
            f"{result.socket_errors:>8}"
        )
    for (workload, arm), result in results.items():
        if result.non_2xx or result.socket_errors:
            failed.append(f"{workload} ({arm})")
        if arm != reference:
            base = results[(workload, reference)].requests_per_second
            print(f"{workload}: {arm} / {reference} = {result.requests_per_second / base:.2f}x")
    if failed:
        raise SystemExit(f"errors (non-2xx or socket) in: {', '.join(failed)}")


def cache_benchmark(args: argparse.Namespace) -> None:
    """GET /books/{id} and GET /books on PostgreSQL, the cache off and on, interleaved."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    with database() as url:
        arms = {
            "cache off": {"DATABASE_URL": url, "REDIS_URL": ""},
            "cache on": {"DATABASE_URL": url, "REDIS_URL": REDIS_URL, "CACHE_PREFIX": prefix},
        }
        with server(arms["cache off"]):  # creates the schema
            asyncio.run(seed(url, args.books))
        runs: dict[tuple[str, str], list[Result]] = {}
        for _ in range(args.rounds):
            for arm, env in arms.items():
                with server(env) as process:
                    for workload, script in WORKLOADS.items():
                        lua = script.format(books=args.books)
                        wrk(process, lua, args.warmup, args.connections)
                        result = wrk(process, lua, args.seconds, args.connections)
                        runs.setdefault((workload, arm), []).append(result)
    _forget(prefix)
    report(
        f"PostgreSQL, {args.books} books, {args.connections} connections, "
        f"{args.seconds:g} s x {args.rounds} rounds (medians)",
        {key: median(results) for key, results in sorted(runs.items())},
        reference="cache off",
    )


def _forget(prefix: str) -> None:
    """Delete this run's cache keys."""
    with redis.Redis.from_url(REDIS_URL) as client:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["cache"])
    parser.add_argument("--books", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="1 s runs, 1 round: the script works")
    args = parser.parse_args()
    if args.smoke:
        args.books, args.seconds, args.warmup, args.rounds = 1000, 1, 1, 1
    cache_benchmark(args)


if __name__ == "__main__":
    main()
