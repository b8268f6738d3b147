"""Helpers for the ``flowrra`` CLI tests: run commands in-process against real brokers.

The CLI runs in-process through click's :class:`CliRunner` (each command makes its own
``asyncio.run``, so the tests here are plain functions); brokers and nodes are real processes
started by the fixtures of ``tests/conftest.py``. Commands that run until Ctrl-C run as child
processes instead (:class:`CliProcess`), so a real SIGINT can be sent to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from click.testing import CliRunner, Result

from flowrra import Flowrra
from flowrra.cli import main
from flowrra.result import TaskResult
from tests.cli import cliapp
from tests.conftest import BIN, BrokerProcess, Launcher, NodeProcess, remote_twin, subprocess_env

T = TypeVar("T")

# A task name no node serves: its submissions stay queued.
UNSERVED = "cli.unserved"
FLOWRRA_EXE = str(BIN / "flowrra")
# How long a Ctrl-C-ed command may take to exit: generous for a loaded machine, far below
# any request timeout the tests use.
CTRL_C_EXIT_S = 5.0


def _unserved() -> None:  # registered on the client side only
    raise AssertionError("no node serves this")


def invoke(url: str, *args: str, input: str | None = None, timeout: float = 5.0) -> Result:
    """``flowrra --broker url --timeout timeout ARGS`` in-process."""
    clean_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLOWRRA_")}
    return CliRunner().invoke(
        main, ["--broker", url, "--timeout", str(timeout), *args], input=input, env=clean_env
    )


def ok(url: str, *args: str, input: str | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    result = invoke(url, *args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def ok_json(url: str, *args: str) -> Any:
    return json.loads(ok(url, *args, "--json"))


@dataclass
class Client:
    """Submit and wait through an app twin, one short connection per call."""

    url: str

    def run(self, body: Callable[[Flowrra], Awaitable[T]]) -> T:
        async def session() -> T:
            twin = remote_twin(cliapp.app, self.url)
            twin.task(name=UNSERVED)(_unserved)
            async with twin:
                return await body(twin)

        return asyncio.run(session())

    def submit(self, task: Any, *args: Any, priority: int | None = None, **kwargs: Any) -> str:
        return self.run(lambda app: app.submit(task, *args, priority=priority, **kwargs))

    def wait(self, task_id: str, timeout: float = 15.0) -> TaskResult:
        return self.run(lambda app: app.wait_for_result(task_id, timeout))

    def get(self, task_id: str) -> TaskResult | None:
        return self.run(lambda app: app.get_result(task_id))

    def status(self) -> dict[str, Any]:
        reply: dict[str, Any] = ok_json(self.url, "status")
        return reply


@dataclass
class Fleet:
    """One broker with two nodes serving :mod:`tests.cli.cliapp`."""

    broker: BrokerProcess
    nodes: list[NodeProcess]
    client: Client
    tmp: Path

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def fleet(module_launcher: Launcher) -> Iterator[Fleet]:
    broker = module_launcher.broker()
    nodes = [
        module_launcher.node(broker, "tests.cli.cliapp:app", concurrency=4, node_id=node_id)
        for node_id in ("cli-node-a", "cli-node-b")
    ]
    yield Fleet(broker, nodes, Client(broker.url), module_launcher.tmp)


# --------------------------------------------------------------------------- child processes


@contextlib.contextmanager
def _inherited_sigint(disposition: Literal["default", "ignored"]) -> Iterator[None]:
    """SIGINT set for a child started meanwhile to inherit as ``disposition``: an ignored
    signal stays ignored across exec, a caught one becomes the default (and /bin/sh cannot
    undo an ignored SIGINT, nor can preexec_fn safely do it with threads about)."""
    wanted = signal.SIG_IGN if disposition == "ignored" else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, wanted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class CliProcess:
    """``flowrra --broker url ARGS`` as a child process, its stdout read as it comes.

    stdout is a pty (``tty=True``: the CLI sees a terminal) or a pipe, and is drained for as
    long as the process lives, also while it is asked to stop: a child blocked writing to a
    full pipe cannot act on a signal. stderr goes to a file for the same reason.
    ``sigint`` is the SIGINT disposition the child starts with, whatever this process has:
    ``"default"``, or ``"ignored"`` as in a background job of a non-interactive shell (and in
    everything such a job starts: this test run itself, maybe).
    """

    def __init__(
        self,
        url: str,
        *args: str,
        tty: bool = False,
        sigint: Literal["default", "ignored"] = "default",
    ) -> None:
        argv = [FLOWRRA_EXE, "--broker", url, *args]
        if tty:
            self.fd, child_out = os.openpty()
        else:
            self.fd, child_out = os.pipe()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        try:
            with _inherited_sigint(sigint):
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=child_out,
                    stderr=self._stderr,
                    env=subprocess_env(),
                )
        except BaseException:
            os.close(self.fd)
            self._stderr.close()
            raise
        finally:
            os.close(child_out)
        self.output = b""
        self._eof = False

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    @property
    def tail(self) -> str:
        """The end of stdout, for failure messages."""
        return self.text[-2000:]

    @property
    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _read(self, timeout: float) -> None:
        """Whatever stdout has within ``timeout`` s (EOF: nothing more will come)."""
        if self._eof:
            time.sleep(min(timeout, 0.01))
            return
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # a pty whose other side is closed: EIO
            chunk = b""
        self.output += chunk
        self._eof = not chunk

    def read_until(self, done: Callable[[str], bool], timeout: float = 15.0) -> str:
        """Read until ``done(output so far)``; fail if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while not done(self.text):
            if self._eof or self.proc.poll() is not None:
                self._read(0)  # the last of it
                if done(self.text):
                    break
                raise AssertionError(
                    f"exited with {self.proc.wait()} first; stdout:\n{self.tail}\n"
                    f"stderr:\n{self.stderr}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not within {timeout}s; stdout ends:\n{self.tail}")
            self._read(min(remaining, 0.2))
        return self.text

    def wait_for_threads(self, count: int, timeout: float = 15.0) -> None:
        """Wait until the process runs ``count`` threads (``flowrra`` gains two, ZeroMQ's,
        when it makes its first socket: it is then inside the command, connecting)."""
        deadline = time.monotonic() + timeout
        tasks = Path(f"/proc/{self.proc.pid}/task")
        while True:
            with contextlib.suppress(FileNotFoundError):
                if len(list(tasks.iterdir())) >= count:
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.stderr}")
            assert time.monotonic() < deadline, f"fewer than {count} threads after {timeout}s"
            self._read(0.01)

    def drain(self, seconds: float) -> str:
        """Read for ``seconds``; the output so far."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._read(min(remaining, 0.05))
        return self.text

    def interrupt(self, within: float = CTRL_C_EXIT_S, *, swallowed_again: bool = False) -> int:
        """Send SIGINT and wait (reading on) for the process to end within ``within`` s;
        its exit code.

        ``swallowed_again``: if CPython itself dropped the KeyboardInterrupt (raised inside
        a callback during an import, it is printed as "Exception ignored" and the program
        goes on, as for any Python program), send a second SIGINT, as a user would press
        Ctrl-C again, and wait for that one as for the first."""
        self.proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        while self.proc.poll() is None:
            if swallowed_again and _swallowed(self.stderr):
                swallowed_again = False
                self.proc.send_signal(signal.SIGINT)
                sent = time.monotonic()
            took = time.monotonic() - sent
            if took > within:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"still running {within}s after SIGINT (killed); stdout ends:\n{self.tail}\n"
                    f"stderr:\n{self.stderr}"
                )
            self._read(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
        self._stderr.close()


def _swallowed(stderr: str) -> bool:
    """CPython printed a KeyboardInterrupt it could not raise ("Exception ignored in: ...")."""
    ignored = stderr.find("Exception ignored in")
    return ignored >= 0 and "KeyboardInterrupt" in stderr[ignored:]
