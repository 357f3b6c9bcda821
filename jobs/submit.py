"""`gss submit`: run any `gss` command on a Ray cluster through the Ray Jobs API.

The project folder travels as the job's working directory (so the cluster runs this exact code and
these configs); MLflow and storage settings travel as environment variables. Credentials do not: the
cluster's nodes get them from their service account and Kubernetes secrets (infra/README.md).

The clusters of ray_cluster.yaml and infra/kuberay run with Ray's token authentication: their dashboard answers
only requests that carry the cluster's token. `gss submit` takes it from where Ray's own clients do, through
Ray's own loader ($RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token), and sends
it in each request's Authorization header, with or without RAY_AUTH_MODE=token here. The token is a credential
too: it goes into no job's runtime env and is never printed. A cluster that refuses the request (no token, or
not its token) is told apart from an address where nothing answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
# settings that say where things are, never secrets (nor RAY_AUTH_TOKEN: the cluster's nodes have their own)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "GOOGLE_CLOUD_PROJECT", "PJRT_DEVICE")
EXCLUDES = [".venv", ".venv-xla", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
            "benchmarks/results"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard through `ray dashboard ray_cluster.yaml` or a tunnel
GET_THE_TOKEN = ("put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` on the head prints it, or "
                 "`ray rsync-down ray_cluster.yaml /home/ray/.ray/auth_token ~/.ray/auth_token` copies it; on GKE "
                 "the ray-auth-token Secret holds it: infra/README.md, \"Ray's token\") or in RAY_AUTH_TOKEN")


def runtime_env() -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env}


def entrypoint(command: list[str], commands: list[str]) -> str:
    """`gss <command> ...` as the job's shell command: this project's CLI in the cluster's Python.

    `commands`: the gss commands a job may run (the CLI passes its own, less `submit`)."""
    words = command[1:] if command and command[0] == "--" else command
    if len(words) < 2 or words[0] != "gss" or words[1] not in commands:
        raise SystemExit("gss submit: give the command after --, e.g. `gss submit -- gss run configs/paper-pg19.yaml`"
                         f" (commands: {', '.join(commands)})")
    return "python -m jobs.cli " + shlex.join(words[1:])


def auth_headers() -> dict[str, str]:
    """{"authorization": "Bearer <token>"} with the token Ray's loader finds here, {} where there is none.

    Ray's JobSubmissionClient adds this header itself only when RAY_AUTH_MODE=token is set in this process (a
    setting for the clusters a process starts); a client of a remote cluster sends the token it has."""
    # private, as in `ray get-auth-token`: no public API gives the token or reads every place Ray keeps it in
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True))
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a file that is missing, unreadable or empty
        raise SystemExit(f"gss submit: RAY_AUTH_TOKEN_PATH names {os.environ.get('RAY_AUTH_TOKEN_PATH')!r}, which "
                         f"cannot be read or is empty: {GET_THE_TOKEN}") from None


def token_source() -> str:
    """Where the token sent came from, in the order Ray's loader looks (for messages: never the token)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def refused(address: str, sent_token: bool) -> str:
    """The one line for a cluster that answered 401 (no token sent) or 403 (not its token)."""
    if sent_token:
        why = f"the token from {token_source()} is not this cluster's"
    else:
        why = "it has token authentication on and no token was found here"
    return f"gss submit: the Ray cluster at {address} refused the request: {why}; {GET_THE_TOKEN}"


def connect(address: str, headers: dict[str, str]):
    """A JobSubmissionClient of the cluster at `address` (which checks that its dashboard answers)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise  # the cluster answered: submit_main words it
    except ConnectionError:  # what Ray makes of requests' ConnectionError: nothing listens, no such host
        raise SystemExit(f"gss submit: no Ray cluster answers at {address}; open the tunnel to its dashboard "
                         "(`ray dashboard ray_cluster.yaml`, or `kubectl port-forward` on GKE) or start one "
                         "(`ray up ray_cluster.yaml`)") from None
    except Exception as e:  # noqa: BLE001 - a 404 from another server, a 5xx, a timeout
        raise SystemExit(f"gss submit: {address} answered, but not as a Ray dashboard's job API "
                         f"({' '.join(str(e).split())})") from None


def submit_when_an_agent_answers(client, timeout_s: float = 120.0, **job) -> str:
    """`client.submit_job(**job)`, tried again while the head answers "No available agent": its job agent is
    still starting (a cluster just brought up, a busy head), and the head itself waits only 10 s for one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("gss submit: the cluster's job agent is not up yet; trying again", file=sys.stderr, flush=True)
            time.sleep(2)


def submit_main(args: argparse.Namespace, commands: list[str]) -> None:
    from ray.exceptions import AuthenticationError

    address = args.address or os.environ.get("RAY_ADDRESS", "") or DEFAULT_ADDRESS
    if not address.startswith("http"):
        raise SystemExit(f"gss submit: --address must be the dashboard's http:// URL, not {address!r}")
    headers = auth_headers()
    try:
        talk_to(connect(address, headers), address, args, commands)
    except AuthenticationError:  # 401 or 403, at the first request or any later one
        raise SystemExit(refused(address, sent_token=bool(headers))) from None


def talk_to(client, address: str, args: argparse.Namespace, commands: list[str]) -> None:
    from ray.job_submission import JobStatus

    if args.status:
        print(client.get_job_status(args.status).value)
        return
    if args.logs:
        print(client.get_job_logs(args.logs), end="")
        return
    if args.stop:
        print(f"stop requested: {client.stop_job(args.stop)}")
        return

    job_id = submit_when_an_agent_answers(client, entrypoint=entrypoint(args.command, commands),
                                          runtime_env=runtime_env(), metadata={"gss": shlex.join(args.command)})
    print(f"submitted {job_id} to {address}\n  status: gss submit --status {job_id}\n"
          f"  logs:   gss submit --logs {job_id}\n  stop:   gss submit --stop {job_id}", flush=True)
    if not args.wait:
        return

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status is final
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    if status != JobStatus.SUCCEEDED:
        sys.exit(1)
