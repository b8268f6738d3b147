"""The installed distribution is one package, ``flowrra``: ``broker`` and ``node`` are
``flowrra.broker`` and ``flowrra.node``, not top-level names that other distributions use."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_only_the_flowrra_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("flowrra_fabric-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {
        "flowrra",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    # The broker and node code is inside, as real files, under the one namespace.
    assert "flowrra/broker/core.py" in names
    assert "flowrra/node/worker.py" in names
    # The dashboard's page is package data (read with importlib.resources).
    for asset in ("index.html", "dashboard.css", "dashboard.js"):
        assert f"flowrra/dashboard/static/{asset}" in names, asset
    entry_points = zipfile.ZipFile(wheel).read(
        next(name for name in names if name.endswith("entry_points.txt"))
    )
    assert b"flowrra-broker = flowrra.broker.cli:main" in entry_points
    assert b"flowrra-node = flowrra.node.cli:main" in entry_points
