"""The same lint and type checks developers run, as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(240)
def test_ruff_check() -> None:
    _run("ruff", "check", ".")


@pytest.mark.timeout(240)
def test_ruff_format() -> None:
    _run("ruff", "format", "--check", ".")


@pytest.mark.timeout(240)
def test_mypy_strict() -> None:
    _run("mypy")
