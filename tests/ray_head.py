"""A second Ray cluster on this machine, started as `ray start --head` starts one, for the tests that need one."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PORT_FLAGS = ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
              "metrics-export-port", "runtime-env-agent-port")
"""The head's ports with a fixed default: each one its own, so the head and the session's `ray_cluster` never meet."""


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_ray_auth(env: dict[str, str]) -> dict[str, str]:
    """`env` less every token setting (the session's `ray_cluster` sets RAY_AUTH_MODE=token in this process)."""
    return {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}


@contextlib.contextmanager
def ray_head(log: Path, env: dict[str, str], serves: Callable[[str], bool], *flags: str
             ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ray start --head` (more `flags`) on ports of its own, with environment `env` and its output in `log`: its
    dashboard's URL, once `serves(url)`, and its process. `--block`, so that ending this one process ends its node
    (never `ray stop`: it stops every Ray on the machine)."""
    ports = {flag: free_port() for flag in PORT_FLAGS}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port=0", "--num-cpus=1",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items()),
         *flags],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 90
        while not serves(url):
            assert head.poll() is None, f"the head ended: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no dashboard at {url} after 90 s"
            time.sleep(0.3)
        yield url, head
    finally:
        head.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its session is left
