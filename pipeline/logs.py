"""The terminal is for people: the stages, one progress bar each, the results and where to look.

Everything the libraries say (Ray, Ray Data, Ray Train, MLflow and its database migrations, Python warnings)
goes to `<root>/logs/gss.log` instead; errors also reach the terminal. Ray's own processes (the training
workers and controller, Ray Data's actors) write to Ray's session folder, which the driver does not echo
(`ray.init(log_to_driver=False)` in `pipeline.cluster`) and which `<root>/logs/ray` links to. What native code
in this process writes to its stderr (Ray's C++ core worker, gRPC) goes to gss.log too (`native_stderr_to`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import filesystem, join

LIBRARIES = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "py.warnings", "urllib3",
             "fsspec", "gcsfs", "google", "matplotlib")
LOG_FILE = "gss.log"
_installed: list[logging.Handler] = []  # ours on the root logger: replaced, not stacked, when routed again
_terminal: list[io.TextIOWrapper] = []  # sys.stderr once native_stderr_to has moved file descriptor 2


def log_folder(root: str) -> str:
    """`<root>/logs` for a local root; a local cache folder for a bucket (log files are appended to)."""
    fs, path = filesystem(root)
    if isinstance(fs, LocalFileSystem):
        return join(path, "logs")
    return os.path.join(tempfile.gettempdir(), "gss-logs", path.replace("/", "_"))


class FirstLine(logging.Formatter):
    """A library's error on the terminal: its first line and where the rest is (tracebacks stay in the file)."""

    def __init__(self, log_file: str):
        super().__init__()
        self.log_file = log_file

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines() or [""]
        more = f" (more in {self.log_file})" if len(lines) > 1 or record.exc_info else ""
        return f"{record.name}: {lines[0]}{more}"


def route_library_logs(root: str) -> str:
    """Send the libraries' logging to `<log folder>/gss.log` (errors to the terminal too); returns the file."""
    import mlflow  # noqa: F401 - each configures its loggers on import: import first, then reconfigure
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401

    folder = log_folder(root)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOG_FILE)
    native_stderr_to(path)
    logging.raiseExceptions = False  # a log line that a full disk refuses is lost, not printed as "Logging error"
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.ERROR)
    to_terminal.setFormatter(FirstLine(path))
    # storage clients log each request that ran out of retries; the command then fails with the error explained
    to_terminal.addFilter(lambda record: not record.name.startswith(("gcsfs", "google")))
    # MLflow prints a "View run" link per stage on a tracking server; `gss run` names the one page to look at
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed[:] = [to_file, to_terminal]
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    for name in LIBRARIES:  # their own terminal handlers go; their records go up to the root's
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = True
    os.environ["GSS_LOG_FOLDER"] = folder  # for `pipeline.cluster` to link Ray's session logs here
    return path


def native_stderr_to(path: str) -> None:
    """File descriptor 2 of this process appends to `path`; Python's sys.stderr (progress bars, errors, tracebacks)
    stays on the terminal through a copy of the old descriptor.

    Native code writes its log lines to descriptor 2 directly. Ray's C++ core worker in the driver prints its
    ERROR lines there as well as to its own log file (python-core-driver-*.log under `<log folder>/ray`), with no
    switch between the two: RAY_BACKEND_LOG_LEVEL would drop them from the file too. One of them reads like a
    failure in a run that is fine: every Ray Data actor pool (prepare's tokenizers) is created with constructor
    arguments in the object store and max_restarts=-1, Ray Data's default that lets a lost actor be replaced,
    and core_worker.cc says so once per process at ERROR ("... has constructor arguments in the object store and
    max_restarts > 0 ..."). The fault tolerance stays; the line goes where the libraries' logs go.
    """
    if not _terminal:  # once per process: later calls only point descriptor 2 at another log file
        sys.stderr.flush()
        _terminal.append(open(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"))
        sys.stderr = _terminal[0]
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)


@contextlib.contextmanager
def printed_to_log(logger_name: str) -> Iterator[None]:
    """What a library prints (rather than logs) inside the block goes to its logger, hence to the log file."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for line in (out.getvalue() + err.getvalue()).splitlines():
            logging.getLogger(logger_name).info(line)


def link_ray_session_logs() -> None:
    """`<log folder>/ray` -> this Ray session's log folder (workers, controller, Ray Data), when routing is on; for a
    driver on a Ray node (not one through Ray Client, whose session is on the cluster's head)."""
    folder = os.environ.get("GSS_LOG_FOLDER")
    if not folder:
        return
    import ray

    context = ray.get_runtime_context()
    logs = os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")  # Ray's layout of its temp dir
    link = os.path.join(folder, "ray")
    if os.path.islink(link):
        os.remove(link)
    if not os.path.exists(link):
        os.symlink(logs, link)
