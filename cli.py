"""The command line: `uv run app.py` serves the API; `import FILE` and `seed N` load books."""

import argparse
from collections.abc import Callable
from pathlib import Path

import uvicorn
from responder import API

import bulk
from settings import Settings


def counted(lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `lowest` to `highest` (else a usage error)."""

    def parse(text: str) -> int:
        number = int(text)  # a ValueError is argparse's "invalid value"
        if not lowest <= number <= highest:
            raise argparse.ArgumentTypeError(f"must be {lowest:,} to {highest:,}")
        return number

    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="The books service.")
    commands = parser.add_subparsers(dest="command", title="commands (none: serve the API)")
    loading = commands.add_parser(
        "import",
        help="load books from a CSV or JSON Lines file",
        description="Load books from a CSV (with a header line) or JSON Lines file, "
        "validated as the API validates them; rejected lines are reported and skipped.",
    )
    loading.add_argument("file", type=Path)
    loading.add_argument("--format", choices=["csv", "jsonl"], help="default: by file suffix")
    loading.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="one transaction: store nothing if any line is rejected (default: commit batches)",
    )
    loading.add_argument(
        "--batch-size",
        type=counted(1, bulk.MAX_BATCH_SIZE),
        default=bulk.BATCH_SIZE,
        metavar="N",
        help=f"books per transaction, 1 to {bulk.MAX_BATCH_SIZE:,} (default {bulk.BATCH_SIZE:,})",
    )
    seeding = commands.add_parser("seed", help="create N plausible books to try the API with")
    seeding.add_argument("count", type=counted(0, 10**9), metavar="N")
    return parser


def main(api: API) -> int:
    """Run the command the arguments name; the exit status."""
    args = parser().parse_args()
    settings: Settings = api.state.settings
    if args.command == "import":
        return bulk.import_file(
            settings,
            args.file,
            fmt=args.format,
            all_or_nothing=args.all_or_nothing,
            batch_size=args.batch_size,
        )
    if args.command == "seed":
        return bulk.seed(settings, args.count)
    uvicorn.run(
        api,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=8,
        access_log=False,  # Responder logs each request, with its request ID
        # uvicorn would trust X-Forwarded-For from 127.0.0.1 by default: only
        # TRUST_PROXY_HEADERS decides whose address a client has (Responder).
        proxy_headers=False,
    )
    return 0
