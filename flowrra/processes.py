"""Start real ``flowrra-broker`` and ``flowrra-node`` processes on 127.0.0.1.

The one launcher shared by the test suite and the scripts (``scripts/bench.py``,
``scripts/chaos.py``, ``scripts/measure_memory.py``)::

    with Launcher(tmp_dir) as launch:
        broker = launch.broker()                     # free ports, its own data directory
        node = launch.node(broker, "myapp.tasks:app")
        ...                                          # Flowrra.from_urls(broker=broker.url)
        broker = launch.restart(broker)              # kill -9, then again on the same ports/data

* Every socket gets a free loopback port (:func:`free_ports`): the ROUTER, the result
  publisher and, with ``metrics=True``, the metrics server (port 0, read back from the log).
* A start returns once the process says it is ready in its log: the broker's
  ``broker listening on`` line (sockets bound, store open), the node's
  ``registered with broker`` line (its READY was answered). Nothing sleeps.
* Each process runs in its own session (process group), so a node's worker processes can be
  found and killed with it. :meth:`ManagedProcess.stop` sends SIGTERM, SIGKILL after a grace
  period, and records a problem if the process ignored SIGTERM or left processes behind;
  :meth:`ManagedProcess.kill9` is the crash.
* The combined stdout/stderr of every process is kept (and optionally written to a file), for
  :meth:`ManagedProcess.wait_for` and for failure reports.

Only for loopback test and benchmark set-ups: the processes run without CURVE unless the caller
passes the options, and ports are probed, not reserved (a start retries on a bind race).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from flowrra.errors import FlowrraError

__all__ = [
    "HOST",
    "BrokerProcess",
    "LaunchError",
    "Launcher",
    "ManagedProcess",
    "NodeProcess",
    "clean_env",
    "command",
    "free_port",
    "free_ports",
    "group_members",
    "live_processes",
    "pid_alive",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 300
BROKER_READY = r"broker listening on "
NODE_READY = r"registered with broker "
METRICS_READY = r"serving metrics on (http://\S+/metrics)"


class LaunchError(FlowrraError, RuntimeError):
    """A process exited, or did not log what was awaited in time (the message has its log)."""


# --------------------------------------------------------------------------- small helpers


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that were free a moment ago.

    The sockets are held together while probing, so the ports differ; they are released
    before returning, so another process can still take one (callers retry on a bind error).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    return free_ports(1, host)[0]


def clean_env(path: Sequence[str | os.PathLike[str]] = (), **extra: str) -> dict[str, str]:
    """This process's environment without ``FLOWRRA_*`` options and with only ``path`` on
    ``PYTHONPATH`` (a stray option or path would change what a broker or node does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWRRA_")}
    env.pop("PYTHONPATH", None)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(os.fspath(p) for p in path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


_CLI_MODULES = {"flowrra-broker": "flowrra.broker.cli", "flowrra-node": "flowrra.node.cli"}


def command(name: str) -> list[str]:
    """The argv prefix of a console script: this interpreter's ``bin/<name>`` when it exists,
    else ``python -c`` on the script's entry point (a run from a source tree)."""
    script = Path(sys.executable).parent / name
    if script.exists() or name not in _CLI_MODULES:
        return [str(script)]
    return [sys.executable, "-c", f"from {_CLI_MODULES[name]} import main; main()"]


def _stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                alive.append(int(entry))
    return alive


_PR_SET_PDEATHSIG = 1
_LIBC: Any = None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launching thread's process dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# --------------------------------------------------------------------------- one process


class ManagedProcess:
    """A process started in its own session; its output is read line by line in a thread.

    ``keep`` bounds the lines kept in memory (None: all of them); ``log_path`` also appends
    every line to that file. ``die_with_parent`` (Linux) sends the process SIGTERM should this
    one die without stopping it. Positions (:meth:`mark`, ``since=``) count every line ever
    read, kept or not.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        keep: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        global _LIBC
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self._keep = keep
        self._dropped = 0  # lines read but no longer kept
        self._cond = threading.Condition()
        self._eof = False
        self._log_file: IO[str] | None = None
        if log_path is not None:
            self._log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed at EOF
        if die_with_parent and _LIBC is None:
            # Loaded here, not after fork: the child only makes the one call.
            _LIBC = ctypes.CDLL(None, use_errno=True)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=None if cwd is None else os.fspath(cwd),
            start_new_session=True,  # its own process group: its children can be found
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()
        _LIVE.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if self._log_file is not None:
                self._log_file.write(line + "\n")
                self._log_file.flush()
            with self._cond:
                self.lines.append(line)
                if self._keep is not None and len(self.lines) > self._keep:
                    drop = len(self.lines) - self._keep
                    del self.lines[:drop]
                    self._dropped += drop
                self._cond.notify_all()
        self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # ----------------------------------------------------------------------- logs

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def mark(self) -> int:
        """The current log position, for ``since=`` of :meth:`wait_for` and :meth:`find`."""
        with self._cond:
            return self._dropped + len(self.lines)

    def log(self, tail: int | None = None) -> str:
        """The kept output (its last ``tail`` lines)."""
        with self._cond:
            lines = self.lines if tail is None else self.lines[-tail:]
            return "\n".join(lines)

    def find(self, pattern: str, since: int = 0) -> re.Match[str] | None:
        """The first kept line from position ``since`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            for line in self.lines[max(0, since - self._dropped) :]:
                match = regex.search(line)
                if match:
                    return match
        return None

    def wait_for(
        self, pattern: str, timeout: float = START_TIMEOUT_S, since: int = 0
    ) -> re.Match[str]:
        """Block until a line from position ``since`` on matches ``pattern``; its match.

        Raises :class:`LaunchError` (with the log) if the process ends first or on timeout.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        position = since
        with self._cond:
            while True:
                position = max(position, self._dropped)
                while position < self._dropped + len(self.lines):
                    match = regex.search(self.lines[position - self._dropped])
                    position += 1
                    if match:
                        return match
                if self._eof:
                    self.proc.wait()
                    raise LaunchError(
                        f"{self.name} exited with {self.proc.returncode} before logging "
                        f"{pattern!r}; its log:\n{self.log(LOG_TAIL_LINES)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LaunchError(
                        f"{self.name} did not log {pattern!r} within {timeout}s; its log:\n"
                        f"{self.log(LOG_TAIL_LINES)}"
                    )
                self._cond.wait(remaining)

    async def await_line(
        self, pattern: str, timeout: float = START_TIMEOUT_S, since: int = 0
    ) -> re.Match[str]:
        """:meth:`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, timeout, since)

    def describe(self) -> str:
        """Name, pid, exit code and the last lines of the log, for error messages."""
        return f"{self.name} (pid {self.pid}, exit {self.proc.poll()}); its log:\n{self.log(15)}"

    # ----------------------------------------------------------------------- ending

    def kill9(self) -> None:
        """SIGKILL the process itself (not its group: its children are left to notice) and
        reap it."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_GRACE_S)
        self._ended()

    def terminate(self, timeout: float = STOP_GRACE_S) -> int:
        """SIGTERM and wait; the exit code (no SIGKILL, see :meth:`stop`)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._ended()
        return code

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, SIGKILL after ``grace``, then make sure its whole group is gone.

        What went wrong (SIGTERM ignored, processes left behind) goes to :attr:`problems`.
        """
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{self.name} ignored SIGTERM for {grace}s")
                self.proc.kill()
                self.proc.wait(STOP_GRACE_S)
        self._ended()
        # Children (worker processes) get a moment to notice their parent is gone.
        deadline = time.monotonic() + 5.0
        leftovers = group_members(self.pid)
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.05)
            leftovers = group_members(self.pid)
        if leftovers:
            self.problems.append(f"{self.name} left processes behind: {leftovers}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self._reader.join(5.0)
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def _ended(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()


_LIVE: list[ManagedProcess] = []


def live_processes() -> list[ManagedProcess]:
    """Every process started here and not yet stopped (for failure reports)."""
    return list(_LIVE)


@atexit.register
def _kill_everything() -> None:  # a last resort if the launching program is interrupted
    for process in _LIVE:
        if process.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- broker / node


@dataclass
class BrokerProcess:
    """A running ``flowrra-broker`` and what it was started with (see :meth:`Launcher.restart`)."""

    process: ManagedProcess
    port: int
    publish_port: int
    data_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    metrics_url: str | None = None

    @property
    def url(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    @property
    def publish_url(self) -> str:
        return f"tcp://{HOST}:{self.publish_port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class NodeProcess:
    """A running ``flowrra-node``."""

    process: ManagedProcess
    node_id: str
    app: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill9(self) -> None:
        """SIGKILL the node process (its worker processes are left to notice)."""
        self.process.kill9()

    def worker_pids(self) -> list[int]:
        """Worker processes the node's pool reported starting (including replacements)."""
        return [int(m) for m in re.findall(r"worker process (\d+) started", self.process.log())]


_names = itertools.count(1)


class Launcher:
    """Starts brokers, nodes and other processes, and stops them all at :meth:`close`.

    ``workdir`` holds the brokers' data directories and is the brokers' working directory.
    ``python_path`` is the nodes' whole ``PYTHONPATH`` (where their apps are imported from)
    and ``node_cwd`` their working directory. ``heartbeat_ms``/``liveness`` (None: the
    broker's defaults) and ``durability`` are the brokers' defaults. ``keep_lines``,
    ``log_dir`` and ``die_with_parent`` are passed to every :class:`ManagedProcess` (with
    ``log_dir``, each process writes ``<name>.log`` there).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        python_path: Sequence[str | os.PathLike[str]] = (),
        node_cwd: str | os.PathLike[str] | None = None,
        durability: str = "fast",
        heartbeat_ms: int | None = None,
        liveness: int | None = None,
        keep_lines: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.tmp = Path(workdir)
        self.python_path = list(python_path)
        self.node_cwd = Path(node_cwd) if node_cwd is not None else self.tmp
        self.durability = durability
        self.heartbeat_ms = heartbeat_ms
        self.liveness = liveness
        self.keep_lines = keep_lines
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.die_with_parent = die_with_parent
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> Launcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ManagedProcess:
        """Start any process under this launcher (stopped by :meth:`close`)."""
        process = ManagedProcess(
            name,
            argv,
            env=clean_env(self.python_path) if env is None else env,
            cwd=self.tmp if cwd is None else cwd,
            keep=self.keep_lines,
            log_path=None if self.log_dir is None else self.log_dir / f"{name}.log",
            die_with_parent=self.die_with_parent,
        )
        self.processes.append(process)
        return process

    def broker(
        self,
        *,
        port: int | None = None,
        publish_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        durability: str | None = None,
        heartbeat_ms: int | None = None,
        liveness: int | None = None,
        metrics: bool = False,
        args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = START_TIMEOUT_S,
    ) -> BrokerProcess:
        """Start a broker on free (or the given) ports and wait until it listens.

        ``args`` are further command-line options; they come last, so they win.
        With ``wait=False`` it returns at once (ports given or not, no retry on a bind race).
        """
        options: dict[str, Any] = {
            "durability": durability or self.durability,
            "heartbeat_ms": heartbeat_ms if heartbeat_ms is not None else self.heartbeat_ms,
            "liveness": liveness if liveness is not None else self.liveness,
            "metrics": metrics,
            "args": tuple(args),
        }
        fixed = port is not None or publish_port is not None or not wait
        data = Path(data_dir) if data_dir is not None else self.tmp / f"broker-data-{next(_names)}"
        for _ in range(1 if fixed else 5):
            probed = free_ports(2)
            bind_port = port if port is not None else probed[0]
            pub_port = publish_port if publish_port is not None else probed[1]
            argv = [
                *command("flowrra-broker"),
                "--bind", f"tcp://{HOST}:{bind_port}",
                "--publish", f"tcp://{HOST}:{pub_port}",
                "--data-dir", str(data),
                "--durability", options["durability"],
                "--log-level", "INFO",  # the ready line is an INFO line
            ]  # fmt: skip
            if options["heartbeat_ms"] is not None:
                argv += ["--heartbeat-ms", str(options["heartbeat_ms"])]
            if options["liveness"] is not None:
                argv += ["--liveness", str(options["liveness"])]
            if metrics:
                argv += ["--metrics-port", "0"]
            argv += list(args)
            process = self.start(f"broker-{next(_names)}", argv, env=clean_env())
            broker = BrokerProcess(process, bind_port, pub_port, data, options)
            if not wait:
                return broker
            try:
                if metrics:
                    broker.metrics_url = process.wait_for(METRICS_READY, timeout).group(1)
                process.wait_for(BROKER_READY, timeout)
            except LaunchError:
                if fixed or "cannot bind" not in process.log():
                    raise
                continue  # somebody took a port meanwhile: try others
            return broker
        raise LaunchError("could not start a broker on free ports")

    def restart(self, broker: BrokerProcess, **changes: Any) -> BrokerProcess:
        """SIGKILL ``broker`` (if it still runs) and start a new one on its ports and data
        directory, with the same options (``changes`` override them)."""
        broker.process.kill9()
        options = {**broker.options, **changes}
        return self.broker(
            port=broker.port,
            publish_port=broker.publish_port,
            data_dir=broker.data_dir,
            **options,
        )

    def node(
        self,
        broker: BrokerProcess | str,
        app: str,
        *,
        concurrency: int = 10,
        processes: int = 0,
        node_id: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        python_path: Sequence[str | os.PathLike[str]] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: Sequence[str] = (),
        timeout: float = START_TIMEOUT_S,
    ) -> NodeProcess:
        """Start a node serving ``app`` (``module:attribute``) and, by default, wait until the
        broker answered its READY.

        ``python_path`` replaces the launcher's; ``env`` adds variables to the clean
        environment.
        """
        url = broker if isinstance(broker, str) else broker.url
        node_id = node_id or f"node-{next(_names)}"
        argv = [
            *command("flowrra-node"),
            "--app", app,
            "--broker", url,
            "--concurrency", str(concurrency),
            "--processes", str(processes),
            "--node-id", node_id,
            "--log-level", "INFO",  # the ready line is an INFO line
            *args,
        ]  # fmt: skip
        path = self.python_path if python_path is None else python_path
        process = self.start(
            node_id,
            argv,
            env=clean_env(path, **(env or {})),
            cwd=self.node_cwd if cwd is None else cwd,
        )
        node = NodeProcess(process, node_id, app)
        if wait:
            process.wait_for(NODE_READY, timeout)
        return node

    def stop(self, *targets: ManagedProcess | BrokerProcess | NodeProcess) -> list[str]:
        """Stop these processes (SIGTERM to all first, so they stop in parallel); the problems
        found (see :meth:`ManagedProcess.stop`)."""
        processes = [t if isinstance(t, ManagedProcess) else t.process for t in targets]
        for process in processes:
            if process.running:
                process.proc.send_signal(signal.SIGTERM)
        problems: list[str] = []
        for process in processes:
            process.stop()
            problems.extend(process.problems)
            with contextlib.suppress(ValueError):
                self.processes.remove(process)
        return problems

    def close(self) -> list[str]:
        """Stop every process started here; the problems found."""
        return self.stop(*self.processes)
