"""The chaos script, run as part of the suite: 20 broker kills while work flows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_twenty_broker_kills_lose_and_double_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--restarts", "20"],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=ROOT,
    )
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "20 broker kills" in result.stdout
