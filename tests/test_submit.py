"""`gss submit` through the Ray Jobs API of a real local cluster (its dashboard), and against a head with Ray's
token authentication on, as ray_cluster.yaml and infra/kuberay run theirs."""

import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs.cli import command_names, main
from jobs.submit import entrypoint, runtime_env
from tests.ray_head import free_port, ray_head, without_ray_auth

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dashboard(ray_cluster) -> str:
    import ray

    url = ray._private.worker.global_worker.node.address_info["webui_url"]  # no public accessor
    assert url, "the local Ray cluster has no dashboard: install ray[default] (a project dependency)"
    return url if url.startswith("http") else f"http://{url}"


def test_a_gss_command_runs_on_the_cluster_and_can_be_looked_up(dashboard, capsys):
    main(["submit", "--address", dashboard, "--", "gss", "params", "small-gss"])
    out = capsys.readouterr().out
    assert "small-gss" in out and "4.6M" in out and "SUCCEEDED" in out
    job_id = re.search(r"submitted (\S+)", out).group(1)
    main(["submit", "--address", dashboard, "--status", job_id])
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    main(["submit", "--address", dashboard, "--logs", job_id])
    assert "small-gss" in capsys.readouterr().out


def test_a_failing_command_fails_the_submit(dashboard):
    with pytest.raises(SystemExit) as failed:
        main(["submit", "--address", dashboard, "--", "gss", "params", "no-such-preset"])
    assert failed.value.code == 1


def test_only_gss_commands_are_submitted():
    commands = [c for c in command_names() if c != "submit"]
    assert entrypoint(["--", "gss", "run", "configs/local.yaml", "name=x y"], commands) == (
        "python -m jobs.cli run configs/local.yaml 'name=x y'")
    for bad in (["--", "ls"], ["gss", "frobnicate"], ["gss", "submit"], []):
        with pytest.raises(SystemExit, match="give the command after --"):
            entrypoint(bad, commands)


# ---------------------------------------------------------------------------------------------------
# Ray's token authentication: a head started as `ray up` starts one, `gss submit` as a user runs it


@dataclasses.dataclass
class TokenHead:
    url: str  # the dashboard's
    token: str
    process: subprocess.Popen
    log: Path

    def state(self) -> str:
        """For failure messages: is the head still up (a failure may be its death, not `gss submit`'s)."""
        if self.process.poll() is None:
            return "(the head is up)"
        return f"(the head ended, {self.process.returncode}: {self.log.read_text()[-3000:]})"


def answers_only_with_a_token(url: str) -> bool:
    """The dashboard at `url` serves, and refuses a request without a token."""
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=5)
        raise AssertionError("the dashboard answered without a token: token authentication is off")
    except urllib.error.HTTPError as e:
        return e.code == 401
    except OSError:
        return False


@pytest.fixture(scope="module")
def token_head():
    """A Ray head with token authentication on, started as ray_cluster.yaml's
    head_start_ray_commands start one (`RAY_AUTH_MODE=token ray start --head`), its token one of ours.

    Its own HOME, temp dir and ports, so the session's `ray_cluster` and the user's ~/.ray are untouched."""
    from tests.corpus import fresh_process_env

    root = Path(tempfile.mkdtemp(prefix="gss-auth-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    env = without_ray_auth(fresh_process_env()) | {
        "HOME": str(root), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python`
    try:
        with ray_head(root / "head.log", env, answers_only_with_a_token, f"--temp-dir={root / 'ray'}") as (url, head):
            yield TokenHead(url, token, head, root / "head.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def gss_submit(home: Path, *args: str, **token_env: str) -> subprocess.CompletedProcess:
    """`gss submit ARGS` as a user runs it: HOME `home` (its ~/.ray/auth_token or none), no token settings but
    `token_env`."""
    from tests.corpus import fresh_process_env

    env = without_ray_auth(fresh_process_env()) | {"HOME": str(home)} | token_env
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def one_line(done: subprocess.CompletedProcess, head: TokenHead | None = None) -> str:
    """The failed command's message: one line, the last of its stderr, `gss submit: ...`."""
    context = (done.stdout[-2000:], done.stderr[-3000:], head.state() if head else "")
    assert done.returncode == 1, context
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("gss submit: "), context
    assert [ln for ln in done.stderr.splitlines() if "gss submit:" in ln] == [line], context
    return line


def test_submit_sends_the_token_from_where_ray_looks(token_head, tmp_path):
    url, token = token_head.url, token_head.token
    done = gss_submit(tmp_path, "--address", url, "--", "gss", "params", "small-gss", RAY_AUTH_TOKEN=token)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:], token_head.state())
    assert "small-gss" in done.stdout and "SUCCEEDED" in done.stdout
    assert token not in done.stdout + done.stderr, "the token is never printed"
    job_id = re.search(r"submitted (\S+)", done.stdout).group(1)

    (tmp_path / "elsewhere").write_text(token + "\n")  # as `ray get-auth-token > FILE` or an editor leaves it
    by_path = gss_submit(tmp_path, "--address", url, "--status", job_id,
                         RAY_AUTH_TOKEN_PATH=str(tmp_path / "elsewhere"))
    assert by_path.stdout.strip() == "SUCCEEDED", (by_path.stderr[-2000:], token_head.state())

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(token)  # ~/.ray/auth_token: where the README puts it
    by_file = gss_submit(tmp_path, "--address", url, "--status", job_id)
    assert by_file.stdout.strip() == "SUCCEEDED", (by_file.stderr[-2000:], token_head.state())


def test_a_cluster_that_refuses_the_token_says_so_and_how_to_get_it(token_head, tmp_path):
    url = token_head.url
    none = one_line(gss_submit(tmp_path, "--address", url, "--", "gss", "params", "small-gss"), token_head)
    assert none.startswith(f"gss submit: the Ray cluster at {url} refused the request: it has token authentication "
                           "on and no token was found here;"), none
    wrong = one_line(gss_submit(tmp_path, "--address", url, "--", "gss", "params", "small-gss",
                                RAY_AUTH_TOKEN=secrets.token_hex(32)), token_head)
    assert wrong.startswith(f"gss submit: the Ray cluster at {url} refused the request: the token from "
                            "RAY_AUTH_TOKEN is not this cluster's;"), wrong
    for line in (none, wrong):
        assert "no Ray cluster answers" not in line
        for how in ("~/.ray/auth_token", "ray get-auth-token", "RAY_AUTH_TOKEN", "ray-auth-token Secret"):
            assert how in line, (how, line)
    missing = one_line(gss_submit(tmp_path, "--address", url, "--status", "x",
                                  RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-such-file")))
    assert "RAY_AUTH_TOKEN_PATH names" in missing and "cannot be read or is empty" in missing


def test_an_address_where_nothing_listens(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    line = one_line(gss_submit(tmp_path, "--address", address, "--", "gss", "params", "small-gss"))
    assert line.startswith(f"gss submit: no Ray cluster answers at {address};") and "ray up ray_cluster.yaml" in line


def test_the_token_stays_out_of_the_job(monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert runtime_env()["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
