"""Connecting to Ray (an existing cluster when given an address, else a local one sized to this machine), and where
Ray's and vLLM's output goes while a job runs: to the run's log file, and to the terminal only when asked."""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import ray

from qwen_batch.schemas.errors import SpecError

__all__ = ["LOCAL_OBJECT_STORE_BYTES", "job_log_file", "ray_cluster", "ray_output"]

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 << 20
LOG_DIR_ENV = "QWEN_BATCH_LOG_DIR"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ray's loggers that do not propagate to the root logger: each has its own console handler.
RAY_LOGGERS = ("ray", "ray.data")
OUR_LOGGER = "qwen_batch"
WORKER_LINES_HANDLER = "qwen_batch_job_log"
LOCAL_START_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 10
RAYLET_DEADLINE = "timed out during startup"  # Ray's message when the raylet misses its start deadline
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@contextmanager
def ray_cluster(address: str | None = None) -> Iterator[None]:
    """Use the running Ray connection, the cluster at `address` (or RAY_ADDRESS), or start a local one; shut down
    only what this call started."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        _start_local_ray()
    log.debug("connected to Ray: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at a `host:port` or `ray://host:port` address: `ray.init` would retry for
    minutes before saying so."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SpecError(f"Ray at {address}: nothing answers there ({exc}); check the address (`ray status` on the "
                        "head node prints it), or leave out --address and RAY_ADDRESS to run on a local Ray") from exc


def _start_local_ray() -> None:
    """A new local Ray of our own, never whatever `ray start` left running on this machine. Ray gives its raylet a
    fixed 30 s to register, which a busy machine can miss: that start is tried again before giving up."""
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
            return
        except Exception as exc:  # Ray raises a bare Exception for this deadline
            if RAYLET_DEADLINE not in str(exc):
                raise
            ray.shutdown()
            if attempt == LOCAL_START_ATTEMPTS:
                raise SpecError(f"local Ray: its node did not start within Ray's 30 s deadline, {attempt} times "
                                f"({exc}); this machine is too busy now: run again when it is less loaded, or "
                                "start Ray yourself (`ray start --head`) and pass --address") from exc
            log.warning("local Ray: its node missed Ray's 30 s start deadline (a busy machine); starting it again")


def job_log_file(job_id: str, run_id: str) -> Path:
    """Where one run of a job keeps Ray's and vLLM's output: `<log dir>/<job id>/<run id>.log`, the log dir being
    $QWEN_BATCH_LOG_DIR, else `<temp dir>/qwen-batch`."""
    root = os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "qwen-batch"
    return Path(root) / job_id / f"{run_id}.log"


@contextmanager
def ray_output(log_file: Path, *, verbose: bool = False) -> Iterator[None]:
    """While the block runs, Ray's and vLLM's output goes to `log_file`, whose path is logged once; the terminal
    keeps qwen-batch's own log records (the progress line among them), errors from anything, and whatever Python
    code prints to `sys.stderr`.

    What goes to the file: the lines Ray forwards from its workers (the engine actors' vLLM and torch output), Ray's
    own loggers in this process, Python warnings, other libraries' log records below ERROR, and everything native code
    writes to file descriptor 2 (Ray's C++ core worker). With `verbose` the terminal shows all of it as well (the
    native output then stays on the terminal only; Ray keeps it in its session logs too).

    Process-wide while it lasts: file descriptor 2, `sys.stderr`, the root logger's stderr handlers (pointed at the
    terminal, and filtered) and Ray's loggers are changed, and all are put back on the way out.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with ExitStack() as stack:
        sink = stack.enter_context(_LogFile(log_file))
        if not verbose:
            importlib.import_module("ray.data")  # it sets up its loggers on import: now, not halfway through the job
            terminal, replaced = stack.enter_context(_native_stderr_to(sink))
            stack.enter_context(_stderr_handlers_to(root, terminal, replaced))
            for name in RAY_LOGGERS:
                stack.enter_context(_propagating(logging.getLogger(name)))
            stack.enter_context(_warnings_logged())
        file_handler = logging.StreamHandler(sink)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        file_handler.setLevel(min(root.getEffectiveLevel(), logging.INFO))
        for logger in [root, *([logging.getLogger(name) for name in RAY_LOGGERS] if verbose else [])]:
            stack.enter_context(_handler_on(logger, file_handler))
        stack.enter_context(_worker_lines_to(sink, echo=verbose))
        log.info("Ray and vLLM output of this run: %s", log_file)
        yield


class _LogFile:
    """The log file, appended to by whole writes under one lock, from logging and from Ray's log thread alike."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace")
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            written = self._file.write(text)
            self._file.flush()
        return written

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def __enter__(self) -> _LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


@contextmanager
def _handler_on(logger: logging.Logger, handler: logging.Handler) -> Iterator[None]:
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextmanager
def _worker_lines_to(sink: _LogFile, *, echo: bool) -> Iterator[None]:
    """Write the lines Ray forwards from its workers to `sink`; unless `echo`, Ray's own printer of them stays quiet
    (Ray adds that printer to the same dispatcher when it connects with log_to_driver=True)."""
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def write(data: dict[str, Any]) -> None:
        sink.write("".join(f"{_worker_prefix(data)}{TERMINAL_CODES.sub('', line)}\n" for line in data["lines"]))

    echoing = worker._worker_logs_enabled
    worker._worker_logs_enabled = echo
    dispatcher.add_handler(WORKER_LINES_HANDLER, write)
    try:
        yield
    finally:
        dispatcher.remove_handler(WORKER_LINES_HANDLER)
        worker._worker_logs_enabled = echoing


def _worker_prefix(data: dict[str, Any]) -> str:
    """`(ActorName pid=123, ip=10.0.0.2) `, as Ray prints it; the ip only for other nodes."""
    if data.get("pid") in ("autoscaler", "raylet"):
        return f"({data['pid']}) "
    name = data.get("actor_name") or data.get("task_name")
    ip = data.get("ip")
    where = "" if ip is None or ip == data.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={data.get('pid')}{where}) "


@contextmanager
def _native_stderr_to(sink: _LogFile) -> Iterator[tuple[TextIO, TextIO]]:
    """Point file descriptor 2 at `sink`, and `sys.stderr` at a new stream on the terminal; yield that stream and the
    `sys.stderr` it replaced (which now writes to `sink`). A `sys.stderr` not on descriptor 2 (a notebook's) stays."""
    replaced = sys.stderr
    replaced.flush()
    saved_fd = os.dup(2)
    on_fd_2 = _fileno(replaced) == 2
    terminal = open(saved_fd, "w", buffering=1, encoding=getattr(replaced, "encoding", None) or "utf-8",
                    errors="backslashreplace", closefd=False) if on_fd_2 else replaced
    os.dup2(sink.fileno(), 2)
    sys.stderr = terminal
    try:
        yield terminal, replaced
    finally:
        terminal.flush()
        sys.stderr = replaced
        os.dup2(saved_fd, 2)
        if on_fd_2:
            terminal.close()
        os.close(saved_fd)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _OwnRecords(logging.Filter):
    """Passes qwen-batch's own records, and anyone's at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.ERROR or record.name == OUR_LOGGER
                or record.name.startswith(OUR_LOGGER + "."))


@contextmanager
def _stderr_handlers_to(root: logging.Logger, terminal: TextIO, replaced: TextIO) -> Iterator[None]:
    """Point the root logger's handlers that wrote to stderr at `terminal`, filtered to our own records and errors.
    A root logger without handlers gets a stand-in for Python's last-resort handler (warnings and up, to stderr),
    which the log file's handler would otherwise switch off."""
    only_ours = _OwnRecords()
    moved = [(handler, handler.stream) for handler in root.handlers
             if type(handler) is logging.StreamHandler and handler.stream in (replaced, sys.__stderr__)]
    stand_in = None
    if not root.handlers:
        stand_in = logging.StreamHandler(terminal)
        stand_in.setLevel(logging.WARNING)
        root.addHandler(stand_in)
        moved.append((stand_in, terminal))
    for handler, _ in moved:
        handler.setStream(terminal)
        handler.addFilter(only_ours)
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.removeFilter(only_ours)
            handler.setStream(stream)
        if stand_in is not None:
            root.removeHandler(stand_in)


@contextmanager
def _propagating(logger: logging.Logger) -> Iterator[None]:
    """Send a Ray logger's records to the root logger's handlers instead of its own console handler."""
    from ray._private.log import PlainRayHandler

    console = [h for h in logger.handlers if isinstance(h, PlainRayHandler)]
    propagate = logger.propagate
    for handler in console:
        logger.removeHandler(handler)
    logger.propagate = True
    try:
        yield
    finally:
        logger.propagate = propagate
        for handler in console:
            logger.addHandler(handler)


@contextmanager
def _warnings_logged() -> Iterator[None]:
    """Python warnings become log records (logger `py.warnings`), so they reach the log file, not the terminal."""
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
