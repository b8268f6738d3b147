"""A task defined in a script run as ``__main__`` gets the name a node computes on import.

``tests/apps/mainscript.py`` prints the names of its tasks as the script sees them; a node
imports the same file as a module (``--app mainscript:app`` beside it, or
``--app tests.apps.mainscript:app`` from the repository root) and logs the names it serves.
The script then submits to that node by those names, and runs on the embedded default too
(where its cpu_bound task runs in a worker process that imports the script as ``__mp_main__``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess, Launcher, subprocess_env

APPS = ROOT / "tests" / "apps"

# (how the script runs, working directory, --app of the node). A plain script is run the
# way a user would: from its directory, with nothing on PYTHONPATH.
LAYOUTS = {
    "script": (["mainscript.py"], APPS, "mainscript:app"),
    "module": (["-m", "tests.apps.mainscript"], ROOT, "tests.apps.mainscript:app"),
}


def run_script(command: list[str], cwd: Path, *extra: str) -> list[str]:
    """Run the script in a fresh interpreter; its stdout lines (stderr shown on failure)."""
    done = subprocess.run(
        [sys.executable, *command, *extra],
        cwd=cwd,
        env=subprocess_env(repo=cwd == ROOT),
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def node_task_names(log: str) -> list[str]:
    (line,) = [line for line in log.splitlines() if " tasks: " in line]
    return line.split(" tasks: ", 1)[1].split(", ")


@pytest.fixture(scope="module")
def broker(module_launcher: Launcher) -> BrokerProcess:
    return module_launcher.broker()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_main_task_names_match_the_node(
    layout: str, launcher: Launcher, broker: BrokerProcess
) -> None:
    command, cwd, app_spec = LAYOUTS[layout]
    prefix = "mainscript" if layout == "script" else "tests.apps.mainscript"

    names_line, *_ = run_script(command, cwd)
    script_names = json.loads(names_line)
    assert script_names == [f"{prefix}.cube", f"{prefix}.greet"]

    node = launcher.node(
        broker, app_spec, cwd=cwd, repo_on_path=cwd == ROOT, concurrency=2, processes=1
    )
    assert node_task_names(node.process.log()) == script_names

    # The script, as __main__, submits by those names; the node finds and runs both.
    _, results_line = run_script(command, cwd, "--run", broker.url)
    assert json.loads(results_line) == [
        [f"{prefix}.cube", "success", 27, None],
        [f"{prefix}.greet", "success", "hello node", None],
    ]


def test_main_script_on_the_embedded_default() -> None:
    command, cwd, _ = LAYOUTS["script"]
    names_line, results_line = run_script(command, cwd, "--run")
    assert json.loads(names_line) == ["mainscript.cube", "mainscript.greet"]
    assert json.loads(results_line) == [
        ["mainscript.cube", "success", 27, None],
        ["mainscript.greet", "success", "hello node", None],
    ]
