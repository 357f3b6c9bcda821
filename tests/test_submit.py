"""`gss submit` through the Ray Jobs API of a real local cluster (its dashboard)."""

import re

import pytest

from jobs.cli import command_names, main
from jobs.submit import entrypoint


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
