"""The README is the tutorial, so it is run: every `sh` block, in order, in a fresh copy
of the repository, as a newcomer would type it, against the servers it starts.

- A block that starts the service (`uv run app.py`, `uv run uvicorn app:api ...`)
  runs in the background until the next one; the test waits for its `/health`.
- Any other block runs as a bash script; when the next block is its output (a
  block without a language, or `json`), every line shown must appear in what
  the commands print, in order (other lines may come between). `...` in a shown
  line stands for any text, and timestamps match any timestamp. A block without
  shown output must exit 0.
- `<!-- readme-test: skip: why -->` just before a block leaves it out, saying
  why (`uv run pytest` is this very suite; the benchmarks are run by .ci/run).
- Port 5042 becomes a free port; the PostgreSQL database `bookshelf` becomes one
  of this test's own; `redis://127.0.0.1:6379/0` becomes TEST_REDIS_URL with a
  key prefix of this test's own. Blocks that need PostgreSQL or Redis run only
  when TEST_DATABASE_URL / TEST_REDIS_URL say where they are.
"""

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL, admin_query
from tests.servers import ROOT, free_port, repository_copy

README = ROOT / "README.md"
SERVER = re.compile(r"uv run (app\.py|uvicorn app:api)( --[a-z-]+( [0-9.]+)?)*\s*(#.*)?$")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FENCE = re.compile(
    r"(?:<!-- readme-test: skip: (?P<skip>[^>]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.S
)


@dataclass
class Block:
    line: int  # where it starts in README.md
    body: str
    skip: str | None
    output: str | None = None


def readme_blocks() -> list[Block]:
    """The `sh` blocks, each with the output block that follows it, if any."""
    text = README.read_text()
    fences = list(FENCE.finditer(text))
    blocks = []
    for index, fence in enumerate(fences):
        if fence["lang"] != "sh":
            continue
        block = Block(text[: fence.start("lang")].count("\n") + 1, fence["body"], fence["skip"])
        following = fences[index + 1] if index + 1 < len(fences) else None
        if (
            following is not None
            and following["lang"] in ("", "json")
            and not text[fence.end() : following.start()].strip()
        ):
            block.output = following["body"]
        blocks.append(block)
    return blocks


def normalise(line: str) -> str:
    return UUID.sub("<uuid>", TIMESTAMP.sub("<time>", line.rstrip()))


def shown_lines_appear(shown: str, printed: str) -> str | None:
    """None if every shown line appears in `printed`, in order; else the first that does not."""
    lines = [normalise(line) for line in printed.splitlines()]
    position = 0
    for line in shown.splitlines():
        if line.strip() in ("", "..."):
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in normalise(line).split("...")))
        while position < len(lines) and not pattern.fullmatch(lines[position]):
            position += 1
        if position == len(lines):
            return line
        position += 1
    return None


class Tutorial:
    """A newcomer's terminal: a copy of the repository, and the server they started last."""

    def __init__(self, directory: Path, env: dict[str, str], port: int) -> None:
        self.directory = directory
        self.env = env
        self.port = port
        self.server: subprocess.Popen[str] | None = None
        self.server_log = directory / "server.log"

    def start_server(self, command: str) -> None:
        self.stop_server()
        with self.server_log.open("w") as log:
            self.server = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.directory,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own process group: uv, and uvicorn's workers
            )
        for _ in range(600):
            if self.server.poll() is not None:
                raise AssertionError(f"{command!r} exited:\n{self.server_log.read_text()}")
            try:
                url = f"http://127.0.0.1:{self.port}/health"
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            subprocess.run(["sleep", "0.1"], check=True)
        raise AssertionError(f"{command!r} never became healthy:\n{self.server_log.read_text()}")

    def stop_server(self) -> None:
        """Ctrl-C, as the reader would press it; the server must exit within 10 s."""
        if self.server is None:
            return
        os.killpg(self.server.pid, signal.SIGINT)
        try:
            self.server.wait(timeout=10)
        finally:
            if self.server.poll() is None:
                os.killpg(self.server.pid, signal.SIGKILL)
        self.server = None

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", "set -o pipefail\n" + script],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )


def new_tutorial(directory: Path) -> Tutorial:
    """A fresh copy of the repository (what `git clone` gives) and a newcomer's environment."""
    repository_copy(directory)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "REDIS_", "CACHE_", "PORT", "HOST", "SQL_"))
    }
    # `uv run` in the copy uses this checkout's environment instead of building another.
    env["UV_PROJECT_ENVIRONMENT"] = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")))
    env["CACHE_PREFIX"] = f"books-readme-{uuid.uuid4().hex[:12]}:"
    # curl prints a progress meter when its output is not a terminal; a reader sees none.
    (directory / ".curlrc").write_text("no-progress-meter\n")
    env["CURL_HOME"] = str(directory)
    port = free_port()
    env["PORT"] = str(port)  # `uv run app.py` listens here instead of on 5042
    return Tutorial(directory, env, port)


@pytest.fixture
def tutorial(tmp_path: Path) -> Iterator[Tutorial]:
    tutorial = new_tutorial(tmp_path / "books-service")
    yield tutorial
    tutorial.stop_server()
    if TEST_REDIS_URL:
        with redis.Redis.from_url(TEST_REDIS_URL) as server:
            for key in server.scan_iter(match=f"{tutorial.env['CACHE_PREFIX']}*"):
                server.delete(key)


@pytest.fixture
def bookshelf() -> Iterator[str | None]:
    """The name the README's PostgreSQL database gets in this run (dropped afterwards)."""
    if not TEST_DATABASE_URL:
        yield None
        return
    name = f"books_readme_{uuid.uuid4().hex[:12]}"
    yield name
    import asyncio

    asyncio.run(admin_query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run_block(tutorial: Tutorial, block: Block, bookshelf: str | None) -> str | None:
    """Run one block as the README says; what it printed, or None if it was not run here
    (it needs PostgreSQL or Redis that this run lacks, or a server that therefore is not up)."""
    commands = [line for line in block.body.splitlines() if line and not line.startswith("#")]
    starts_server = len(commands) == 1 and SERVER.search(commands[0]) is not None
    available = (bookshelf or "bookshelf" not in block.body) and (
        TEST_REDIS_URL or "redis://127.0.0.1:6379/0" not in block.body
    )
    if starts_server and not available:
        tutorial.stop_server()  # and the requests meant for it are not run either
    if not available or ("5042" in block.body and not starts_server and tutorial.server is None):
        return None
    script = block.body.replace("5042", str(tutorial.port))
    if "bookshelf" in script:
        assert bookshelf is not None
        url = make_url(TEST_DATABASE_URL or "")
        script = script.replace("bookshelf", bookshelf)
        script = script.replace("-h 127.0.0.1 -U postgres", f"-h {url.host} -U {url.username}")
        script = script.replace("postgres@127.0.0.1", f"{url.username}@{url.host}")
    if "redis://127.0.0.1:6379/0" in script:
        assert TEST_REDIS_URL
        script = script.replace("redis://127.0.0.1:6379/0", TEST_REDIS_URL)
    if starts_server:
        tutorial.start_server(script.strip())
        return ""
    result = tutorial.run(script)
    printed = result.stdout + result.stderr
    if block.output is None:
        where = f"README.md:{block.line}"
        assert result.returncode == 0, f"{where}: exit {result.returncode}\n{printed}"
    return printed


def test_every_readme_command_works_as_shown(tutorial: Tutorial, bookshelf: str | None):
    ran = 0
    for block in readme_blocks():
        if block.skip:
            continue
        printed = run_block(tutorial, block, bookshelf)
        if printed is None:
            continue
        ran += 1
        if block.output is not None:
            shown = block.output.replace("5042", str(tutorial.port))
            missing = shown_lines_appear(shown, printed)
            assert missing is None, (
                f"README.md:{block.line}: shown but not printed: {missing!r}\n---\n{printed}"
            )
    tutorial.stop_server()
    assert ran >= 18, f"only {ran} README blocks ran"


def test_the_matcher_fails_on_a_line_that_is_not_printed():
    printed = (
        'HTTP/1.1 201 Created\ndate: x\netag: "1-1"\n{"id":1,"at":"2026-11-22T04:32:06Z"}\n'
        "x-request-id: e131cfb5-8d35-448c-881e-1b2331a2a0e4\n"
    )
    assert shown_lines_appear('HTTP/1.1 201 Created\netag: "1-1"\n', printed) is None
    assert shown_lines_appear('{"id":1,"at":"2020-01-01T00:00:00.5+00:00"}', printed) is None
    assert shown_lines_appear('{"id":1,...}', printed) is None
    assert shown_lines_appear("x-request-id: 1b0bc0c6-63a5-4c0e-9b51-1f4e4dcb0bb8", printed) is None
    assert shown_lines_appear('etag: "1-2"', printed) == 'etag: "1-2"'
    assert shown_lines_appear('etag: "1-1"\nHTTP/1.1 201 Created', printed) is not None
    assert shown_lines_appear('{"id":1}', printed) is not None  # a whole line, not a part
