"""Every operation fuzzed against the OpenAPI document with schemathesis: no 5xx, every
status, content type and body as documented. Bounded in time, with a fixed seed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BACKENDS
from tests.servers import serving

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)
SCHEMATHESIS = Path(sys.executable).with_name("st")
# A minute per database in CI; unset, the suite stays quick for a first `uv run pytest`.
FUZZ_SECONDS = os.environ.get("TEST_FUZZ_SECONDS")


@pytest.mark.skipif(not FUZZ_SECONDS, reason="set TEST_FUZZ_SECONDS (.ci/run sets 60)")
@pytest.mark.skipif(not SCHEMATHESIS.exists() and not shutil.which("st"), reason="no schemathesis")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if "cache" not in str(b)])
def test_schemathesis_finds_nothing(backend, request: pytest.FixtureRequest, tmp_path: Path):
    if backend == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'books.db'}"
    else:
        database_url = request.getfixturevalue("postgres_url")
    with serving({"DATABASE_URL": database_url, "LOG_LEVEL": "warning"}) as server:
        result = subprocess.run(
            [
                str(SCHEMATHESIS), "run", f"{server.url}/schema.yml",
                "--checks", CHECKS, "--seed", "1", "--max-examples", "50",
                "--max-time", str(FUZZ_SECONDS), "--no-color",
            ],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    summary = result.stdout
    assert result.returncode == 0, summary[summary.find("___") :] or summary
    assert " passed" in summary and "generated" in summary
    assert "Traceback" not in server.output()
