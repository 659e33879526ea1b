"""The project's own gates: ruff, snakefmt and snakemake --lint report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO)


def test_ruff():
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout


def test_snakefmt():
    result = run(str(BIN / "snakefmt"), "--check", "Snakefile", "rules")
    assert result.returncode == 0, result.stderr


def test_snakemake_lint():
    result = run(str(BIN / "snakemake"), "--lint")
    assert "Congratulations" in result.stdout + result.stderr, result.stdout + result.stderr
