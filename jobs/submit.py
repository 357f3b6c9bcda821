"""`gss submit`: run any `gss` command on a Ray cluster through the Ray Jobs API.

The project folder travels as the job's working directory (so the cluster runs this exact code and
these configs); MLflow and storage settings travel as environment variables. Credentials do not: the
cluster's nodes get them from their service account and Kubernetes secrets (infra/README.md).
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
# settings that say where things are, never secrets
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "GOOGLE_CLOUD_PROJECT", "PJRT_DEVICE")
EXCLUDES = [".venv", ".venv-xla", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
            "benchmarks/results"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard through `ray dashboard ray_cluster.yaml` or a tunnel


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
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = args.address or os.environ.get("RAY_ADDRESS", "") or DEFAULT_ADDRESS
    if not address.startswith("http"):
        raise SystemExit(f"gss submit: --address must be the dashboard's http:// URL, not {address!r}")
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection errors come in several types
        raise SystemExit(f"gss submit: no Ray cluster answers at {address} ({e}); start one (`ray up "
                         "ray_cluster.yaml`) and open a tunnel (`ray dashboard ray_cluster.yaml`)") from None
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
