"""Several server processes on one port (``--processes N``): a supervisor and its children.

One process answers calls with one Python interpreter: its event loop, the request's
decoding, the methods' bookkeeping and the answer's encoding all take turns on one GIL, so
on a CPU node one process keeps about one core busy however many calls are in flight
(docs/performance.md, "Concurrent requests"). ``--processes N`` runs N copies of the server
on the same port instead: the supervisor (this module, torch-free) holds the port, starts N
children with ``--reuse-port`` and serves their metrics together; the kernel spreads the
connections (``SO_REUSEPORT``) over the children. Each child has its own models, executor
and threads (torch and ONNX Runtime threads default to the usable CPUs / N each).

What the supervisor does:

- **The port.** It binds the address itself with ``SO_REUSEPORT`` (without listening) before
  any child starts and holds it until the end: a port already in use stops the server with
  an error, as with one process, and another single-process server cannot take the port
  while this one runs. Port 0 picks a free port, logged, that every child then shares.
- **Metrics.** The children record into ``prometheus_client``'s multiprocess files in a
  private temporary directory; the supervisor serves their sum on ``metrics_port``
  (in-flight gauges add up over live children; counters and histograms over all).
- **Children that end.** A child that exits with a non-zero status on its own (it could not
  load its models, or bind) stops the whole server with that status: it logged why, and a
  restart would fail alike. A child ended by a signal (the OOM killer, a crash) or that
  exits 0 while the server is not stopping is restarted, at most ``MAX_RESTARTS`` times in
  ``RESTART_WINDOW_SECONDS``; beyond that the server stops with status 1.
- **Stopping.** SIGTERM or SIGINT goes to every child, which finishes its calls in flight
  (``grace_seconds``); a child still running ``KILL_AFTER_SECONDS`` after the grace is
  killed. A supervisor that is killed outright (SIGKILL) takes its children with it: each
  asks Linux for SIGTERM when its parent ends (:func:`follow_supervisor`), so no child
  keeps serving on the port unsupervised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

from xaiserve.gateway.settings import Settings
from xaiserve.runtime.cpus import OMP_ENV, usable_cpus

logger = logging.getLogger(__name__)

#: Where prometheus_client's multiprocess mode keeps each process's values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set in each child's environment: the supervisor's pid (see :func:`follow_supervisor`).
SUPERVISOR_ENV = "XAISERVE_SUPERVISOR_PID"
#: Linux prctl option: the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1
#: Restarts allowed within ``RESTART_WINDOW_SECONDS`` before the server gives up.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
#: Seconds a stopping child gets beyond its grace before it is killed.
KILL_AFTER_SECONDS = 15.0
#: How often the supervisor looks at its children.
POLL_SECONDS = 0.2


class SupervisorError(RuntimeError):
    """The supervisor cannot start (the port is taken)."""


@dataclass
class Child:
    """One server process and when it started."""

    number: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


def child_threads(settings: Settings, environ: dict[str, str]) -> dict[str, int]:
    """Torch and ONNX Runtime threads of each child: those set explicitly stay; left at 0
    (the usable CPUs), each child gets the usable CPUs / ``processes`` (at least 1), unless
    ``OMP_NUM_THREADS`` sets torch's."""
    share = max(1, usable_cpus() // settings.processes)
    threads = {}
    if settings.torch_threads == 0 and OMP_ENV not in environ:
        threads["torch_threads"] = share
    if settings.onnx_threads == 0:
        threads["onnx_threads"] = share
    return threads


def child_command(settings: Settings, argv: Sequence[str], port: int) -> list[str]:
    """The command line of a child: the supervisor's own flags, then one process on the
    shared ``port``, no metrics endpoint of its own, the demo model already built."""
    threads = child_threads(settings, dict(os.environ))
    overrides = [
        *("--processes", "1", "--reuse-port", "--port", str(port), "--metrics-port", "0"),
        "--no-build-demo",
    ]
    for name, value in threads.items():
        overrides += ["--" + name.replace("_", "-"), str(value)]
    return [sys.executable, "-m", "xaiserve.gateway.server", *argv, *overrides]


@contextlib.contextmanager
def hold_port(host: str, port: int) -> Iterator[int]:
    """Binds ``host:port`` with ``SO_REUSEPORT`` (not listening) for as long as the block
    runs; yields the port (the one picked when ``port`` is 0). A port given is first bound
    without ``SO_REUSEPORT`` and released, so that one any socket holds, another
    supervisor's included, is refused rather than shared.

    Raises:
        SupervisorError: the address cannot be bound (in use by a process that does not
            share it, or not an address of this machine).
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise SupervisorError(f"cannot listen on {host}:{port}: {error}") from None
    if port:  # first alone: a port any socket holds (another supervisor's too) is refused
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as error:
                raise SupervisorError(f"cannot listen on {host}:{port}: {error}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as error:
            raise SupervisorError(f"cannot listen on {host}:{port}: {error}") from None
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


class Supervisor:
    """Starts, watches and stops the children of one ``--processes N`` server."""

    def __init__(self, settings: Settings, argv: Sequence[str], port: int, metrics_dir: str):
        self.settings = settings
        self.command = child_command(settings, argv, port)
        self.environ = {**os.environ, MULTIPROC_ENV: metrics_dir, SUPERVISOR_ENV: str(os.getpid())}
        self.metrics_dir = metrics_dir
        self.children: list[Child] = []
        self.restarts: deque[float] = deque()
        self.stopping = threading.Event()

    def start(self) -> None:
        """Starts every child."""
        self.children = [self._spawn(number) for number in range(self.settings.processes)]

    def _spawn(self, number: int) -> Child:
        process = subprocess.Popen(self.command, env=self.environ, stdin=subprocess.DEVNULL)
        logger.info("server process %d: pid %d", number, process.pid)
        return Child(number, process)

    def watch(self) -> int:
        """Returns once the server stops: 0 after a requested stop, else a child's status
        (module docstring)."""
        while not self.stopping.wait(POLL_SECONDS):
            for index, child in enumerate(self.children):
                code = child.process.poll()
                if code is None or self.stopping.is_set():
                    continue
                self._forget(child)
                if code > 0:
                    logger.error(
                        "server process %d (pid %d) exited with status %d; stopping",
                        child.number,
                        child.process.pid,
                        code,
                    )
                    self.stop()
                    return code
                if not self._may_restart():
                    logger.error(
                        "server process %d (pid %d) ended (%s), the %dth restart within "
                        "%.0f s; stopping",
                        child.number,
                        child.process.pid,
                        _how(code),
                        MAX_RESTARTS + 1,
                        RESTART_WINDOW_SECONDS,
                    )
                    self.stop()
                    return 1
                logger.warning(
                    "server process %d (pid %d) ended (%s); restarting it",
                    child.number,
                    child.process.pid,
                    _how(code),
                )
                self.children[index] = self._spawn(child.number)
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_SECONDS:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            return False
        self.restarts.append(now)
        return True

    def _forget(self, child: Child) -> None:
        """Drops a dead child's live gauges from the summed metrics."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.process.pid, self.metrics_dir)

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal handler: stop (the children are signalled by :meth:`stop`)."""
        del frame
        logger.info("%s: stopping %d server processes", signal.Signals(signum).name, len(self))
        self.stopping.set()

    def stop(self) -> None:
        """SIGTERM to every child still running; waits for them (killing those that
        outlast their grace by ``KILL_AFTER_SECONDS``)."""
        self.stopping.set()
        running = [c for c in self.children if c.process.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.settings.grace_seconds + KILL_AFTER_SECONDS
        for child in running:
            try:
                child.process.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("server process %d did not stop; killing it", child.number)
                child.process.kill()
                child.process.wait()

    def __len__(self) -> int:
        return len(self.children)


def follow_supervisor(environ: dict[str, str] | None = None) -> None:
    """In a child (``XAISERVE_SUPERVISOR_PID`` set): SIGTERM to this process when the
    supervisor ends (Linux ``PR_SET_PDEATHSIG``); at once if it already has. Elsewhere, or
    where prctl is missing, nothing."""
    supervisor = (os.environ if environ is None else environ).get(SUPERVISOR_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        logger.warning("cannot ask to be stopped with the supervisor (prctl)")
        return
    if os.getppid() != int(supervisor):  # it ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Serves with ``settings.processes`` children until SIGTERM or SIGINT (module
    docstring); returns the exit status."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    try:
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(hold_port(settings.host, settings.port))
            metrics_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="xaiserve-metrics-")
            )
            if settings.metrics_port:
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry, path=metrics_dir)
                addr = settings.host.strip("[]")
                try:
                    httpd, _ = start_http_server(
                        settings.metrics_port, addr=addr, registry=registry
                    )
                except OSError as error:
                    raise SupervisorError(
                        f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {error}"
                    ) from None
                stack.callback(httpd.server_close)
                stack.callback(httpd.shutdown)
                logger.info(
                    "metrics of all processes on http://%s:%d/metrics", addr, httpd.server_port
                )
            supervisor = Supervisor(settings, argv, port, metrics_dir)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, supervisor.request_stop)
            logger.info(
                "%d server processes on %s:%d (SO_REUSEPORT: connections are spread over them)",
                settings.processes,
                settings.host,
                port,
            )
            supervisor.start()
            code = supervisor.watch()
            supervisor.stop()
    except SupervisorError as error:
        logger.error("%s", error)
        return 1
    logger.info("stopped")
    return code
