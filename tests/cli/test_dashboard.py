"""``flowrra dashboard``: lazily imports :mod:`flowrra.dashboard` and runs its ``serve``."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import flowrra
from flowrra.cli import DASHBOARD_EXTRA_HINT
from flowrra.exitcodes import ExitCode
from tests.cli.conftest import invoke
from tests.conftest import BIN, subprocess_env


def test_dashboard_runs_serve_with_the_broker_host_and_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    async def serve(broker_url: str, host: str, port: int, keys: Any = None) -> None:
        calls.append((broker_url, host, port, keys))

    fake = types.ModuleType("flowrra.dashboard")
    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flowrra.dashboard", fake)

    result = invoke("tcp://127.0.0.1:7001", "dashboard", "--port", "8123")
    assert result.exit_code == ExitCode.OK, result.output
    result = invoke(
        "tcp://127.0.0.1:7001", "dashboard", "--broker", "tcp://10.0.0.9:5555", "--host", "::1"
    )
    assert result.exit_code == ExitCode.OK, result.output
    assert calls == [
        ("tcp://127.0.0.1:7001", "127.0.0.1", 8123, None),
        ("tcp://10.0.0.9:5555", "::1", 8080, None),
    ]


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_dashboard_without_its_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str
) -> None:
    # A dashboard package that needs the missing library, found before the real one.
    package = tmp_path / "dashboard"
    package.mkdir()
    (package / "__init__.py").write_text(
        f"import {missing}\n\nasync def serve(broker_url, host, port):\n    pass\n"
    )
    monkeypatch.setattr(flowrra, "__path__", [str(tmp_path), *flowrra.__path__])
    monkeypatch.delitem(sys.modules, "flowrra.dashboard", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)
    result = invoke("tcp://127.0.0.1:7001", "dashboard")
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert result.stderr == f"error: {DASHBOARD_EXTRA_HINT}\n"
    assert "pip install 'flowrra-fabric[dashboard]'" in DASHBOARD_EXTRA_HINT


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_the_real_dashboard_without_its_extra(tmp_path: Path, missing: str) -> None:
    (tmp_path / f"{missing}.py").write_text(
        f"raise ImportError('{missing} shadowed by the test')\n"
    )
    result = subprocess.run(
        [str(BIN / "flowrra"), "dashboard", "--port", "1"],
        env=subprocess_env([tmp_path]),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert result.stderr == f"error: {DASHBOARD_EXTRA_HINT}\n"


def test_the_dashboard_package_needs_no_aiohttp(tmp_path: Path) -> None:
    """flowrra's own code does not use aiohttp (only some tests do)."""
    (tmp_path / "aiohttp.py").write_text("raise ImportError('aiohttp shadowed by the test')\n")
    code = "import flowrra.dashboard, flowrra.cli, flowrra.render; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env([tmp_path]),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
